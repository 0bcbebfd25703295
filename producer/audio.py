"""Audio for producers, with no I/O except reading a file: re-chunking PCM into frames, reading
WAV/raw files, and the deterministic marker frames that tests and benchmarks send.

The wire carries exactly `frame_bytes` per frame (docs/protocol.md §3): a frame of the wrong size is bad
input that the worker rejects, so every byte a backend hands us goes through `FrameChunker`, which
is the only place that decides where frame boundaries fall.
"""

from __future__ import annotations

import io
import shlex
import struct
import wave
from pathlib import Path
from typing import Final

from producer.protocol import AudioFormat, Frame

# ------------------------------------------------------------------------------------ chunking


class FrameChunker:
    """Cut a PCM byte stream of arbitrary pieces into exact `frame_bytes` frames, numbered from
    `start_seq`. Any split of the same input yields the same frames, because the remainder of one
    `push` is carried into the next one instead of being padded."""

    def __init__(self, frame_bytes: int = 640, start_seq: int = 0, silence: int = 0) -> None:
        if frame_bytes <= 0:
            raise ValueError("frame_bytes must be positive")
        self.frame_bytes = frame_bytes
        self.silence = silence  # the byte that is silence in the format (AudioFormat.silence_byte)
        self.next_seq = start_seq
        self._rest = bytearray()

    @property
    def pending_bytes(self) -> int:
        """Bytes held back until a whole frame is available."""
        return len(self._rest)

    def push(self, pcm: bytes | bytearray | memoryview) -> list[Frame]:
        """Add PCM; return every frame that is now complete."""
        size = self.frame_bytes
        if not self._rest and len(pcm) % size == 0:
            # The common case (a backend that already sends whole frames): no copy into the buffer.
            data = bytes(pcm)
            count = len(data) // size
            frames = [Frame(self.next_seq + i, data[i * size : (i + 1) * size]) for i in range(count)]
            self.next_seq += len(frames)
            return frames
        self._rest += pcm
        whole = len(self._rest) // size
        frames = [
            Frame(self.next_seq + i, bytes(self._rest[i * size : (i + 1) * size])) for i in range(whole)
        ]
        del self._rest[: whole * size]
        self.next_seq += whole
        return frames

    def flush(self) -> Frame | None:
        """The held-back remainder as one last frame padded with silence, or None if there is none.

        Padding with silence (zeros in signed PCM, 0xFF in μ-law, 0xD5 in A-law) rather than
        dropping keeps every byte the backend sent; the few milliseconds of silence at the very end
        change no transcript.
        """
        if not self._rest:
            return None
        pcm = bytes(self._rest) + bytes([self.silence]) * (self.frame_bytes - len(self._rest))
        self._rest.clear()
        frame = Frame(self.next_seq, pcm)
        self.next_seq += 1
        return frame


# ------------------------------------------------------------------------------- marker frames

MARKER_MAGIC: Final = b"VQMK"
_MARKER = struct.Struct("<4sIQ")
# Byte 16 of a marker frame: turn flags, read by the emulator's Flux engine (`/v2/listen`,
# worker/emulator/flux.py) and ignored by its `/v1/listen` engine. 0 (no flags) is what every marker
# frame carried before flags existed, so a frame without flags is byte-identical to those.
MARKER_FLAGS_OFFSET: Final = _MARKER.size
MARKER_END_OF_TURN: Final = 0x01  # the speaker's turn ends after this word (EndOfTurn, trigger "model")
MARKER_EAGER: Final = 0x02  # the model is moderately sure the turn ends here (EagerEndOfTurn)


def marker_frame(
    n: int,
    sent_ns: int = 0,
    frame_bytes: int = 640,
    *,
    end_of_turn: bool = False,
    eager: bool = False,
) -> bytes:
    """A deterministic frame that says which frame it is: b"VQMK" + uint32 LE n + uint64 LE sent_ns,
    then a flags byte (`MARKER_END_OF_TURN`, `MARKER_EAGER`), zero-padded. The emulator turns it into
    the word `f<n>`, so a test can prove that every frame arrived exactly once, and `sent_ns` lets a
    benchmark measure end-to-end latency. The flags script Flux's turn detection (`/v2/listen`):
    `end_of_turn` ends the turn after this word, `eager` announces an eager end of turn after it."""
    head = _MARKER.pack(MARKER_MAGIC, n, sent_ns)
    flags = (MARKER_END_OF_TURN if end_of_turn else 0) | (MARKER_EAGER if eager else 0)
    if flags:
        head += bytes((flags,))
    if frame_bytes < len(head):
        raise ValueError(f"frame_bytes must be at least {len(head)}")
    return head + bytes(frame_bytes - len(head))


def format_marker_frame(
    fmt: AudioFormat, n: int, sent_ns: int = 0, *, end_of_turn: bool = False, eager: bool = False
) -> bytes:
    """A marker frame in any format: each channel carries its own marker (`marker_frame` of the
    channel's share of the frame), interleaved sample by sample as the format's samples are. The
    marker is raw bytes whatever the encoding (μ-law/A-law frames carry it in the encoded payload),
    which is how the emulator's marker engines read it (worker/emulator/marker.py, flux.py)."""
    channels, width = fmt.channels, fmt.sample_width
    mono = marker_frame(n, sent_ns, fmt.frame_bytes // channels, end_of_turn=end_of_turn, eager=eager)
    if channels == 1:
        return mono
    out = bytearray(fmt.frame_bytes)
    group = channels * width
    for c in range(channels):
        for k in range(width):
            out[c * width + k :: group] = mono[k::width]
    return bytes(out)


def parse_marker_frame(pcm: bytes) -> tuple[int, int] | None:
    """(n, sent_ns) of a marker frame, or None if `pcm` is not one."""
    if len(pcm) < _MARKER.size or not pcm.startswith(MARKER_MAGIC):
        return None
    _, n, sent_ns = _MARKER.unpack_from(pcm)
    return n, sent_ns


# -------------------------------------------------------------------------------------- files

RAW_SUFFIXES: Final = frozenset({".raw", ".pcm"})
WANTED: Final = (
    "16-bit PCM at 8000, 16000, 24000, 32000, 44100 or 48000 Hz, or 8000 Hz mu-law/A-law, mono or stereo"
)
_WAVE_FORMAT_ALAW: Final = 0x0006
_WAVE_FORMAT_MULAW: Final = 0x0007
_G711: Final = {_WAVE_FORMAT_ALAW: "alaw", _WAVE_FORMAT_MULAW: "mulaw"}

_WAVE_FORMAT_PCM: Final = 0x0001
_WAVE_FORMAT_IEEE_FLOAT: Final = 0x0003
_WAVE_FORMAT_EXTENSIBLE: Final = 0xFFFE
_FORMAT_NAMES: Final = {
    0x0002: "ADPCM",
    _WAVE_FORMAT_IEEE_FLOAT: "float",
    0x0006: "A-law",
    0x0007: "mu-law",
    0x0011: "IMA ADPCM",
    0x0055: "MP3",
}
# The sub-format GUID of WAVE_FORMAT_EXTENSIBLE is <format tag> followed by this fixed tail.
_GUID_TAIL: Final = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"


class AudioFileError(ValueError):
    """A file voxqueue cannot send as it is; the message says what the file is and how to fix it."""


def read_audio_file(
    path: str | Path,
    raw: bool = False,
    *,
    encoding: str | None = None,
    sample_rate: int | None = None,
    channels: int | None = None,
) -> tuple[AudioFormat, bytes]:
    """Read a WAV in any format of the wire contract (docs/protocol.md, "Audio formats": 16-bit PCM
    at a supported rate, 8 kHz μ-law or A-law; mono or stereo), or a headerless file (`raw=True`
    or a .raw/.pcm suffix) in the format given by `encoding`, `sample_rate`, `channels` (default
    16 kHz mono linear16). Returns the format and the samples as they are.

    Anything else is refused rather than converted: resampling belongs to tools made for it, and a
    silently wrong sample rate would produce a confident but wrong transcript.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AudioFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    if raw or path.suffix.lower() in RAW_SUFFIXES:
        fmt = AudioFormat(encoding or "linear16", sample_rate or 16000, channels or 1)
        try:
            fmt.validate()
        except ValueError as exc:
            raise AudioFileError(f"{path.name}: {exc}") from None
        sample_bytes = fmt.sample_width * fmt.channels
        if len(data) % sample_bytes:
            raise AudioFileError(
                f"{path.name} has {len(data)} bytes, not a whole number of {sample_bytes}-byte samples, "
                f"so it is not {fmt.encoding} with {fmt.channels} channel(s)"
            )
        return fmt, data
    kind = _sniff(data)
    if kind != "WAV":
        hint = "" if kind != "not a WAV file" else "; if it is headerless audio, use --raw"
        raise AudioFileError(
            f"{path.name} is {kind}{hint}; voxqueue needs a WAV of {WANTED} "
            f"(convert with: {_convert_hint(path, is_wav=False)})"
        )
    return _read_wav(path, data)


def _accepted(tag: int, rate: int, channels: int, bits: int) -> AudioFormat | None:
    """The session format of a WAV with these parameters, or None if the contract lacks it."""
    if tag == _WAVE_FORMAT_PCM and bits == 16:
        fmt = AudioFormat("linear16", rate, channels)
    elif tag in _G711 and bits == 8:
        fmt = AudioFormat(_G711[tag], rate, channels)
    else:
        return None
    try:
        fmt.validate()
    except ValueError:
        return None
    return fmt


def _read_wav(path: Path, data: bytes) -> tuple[AudioFormat, bytes]:
    try:
        with wave.open(io.BytesIO(data)) as w:
            rate, channels, width = w.getframerate(), w.getnchannels(), w.getsampwidth()
            fmt = _accepted(_WAVE_FORMAT_PCM, rate, channels, width * 8)
            if fmt is not None:
                return fmt, w.readframes(w.getnframes())
            raise AudioFileError(_refusal(path, rate, channels, width * 8, "PCM"))
    except (wave.Error, EOFError):
        # Python 3.11's wave refuses WAVE_FORMAT_EXTENSIBLE (and float, A-law...): read the chunks
        # ourselves, accept extensible PCM, and describe anything else precisely.
        pass
    header, samples = _riff_chunks(path, data)
    if len(header) < 16:
        raise AudioFileError(f"{path.name} is a damaged WAV file (its fmt chunk is too short)")
    tag, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", header)
    if tag == _WAVE_FORMAT_EXTENSIBLE and len(header) >= 40:
        sub = header[24:40]
        if sub.endswith(_GUID_TAIL):
            tag = struct.unpack_from("<H", sub)[0]
    found = _accepted(tag, rate, channels, bits)
    if found is not None:
        if samples is None:
            raise AudioFileError(f"{path.name} is a damaged WAV file (it has no data chunk)")
        whole = found.sample_width * found.channels
        return found, samples[: len(samples) // whole * whole]
    kind = "PCM" if tag == _WAVE_FORMAT_PCM else _FORMAT_NAMES.get(tag, f"format 0x{tag:04x}")
    raise AudioFileError(_refusal(path, rate, channels, bits, kind))


def _riff_chunks(path: Path, data: bytes) -> tuple[bytes, bytes | None]:
    """The `fmt ` and `data` chunk bodies of a RIFF/WAVE file."""
    fmt: bytes | None = None
    samples: bytes | None = None
    pos = 12
    while pos + 8 <= len(data):
        cid, size = struct.unpack_from("<4sI", data, pos)
        body = data[pos + 8 : pos + 8 + size]
        if cid == b"fmt ":
            fmt = body
        elif cid == b"data":
            samples = body
        pos += 8 + size + (size & 1)  # chunks are word-aligned
    if fmt is None:
        raise AudioFileError(f"{path.name} is a damaged WAV file (it has no fmt chunk)")
    return fmt, samples


def _refusal(path: Path, rate: int, channels: int, bits: int, kind: str) -> str:
    layout = {1: "mono", 2: "stereo"}.get(channels, f"{channels}-channel")
    return (
        f"{path.name} is {rate} Hz {layout} {bits}-bit {kind}; voxqueue needs {WANTED} "
        f"(convert with: {_convert_hint(path)})"
    )


def _convert_hint(path: Path, *, is_wav: bool = True) -> str:
    """A command that converts `path`, as given (a copy-paste from another directory must work),
    quoted for the shell, to a `-16k.wav` next to it."""
    src, out = shlex.quote(str(path)), shlex.quote(str(path.with_name(f"{path.stem}-16k.wav")))
    if is_wav:
        # `-t wav`: sox picks the input format by extension, and knows neither .wave nor .WAV files
        # whose name says otherwise.
        return f"sox -t wav {src} -r 16000 -c 1 -b 16 {out}"
    # Not a WAV (whatever its name says: sox would trust a .wav name and fail on the contents), and
    # sox often lacks MP3/M4A support; ffmpeg looks at the contents and reads everything.
    return f"ffmpeg -i {src} -ar 16000 -ac 1 -c:a pcm_s16le {out}"


def _sniff(data: bytes) -> str:
    """What a file is, from its first bytes: "WAV" or a description for the refusal message."""
    head = data[:12]
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "WAV"
    if head[:4] in (b"RF64", b"BW64"):
        return "an RF64 (64-bit) WAV file"
    if head[:3] == b"ID3" or (len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0):
        return "an MP3 file"
    if head[:4] == b"fLaC":
        return "a FLAC file"
    if head[:4] == b"OggS":
        return "an Ogg file"
    if head[4:8] == b"ftyp":
        return "an MP4/M4A file"
    if head[:4] == b"FORM":
        return "an AIFF file"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "a WebM/Matroska file"
    if not data:
        return "empty"
    return "not a WAV file"
