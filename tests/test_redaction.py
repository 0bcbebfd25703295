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
