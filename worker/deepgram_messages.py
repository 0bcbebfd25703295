"""Deepgram's server messages, decoded lean.

The SDK decodes each message by trying its pydantic models one after another (an undiscriminated
union): about 145 µs for a Results message of 25 words on the VM of the first round (BENCHMARKS.md
"What each step bought"; ~370 µs on the VM of the later rounds), the largest single cost of a worker
per frame. Deepgram tags every message with `type`, so this module dispatches on it and builds small
slotted dataclasses with the same field names as the SDK's models (`ListenV1Results` and friends):
about 10× cheaper. Parsed with orjson (8 µs for a final of 25 words against 28 µs with the standard
library, on the later rounds' VM), into dataclasses that are not frozen (a frozen one's __init__
costs 4× as much, once per word; nothing modifies them after decoding): 32 µs in all for that final
there, 75 µs before both. tests/test_deepgram_messages.py checks that the SDK and this module decode
every message the same way. The connection itself stays the SDK's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson

T = TypeVar("T")


@dataclass(slots=True)
class Word:
    word: str
    start: float
    end: float
    confidence: float
    punctuated_word: str | None = None
    speaker: int | None = None


@dataclass(slots=True)
class Alternative:
    transcript: str
    confidence: float
    words: list[Word]


@dataclass(slots=True)
class Channel:
    alternatives: list[Alternative]


@dataclass(slots=True)
class ResultsMetadata:
    request_id: str


@dataclass(slots=True)
class Results:
    start: float
    duration: float
    is_final: bool | None
    speech_final: bool | None
    from_finalize: bool | None
    channel: Channel
    metadata: ResultsMetadata | None
    # [channel, channel count], as Deepgram sends it: [i, n] with multichannel, [0, 1] without.
    channel_index: list[int] = field(default_factory=lambda: [0, 1])

    @property
    def channel_number(self) -> int:
        return self.channel_index[0]


@dataclass(slots=True)
class Metadata:
    request_id: str
    duration: float


@dataclass(slots=True)
class SpeechStarted:
    timestamp: float
    channel: list[int] = field(default_factory=lambda: [0])


@dataclass(slots=True)
class UtteranceEnd:
    last_word_end: float
    channel: list[int] = field(default_factory=lambda: [0, 1])


@dataclass(slots=True)
class ErrorMessage:
    variant: str
    description: str


Message = Results | Metadata | SpeechStarted | UtteranceEnd | ErrorMessage


class UnknownMessage(ValueError):
    """Not JSON, or a type this worker does not know (newer Deepgram): logged and skipped."""


MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # far above any real Results message; bounds what we parse


def decode(raw: str | bytes) -> Message:
    """One server message. Anything off-shape (not JSON, too deep, wrong types, non-finite times)
    is an UnknownMessage: skipped with a log line, never a broken connection or a crashed worker."""
    return _dispatch(raw, _DECODERS)


def _dispatch(raw: str | bytes, decoders: dict[str, Callable[[dict[str, Any]], T]]) -> T:
    """Bounded JSON, then the decoder of its `type`; every failure is an UnknownMessage."""
    if len(raw) > MAX_MESSAGE_BYTES:
        raise UnknownMessage(f"message of {len(raw)} bytes is too large")
    try:
        data = orjson.loads(raw)
        kind = data["type"]
    except (ValueError, TypeError, KeyError, IndexError, RecursionError):
        raise UnknownMessage("not a Deepgram message") from None
    if not isinstance(kind, str):
        raise UnknownMessage("message `type` is not a string")
    decoder = decoders.get(kind)
    if decoder is None:
        raise UnknownMessage(f"unknown message type {kind!r}")
    try:
        return decoder(data)
    except Exception as exc:  # hostile input: any shape error is this one message's problem
        raise UnknownMessage(f"malformed {kind} message: {type(exc).__name__}") from None


MAX_TIME_SECONDS = 1e9  # ~32 years: far past any session; bounds `t / frame seconds` arithmetic


def _time(value: Any) -> float:
    """A time in seconds from the server: a finite, non-negative number, and not absurdly large
    (1e308 / 0.02 overflows to inf, and int(inf) would crash the receiver)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError("time is not a number")
    t = float(value)
    if not math.isfinite(t) or t < 0 or t > MAX_TIME_SECONDS:
        raise ValueError("time is not finite and non-negative")
    return t


def _results(d: dict[str, Any]) -> Results:
    alternatives = [
        Alternative(
            str(a["transcript"]),
            float(a["confidence"]),
            [
                Word(
                    str(w["word"]),
                    _time(w["start"]),
                    _time(w["end"]),
                    float(w["confidence"]),
                    w.get("punctuated_word"),
                    w.get("speaker"),
                )
                for w in a["words"]
            ],
        )
        for a in d["channel"]["alternatives"]
    ]
    meta = d.get("metadata")
    return Results(
        _time(d["start"]),
        _time(d["duration"]),
        d.get("is_final"),
        d.get("speech_final"),
        d.get("from_finalize"),
        Channel(alternatives),
        ResultsMetadata(meta["request_id"]) if meta else None,
        _channel_index(d.get("channel_index", [0, 1]), 2),
    )


MAX_CHANNELS = 16


def _channel_index(value: Any, length: int) -> list[int]:
    """`channel_index` ([i, n]) or `channel` ([i] or [i, n]): small non-negative integers, i < n."""
    if not isinstance(value, list) or not 1 <= len(value) <= length:
        raise TypeError("channel index is not a short list")
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_CHANNELS for v in value):
        raise ValueError("channel index holds something other than small integers")
    if len(value) == 2 and value[0] >= value[1]:
        raise ValueError("channel index is not below the channel count")
    return list(value)


_DECODERS: dict[str, Callable[[dict[str, Any]], Message]] = {
    "Results": _results,
    "Metadata": lambda d: Metadata(d["request_id"], float(d["duration"])),
    "SpeechStarted": lambda d: SpeechStarted(_time(d["timestamp"]), _channel_index(d.get("channel", [0]), 2)),
    "UtteranceEnd": lambda d: UtteranceEnd(
        _time(d["last_word_end"]), _channel_index(d.get("channel", [0, 1]), 2)
    ),
    "Error": lambda d: ErrorMessage(str(d.get("variant", "")), str(d.get("description", ""))),
}


# --------------------------------------------------------------------------- Flux (/v2/listen)
#
# Flux answers with other message types than v1 (and its `Error` has other fields), so v2 has its
# own dispatch table. Field names follow the SDK's ListenV2* models; times are connection-relative
# seconds, as on v1.

TURN_EVENTS = frozenset({"Update", "StartOfTurn", "EagerEndOfTurn", "TurnResumed", "EndOfTurn"})
MAX_TURN_INDEX = 10_000_000
MAX_LANGUAGES = 16


@dataclass(slots=True)
class TurnWord:
    word: str
    confidence: float
    start: float | None = None
    end: float | None = None


@dataclass(slots=True)
class TurnInfo:
    event: str
    turn_index: int
    audio_window_start: float
    audio_window_end: float
    transcript: str
    words: list[TurnWord]
    end_of_turn_confidence: float
    request_id: str = ""
    trigger: str | None = None  # EndOfTurn only: model, manual, timeout (an open set)
    languages: list[str] | None = None


@dataclass(slots=True)
class Connected:
    request_id: str


@dataclass(slots=True)
class ConfigureReply:
    ok: bool
    code: str = ""
    description: str = ""


@dataclass(slots=True)
class FluxWarning:
    code: str
    description: str


@dataclass(slots=True)
class FatalError:
    code: str
    description: str


MessageV2 = TurnInfo | Connected | ConfigureReply | FluxWarning | FatalError


def decode_v2(raw: str | bytes) -> MessageV2:
    """One Flux server message; anything off-shape is an UnknownMessage, as for v1."""
    return _dispatch(raw, _DECODERS_V2)


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError("not a number")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError("not finite")
    return number


def _turn_info(d: dict[str, Any]) -> TurnInfo:
    event = d["event"]
    if event not in TURN_EVENTS:
        raise ValueError("unknown turn event")
    index = d["turn_index"]
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= MAX_TURN_INDEX:
        raise ValueError("turn_index is not a small non-negative integer")
    start, end = _time(d["audio_window_start"]), _time(d["audio_window_end"])
    if end < start:
        raise ValueError("audio window ends before it starts")
    words = [
        TurnWord(
            str(w["word"]),
            _number(w["confidence"]),
            _time(w["start"]) if w.get("start") is not None else None,
            _time(w["end"]) if w.get("end") is not None else None,
        )
        for w in d["words"]
    ]
    trigger = d.get("trigger")
    languages = d.get("languages")
    return TurnInfo(
        event,
        index,
        start,
        end,
        str(d["transcript"]),
        words,
        _number(d["end_of_turn_confidence"]),
        str(d.get("request_id", "")),
        str(trigger) if trigger is not None else None,
        [str(x) for x in languages][:MAX_LANGUAGES] if isinstance(languages, list) else None,
    )


_DECODERS_V2: dict[str, Callable[[dict[str, Any]], MessageV2]] = {
    "TurnInfo": _turn_info,
    "Connected": lambda d: Connected(str(d.get("request_id", ""))),
    "ConfigureSuccess": lambda d: ConfigureReply(True),
    "ConfigureFailure": lambda d: ConfigureReply(
        False, str(d.get("code") or ""), str(d.get("description") or "")
    ),
    "Warning": lambda d: FluxWarning(str(d.get("code", "")), str(d.get("description", ""))),
    "Error": lambda d: FatalError(str(d.get("code", "")), str(d.get("description", ""))),
}
