"""worker.logs: JSON lines with the bound session id, secret redaction, stdlib routing, redact_url."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from worker.logs import MASK, clear_secrets, configure_logging, redact, redact_url, register_secret

SECRET = "dg-secret-0123456789abcdef"


@pytest.fixture
def out() -> Iterator[io.StringIO]:
    """Configure logging into a buffer; restore structlog, the root logger and the secrets afterwards."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    buf = io.StringIO()
    try:
        yield buf
    finally:
        structlog.contextvars.clear_contextvars()
        structlog.reset_defaults()
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        clear_secrets()


def lines(buf: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in buf.getvalue().splitlines() if line.strip()]


def test_json_line_has_bound_sid_level_and_utc_timestamp(out: io.StringIO) -> None:
    configure_logging("info", "json", stream=out)
    structlog.contextvars.bind_contextvars(sid="s-42")
    structlog.get_logger("t").info("session.started", frames=3)
    structlog.get_logger("t").debug("not shown at info")

    [line] = lines(out)
    assert line["event"] == "session.started"
    assert line["sid"] == "s-42"
    assert line["frames"] == 3
    assert line["level"] == "info"
    assert line["timestamp"].endswith("Z")


async def test_sid_is_bound_per_asyncio_task(out: io.StringIO) -> None:
    configure_logging("debug", "json", stream=out)
    log = structlog.get_logger("t")

    async def session(sid: str) -> None:
        structlog.contextvars.bind_contextvars(sid=sid)
        for i in range(3):
            log.debug("frame", seq=i)
            await asyncio.sleep(0)

    await asyncio.gather(session("a"), session("b"))
    log.info("outside")

    got = lines(out)
    assert sorted((d["sid"], d["seq"]) for d in got if d["event"] == "frame") == [
        (sid, i) for sid in "ab" for i in range(3)
    ]
    assert "sid" not in next(d for d in got if d["event"] == "outside")


def test_registered_secret_is_masked_in_event_and_nested_values(out: io.StringIO) -> None:
    configure_logging("info", "json", stream=out)
    register_secret(SECRET)
    log = structlog.get_logger("t")
    log.info(f"connecting with Token {SECRET}")
    log.info(
        "handshake",
        headers={"Authorization": f"Token {SECRET}", "other": ["x", f"key={SECRET};"]},
        attempts=(1, f"{SECRET}"),
    )

    text = out.getvalue()
    assert SECRET not in text
    first, second = lines(out)
    assert first["event"] == f"connecting with Token {MASK}"
    assert second["headers"] == {"Authorization": f"Token {MASK}", "other": ["x", f"key={MASK};"]}
    assert second["attempts"] == [1, MASK]


def test_secret_in_exception_traceback_is_masked(out: io.StringIO) -> None:
    configure_logging("info", "json", stream=out)
    register_secret(SECRET)
    try:
        raise RuntimeError(f"401 for key {SECRET}")
    except RuntimeError:
        structlog.get_logger("t").exception("connect.failed")

    assert SECRET not in out.getvalue()
    [line] = lines(out)
    assert f"401 for key {MASK}" in line["exception"]


def test_short_and_empty_secrets_are_ignored(out: io.StringIO) -> None:
    register_secret("")
    register_secret("abc")
    assert redact("abc and the alphabet") == "abc and the alphabet"
    register_secret("abcd")
    assert redact("abcd") == MASK


def test_stdlib_logging_goes_through_the_same_renderer_and_redaction(out: io.StringIO) -> None:
    configure_logging("debug", "json", stream=out)
    register_secret(SECRET)
    logging.getLogger("websockets.client").info("noisy %s", "frame")  # below WARNING: dropped
    logging.getLogger("deepgram").warning("rejected key %s at %s", SECRET, "redis://u:hunter22@h:1/0")

    [line] = lines(out)
    assert line["logger"] == "deepgram"
    assert line["level"] == "warning"
    assert line["event"] == f"rejected key {MASK} at redis://u:{MASK}@h:1/0"


def test_console_format_without_tty_has_no_colors(out: io.StringIO) -> None:
    configure_logging("info", "console", stream=out)
    register_secret(SECRET)
    structlog.get_logger("t").info("hello", key=SECRET)
    text = out.getvalue()
    assert "hello" in text
    assert "\x1b[" not in text
    assert SECRET not in text


def test_auto_format_is_json_when_not_a_tty(out: io.StringIO) -> None:
    configure_logging("info", "auto", stream=out)
    structlog.get_logger("t").info("hello")
    assert lines(out)[0]["event"] == "hello"


def test_bad_level_or_format_is_rejected() -> None:
    with pytest.raises(ValueError, match="level"):
        configure_logging("loud", "json", stream=io.StringIO())
    with pytest.raises(ValueError, match="format"):
        configure_logging("info", "xml", stream=io.StringIO())


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://user:pass@host:6379/0", f"redis://user:{MASK}@host:6379/0"),
        ("redis://:s3cr3t@redis:6379", f"redis://:{MASK}@redis:6379"),
        ("rediss://default:p%40ss@cache.example:6380/2", f"rediss://default:{MASK}@cache.example:6380/2"),
        ("redis://redis:6379/0", "redis://redis:6379/0"),
        ("redis://localhost:6379/0?password=abc&db=1", f"redis://localhost:6379/0?password={MASK}&db=1"),
        ("unix:///tmp/redis.sock", "unix:///tmp/redis.sock"),
        ("ws://emulator:8765", "ws://emulator:8765"),
        (
            "error connecting to redis://u:pw@h:1/0: refused",
            f"error connecting to redis://u:{MASK}@h:1/0: refused",
        ),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        # The cases issue 8 found: part of the password leaked, or none of it was masked.
        ("cannot reach redis://u:p@ss@host:6379/0", f"cannot reach redis://u:{MASK}@host:6379/0"),
        ("cannot reach redis://u:pa ss@h:1/0 (refused)", f"cannot reach redis://u:{MASK}@h:1/0 (refused)"),
        (
            "at rediss://:a@h:1 and unix:///s.sock?password=ab",
            f"at rediss://:{MASK}@h:1 and unix:///s.sock?password={MASK}",
        ),
    ],
)
def test_worker_log_lines_mask_awkward_url_passwords_whole(
    out: io.StringIO, line: str, expected: str
) -> None:
    configure_logging("info", "json", stream=out)
    structlog.get_logger("t").warning(line, url=line)
    logging.getLogger("redis").warning("%s", line)
    first, second = lines(out)
    assert first["event"] == first["url"] == second["event"] == expected


def test_worker_log_masks_its_registered_short_password_only_where_it_is_a_secret(out: io.StringIO) -> None:
    from worker.logs import register_url

    configure_logging("info", "json", stream=out)
    url = "redis://u:ab@redis:6379/0"
    register_url(url)
    structlog.get_logger("t").info("ready", redis=url, note="a tab, about", password="ab")
    [line] = lines(out)
    assert line["redis"] == f"redis://u:{MASK}@redis:6379/0"
    assert line["note"] == "a tab, about"  # a 2-character password is not masked as a substring
    assert line["password"] == MASK  # but a field named like a secret is masked whatever its length
