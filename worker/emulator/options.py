"""The query parameters of `/v1/listen` and `/v2/listen` (Flux) that the emulator understands.

Lenient where Deepgram is lenient (a missing model, sample rate or channel count gets Deepgram's
default; unknown parameters are kept and ignored) and strict where a typo would otherwise go
unnoticed: a malformed boolean or number is an HTTP 400 at the handshake, as Deepgram answers.
A missing or unknown encoding is accepted at the handshake but the first audio is then undecodable
(close 1008), which is what happens to raw PCM sent to Deepgram without `encoding`. linear16, mulaw
and alaw are decoded.

`/v2/listen` (`FluxOptions`) is stricter, as Flux is: `model` is required and must be a Flux model,
`encoding` one of Flux's, the turn thresholds within the documented ranges (`Thresholds`). Flux has
no `channels`/`multichannel`: audio is mono, and asking for more channels is a 400.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Final
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


class _Encoded:
    """What both endpoints' options say about the audio bytes: whether the engines can read them,
    and their sample width."""

    __slots__ = ()
    encoding: str | None

    @property
    def decodable(self) -> bool:
        return self.encoding in SAMPLE_WIDTH

    @property
    def sample_width(self) -> int:
        return SAMPLE_WIDTH.get(self.encoding or "", 2)


@dataclass(frozen=True, slots=True)
class ListenOptions(_Encoded):
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


# ---------------------------------------------------------------------------------- /v2/listen

FLUX_MODELS: Final = ("flux-general-en", "flux-general-multi")
FLUX_MULTILINGUAL: Final = "flux-general-multi"
FLUX_ENCODINGS: Final = ("linear16", "linear32", "mulaw", "alaw", "opus", "ogg-opus")
# The documented ranges. deepgram-sdk 7.17's API definition (ListenV2EagerEotThreshold,
# ListenV2EotThreshold, ListenV2EotTimeoutMs) says 0.3-0.9, 0.5-1.0 and 500-60000 ms; Deepgram's
# end-of-turn guide says 0.5-0.9 and 500-10000 ms. The emulator takes the wider, newer ranges: a
# value it refuses is then surely refused by Deepgram too. eot_threshold 1.0 turns confidence-based
# end of turn off (only eot_timeout_ms and ForceEndTurn end turns).
EAGER_EOT_RANGE: Final = (0.3, 0.9)
EOT_RANGE: Final = (0.5, 1.0)
EOT_TIMEOUT_MS_RANGE: Final = (500, 60_000)
DEFAULT_EOT_THRESHOLD: Final = 0.7
DEFAULT_EOT_TIMEOUT_MS: Final = 5000
# Bounds of what a client may make the emulator keep (hostile input must not grow memory freely).
MAX_KEYTERMS: Final = 500
MAX_TERM_CHARS: Final = 200


def _number(name: str, value: Any) -> float:
    """A finite number from a query string or a JSON value (Deepgram takes "0.7" and 0.7 alike)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise OptionError(f"{name} must be a number, got {value!r}")
    try:
        n = float(value)
    except ValueError:
        raise OptionError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(n):
        raise OptionError(f"{name} must be a finite number, got {value!r}")
    return n


def _in_range(name: str, n: float, bounds: tuple[float, float]) -> None:
    if not bounds[0] <= n <= bounds[1]:
        raise OptionError(f"{name} must be between {bounds[0]} and {bounds[1]}, got {n:g}")


@dataclass(frozen=True, slots=True)
class Thresholds:
    """Flux's end-of-turn settings. `eager_eot_threshold` None = no EagerEndOfTurn/TurnResumed."""

    eager_eot_threshold: float | None = None
    eot_threshold: float = DEFAULT_EOT_THRESHOLD
    eot_timeout_ms: int = DEFAULT_EOT_TIMEOUT_MS

    def merged(self, updates: Any) -> Thresholds:
        """These thresholds with `updates` (a Configure message's `thresholds` object) applied.

        A missing or null key keeps its value, as Deepgram documents. Raises OptionError (and
        changes nothing) when any value is out of range."""
        if not isinstance(updates, dict):
            raise OptionError("thresholds must be an object")
        unknown = set(updates) - {"eager_eot_threshold", "eot_threshold", "eot_timeout_ms"}
        if unknown:
            raise OptionError(f"unknown threshold {sorted(unknown)[0]!r}")
        eager, eot, timeout = self.eager_eot_threshold, self.eot_threshold, self.eot_timeout_ms
        if updates.get("eager_eot_threshold") is not None:
            eager = _number("eager_eot_threshold", updates["eager_eot_threshold"])
        if updates.get("eot_threshold") is not None:
            eot = _number("eot_threshold", updates["eot_threshold"])
        if updates.get("eot_timeout_ms") is not None:
            timeout = _timeout_ms(updates["eot_timeout_ms"])
        return Thresholds.checked(eager, eot, timeout)

    @classmethod
    def checked(cls, eager: float | None, eot: float, timeout_ms: int) -> Thresholds:
        if eager is not None:
            _in_range("eager_eot_threshold", eager, EAGER_EOT_RANGE)
        _in_range("eot_threshold", eot, EOT_RANGE)
        _in_range("eot_timeout_ms", timeout_ms, EOT_TIMEOUT_MS_RANGE)
        if eager is not None and eager > eot:
            # An eager end of turn is an early, less certain one: above eot_threshold it could
            # never come before the real one.
            raise OptionError(f"eager_eot_threshold ({eager:g}) must not exceed eot_threshold ({eot:g})")
        return cls(eager, eot, timeout_ms)

    def to_json(self) -> dict[str, Any]:
        return {
            "eager_eot_threshold": self.eager_eot_threshold,
            "eot_threshold": self.eot_threshold,
            "eot_timeout_ms": self.eot_timeout_ms,
        }


def _timeout_ms(value: Any) -> int:
    n = _number("eot_timeout_ms", value)
    if n != int(n):
        raise OptionError(f"eot_timeout_ms must be a whole number of milliseconds, got {value!r}")
    return int(n)


def check_terms(name: str, terms: Any) -> tuple[str, ...]:
    """A list of strings (keyterms, language hints), bounded; a single string is a list of one."""
    if isinstance(terms, str):
        terms = [terms]
    if not isinstance(terms, list) or not all(isinstance(t, str) for t in terms):
        raise OptionError(f"{name} must be a list of strings")
    if len(terms) > MAX_KEYTERMS:
        raise OptionError(f"at most {MAX_KEYTERMS} {name}, got {len(terms)}")
    for t in terms:
        if not t.strip() or len(t) > MAX_TERM_CHARS:
            raise OptionError(f"each of {name} must be 1 to {MAX_TERM_CHARS} characters")
    return tuple(terms)


@dataclass(frozen=True, slots=True)
class FluxOptions(_Encoded):
    model: str
    encoding: str | None = None
    sample_rate: int = 16000
    thresholds: Thresholds = field(default_factory=Thresholds)
    keyterms: tuple[str, ...] = ()
    language_hints: tuple[str, ...] = ()
    numerals: bool = False
    profanity_filter: bool = False
    mip_opt_out: bool = False
    redact: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def multilingual(self) -> bool:
        return self.model == FLUX_MULTILINGUAL

    @classmethod
    def from_query(cls, query: str) -> FluxOptions:
        known: dict[str, Any] = {}
        lists: dict[str, list[str]] = {"keyterm": [], "language_hint": [], "redact": [], "tag": []}
        extra: dict[str, str] = {}
        eager: float | None = None
        eot, timeout = DEFAULT_EOT_THRESHOLD, DEFAULT_EOT_TIMEOUT_MS
        for name, value in parse_qsl(query, keep_blank_values=True):
            if name == "model":
                if value not in FLUX_MODELS:
                    raise OptionError(
                        f"model must be one of {', '.join(FLUX_MODELS)} on /v2/listen, got {value!r}"
                    )
                known["model"] = value
            elif name == "encoding":
                if value.lower() not in FLUX_ENCODINGS:
                    raise OptionError(f"encoding must be one of {', '.join(FLUX_ENCODINGS)}, got {value!r}")
                known["encoding"] = value.lower()
            elif name == "sample_rate":
                known["sample_rate"] = _int(name, value, 8000, 192000)
            elif name == "eager_eot_threshold":
                eager = _number(name, value)
            elif name == "eot_threshold":
                eot = _number(name, value)
            elif name == "eot_timeout_ms":
                timeout = _timeout_ms(value)
            elif name in ("numerals", "profanity_filter", "mip_opt_out"):
                known[name] = _bool(name, value)
            elif name in lists:
                lists[name].append(value)
            elif name == "channels":
                if _int(name, value, 1, 16) != 1:
                    raise OptionError("Flux (/v2/listen) transcribes mono audio only: channels must be 1")
            elif name == "multichannel":
                if _bool(name, value):
                    raise OptionError("Flux (/v2/listen) has no multichannel: send one stream per channel")
            else:
                extra[name] = value
        if "model" not in known:
            raise OptionError(f"model is required on /v2/listen: one of {', '.join(FLUX_MODELS)}")
        hints = check_terms("language_hint", lists["language_hint"]) if lists["language_hint"] else ()
        if hints and known["model"] != FLUX_MULTILINGUAL:
            raise OptionError(f"language_hint needs model={FLUX_MULTILINGUAL}")
        return cls(
            thresholds=Thresholds.checked(eager, eot, timeout),
            keyterms=check_terms("keyterm", lists["keyterm"]) if lists["keyterm"] else (),
            language_hints=hints,
            redact=tuple(lists["redact"]),
            tags=tuple(lists["tag"]),
            extra=extra,
            **known,
        )
