"""What a recognition engine hears, independent of how it is put on the wire.

Engines (`marker`, `speech`) turn audio into these plain values and know nothing about JSON,
sockets or Deepgram's message shapes; `messages.py` renders them. Keeping the two apart lets the
marker engine be unit-tested as a pure function of its input bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol

# Every engine speaks in 20 ms frames: the size of a frame follows the connection's declared format.
FRAME_MS = 20


# Bytes per sample of each encoding the engines decode (docs/protocol.md, formats).
SAMPLE_WIDTH = {"linear16": 2, "mulaw": 1, "alaw": 1}


class FrameCutter:
    """Cuts a connection's byte stream into whole units (frames, or sample groups): a partial unit
    waits for the rest of its bytes in the next message, as on Deepgram, where message boundaries
    carry no meaning."""

    __slots__ = ("rest", "unit")

    def __init__(self, unit: int) -> None:
        self.unit = unit
        self.rest = b""

    def take(self, data: bytes) -> tuple[bytes, int]:
        """`data` after what was left over, and how many of its leading bytes are whole units (the
        remainder is kept for the next call)."""
        if self.rest:
            data = self.rest + data
            self.rest = b""
        whole = len(data) - len(data) % self.unit
        if whole != len(data):
            self.rest = data[whole:]
        return data, whole


def frame_bytes_for(sample_rate: int, channels: int, sample_width: int = 2) -> int:
    return sample_rate * channels * sample_width * FRAME_MS // 1000


def seconds(value: float) -> float:
    """Deepgram-style time: seconds, rounded so that float noise never reaches the client."""
    return round(value, 6)


class Word(NamedTuple):
    # A NamedTuple, not a frozen dataclass: thousands are built per second and tuples build fastest.
    word: str
    start: float
    end: float
    confidence: float
    punctuated_word: str


@dataclass(frozen=True, slots=True)
class Transcript:
    """One `Results` message: the audio in [start, start + duration) and the words heard in it."""

    start: float
    duration: float
    is_final: bool
    speech_final: bool
    words: tuple[Word, ...]
    from_finalize: bool = False
    # The punctuated transcript when the engine formats text; None means "the words joined".
    text: str | None = None


@dataclass(frozen=True, slots=True)
class SpeechStarted:
    timestamp: float


@dataclass(frozen=True, slots=True)
class UtteranceEnd:
    last_word_end: float


@dataclass(frozen=True, slots=True)
class ChannelTagged:
    """An event of one channel of a multichannel connection (`channels.ChannelSplitter`)."""

    channel: int
    event: Transcript | SpeechStarted | UtteranceEnd


Event = Transcript | SpeechStarted | UtteranceEnd | ChannelTagged


class BadAudio(Exception):
    """The audio cannot be decoded: the server closes with 1008 and this message as the reason."""


class Engine(Protocol):
    """The interface the server drives; one engine instance per connection."""

    # True when feed() does CPU-heavy work that must run in a thread, off the event loop.
    blocking: bool
    # Arrival lags (ns) of timestamped marker frames, drained by the server into its stats.
    lag_ns: list[int]

    def feed(self, data: bytes, now_ns: int = 0) -> list[Event]: ...

    def finalize(self) -> list[Event]: ...

    def close_stream(self) -> list[Event]: ...

    def audio_seconds(self) -> float: ...

    def release(self) -> None: ...
