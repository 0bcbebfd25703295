"""Logging: structlog to stderr as JSON lines or a console view, with secrets redacted.

    configure_logging("info", "auto")   # console on a TTY, JSON lines otherwise
    register_secret(settings.deepgram_api_key)
    structlog.contextvars.bind_contextvars(sid=sid)   # per asyncio task: every line of the task has it
    log = structlog.get_logger(__name__)

The standard library's `logging` (the deepgram SDK and websockets log through it) goes to the same
stream through the same renderer and redaction, at WARNING and above only.

Redaction (producer/secrets.py, whose docstring says how and why): every string in a log line
(event, values, nested dicts/lists, rendered tracebacks) has the registered URLs and secrets masked
and the password of any URL (`redis://user:pass@host`, `?password=...`) replaced by "***", however
it is written. It runs after the traceback is rendered to text, so a secret in an exception message
is masked too; tracebacks never show local variables.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

# The one redactor lives with the producer (the producer CLI needs it and must not import the
# worker); re-exported here for the worker's callers.
from producer.secrets import (
    MASK,
    clear_secrets,
    redact,
    redact_field,
    redact_url,
    redact_value,
    register_secret,
    register_url,
)

__all__ = [
    "MASK",
    "clear_secrets",
    "configure_logging",
    "redact",
    "redact_url",
    "redact_value",
    "register_secret",
    "register_url",
]

LEVELS = {
    "critical": logging.CRITICAL,
    "error": logging.ERROR,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
}
FORMATS = ("auto", "json", "console")


def redact_processor(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: redact every value of the event dict (run it after format_exc_info)."""
    for key, value in event_dict.items():
        if key.startswith("_"):  # structlog's private keys (_record, _from_structlog)
            continue
        if value is None or isinstance(value, bool | int | float):
            continue
        event_dict[key] = redact_field(key, value)
    return event_dict


def _level_number(level: str | int) -> int:
    if isinstance(level, int):
        return level
    try:
        return LEVELS[level.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r}: use one of {', '.join(LEVELS)}") from None


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class _Handler(logging.StreamHandler):
    """Marker type, so that configure_logging can replace its own handler when called twice."""


def configure_logging(level: str | int = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Configure structlog and stdlib logging for the process.

    level: debug | info | warning | error | critical (structlog lines below it cost almost nothing).
    fmt:   "json" (one JSON object per line), "console" (human view, colors only on a TTY), or "auto"
           (console when the stream is a TTY, else JSON).
    stream: where lines go; default sys.stderr.
    """
    out = stream if stream is not None else sys.stderr
    fmt = (fmt or "auto").strip().lower()
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r}: use one of {', '.join(FORMATS)}")
    if fmt == "auto":
        fmt = "console" if _is_tty(out) else "json"
    level_no = _level_number(level)

    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    renderer: Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(
            colors=_is_tty(out),
            # never rich tracebacks: they print local variables, which may hold keys
            exception_formatter=structlog.dev.plain_traceback,
        )

    # Rendering tail shared by structlog and stdlib records: traceback -> text, then redact, then render.
    tail: list[Processor] = [
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
        structlog.processors.UnicodeDecoder(),
        redact_processor,
    ]

    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            timestamper,
            *tail,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level_no),
        logger_factory=structlog.WriteLoggerFactory(file=out),
        context_class=dict,
        cache_logger_on_first_use=True,
    )

    # stdlib logging (deepgram SDK, websockets, asyncio): same stream, same look, redacted, WARNING+.
    handler = _Handler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.contextvars.merge_contextvars,
                structlog.stdlib.add_log_level,
                structlog.stdlib.add_logger_name,
                timestamper,
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                *tail,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
        old.close()  # a StreamHandler's close() does not close its stream
    root.addHandler(handler)
    root.setLevel(max(logging.WARNING, level_no))
