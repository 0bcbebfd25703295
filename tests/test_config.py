"""Start-up configuration: bad values are clear errors that never echo the value."""

from __future__ import annotations

import pytest

from worker.config import ConfigError, load_settings


def test_bad_value_names_the_variable_without_echoing_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VOXQUEUE_DEEPGRAM_URL", "http://not-a-websocket")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "VOXQUEUE_DEEPGRAM_URL" in str(info.value) and "not-a-websocket" not in str(info.value)


def test_real_deepgram_needs_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DEEPGRAM_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="DEEPGRAM_API_KEY is not set"):
        load_settings()


def test_renewal_must_fit_inside_the_lease() -> None:
    with pytest.raises(ConfigError, match="at most half of lease_seconds"):
        load_settings(deepgram_url="ws://127.0.0.1:1", lease_seconds=5, renew_seconds=4)


def test_the_key_never_shows_in_the_settings_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEPGRAM_API_KEY", "dg-secret-key-123")
    settings = load_settings()
    assert settings.api_key() == "dg-secret-key-123"
    assert "dg-secret-key-123" not in repr(settings) and "dg-secret-key-123" not in str(settings.model_dump())


def test_settings_repr_and_str_hide_the_redis_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VOXQUEUE_DEEPGRAM_URL", "ws://127.0.0.1:1")
    monkeypatch.setenv("VOXQUEUE_REDIS_URL", "redis://user:hunter2pass@127.0.0.1:1/0")
    monkeypatch.setenv("DEEPGRAM_API_KEY", "dg-key-0123456789")
    settings = load_settings()
    for text in (repr(settings), str(settings)):
        assert "hunter2" not in text and "dg-key" not in text, text
        assert "127.0.0.1:1/0" in text
    assert settings.redis_url == "redis://user:hunter2pass@127.0.0.1:1/0"  # the value itself is intact
