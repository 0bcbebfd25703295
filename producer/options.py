"""Deepgram live options a session may ask for, and how they are checked.

Producers are less trusted than workers: an option such as `callback` would make Deepgram post
transcripts to a third-party URL, and `encoding`/`sample_rate`/`channels` must match the frames the
worker sends. So options are an allow-list with a type per name; anything else is refused.
The same check runs in the producer (early, clear error) and in the worker (the authority).
"""

from __future__ import annotations

import contextlib
import math
import re
from typing import Any, Final

from producer.protocol import AudioFormat, ProtocolError

_BOOL: Final = "bool"
_STR: Final = "str"
_INT: Final = "int"
_STR_LIST: Final = "str_list"
_BOOL_OR_INT: Final = "bool_or_int"
_FLOAT: Final = "float"  # Flux thresholds: a finite number in the option's documented range

# name -> kind. Deliberately excluded: callback, callback_method (exfiltration), encoding,
# sample_rate, channels, multichannel (set by the worker from the session's audio format).
ALLOWED_OPTIONS: Final[dict[str, str]] = {
    # Live streaming only takes what its query documents; no_delay (send finals without Deepgram's
    # short wait for more words) is the one voice agents ask for. Anything newer: the deployment
    # allow-list extension (parse_extra_options).
    "no_delay": _BOOL,
    "model": _STR,
    "language": _STR,
    "version": _STR,
    "interim_results": _BOOL,
    "punctuate": _BOOL,
    "smart_format": _BOOL,
    "numerals": _BOOL,
    "profanity_filter": _BOOL,
    "dictation": _BOOL,
    "diarize": _BOOL,
    "detect_entities": _BOOL,
    "mip_opt_out": _BOOL,
    "vad_events": _BOOL,
    "filler_words": _BOOL,
    "endpointing": _BOOL_OR_INT,
    "utterance_end_ms": _INT,
    "redact": _STR_LIST,
    "keywords": _STR_LIST,
    "keyterm": _STR_LIST,
    "search": _STR_LIST,
    "replace": _STR_LIST,
    "tag": _STR_LIST,
    "extra": _STR_LIST,
}
KINDS: Final = frozenset({_BOOL, _STR, _INT, _STR_LIST, _BOOL_OR_INT})

# Deepgram Flux (`/v2/listen`, turn-based recognition for voice agents). A session is a Flux session
# when its `model` is a Flux model (`flux-…`): Flux models exist only on v2, and v2 serves only them,
# so the model alone decides the API, as it does on Deepgram. v2 takes its own, shorter list of
# query options (deepgram-sdk 7.x `listen.v2.connect`); the end-of-turn knobs have documented ranges.
FLUX_MODEL_PREFIX: Final = "flux-"
ALLOWED_V2_OPTIONS: Final[dict[str, str]] = {
    "model": _STR,
    "eager_eot_threshold": _FLOAT,
    "eot_threshold": _FLOAT,
    "eot_timeout_ms": _INT,
    "keyterm": _STR_LIST,
    "language_hint": _STR_LIST,
    "profanity_filter": _BOOL,
    "numerals": _BOOL,
    "redact": _STR_LIST,
    "mip_opt_out": _BOOL,
    "tag": _STR_LIST,
}
# (low, high) of the Flux end-of-turn settings, as Deepgram documents them; an eot_threshold of 1.0
# turns the model's own end-of-turn detection off (every turn then ends by `force_end_turn`).
V2_RANGES: Final[dict[str, tuple[float, float]]] = {
    "eager_eot_threshold": (0.3, 0.9),
    "eot_threshold": (0.5, 1.0),
    "eot_timeout_ms": (500, 10_000),
}
# What Flux takes: mono audio, and these sample rates (no 32 kHz).
V2_SAMPLE_RATES: Final = (8000, 16000, 24000, 44100, 48000)
# The thresholds a `configure` control entry may change mid-session (Deepgram's Configure message).
CONFIGURE_THRESHOLDS: Final = ("eager_eot_threshold", "eot_threshold", "eot_timeout_ms")
# Never allowed, whatever a deployment configures: callback/callback_method would make Deepgram post
# transcripts to a URL the producer chose; the format options must match the frames the worker
# sends, so the worker sets them from the session's audio format.
NEVER_ALLOWED: Final = frozenset(
    {"callback", "callback_method", "encoding", "sample_rate", "channels", "multichannel"}
)
# Options a deployment added to the allow-list (worker setting `extra_options`, see
# `parse_extra_options`); installed once at start-up by `install_extra_options`.
_extra_options: dict[str, str] = {}
DEFAULT_MODEL: Final = "nova-3"
MAX_OPTION_TEXT: Final = 256
MAX_LIST_ITEMS: Final = 100
_SAFE_TEXT = re.compile(r"^[\w .:,'+\-/@#&%]*$")


def parse_extra_options(spec: str) -> dict[str, str]:
    """A deployment's extension of the allow-list: `name:kind,name:kind` (kinds: bool, str, int,
    str_list, bool_or_int). Raises ValueError for a bad entry or a name that is never allowed."""
    out: dict[str, str] = {}
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, kind = item.partition(":")
        name, kind = name.strip(), kind.strip()
        if not sep or not re.fullmatch(r"[a-z][a-z0-9_]{0,63}", name):
            raise ValueError(f"extra option {item!r} is not name:kind (lower-case name)")
        if kind not in KINDS:
            raise ValueError(f"extra option {name!r}: kind {kind!r} is not one of {sorted(KINDS)}")
        if name in NEVER_ALLOWED:
            raise ValueError(f"option {name!r} can never be allowed (set by the worker, or unsafe)")
        out[name] = kind
    return out


def install_extra_options(extra: dict[str, str]) -> None:
    """Make a deployment's extra options valid in this process (the worker calls it at start-up)."""
    bad = set(extra) & NEVER_ALLOWED
    if bad:
        raise ValueError(f"options {sorted(bad)} can never be allowed")
    _extra_options.clear()
    _extra_options.update(extra)


def allowed_kind(name: str) -> str | None:
    if name in NEVER_ALLOWED:
        return None
    return ALLOWED_OPTIONS.get(name) or _extra_options.get(name)


def is_flux(options: dict[str, Any]) -> bool:
    """Whether these (raw or validated) options make a Flux session (Deepgram `/v2/listen`)."""
    model = options.get("model")
    return isinstance(model, str) and model.startswith(FLUX_MODEL_PREFIX)


def validate_options(options: dict[str, Any], fmt: AudioFormat | None = None) -> dict[str, Any]:
    """Return the options normalised to Deepgram's query form (strings, lists of strings).

    A Flux model selects Deepgram's v2 API and its own allow-list; with `fmt`, the session's audio
    format is checked against what that API takes. Raises ProtocolError naming the first offending
    option.
    """
    if is_flux(options):
        return _validate_v2(options, fmt)
    out: dict[str, Any] = {}
    for name, value in options.items():
        kind = allowed_kind(name)
        if kind is None:
            raise ProtocolError("option_not_allowed", f"Deepgram option {name!r} is not allowed")
        out[name] = _normalise(name, kind, value)
    return out


def _validate_v2(options: dict[str, Any], fmt: AudioFormat | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in options.items():
        kind = ALLOWED_V2_OPTIONS.get(name)
        if kind is None:
            raise ProtocolError(
                "option_not_allowed", f"Deepgram option {name!r} is not allowed with a Flux model"
            )
        out[name] = _normalise(name, kind, value)
        if name in V2_RANGES:
            low, high = V2_RANGES[name]
            if not low <= float(out[name]) <= high:
                raise ProtocolError("bad_option", f"option {name!r} must be within {low:g}..{high:g}")
    if fmt is not None:
        if fmt.channels != 1:
            raise ProtocolError("bad_format", "Flux models take mono audio only (channels 1)")
        if fmt.sample_rate not in V2_SAMPLE_RATES:
            rates = ", ".join(str(r) for r in V2_SAMPLE_RATES)
            raise ProtocolError("bad_format", f"Flux models take sample rates {rates}, not {fmt.sample_rate}")
    return out


def validate_thresholds(thresholds: Any) -> dict[str, str]:
    """A `configure` control entry's thresholds: a non-empty object of Flux end-of-turn settings,
    each in range. Returns them normalised (strings, as on the query string)."""
    if not isinstance(thresholds, dict) or not thresholds:
        raise ProtocolError("bad_configure", "configure must be a non-empty JSON object of thresholds")
    out: dict[str, str] = {}
    for name, value in thresholds.items():
        if name not in CONFIGURE_THRESHOLDS:
            allowed = ", ".join(CONFIGURE_THRESHOLDS)
            raise ProtocolError("bad_configure", f"configure may set {allowed}; not {str(name)[:40]!r}")
        try:
            text = _normalise(name, ALLOWED_V2_OPTIONS[name], value)
        except ProtocolError as exc:
            raise ProtocolError("bad_configure", str(exc)) from None
        low, high = V2_RANGES[name]
        if not low <= float(text) <= high:
            raise ProtocolError("bad_configure", f"{name} must be within {low:g}..{high:g}")
        out[name] = text
    return out


def parse_option_pairs(pairs: list[str]) -> dict[str, Any]:
    """`key=value` strings (CLI --option) to an options dict; repeated keys make a list."""
    out: dict[str, Any] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise ProtocolError("bad_option", f"option {pair!r} is not key=value")
        if name in out:
            prev = out[name]
            out[name] = [*prev, value] if isinstance(prev, list) else [prev, value]
        elif allowed_kind(name) == _STR_LIST:
            out[name] = [value]
        else:
            out[name] = value
    return validate_options(out)


def connect_kwargs_v2(options: dict[str, Any], fmt: AudioFormat | None = None) -> dict[str, Any]:
    """Validated Flux options as keyword arguments for `listen.v2.connect`, with the audio format as
    `encoding` and `sample_rate` (Flux is mono: no channel options)."""
    kwargs = dict(options)
    if fmt is not None:
        kwargs.update(encoding=fmt.encoding, sample_rate=str(fmt.sample_rate))
    return kwargs


def connect_kwargs(options: dict[str, Any], fmt: AudioFormat | None = None) -> dict[str, Any]:
    """Options as keyword arguments for `listen.v1.connect` (model is required by the SDK), with
    the audio format as Deepgram's `encoding`, `sample_rate`, `channels` and, for more than one
    channel, `multichannel=true` (results per channel: what the per-channel commit relies on)."""
    kwargs = {k: v for k, v in options.items() if k not in NEVER_ALLOWED}
    kwargs.setdefault("model", DEFAULT_MODEL)
    if fmt is not None:
        kwargs.update(encoding=fmt.encoding, sample_rate=str(fmt.sample_rate), channels=str(fmt.channels))
        if fmt.channels > 1:
            kwargs["multichannel"] = "true"
    return kwargs


def _normalise(name: str, kind: str, value: Any) -> Any:
    if kind == _BOOL:
        return _bool(name, value)
    if kind == _INT:
        return _int(name, value)
    if kind == _FLOAT:
        return _float(name, value)
    if kind == _BOOL_OR_INT:
        try:
            return _bool(name, value)
        except ProtocolError:
            return _int(name, value)
    if kind == _STR:
        return _text(name, value)
    values = value if isinstance(value, list) else [value]
    if len(values) > MAX_LIST_ITEMS:
        raise ProtocolError("bad_option", f"option {name!r} has more than {MAX_LIST_ITEMS} values")
    return [_text(name, v) for v in values]


def _bool(name: str, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower()
    raise ProtocolError("bad_option", f"option {name!r} must be true or false, not {_preview(value)}")


MAX_INT_OPTION: Final = 600_000


def _int(name: str, value: Any) -> str:
    # Only whole numbers in range: a float must be integral and finite (int(1e999) raises
    # OverflowError, int(nan) ValueError), a string short enough to convert cheaply.
    if isinstance(value, bool):
        raise ProtocolError("bad_option", f"option {name!r} must be an integer")
    number: int | None = None
    if isinstance(value, int):
        number = value
    elif isinstance(value, float) and math.isfinite(value) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and len(value) <= 16:
        with contextlib.suppress(ValueError):
            number = int(value)
    if number is None:
        raise ProtocolError("bad_option", f"option {name!r} must be an integer, not {_preview(value)}")
    if not 0 <= number <= MAX_INT_OPTION:
        raise ProtocolError("bad_option", f"option {name!r} is out of range (0..{MAX_INT_OPTION})")
    return str(number)


def _float(name: str, value: Any) -> str:
    """A finite number (a JSON number or its decimal text), as the shortest decimal text."""
    number: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value) if abs(value) < 1e300 else None
    elif isinstance(value, str) and len(value) <= 16:
        with contextlib.suppress(ValueError):
            number = float(value)
    if number is None or not math.isfinite(number):
        raise ProtocolError("bad_option", f"option {name!r} must be a number, not {_preview(value)}")
    return repr(number)


def _text(name: str, value: Any) -> str:
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise ProtocolError("bad_option", f"option {name!r} must be text")
    if isinstance(value, float) and not math.isfinite(value):
        raise ProtocolError("bad_option", f"option {name!r} must be text or a finite number")
    if isinstance(value, int) and not -(10**MAX_OPTION_TEXT) < value < 10**MAX_OPTION_TEXT:
        # str() of a huge int is slow and, past 4300 digits, raises ValueError in Python 3.11.
        raise ProtocolError("bad_option", f"option {name!r} has characters or length that are not allowed")
    text = str(value)
    if not text:
        # `model=` would reach Deepgram as an empty parameter and fail the session only then.
        raise ProtocolError("bad_option", f"option {name!r} is empty")
    if len(text) > MAX_OPTION_TEXT or not _SAFE_TEXT.match(text):
        raise ProtocolError("bad_option", f"option {name!r} has characters or length that are not allowed")
    return text


def _preview(value: Any) -> str:
    """A short, safe rendering of a bad value for an error message: never a huge repr (a
    4300-digit int's repr even raises ValueError), never an exception of its own."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**30:
        return "a huge integer"
    if not isinstance(value, str | int | float | bool | type(None)):
        return "a JSON array" if isinstance(value, list) else "a JSON object"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
