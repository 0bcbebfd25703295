"""The rules of one session, as a state machine with no I/O.

Everything a session decides lives here: which frames to send and when, which frames a final
covers and therefore what to commit, which events to publish, which entries to reject, when to
send KeepAlive, when a connection is half-open, whether a failure is worth a reconnect and after
how long, where a new connection starts reading, and how the session ends. The asyncio runner
(worker/session_runner.py) feeds inputs in and performs the actions that come out, the way
python-websockets keeps the WebSocket protocol in a sans-I/O `protocol.py` and does the I/O
elsewhere. Nothing here awaits, sleeps, reads a clock or talks to Redis: `now` is an argument, so
every rule is unit-tested (tests/test_session_machine.py) without processes or timing.

Inputs                                   Outputs (actions)
------                                   -----------------
begin(options_error)                     Publish (session_started), Connect | End
commit_point(seq, id)  (read from Redis  Note (it went backwards)
   before every connection: the
   authority, adopted even when lower)
connected(now, request_id)               ReadAudio (catch-up from the commit point)
caught_up(entries, now)                  Send, Publish (gap), RejectEntry, Finalize,
                                         ReadAudio | Follow | CloseInput
live(entries, now), inbox_overflowed()   Send, Publish, RejectEntry, Finalize, CloseInput | ReadAudio
live_inline(entries, now)                the payload to send at once, or None (take the slow path)
live_wait(now)                           seconds to let live frames gather (send interval)
written(last_seq)  (a Send performed)    - (finals may now cover those frames)
input_broken(detail, now)                CloseInput (the audio key cannot be read: fatal input)
message(msg, now)   (decoded Deepgram)   CommitFinal | Publish | Note
commit_result(commit, result)            Abort (stale) | nothing
tick(now)                                KeepAlive | Abort (stalled) | CloseInput (abandoned)
closed(now)  (server closed normally)    End | Abort (closed early)
failed(failure, now)                     Publish (error) + End | Reconnect(delay)
reconnecting()  (the delay is over)      Connect
end_refused()   (Redis is behind us)     Connect
fail_crash_loop(takeovers)               Publish (error) + End

The delivery rules (docs/architecture.md has the why):

* A frame is committed only when a final covers it; a final and the frames it covers are one
  fenced Commit. A new connection rewinds to the first uncommitted frame (`committed_seq + 1`)
  and re-reads the audio stream after the commit point's entry id.
* Redis's commit point is the authority. A commit whose reply was lost can put Redis ahead of us;
  Redis losing its last writes (appendfsync everysec and a power loss, failover to a lagging
  replica) can put it behind. Either way the machine adopts it before the next connection and
  replays from there; going backwards is reported (`Note("commit_point_regressed")`).
* Session time is seq-exact: Deepgram restarts its clock at 0 per connection; the ledger adds
  the offset of the first frame sent on that connection.
* Bad input: a bad entry is rejected alone (error event + dead letter) and the session goes on;
  input the session cannot survive (a seq gap over the limit, a session over its maximum length)
  first flushes what was sent (Finalize, CloseStream, wait for the last finals), then fails.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from producer import protocol as p
from producer.options import validate_thresholds
from worker import deepgram_messages as dm
from worker.backoff import Backoff
from worker.events import EventFactory
from worker.failures import Failure
from worker.flow import CatchupPacer, LinkClock
from worker.ledger import Admission, Commit, FrameLedger, stream_id_key

Entry = tuple[bytes, dict[bytes, bytes]]

CATCHUP_BATCH = 256  # entries per catch-up read (XRANGE COUNT)
STARTED_FLAG = "started_published"


# ------------------------------------------------------------------------------------- settings


@dataclass(frozen=True, slots=True)
class Rules:
    """The knobs of a session's rules (a slice of the worker's Settings)."""

    frame_seconds: float = 0.02
    frame_bytes: int = 640
    max_gap_frames: int = 250  # a longer gap (5 s at 20 ms) is a broken producer, not a blip
    max_session_seconds: float = 4 * 3600
    idle_timeout: float = 60.0
    max_retries: int = 8
    max_frames_per_message: int = 12
    keepalive_seconds: float = 4.0
    stall_seconds: float = 10.0
    close_timeout: float = 15.0  # CloseStream sent: the server must close within this
    catchup_speed: float = 1.25
    catchup_burst_seconds: float = 2.0
    backoff_initial: float = 0.2
    backoff_max: float = 10.0
    send_interval: float = 0.0  # seconds: hold live frames this long to send fewer, larger messages
    channels: int = 1  # 2: Deepgram finalizes each channel on its own (per-channel commit marks)
    silence_byte: int = 0  # what fills a gap: 0 in linear16, 0xFF in μ-law, 0xD5 in A-law
    # Deepgram Flux (v2): turns instead of finals; see `_turn_info`.
    flux: bool = False
    # Silence after the last turn is committed on Flux's Updates, but only up to this far behind
    # the audio Flux has heard: a turn is declared some time after its speech begins, and a replay
    # must start before that speech.
    flux_idle_guard: float = 2.0

    @classmethod
    def from_settings(cls, settings: Any, fmt: p.AudioFormat, flux: bool = False) -> Rules:
        interval_ms = settings.flux_send_interval_ms if flux else settings.send_interval_ms
        return cls(
            frame_seconds=fmt.frame_seconds,
            frame_bytes=fmt.frame_bytes,
            max_session_seconds=settings.max_session_seconds,
            idle_timeout=settings.idle_timeout,
            max_retries=settings.max_retries,
            max_frames_per_message=settings.max_frames_per_message,
            keepalive_seconds=settings.keepalive_seconds,
            stall_seconds=settings.stall_seconds,
            close_timeout=settings.close_timeout,
            catchup_speed=settings.catchup_speed,
            catchup_burst_seconds=settings.catchup_burst_seconds,
            backoff_initial=settings.backoff_initial,
            backoff_max=settings.backoff_max,
            send_interval=interval_ms / 1000,
            channels=fmt.channels,
            silence_byte=fmt.silence_byte,
            flux=flux,
        )


@dataclass(frozen=True, slots=True)
class Resume:
    """Where an owner starts: the session as Redis has it when the lease was acquired."""

    epoch: int
    committed_seq: int = -1
    committed_id: bytes = b"0-0"
    finals: int = 0
    marks: tuple[int, ...] = ()  # per channel (multichannel): each channel's last committed frame


# -------------------------------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True)
class Publish:
    """A best-effort event (fenced). `once`: a flag that makes it at most once per session."""

    event: dict[str, Any]
    once: str = ""


@dataclass(frozen=True, slots=True)
class CommitFinal:
    """Publish `event` (None: a final with no words) and move the commit point, in one fenced step."""

    commit: Commit
    event: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class RejectEntry:
    """One bad audio entry: an error event and a dead letter, once per entry (fenced)."""

    entry_id: bytes
    reason: str
    event: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Connect:
    """Read the commit point from Redis (feed it to `commit_point`), then open a connection."""


@dataclass(frozen=True, slots=True)
class ReadAudio:
    """Read up to `count` audio entries after `after` from Redis and feed them to `caught_up`."""

    after: bytes
    count: int = CATCHUP_BATCH


@dataclass(frozen=True, slots=True)
class Follow:
    """Hand the stream to the live reader from `after` on; its entries go to `live`."""

    after: bytes


@dataclass(frozen=True, slots=True)
class Send:
    """One WebSocket message of audio, not before `not_before` (catch-up pacing)."""

    payload: bytes
    frames: int
    not_before: float
    last_seq: int  # report it with `written` once the message is on the wire


@dataclass(frozen=True, slots=True)
class KeepAlive:
    pass


@dataclass(frozen=True, slots=True)
class Finalize:
    """Send Deepgram's Finalize (a producer's `finalize` entry): the audio sent so far comes back
    as finals now, flagged from_finalize. Comes after the Sends of the frames before the entry."""


@dataclass(frozen=True, slots=True)
class ForceEndTurn:
    """Send Flux's ForceEndTurn (a `force_end_turn` or `finalize` entry of a Flux session): the turn
    in progress ends now. Comes after the Sends of the frames before the entry."""


@dataclass(frozen=True, slots=True)
class Configure:
    """Send Flux's Configure with these thresholds (a `configure` entry, or the session's saved
    thresholds at the start of a connection)."""

    thresholds: dict[str, str]


@dataclass(frozen=True, slots=True)
class SaveConfigure:
    """Keep the session's current thresholds in Redis (fenced), for its next connection or owner."""

    thresholds: dict[str, str]


@dataclass(frozen=True, slots=True)
class CloseInput:
    """No more audio: Finalize, CloseStream, then read until the server closes (feed `closed`)."""


@dataclass(frozen=True, slots=True)
class Abort:
    """Drop this connection; the failure then goes to `failed`."""

    failure: Failure


@dataclass(frozen=True, slots=True)
class Reconnect:
    """Wait `delay` seconds, then Connect again."""

    delay: float
    failure: Failure


@dataclass(frozen=True, slots=True)
class End:
    """Finish the session in one fenced step: session_ended, status, lease acked, TTLs."""

    status: str  # ended | failed
    reason: str  # completed | abandoned | failed | rejected
    frames: int
    finals: int
    event: dict[str, Any]
    detail: str = ""
    dead_reason: str = ""
    # A normal end is refused ('stale') unless Redis's commit point is at least this: had Redis
    # lost commits after the last one we made, ending now would lose their finals for good.
    expect_committed: int | None = None


@dataclass(frozen=True, slots=True)
class Note:
    """Something the operator should know (the runner logs it and counts it)."""

    what: str
    level: str
    fields: dict[str, Any]


Action = (
    Publish
    | CommitFinal
    | RejectEntry
    | Connect
    | ReadAudio
    | Follow
    | Send
    | KeepAlive
    | Finalize
    | ForceEndTurn
    | Configure
    | SaveConfigure
    | CloseInput
    | Abort
    | Reconnect
    | End
    | Note
)


class Phase(Enum):
    NEW = "new"
    CONNECTING = "connecting"  # Connect asked for; waiting for commit_point + connected/failed
    CATCHING_UP = "catching_up"  # reading the backlog from Redis
    LIVE = "live"  # following the stream with the live reader
    CLOSING = "closing"  # CloseInput sent; waiting for the server to close
    RETRYING = "retrying"  # a connection failed; Reconnect asked for
    ENDED = "ended"


# Deepgram messages that answer audio: a connection that got one of these worked (`failed`).
AUDIO_REPLIES = (dm.Results, dm.SpeechStarted, dm.UtteranceEnd, dm.Metadata, dm.TurnInfo)


class MachineError(RuntimeError):
    """An input that is not allowed in the machine's current phase: a bug in the runner."""


@dataclass(frozen=True, slots=True)
class _Closing:
    """Why input stopped: the outcome once the server has closed."""

    status: str
    reason: str
    detail: str = ""
    dead_reason: str = ""
    error_code: str = ""


# -------------------------------------------------------------------------------------- machine


@dataclass(slots=True)
class SessionMachine:
    sid: str
    rules: Rules
    resume: Resume
    rng: random.Random = field(default_factory=random.Random)
    phase: Phase = Phase.NEW
    ledger: FrameLedger = field(init=False)
    events: EventFactory = field(init=False)
    finals: int = field(init=False)
    errors: int = 0
    committed_at_failure: int = -1  # the commit point at the last failure (progress since?)
    attempts: int = 0  # failed connections in a row (a connection that got replies resets it)
    replies: int = 0  # replies on the current connection
    last_read_id: bytes = field(init=False)
    last_input_at: float = 0.0
    input_seen_to: bytes = b"0-0"  # the furthest audio entry ever read (replays read below it)
    end_seen: bool = False
    closing: _Closing | None = None
    closing_since: float = 0.0
    next_send_at: float = 0.0  # with a send interval: when live frames may next be taken
    finalized_at: int = -1  # ledger.next_seq when Finalize was last sent on this connection
    request_id: str = ""
    commit_point_fresh: bool = False  # read from Redis since the last connection ended
    pacer: CatchupPacer = field(init=False)
    clock: LinkClock = field(init=False)
    backoff: Backoff = field(init=False)
    silence: bytes = field(init=False)
    turn_open: bool = False  # Flux: a turn started on this connection and has not ended
    # With a send interval: live frames taken inline and recorded as sent, not written yet, so that
    # they go out together (`live_inline`); `held_since` is when the first of them came in.
    held: list[bytes] = field(default_factory=list)
    held_since: float = 0.0
    configure: dict[str, str] = field(default_factory=dict)  # Flux: thresholds set mid-session

    def __post_init__(self) -> None:
        r = self.rules
        self.ledger = FrameLedger.resume(
            self.resume.committed_seq,
            self.resume.committed_id,
            r.frame_seconds,
            r.channels,
            list(self.resume.marks),
        )
        self.events = EventFactory(self.sid, self.resume.epoch, self.ledger, r.channels)
        self.finals = self.resume.finals
        self.committed_at_failure = self.resume.committed_seq
        self.last_read_id = self.ledger.committed_id
        self.pacer = CatchupPacer(r.catchup_speed, r.catchup_burst_seconds)
        self.clock = LinkClock(r.keepalive_seconds, r.stall_seconds)
        self.backoff = Backoff(r.backoff_initial, r.backoff_max, rng=self.rng)
        self.silence = bytes([r.silence_byte]) * r.frame_bytes

    @property
    def epoch(self) -> int:
        return self.resume.epoch

    @property
    def frames(self) -> int:
        """Frames of the session so far: every frame sent, and at least every frame committed."""
        return max(self.ledger.next_seq, self.ledger.committed_seq + 1)

    # ---------------------------------------------------------------------------------- lifecycle

    def begin(
        self, now: float, started: dict[str, Any], options_error: p.ProtocolError | None = None
    ) -> list[Action]:
        """The session starts: `started` is its session_started event (built by the runner from the
        session entry, `events.session_started`); `options_error` a refusal of its options."""
        self._expect(Phase.NEW)
        self.last_input_at = now
        if options_error is not None:
            return self._end(
                _Closing(
                    p.STATUS_FAILED,
                    p.END_REJECTED,
                    str(options_error),
                    f"{options_error.code}: {options_error}",
                    options_error.code,
                )
            )
        self.phase = Phase.CONNECTING
        return [Publish(started, once=STARTED_FLAG), Connect()]

    def commit_point(
        self,
        seq: int,
        entry_id: bytes,
        finals: int | None = None,
        marks: list[int] | None = None,
        configure: dict[str, str] | None = None,
    ) -> list[Note]:
        """Redis's commit point, read just before a connection opens. Redis is the authority:
        ahead of us (a commit whose reply was lost) or behind (Redis lost its last writes), it is
        adopted, and the next connection replays from it. With several channels, `marks` are each
        channel's committed marks as Redis has them (adopted the same way)."""
        self._expect(Phase.CONNECTING)
        self.commit_point_fresh = True
        ledger = self.ledger
        notes: list[Note] = []
        if seq < ledger.committed_seq:
            notes.append(
                Note(
                    "commit_point_regressed",
                    "warning",
                    {
                        "ours": ledger.committed_seq,
                        "redis": seq,
                        "replaying_frames": ledger.committed_seq - seq,
                    },
                )
            )
        ledger.committed_seq, ledger.committed_id = seq, entry_id
        if self.rules.channels > 1:
            ledger.adopt_marks(seq, marks or [], self.rules.channels)
        if finals is not None:
            self.finals = finals
        if configure:
            # Thresholds a `configure` entry set, kept in Redis: what Redis has is the latest
            # (our own saves reach it before the Configure is sent), and a new owner has no other.
            try:
                self.configure = validate_thresholds(configure)
            except p.ProtocolError as exc:
                notes.append(Note("saved_configure_ignored", "warning", {"reason": str(exc)}))
        return notes

    def connected(self, now: float, request_id: str = "") -> list[Action]:
        """The connection is open; `request_id` is Deepgram's from the handshake (dg-request-id)."""
        self._expect(Phase.CONNECTING)
        if not self.commit_point_fresh:
            raise MachineError("connected() before the commit point was read from Redis")
        self.commit_point_fresh = False
        self.ledger.rewind()
        self.last_read_id = self.ledger.committed_id
        self.pacer.start(now)
        self.clock.start(now)
        self.replies = 0
        self.request_id = request_id
        self.finalized_at = -1
        self.turn_open = False
        self.held = []  # recorded as sent on the last connection, never written: replayed
        if self.closing is not None:
            # Input had already stopped (end marker, fatal input) when the connection failed:
            # replay up to the same point and close again. The catch-up read finds that point.
            self.closing = None
            self.end_seen = False
        self.phase = Phase.CATCHING_UP
        if self.rules.flux and self.configure:
            # A new connection starts with the query's thresholds: re-apply the session's own.
            return [Configure(dict(self.configure)), ReadAudio(self.last_read_id)]
        return [ReadAudio(self.last_read_id)]

    # ---------------------------------------------------------------------------------- audio

    def caught_up(self, entries: list[Entry], now: float, count: int = CATCHUP_BATCH) -> list[Action]:
        """A catch-up read's entries (at most `count`; fewer means the stream's end was reached)."""
        self._expect(Phase.CATCHING_UP)
        actions = self._process(entries, now)
        if self.phase is Phase.CATCHING_UP:
            if len(entries) < count:
                self.phase = Phase.LIVE
                actions.append(Follow(self.last_read_id))
            else:
                actions.append(ReadAudio(self.last_read_id, count))
        return actions

    def written(self, last_seq: int) -> None:
        """A Send was performed: its frames (up to `last_seq`) are on the wire, and a final may
        now cover them."""
        self.ledger.mark_written(last_seq)

    def live_wait(self, now: float) -> float:
        """Seconds to let live frames accumulate before taking them (the send interval: fewer,
        larger messages for that much latency). 0 = take them now."""
        if not self.rules.send_interval:
            return 0.0
        return max(0.0, self.next_send_at - now)

    def live(self, entries: list[Entry], now: float) -> list[Action]:
        if self.phase is not Phase.LIVE:  # delivered after the connection moved on: re-read later
            return []
        if self.rules.send_interval:
            self.next_send_at = now + self.rules.send_interval
        return self._process(entries, now)

    def input_broken(self, detail: str, now: float) -> list[Action]:
        """The audio stream cannot be read at all (its key holds another type): input the session
        cannot survive; what was sent is flushed first, as for any fatal input."""
        if self.phase not in (Phase.CATCHING_UP, Phase.LIVE):
            return []
        return self._fatal_input([], detail, now)

    def inbox_overflowed(self, now: float = 0.0) -> list[Action]:
        """The live reader's buffer overflowed (Deepgram slower than the producer): go back to
        reading from Redis, where everything still is (after the frames held back, sent first)."""
        if self.phase is not Phase.LIVE:
            return []
        actions: list[Action] = []
        self._flush_held(now, actions)
        self.phase = Phase.CATCHING_UP
        actions.append(ReadAudio(self.last_read_id))
        return actions

    def live_inline(self, entries: list[Entry], now: float) -> bytes | None:
        """The hot path: fresh entries that are exactly the next well-formed frames, on a live
        connection with no pacing due, are sent from the reader's task as one message. Returns
        the payload (already recorded as sent), or None to decline (the entries then go through
        `live`, which handles everything else).

        With a send interval the frames are held (recorded as sent, not written; b"" is returned)
        until the interval's worth of frames is there, or the first held one has waited the whole
        interval (`tick` sends them then): fewer, larger messages, still from the reader's task."""
        if self.phase is not Phase.LIVE:
            return None
        rules = self.rules
        frame_bytes = rules.frame_bytes
        seq = self.ledger.next_seq
        if len(entries) + len(self.held) > rules.max_frames_per_message:
            return None
        frames: list[bytes] = []
        for _, fields in entries:
            pcm = fields.get(b"pcm")
            if (
                len(fields) != 2
                or pcm is None
                or len(pcm) != frame_bytes
                or fields.get(b"seq") != b"%d" % seq
            ):
                return None
            frames.append(pcm)
            seq += 1
        if seq * rules.frame_seconds > rules.max_session_seconds:
            return None
        seconds = len(frames) * rules.frame_seconds
        if self.pacer.delay(seconds, now) > 0:
            return None
        record = self.ledger.record_sent
        for (entry_id, _), _pcm in zip(entries, frames, strict=True):
            record(self.ledger.next_seq, entry_id)
        self.last_read_id = entries[-1][0]
        self.last_input_at = now
        self.input_seen_to = entries[-1][0]
        if rules.send_interval:
            if not self.held:
                self.held_since = now
            self.held.extend(frames)
            if len(self.held) < self.hold_frames and now - self.held_since < rules.send_interval:
                return b""
            frames, self.held = self.held, []
            seconds = len(frames) * rules.frame_seconds
        # Written at once: the send that follows writes to the transport before its first await.
        self.ledger.mark_written(self.ledger.next_seq - 1)
        self.pacer.sent(seconds)
        self.clock.audio_sent(now)
        return frames[0] if len(frames) == 1 else b"".join(frames)

    @property
    def hold_frames(self) -> int:
        """Frames per message a send interval aims at (40 ms of 20 ms frames: 2)."""
        return max(1, round(self.rules.send_interval / self.rules.frame_seconds))

    def _flush_held(self, now: float, actions: list[Action]) -> None:
        """Frames held back by `live_inline` go out first: they are the last ones recorded."""
        if self.held:
            frames, self.held = self.held, []
            self._flush(frames, now, actions)

    def _process(self, entries: list[Entry], now: float) -> list[Action]:
        """Decodes entries in stream order and turns them into actions."""
        if entries and stream_id_key(entries[-1][0]) > stream_id_key(self.input_seen_to):
            # New input. Entries a replay reads again, or an empty read, are no sign of a producer:
            # a session whose connections keep failing over old audio must still be found idle.
            self.last_input_at = now
            self.input_seen_to = entries[-1][0]
        ledger = self.ledger
        rules = self.rules
        actions: list[Action] = []
        self._flush_held(now, actions)  # before anything else is recorded: stream order
        batch: list[bytes] = []
        for index, (entry_id, fields) in enumerate(entries):
            self.last_read_id = entry_id
            try:
                item = decode_audio_entry(fields, rules.frame_bytes)
            except p.ProtocolError as exc:
                actions.append(self._reject(entry_id, exc.code, str(exc)))
                continue
            if isinstance(item, p.ConfigureMarker | p.ForceEndTurnMarker) and not rules.flux:
                actions.append(
                    self._reject(entry_id, "not_flux", "control entry for Flux sessions (model flux-…) only")
                )
                continue
            if isinstance(item, p.ConfigureMarker):
                try:
                    thresholds = validate_thresholds(item.thresholds)
                except p.ProtocolError as exc:
                    actions.append(self._reject(entry_id, exc.code, str(exc)))
                    continue
                self._flush(batch, now, actions)
                batch = []
                self.configure = {**self.configure, **thresholds}
                # Saved before it is sent: a new connection or owner then starts with it even if
                # this one dies right after sending it.
                actions.append(SaveConfigure(dict(self.configure)))
                actions.append(Configure(thresholds))
                continue
            if isinstance(item, p.FinalizeMarker | p.ForceEndTurnMarker):
                # Only when frames went out since the last one: a burst of finalize entries (or
                # one with nothing before it) costs Deepgram nothing. A replay re-sends it, and
                # the finals that answer are committed like any other.
                if ledger.next_seq != self.finalized_at and ledger.next_seq > ledger.connection_base_seq:
                    self._flush(batch, now, actions)
                    batch = []
                    self.finalized_at = ledger.next_seq
                    # On Flux, `finalize` means what ForceEndTurn does: the words so far, final now.
                    actions.append(ForceEndTurn() if rules.flux else Finalize())
                continue
            if isinstance(item, p.EndMarker):
                self.end_seen = True
                self._flush(batch, now, actions)  # every way out of this branch returns
                # Whatever follows the end marker is off-contract: say so, once per entry.
                for late_id, _ in entries[index + 1 :]:
                    actions.append(
                        self._reject(late_id, "after_end", "entry appended after the end marker; ignored")
                    )
                # `frames` is the count of frames sent: last seq + 1. Any difference from what
                # arrived is reported (end_mismatch, not fatal): more declared than arrived pads
                # the missing tail with silence (up to max_gap_frames, beyond which the session
                # fails like any gap); fewer declared than arrived changes nothing (every frame
                # that arrived was sent on).
                declared = item.frames
                arrived = ledger.next_seq
                if declared is not None and declared != arrived:
                    missing = declared - arrived
                    if missing > rules.max_gap_frames:
                        detail = f"end marker says {declared} frames were sent, but only {arrived} arrived"
                        return self._fatal_input(actions, detail, now)
                    if missing > 0:
                        message = (
                            f"end marker says {declared} frames were sent, but only {arrived} arrived; "
                            f"frames {arrived}..{declared - 1} were sent to Deepgram as silence"
                        )
                    else:
                        message = (
                            f"end marker says {declared} frames were sent, but {arrived} arrived "
                            f"(seq 0..{arrived - 1}); all of them were transcribed"
                        )
                    event = self.events.error("end_mismatch", message, False, declared)
                    actions.append(Publish(event, once="end_mismatch"))
                    if missing > 0:
                        self._fill_silence(missing, now, actions)
                return self._stop_input(actions, _Closing(p.STATUS_ENDED, p.END_COMPLETED), now)
            admission, missing = ledger.admit(item.seq)
            if admission is Admission.DUPLICATE:
                continue
            if admission is Admission.GAP:
                if missing > rules.max_gap_frames:
                    self._flush(batch, now, actions)
                    detail = f"frames {ledger.next_seq}..{item.seq - 1} never arrived ({missing} frames)"
                    return self._fatal_input(actions, detail, now)
                self._flush(batch, now, actions)
                batch = []
                self._fill_gap(missing, item.seq, now, actions)
            if (item.seq + 1) * rules.frame_seconds > rules.max_session_seconds:
                self._flush(batch, now, actions)
                return self._fatal_input(
                    actions, f"session is longer than {rules.max_session_seconds:g} s", now
                )
            ledger.record_sent(item.seq, entry_id)
            batch.append(item.pcm)
        self._flush(batch, now, actions)
        return actions

    def _flush(self, frames: list[bytes], now: float, actions: list[Action]) -> None:
        """Frames to Send actions: at most max_frames_per_message per message, paced."""
        if not frames:
            return
        step = self.rules.max_frames_per_message
        frame_s = self.rules.frame_seconds
        last_seq = self.ledger.next_seq - len(frames) - 1  # the frames were just recorded as sent
        for i in range(0, len(frames), step):
            chunk = frames[i : i + step]
            seconds = len(chunk) * frame_s
            delay = self.pacer.delay(seconds, now)
            self.pacer.sent(seconds)
            payload = chunk[0] if len(chunk) == 1 else b"".join(chunk)
            last_seq += len(chunk)
            actions.append(Send(payload, len(chunk), now + delay, last_seq))
        self.clock.audio_sent(now)

    def _fill_gap(self, missing: int, before_seq: int, now: float, actions: list[Action]) -> None:
        """Missing frames become silence so later timestamps stay seq-exact; reported once."""
        first = self.ledger.next_seq
        event = self.events.error(
            "seq_gap",
            f"{missing} frame(s) before seq {before_seq} never arrived; sent silence in their place",
            False,
            first,
        )
        actions.append(Publish(event, once=f"gap:{first}"))
        self._fill_silence(missing, now, actions)

    def _fill_silence(self, missing: int, now: float, actions: list[Action]) -> None:
        fill = []
        for _ in range(missing):
            fill.append(self.silence)
            self.ledger.record_sent(self.ledger.next_seq, None)
        self._flush(fill, now, actions)

    def _reject(self, entry_id: bytes, code: str, reason: str) -> RejectEntry:
        self.errors += 1
        name = entry_id.decode(errors="replace")
        event = self.events.error(code, f"entry {name}: {reason}", False, self.errors)
        event["id"] = p.event_id(self.sid, p.ERROR, f"{code}/{name}")
        return RejectEntry(entry_id, f"{code}: {reason}", event)

    def _fatal_input(self, actions: list[Action], detail: str, now: float) -> list[Action]:
        """Input the session cannot survive: keep what was sent (flush it through Deepgram and
        commit its finals), then fail."""
        self.end_seen = True
        closing = _Closing(p.STATUS_FAILED, p.END_FAILED, detail, f"bad_input: {detail}", "bad_input")
        return self._stop_input(actions, closing, now)

    def _stop_input(self, actions: list[Action], closing: _Closing, now: float) -> list[Action]:
        self._flush_held(now, actions)  # frames held back are sent before the stream is closed
        self.closing = closing
        self.closing_since = now
        self.phase = Phase.CLOSING
        actions.append(CloseInput())
        return actions

    # ---------------------------------------------------------------------------------- timers

    def tick(self, now: float) -> list[Action]:
        """Time passes with no input: stall watchdog, KeepAlive, idleness."""
        if self.phase not in (Phase.CATCHING_UP, Phase.LIVE, Phase.CLOSING):
            return []
        if self.clock.stalled(now):
            stall = self.rules.stall_seconds
            return [Abort(Failure(False, "stalled", f"no reply from Deepgram for {stall:g} s"))]
        actions: list[Action] = []
        if self.phase is Phase.CLOSING:
            if now - self.closing_since >= self.rules.close_timeout:
                return [Abort(Failure(False, "stalled", "Deepgram did not close after CloseStream"))]
            return actions
        if self.held and now - self.held_since >= self.rules.send_interval:
            self._flush_held(now, actions)
        if self.clock.keepalive_due(now):
            self.clock.keepalive_sent(now)
            if not self.rules.flux:  # Flux's protocol has no KeepAlive message
                actions.append(KeepAlive())
        if self.phase is Phase.LIVE and now - self.last_input_at >= self.rules.idle_timeout:
            actions.append(Note("abandoned", "warning", {"idle_s": self.rules.idle_timeout}))
            self._stop_input(actions, _Closing(p.STATUS_ENDED, p.END_ABANDONED), now)
        return actions

    def next_tick_in(self, now: float) -> float:
        """How long the runner may wait for input before `tick` could have something to do."""
        wait = self.clock.next_check_in(now)
        if self.held:
            wait = min(wait, max(self.held_since + self.rules.send_interval - now, 0.001))
        if self.phase is Phase.LIVE:
            wait = min(wait, max(self.rules.idle_timeout - (now - self.last_input_at), 0.01))
        elif self.phase is Phase.CLOSING:
            wait = min(wait, max(self.rules.close_timeout - (now - self.closing_since), 0.01))
        return wait

    # ---------------------------------------------------------------------------------- deepgram

    def message(self, msg: dm.Message | dm.MessageV2, now: float) -> list[Action]:
        """A decoded message from Deepgram on the current connection."""
        if self.phase not in (Phase.CATCHING_UP, Phase.LIVE, Phase.CLOSING):
            return []
        self.clock.reply_received(now)
        if isinstance(msg, dm.Connected):
            # Flux's greeting, on every connection before any audio: no sign the stream works, so
            # not a reply for the retry rule (counted, a server that greets and then fails would
            # look like progress every time and be retried forever).
            self.request_id = msg.request_id or self.request_id
            return []
        if isinstance(msg, dm.ConfigureReply):  # an answer to our Configure, not to audio
            if msg.ok:
                return []
            self.errors += 1
            text = f"Deepgram refused a configure: {msg.code or 'no code'}: {msg.description}"[:500]
            return [Publish(self.events.error("configure_failed", text, False, self.errors))]
        if isinstance(msg, AUDIO_REPLIES):
            # Only answers to audio count for the retry rule: an error message before a close
            # would otherwise make every failing connection look like progress.
            self.replies += 1
        if isinstance(msg, dm.TurnInfo):
            return self._turn_info(msg)
        if isinstance(msg, dm.FluxWarning | dm.FatalError):
            what = "deepgram_warning" if isinstance(msg, dm.FluxWarning) else "deepgram_error_message"
            return [Note(what, "warning", {"code": msg.code, "description": msg.description[:500]})]
        if isinstance(msg, dm.Results):
            if msg.metadata is not None:
                self.request_id = msg.metadata.request_id
            alts = msg.channel.alternatives
            # One channel: whatever channel_index says. Several: each channel commits on its own.
            channel = msg.channel_number if self.rules.channels > 1 else 0
            if channel >= self.rules.channels:
                return [Note("unknown_channel", "warning", {"channel_index": msg.channel_index})]
            if msg.is_final:
                commit = self.ledger.channel_coverage(channel, msg.start, msg.duration)
                has_words = bool(alts and alts[0].transcript)
                if commit is None:
                    if has_words and self.rules.channels == 1:
                        # Deepgram's finals come in order and each ends past the last: one that
                        # covers nothing new (out of order, zero length) cannot be committed once;
                        # its words are dropped, loudly. (With two channels, a channel replaying
                        # frames its own mark already covers is normal.)
                        fields = {
                            "start": msg.start,
                            "duration": msg.duration,
                            "committed_seq": self.ledger.committed_seq,
                        }
                        return [Note("final_covers_nothing_new", "warning", fields)]
                    return []
                event = self.events.transcript(msg, commit, channel) if has_words else None
                if event is not None and not event["words"] and not event["transcript"]:
                    event = None  # every word of it was published already (a channel replaying)
                return [CommitFinal(commit, event)]
            if alts and alts[0].transcript:
                return [Publish(self.events.transcript(msg, None, channel))]
            return []
        if isinstance(msg, dm.SpeechStarted):
            return [Publish(self.events.speech_started(msg, self.request_id))]
        if isinstance(msg, dm.UtteranceEnd):
            return [Publish(self.events.utterance_end(msg, self.request_id))]
        if isinstance(msg, dm.Metadata):
            return []
        return [
            Note(
                "deepgram_error_message",
                "warning",
                {"variant": getattr(msg, "variant", ""), "description": getattr(msg, "description", "")},
            )
        ]

    def _turn_info(self, msg: dm.TurnInfo) -> list[Action]:
        """Flux's turn events. EndOfTurn is Flux's final: it is committed together with the frames
        up to its audio window's end, in one fenced step, so a new connection or owner replays from
        the end of the last committed turn and each turn ends exactly once. The turn index is the
        count of turns committed before it (Deepgram's restarts at 0 on every connection, and a
        replayed turn must keep its number); every other event of a turn carries the index that
        turn will have. Events of other kinds are best effort."""
        ledger = self.ledger
        if msg.event == "EndOfTurn":
            self.turn_open = False
            commit = ledger.coverage(0.0, msg.audio_window_end)
            if commit is None:
                if msg.transcript:
                    fields = {"audio_window_end": msg.audio_window_end, "committed_seq": ledger.committed_seq}
                    return [Note("turn_end_covers_nothing_new", "warning", fields)]
                return []
            if not msg.transcript and not msg.words:
                return [CommitFinal(commit, None)]  # an empty turn: its frames are done, nothing to say
            return [CommitFinal(commit, self.events.turn(msg, self.finals, commit, self.request_id))]
        if msg.event == "Update" and not msg.transcript:
            if self.turn_open:
                return []
            # No turn in progress: the audio Flux has heard, but for the guard, holds no speech.
            commit = ledger.coverage(0.0, max(0.0, msg.audio_window_end - self.rules.flux_idle_guard))
            return [CommitFinal(commit, None)] if commit is not None else []
        actions: list[Action] = []
        if msg.event == "StartOfTurn" and ledger.seq_at(msg.audio_window_start) <= ledger.committed_seq:
            # The guard was too short for this turn: a replay would start inside it.
            fields = {"audio_window_start": msg.audio_window_start, "committed_seq": ledger.committed_seq}
            actions.append(Note("turn_started_before_commit_point", "warning", fields))
        self.turn_open = True
        actions.append(Publish(self.events.turn(msg, self.finals, None, self.request_id)))
        return actions

    def clean_close(self, code: int | None) -> bool:
        """Whether a close frame with this code, received while closing, is the server's normal end
        of the stream. Flux closes after CloseStream without a status code (1005; websockets
        already counts that as a normal close, other clients may not); a close without any frame
        (1006) is a dropped connection either way, and is replayed."""
        if code in (1000, 1001):
            return True
        return self.rules.flux and code == 1005 and self.phase is Phase.CLOSING

    def unreadable_message(self, now: float) -> None:
        """A message that could not be decoded: still a sign of life from the server."""
        self.clock.reply_received(now)
        self.replies += 1

    def commit_result(self, commit: CommitFinal, result: str) -> list[Action]:
        """What Redis said to a CommitFinal: ok, dup (already there: a retry after a lost reply),
        or stale (Redis's commit point is not where we thought: re-read it and replay). Fenced
        never comes here: the runner stops the session without writing."""
        if result == "stale":
            return [
                Abort(
                    Failure(False, "stale_commit_point", "commit point moved in Redis: replaying from there")
                )
            ]
        if result not in ("ok", "dup"):
            raise MachineError(f"unknown commit result {result!r}")
        self.ledger.apply(commit.commit)
        # `dup` on a live connection is our own COMMIT retried after its reply was lost: Redis
        # published that final (and counted it), so count it too.
        if commit.event is not None:
            self.finals += 1
        return []

    def closed(self, now: float) -> list[Action]:
        """The server closed the connection normally (1000)."""
        if self.phase is Phase.CLOSING and self.closing is not None:
            return self._end(self.closing)
        if self.phase in (Phase.CATCHING_UP, Phase.LIVE):
            return [
                Abort(Failure(False, "closed_early", "Deepgram closed the stream before it was asked to"))
            ]
        return []

    def failed(self, failure: Failure, now: float) -> list[Action]:
        """The connection failed (handshake refused, dropped, stalled, closed early, aborted)."""
        if self.phase is Phase.ENDED:
            return []
        self.commit_point_fresh = False
        if failure.fatal:
            return self._end(
                _Closing(
                    p.STATUS_FAILED,
                    p.END_FAILED,
                    str(failure),
                    str(failure),  # "<code>: <message>", like every dead letter's reason
                    failure.code,
                ),
                error_message=failure.reason,
            )
        # Count failures in a row without progress, not in a lifetime. Progress is a commit since
        # the last failure; a connection that got replies with nothing to replay (a quiet
        # producer, kept alive) also worked. Replies alone are not enough: a connection that
        # sends a partial and then dies at the same point of the audio every time would be
        # retried forever (the replies are this connection's: a failed handshake has none).
        progressed = self.ledger.committed_seq > self.committed_at_failure or (
            self.replies > 0 and self.ledger.pending_frames == 0
        )
        self.committed_at_failure = self.ledger.committed_seq
        self.attempts = 1 if progressed else self.attempts + 1
        self.replies = 0
        if self.attempts > self.rules.max_retries:
            return self._end(
                _Closing(
                    p.STATUS_FAILED,
                    p.END_FAILED,
                    f"gave up after {self.attempts} attempts: {failure}",
                    f"{failure.code}: gave up after {self.attempts} attempts: {failure.reason}",
                    failure.code,
                ),
                error_message=failure.reason,
            )
        if self.attempts == 1:
            self.backoff.reset()
        self.phase = Phase.RETRYING
        return [Reconnect(self.backoff.next_delay(), failure)]

    def reconnecting(self) -> list[Action]:
        """The Reconnect delay is over."""
        self._expect(Phase.RETRYING)
        self.phase = Phase.CONNECTING
        return [Connect()]

    # ---------------------------------------------------------------------------------- ending

    def fail_crash_loop(self, takeovers: int) -> list[Action]:
        """The session's owners keep dying before any progress: fail it without connecting."""
        self._expect(Phase.NEW)
        detail = f"taken over {takeovers} times without progress: crash loop"
        return self._end(
            _Closing(p.STATUS_FAILED, p.END_FAILED, detail, f"crash_loop: {detail}", "crash_loop")
        )

    def _end(self, closing: _Closing, error_message: str = "") -> list[Action]:
        actions: list[Action] = []
        if closing.error_code:
            self.errors += 1
            event = self.events.error(closing.error_code, error_message or closing.detail, True, self.errors)
            actions.append(Publish(event))
        frames = self.frames
        ended = self.events.session_ended(closing.reason, frames, self.finals, closing.detail)
        normal = closing.status == p.STATUS_ENDED
        actions.append(
            End(
                closing.status,
                closing.reason,
                frames,
                self.finals,
                ended,
                closing.detail,
                closing.dead_reason,
                self.ledger.committed_seq if normal else None,
            )
        )
        self.phase = Phase.ENDED
        return actions

    def end_refused(self) -> list[Action]:
        """Redis refused a normal End: its commit point is behind ours (it lost writes after our
        last commit). Replay from Redis's commit point and end again, so no final is lost."""
        self._expect(Phase.ENDED)
        self.phase = Phase.CONNECTING
        self.closing = None
        self.end_seen = False
        return [Connect()]

    def _expect(self, phase: Phase) -> None:
        if self.phase is not phase:
            raise MachineError(f"input not allowed in phase {self.phase.value} (expected {phase.value})")


# ------------------------------------------------------------------------------------ decoding


def decode_audio_entry(raw: dict[bytes, bytes], frame_bytes: int) -> p.AudioItem:
    """producer.protocol's decoder, with any unexpected exception turned into a rejection of that
    one entry: nothing a producer writes may stop a session, let alone a worker."""
    try:
        return p.decode_audio_entry(raw, frame_bytes)
    except p.ProtocolError:
        raise
    except Exception as exc:
        raise p.ProtocolError("bad_entry", f"undecodable audio entry ({type(exc).__name__})") from None
