"""The wire contract between producers, workers and transcript readers.

Everything that names a Redis key, a stream field or an event field lives here, so that
docs/protocol.md, the producer library and the worker cannot drift apart. Nothing here does I/O.
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass, field
from typing import Any, Final

import msgpack

PROTOCOL_VERSION: Final = 1
DEFAULT_NAMESPACE: Final = "vq"
WORKERS_GROUP: Final = "workers"

# Fields of a `sessions` stream entry.
F_SID: Final = "sid"
F_ENCODING: Final = "encoding"
F_SAMPLE_RATE: Final = "sample_rate"
F_CHANNELS: Final = "channels"
F_FRAME_MS: Final = "frame_ms"
F_OPTIONS: Final = "options"  # JSON object of Deepgram query options
F_LABELS: Final = "labels"  # JSON object of str -> str
F_VERSION: Final = "v"
SESSION_FIELDS: Final = frozenset(
    {F_SID, F_ENCODING, F_SAMPLE_RATE, F_CHANNELS, F_FRAME_MS, F_OPTIONS, F_LABELS, F_VERSION}
)
REQUIRED_SESSION_FIELDS: Final = frozenset({F_SID})
# Bounds checked BEFORE parsing `options` and `labels` (docs/protocol.md, section 2): a session entry
# comes from a less trusted producer, and a huge or deeply nested JSON value costs the worker memory
# and stack (Python's json recursion). The allow-listed options fit easily in 64 KiB (7 list options
# of at most 100 values of 256 characters); labels are a flat map, so depth 1 is all they need.
MAX_OPTIONS_BYTES: Final = 65_536
MAX_LABELS_BYTES: Final = 16_384
MAX_OPTIONS_DEPTH: Final = 2  # {"keywords": ["a", "b"]}
MAX_LABELS_DEPTH: Final = 1  # {"team": "x"}

# Fields of an audio stream entry: a frame carries `seq` and `pcm`; the end marker carries `end`.
F_SEQ: Final = "seq"
F_PCM: Final = "pcm"
F_END: Final = "end"
F_END_FRAMES: Final = "frames"  # optional on the end marker: how many frames the producer sent
FRAME_FIELDS: Final = frozenset({F_SEQ, F_PCM})
END_FIELDS: Final = frozenset({F_END, F_END_FRAMES})
# A control entry: `finalize` asks the worker to send Deepgram's Finalize after the frames before
# it, so the words said so far come back as finals now (flagged `from_finalize`), not at the next
# pause. The session goes on. Its value is ignored ("1" by convention).
F_FINALIZE: Final = "finalize"
FINALIZE_FIELDS: Final = frozenset({F_FINALIZE})
# Control entries of Flux sessions (model `flux-…`, Deepgram's v2 API). `force_end_turn` ends the
# turn in progress now (Deepgram's ForceEndTurn: its EndOfTurn carries trigger `manual`); its value
# is ignored. `configure` changes end-of-turn thresholds mid-session (Deepgram's Configure): its
# value is a JSON object of `eager_eot_threshold`, `eot_threshold`, `eot_timeout_ms`.
F_FORCE_END_TURN: Final = "force_end_turn"
F_CONFIGURE: Final = "configure"
MAX_CONFIGURE_BYTES: Final = 1024

# Fields of a results stream entry. `e` holds the whole event as msgpack; the others repeat a few
# values as plain strings so that `redis-cli XRANGE` is readable and consumers can filter cheaply.
R_EVENT: Final = "e"
R_TYPE: Final = "type"
R_SID: Final = "sid"
R_TEXT: Final = "text"

# Event types.
SESSION_STARTED: Final = "session_started"
PARTIAL: Final = "partial"
FINAL: Final = "final"
SPEECH_STARTED: Final = "speech_started"
UTTERANCE_END: Final = "utterance_end"
TURN: Final = "turn"  # Flux sessions: one per TurnInfo (EndOfTurn is the committed one)
SESSION_ENDED: Final = "session_ended"
ERROR: Final = "error"
EVENT_TYPES: Final = frozenset(
    {SESSION_STARTED, PARTIAL, FINAL, SPEECH_STARTED, UTTERANCE_END, TURN, SESSION_ENDED, ERROR}
)

# Session statuses kept in the state hash.
STATUS_ACTIVE: Final = "active"
STATUS_ENDED: Final = "ended"
STATUS_FAILED: Final = "failed"

# Reasons carried by `session_ended`.
END_COMPLETED: Final = "completed"
END_ABANDONED: Final = "abandoned"
END_FAILED: Final = "failed"
END_REJECTED: Final = "rejected"


# The deployment settings hash, `NS:deployment`: what every producer and worker of a namespace must
# agree on. Values are decimal strings.
D_PARTITIONS: Final = "partitions"
D_PROTOCOL: Final = "protocol"


class DeploymentMismatch(RuntimeError):
    """This process's namespace settings disagree with the deployment's (`NS:deployment`)."""


def check_deployment(stored: dict[bytes, bytes] | dict[str, str], keys: Keys) -> None:
    """Raises DeploymentMismatch if the stored deployment settings (HGETALL of keys.deployment(),
    possibly empty: nothing stored yet) disagree with `keys` and this protocol version."""
    fields = {_text(k): _text(v) for k, v in stored.items()}
    ours = {D_PARTITIONS: str(keys.partitions), D_PROTOCOL: str(PROTOCOL_VERSION)}
    wrong = [
        f"{name} {fields[name]} there, {value} here"
        for name, value in ours.items()
        if name in fields and fields[name] != value
    ]
    if wrong:
        raise DeploymentMismatch(
            f"namespace {keys.namespace!r} is deployed with other settings ({keys.deployment()}: "
            + "; ".join(wrong)
            + "): use the deployment's partition count (VOXQUEUE_PARTITIONS / --partitions)"
        )


def partition_of(sid: str, partitions: int) -> int:
    """Stable partition of a session: CRC-32 (IEEE, as zlib/Go/Java compute it) of the UTF-8 id mod P."""
    return zlib.crc32(sid.encode()) % partitions


@dataclass(frozen=True, slots=True)
class Keys:
    """Key names of one deployment. All keys of a partition share the hash tag `{p<N>}`."""

    namespace: str = DEFAULT_NAMESPACE
    partitions: int = 1

    def tag(self, partition: int) -> str:
        return f"{self.namespace}:{{p{partition}}}"

    def sessions(self, partition: int) -> str:
        return f"{self.tag(partition)}:sessions"

    def results(self, partition: int) -> str:
        return f"{self.tag(partition)}:results"

    def dead(self, partition: int) -> str:
        return f"{self.tag(partition)}:dead"

    def partition(self, sid: str) -> int:
        return partition_of(sid, self.partitions)

    def deployment(self) -> str:
        """The deployment's settings hash (DEPLOYMENT_FIELDS): workers write it at start-up, and
        producers read it to check that they agree (docs/protocol.md §1). No hash tag: one key for
        the whole deployment, read rarely."""
        return f"{self.namespace}:deployment"

    def epochs(self, partition: int) -> str:
        """The partition's fencing-token counter (workers only): every epoch any session of the
        partition gets is drawn from it, so an epoch is never handed out twice, even when a session's
        state hash vanished and was made anew."""
        return f"{self.tag(partition)}:epochs"

    def session(self, sid: str) -> SessionKeys:
        return self.session_in(sid, self.partition(sid))

    def session_in(self, sid: str, p: int) -> SessionKeys:
        """The keys `sid` would have in partition `p`: its real ones only when p is its partition
        (the others name where a producer with a wrong partition count wrote)."""
        base = f"{self.tag(p)}:s:{sid}"
        return SessionKeys(
            sid=sid,
            partition=p,
            audio=f"{base}:audio",
            state=f"{base}:state",
            results=f"{base}:results",
            sessions=self.sessions(p),
            partition_results=self.results(p),
            dead=self.dead(p),
            epochs=self.epochs(p),
        )

    def all_sessions(self) -> list[str]:
        return [self.sessions(p) for p in range(self.partitions)]

    def all_results(self) -> list[str]:
        return [self.results(p) for p in range(self.partitions)]


@dataclass(frozen=True, slots=True)
class SessionKeys:
    sid: str
    partition: int
    audio: str
    state: str
    results: str
    sessions: str
    partition_results: str
    dead: str
    epochs: str = ""


class ProtocolError(ValueError):
    """An entry that does not follow the wire contract (bad input from a producer)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


# Encodings a session may use: bytes per sample, and the sample rates each is taken at. Deepgram
# takes all of these natively, so the worker passes the format on unchanged (no resampling on the
# hot path). Telephony μ-law/A-law is 8 kHz by definition (G.711); linear16 covers telephony,
# wideband, WebRTC (48 kHz) and CD (44.1 kHz) audio. docs/protocol.md has the table of frame sizes.
SAMPLE_WIDTH: Final[dict[str, int]] = {"linear16": 2, "mulaw": 1, "alaw": 1}
SAMPLE_RATES: Final[dict[str, tuple[int, ...]]] = {
    "linear16": (8000, 16000, 24000, 32000, 44100, 48000),
    "mulaw": (8000,),
    "alaw": (8000,),
}
MAX_CHANNELS: Final = 2
SILENCE_BYTE: Final[dict[str, int]] = {"linear16": 0x00, "mulaw": 0xFF, "alaw": 0xD5}


@dataclass(frozen=True, slots=True)
class AudioFormat:
    """A session's audio: `channels` interleaved samples of `encoding` at `sample_rate`, cut into
    frames of `frame_ms` (every frame exactly `frame_bytes`)."""

    encoding: str = "linear16"
    sample_rate: int = 16000
    channels: int = 1
    frame_ms: int = 20

    @property
    def sample_width(self) -> int:
        return SAMPLE_WIDTH.get(self.encoding, 2)

    @property
    def frame_bytes(self) -> int:
        return self.sample_rate * self.channels * self.sample_width * self.frame_ms // 1000

    @property
    def frame_seconds(self) -> float:
        return self.frame_ms / 1000.0

    @property
    def silence_byte(self) -> int:
        """The byte value of silence: 0 in linear16, 0xFF in μ-law, 0xD5 in A-law (a zero byte
        there is a loud sample)."""
        return SILENCE_BYTE.get(self.encoding, 0)

    @property
    def bytes_per_second(self) -> int:
        return self.sample_rate * self.channels * self.sample_width

    def validate(self) -> None:
        """Raises ProtocolError(`bad_format`) for a combination the contract does not carry."""
        rates = SAMPLE_RATES.get(self.encoding)
        if rates is None:
            raise ProtocolError(
                "bad_format",
                f"encoding {self.encoding[:20]!r} is not supported (one of {', '.join(SAMPLE_RATES)})",
            )
        if self.sample_rate not in rates:
            allowed = ", ".join(str(r) for r in rates)
            raise ProtocolError(
                "bad_format",
                f"sample_rate {self.sample_rate} is not supported for {self.encoding} ({allowed})",
            )
        if not 1 <= self.channels <= MAX_CHANNELS:
            raise ProtocolError(
                "bad_format", f"channels {self.channels} is not supported (1 to {MAX_CHANNELS})"
            )
        # A frame must hold a whole number of samples: 44.1 kHz needs frame_ms a multiple of 10.
        if not 10 <= self.frame_ms <= 250 or (self.sample_rate * self.frame_ms) % 1000:
            raise ProtocolError(
                "bad_format",
                f"frame_ms {self.frame_ms} is not supported at {self.sample_rate} Hz "
                "(10..250, a whole number of samples per frame)",
            )


@dataclass(frozen=True, slots=True)
class SessionStart:
    """The `sessions` stream entry that announces a session."""

    sid: str
    format: AudioFormat = field(default_factory=AudioFormat)
    options: dict[str, Any] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)

    def to_fields(self) -> dict[str, str]:
        """The entry's fields; raises ProtocolError if options or labels exceed the size limits."""
        options = json.dumps(self.options, separators=(",", ":"), sort_keys=True)
        labels = json.dumps(self.labels, separators=(",", ":"), sort_keys=True)
        for name, text, limit in (
            ("options", options, MAX_OPTIONS_BYTES),
            ("labels", labels, MAX_LABELS_BYTES),
        ):
            if len(text.encode()) > limit:
                raise ProtocolError(
                    f"bad_{name}", f"`{name}` is {len(text.encode())} bytes; at most {limit} allowed"
                )
        return {
            F_SID: self.sid,
            F_ENCODING: self.format.encoding,
            F_SAMPLE_RATE: str(self.format.sample_rate),
            F_CHANNELS: str(self.format.channels),
            F_FRAME_MS: str(self.format.frame_ms),
            F_OPTIONS: options,
            F_LABELS: labels,
            F_VERSION: str(PROTOCOL_VERSION),
        }

    @classmethod
    def from_fields(cls, raw: dict[bytes, bytes] | dict[str, str]) -> SessionStart:
        fields = {_text(k): v for k, v in raw.items()}
        # First: a later version may add fields, and must be told it is not spoken, not that its
        # fields are unknown. `v` absent means 1.
        version = fields.get(F_VERSION)
        if version is not None and _text(version) != str(PROTOCOL_VERSION):
            raise ProtocolError(
                "bad_version",
                f"protocol version {_text(version)[:20]!r} is not spoken here (only {PROTOCOL_VERSION})",
            )
        unknown = set(fields) - SESSION_FIELDS
        if unknown:
            raise ProtocolError("unknown_fields", f"session entry has unknown fields: {sorted(unknown)}")
        missing = REQUIRED_SESSION_FIELDS - set(fields)
        if missing:
            raise ProtocolError("missing_fields", f"session entry lacks fields: {sorted(missing)}")
        sid = _text(fields[F_SID])
        validate_sid(sid)
        try:
            fmt = AudioFormat(
                encoding=_text(fields.get(F_ENCODING, "linear16")),
                sample_rate=int(fields.get(F_SAMPLE_RATE, 16000)),
                channels=int(fields.get(F_CHANNELS, 1)),
                frame_ms=int(fields.get(F_FRAME_MS, 20)),
            )
        except ValueError as exc:
            raise ProtocolError("bad_format", f"audio format fields are not integers: {exc}") from None
        fmt.validate()
        options = _json_object(fields.get(F_OPTIONS), "options", MAX_OPTIONS_BYTES, MAX_OPTIONS_DEPTH)
        labels = _json_object(fields.get(F_LABELS), "labels", MAX_LABELS_BYTES, MAX_LABELS_DEPTH)
        if not all(isinstance(v, str) for v in labels.values()):
            raise ProtocolError("bad_labels", "labels must map strings to strings")
        return cls(sid=sid, format=fmt, options=options, labels=labels)


MAX_SID_LENGTH: Final = 128


def validate_sid(sid: str) -> None:
    """A session id becomes part of key names: keep it printable and free of hash-tag braces."""
    if not sid or len(sid) > MAX_SID_LENGTH:
        raise ProtocolError("bad_sid", f"session id must be 1..{MAX_SID_LENGTH} characters")
    if any(c in sid for c in "{}: \t\r\n") or not sid.isprintable():
        raise ProtocolError(
            "bad_sid", "session id must not contain braces, colons, whitespace or control characters"
        )


@dataclass(frozen=True, slots=True)
class Frame:
    seq: int
    pcm: bytes


@dataclass(frozen=True, slots=True)
class EndMarker:
    frames: int | None = None


@dataclass(frozen=True, slots=True)
class FinalizeMarker:
    """`finalize` control entry (see F_FINALIZE)."""


@dataclass(frozen=True, slots=True)
class ForceEndTurnMarker:
    """`force_end_turn` control entry of a Flux session (see F_FORCE_END_TURN)."""


@dataclass(frozen=True, slots=True)
class ConfigureMarker:
    """`configure` control entry of a Flux session: the thresholds as the producer wrote them
    (a JSON object; their names and ranges are checked by producer.options.validate_thresholds)."""

    thresholds: dict[str, Any]


ControlMarker = FinalizeMarker | ForceEndTurnMarker | ConfigureMarker
AudioItem = Frame | EndMarker | FinalizeMarker | ForceEndTurnMarker | ConfigureMarker


def frame_fields(seq: int, pcm: bytes) -> dict[str, bytes | str]:
    return {F_SEQ: str(seq), F_PCM: pcm}


def finalize_fields() -> dict[str, str]:
    return {F_FINALIZE: "1"}


def force_end_turn_fields() -> dict[str, str]:
    return {F_FORCE_END_TURN: "1"}


def configure_fields(thresholds: dict[str, Any]) -> dict[str, str]:
    return {F_CONFIGURE: json.dumps(thresholds, separators=(",", ":"), sort_keys=True)}


def end_fields(frames: int | None = None) -> dict[str, str]:
    out = {F_END: "1"}
    if frames is not None:
        out[F_END_FRAMES] = str(frames)
    return out


_PLAIN_SEQ: Final = re.compile(rb"0|[1-9][0-9]{0,17}")


def decode_audio_entry(raw: dict[bytes, bytes], frame_bytes: int) -> AudioItem:
    """Decode one audio stream entry, raising ProtocolError for anything off-contract."""
    if b"finalize" in raw:
        if len(raw) != 1:
            others = sorted({_text(k) for k in raw} - FINALIZE_FIELDS)
            raise ProtocolError("unknown_fields", f"finalize entry has other fields: {others}")
        return FinalizeMarker()
    if b"force_end_turn" in raw:
        if len(raw) != 1:
            others = sorted({_text(k) for k in raw} - {F_FORCE_END_TURN})
            raise ProtocolError("unknown_fields", f"force_end_turn entry has other fields: {others}")
        return ForceEndTurnMarker()
    if b"configure" in raw:
        if len(raw) != 1:
            others = sorted({_text(k) for k in raw} - {F_CONFIGURE})
            raise ProtocolError("unknown_fields", f"configure entry has other fields: {others}")
        return ConfigureMarker(_json_object(raw[b"configure"], "configure", MAX_CONFIGURE_BYTES, 1))
    if b"end" in raw:
        unknown = {_text(k) for k in raw} - END_FIELDS
        if unknown:
            raise ProtocolError("unknown_fields", f"end marker has unknown fields: {sorted(unknown)}")
        frames = raw.get(b"frames")
        if frames is None:
            return EndMarker(None)
        # The same plain decimal form as `seq`: it is the count of frames sent, last seq + 1.
        if _PLAIN_SEQ.fullmatch(frames) is None:
            raise ProtocolError(
                "bad_end", "end marker `frames` must be a decimal integer >= 0 without sign or padding"
            )
        return EndMarker(int(frames))
    pcm = raw.get(b"pcm")
    seq_raw = raw.get(b"seq")
    if pcm is None or seq_raw is None or len(raw) != 2:
        names = sorted(_text(k) for k in raw)
        raise ProtocolError(
            "bad_entry", f"audio entry must have exactly `seq` and `pcm` (or `end`), got {names}"
        )
    # Exactly the decimal form (`0|[1-9][0-9]*`): int() would also take " 5", "+9" and "0_7".
    if _PLAIN_SEQ.fullmatch(seq_raw) is None:
        raise ProtocolError("bad_seq", "frame `seq` must be a decimal integer >= 0 without sign or padding")
    seq = int(seq_raw)
    if len(pcm) != frame_bytes:
        raise ProtocolError("bad_frame_size", f"frame {seq} has {len(pcm)} bytes, expected {frame_bytes}")
    return Frame(seq, pcm)


# ----------------------------------------------------------------------------------------- events


def event_id(sid: str, kind: str, detail: str) -> str:
    """Deterministic id: the same transcript of the same frames always gets the same id."""
    return f"{sid}/{kind}/{detail}"


def encode_event(event: dict[str, Any]) -> dict[str, bytes | str]:
    """The results stream fields for one event."""
    return {
        R_TYPE: event["type"],
        R_SID: event["sid"],
        R_TEXT: event.get("transcript", "") or "",
        R_EVENT: msgpack.packb(event, use_bin_type=True),
    }


def decode_event(raw: dict[bytes, bytes]) -> dict[str, Any]:
    blob = raw.get(R_EVENT.encode())
    if blob is None:
        raise ProtocolError("bad_event", "results entry has no `e` field")
    event = msgpack.unpackb(blob, raw=False)
    if not isinstance(event, dict):
        raise ProtocolError("bad_event", "results entry `e` is not a map")
    return event


def _text(value: bytes | str) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            raise ProtocolError("bad_encoding", "entry field is not valid UTF-8") from None
    return value


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_JSON_NESTING = re.compile(rb"[\[\]{}]")


def json_depth(raw: bytes) -> int:
    """Deepest nesting of arrays/objects in a JSON text, without parsing it (no recursion): strings
    are skipped, then brackets are counted. Malformed text gets some number; json.loads judges it."""
    depth = deepest = 0
    for bracket in _JSON_NESTING.findall(_JSON_STRING.sub(b"", raw)):
        if bracket in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def _json_object(value: bytes | str | None, name: str, max_bytes: int, max_depth: int) -> dict[str, Any]:
    if value is None or value in (b"", ""):
        return {}
    raw = value if isinstance(value, bytes) else value.encode(errors="surrogatepass")
    if len(raw) > max_bytes:
        raise ProtocolError(f"bad_{name}", f"`{name}` is {len(raw)} bytes; at most {max_bytes} allowed")
    if json_depth(raw) > max_depth:
        raise ProtocolError(f"bad_{name}", f"`{name}` is nested deeper than {max_depth} levels")
    try:
        # NaN, Infinity and 1e999 (inf) still parse: options.validate_options refuses them as
        # bad_option naming the option; labels refuse anything but strings.
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ProtocolError(f"bad_{name}", f"`{name}` is not valid JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"bad_{name}", f"`{name}` must be a JSON object")
    return obj
