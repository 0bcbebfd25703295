"""The query parameters of `/v1/listen` that the emulator understands, parsed and checked.

Lenient where Deepgram is lenient (a missing model, sample rate or channel count gets Deepgram's
default; unknown parameters are kept and ignored) and strict where a typo would otherwise go
unnoticed: a malformed boolean or number is an HTTP 400 at the handshake, as Deepgram answers.
A missing or unknown encoding is accepted at the handshake but the first audio is then undecodable
(close 1008), which is what happens to raw PCM sent to Deepgram without `encoding`. linear16, mulaw
and alaw are decoded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import parse_qsl

from .events import SAMPLE_WIDTH

DEFAULT_MODEL = "base"  # Deepgram's documented default when `model` is omitted
DEFAULT_ENDPOINTING_MS = 10  # what `endpointing=true` means on Deepgram


class OptionError(ValueError):
    """A query parameter Deepgram would reject with HTTP 400."""


def _bool(name: str, value: str) -> bool:
    v = value.strip().lower()
    if v == "true":
        return True
    if v == "false":
        return False
    raise OptionError(f"{name} must be true or false, got {value!r}")


def _int(name: str, value: str, low: int, high: int) -> int:
    try:
        n = int(value)
    except ValueError:
        raise OptionError(f"{name} must be an integer, got {value!r}") from None
    if not low <= n <= high:
        raise OptionError(f"{name} must be between {low} and {high}, got {n}")
    return n


@dataclass(frozen=True, slots=True)
class ListenOptions:
    model: str = DEFAULT_MODEL
    encoding: str | None = None
    sample_rate: int = 16000
    channels: int = 1
    multichannel: bool = False
    interim_results: bool = False
    vad_events: bool = False
    utterance_end_ms: int | None = None
    # None = no early finals. Deepgram's own default is 10 ms, but applying it by default would make
    # the marker engine's final cadence depend on silence; the emulator endpoints only when asked.
    endpointing_ms: int | None = None
    punctuate: bool = False
    smart_format: bool = False
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def decodable(self) -> bool:
        return self.encoding in SAMPLE_WIDTH

    @property
    def sample_width(self) -> int:
        return SAMPLE_WIDTH.get(self.encoding or "", 2)

    @classmethod
    def from_query(cls, query: str) -> ListenOptions:
        known: dict[str, object] = {}
        extra: dict[str, str] = {}
        for name, value in parse_qsl(query, keep_blank_values=True):
            if name == "model":
                known["model"] = value or DEFAULT_MODEL
            elif name == "encoding":
                known["encoding"] = value.lower()
            elif name == "sample_rate":
                known["sample_rate"] = _int(name, value, 8000, 192000)
            elif name == "channels":
                known["channels"] = _int(name, value, 1, 16)
            elif name in ("interim_results", "vad_events", "punctuate", "smart_format", "multichannel"):
                known[name] = _bool(name, value)
            elif name == "utterance_end_ms":
                known[name] = _int(name, value, 1, 600_000)
            elif name == "endpointing":
                low = value.strip().lower()
                if low == "false":
                    known["endpointing_ms"] = None
                elif low == "true":
                    known["endpointing_ms"] = DEFAULT_ENDPOINTING_MS
                else:
                    known["endpointing_ms"] = _int(name, value, 0, 600_000) or None
            else:
                extra[name] = value
        return cls(extra=extra, **known)  # type: ignore[arg-type]
