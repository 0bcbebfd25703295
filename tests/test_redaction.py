"""Redis passwords never reach a message, whatever characters they hold."""

from __future__ import annotations

import pytest

from producer.client import redact_url


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://user:pa55@host:6379/0", "redis://user:***@host:6379/0"),
        ("redis://:s3cr3t/x@host:6379/0", "redis://:***@host:6379/0"),  # unescaped '/' in the password
        ("rediss://:p?q#r@h/1", "rediss://:***@h/1"),
        ("redis://host:6379/0", "redis://host:6379/0"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_password_is_found_and_masked_in_log_text_too() -> None:
    from producer.client import url_password
    from worker.logs import redact_url as redact_text

    url = "redis://:s3cr3t/x@host:6379/0"
    assert url_password(url) == "s3cr3t/x"
    assert url_password("redis://host:6379/0") == ""
    assert "s3cr3t" not in redact_text(f"cannot reach {url} (refused)")
