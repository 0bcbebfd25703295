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


# ------------------------------------------------------------------- the one redactor, awkward cases

import wave  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

from click.testing import CliRunner  # noqa: E402

from producer import secrets  # noqa: E402
from producer.cli import main as producer_main  # noqa: E402
from worker.config import ConfigError, load_settings  # noqa: E402
from worker.redis_server import free_port  # noqa: E402

# Passwords redis-py reads as written ('@', ':' and spaces are fine after the user's ':'), short
# ones included, percent-encoded ones as written.
AWKWARD = [
    "p@ss",
    "p@ss@word",
    "x:y:z",
    "pa ss",
    "a b@c",
    "a",
    "ab",
    "abc",
    "@",
    ":",
    " ",
    "p%40s%2Fs",
    "%20",
]
# Passwords with a character that ends the address for urllib/redis-py: masked, and refused as config.
ENDS_ADDRESS = ["s3cr/t", "a?b", "a#b", "/", "?#/", "p@ss/wXq?#"]


@pytest.fixture(autouse=True)
def _fresh_registry() -> Iterator[None]:
    secrets.clear_secrets()
    try:
        yield
    finally:
        secrets.clear_secrets()


@pytest.mark.parametrize("password", AWKWARD + ENDS_ADDRESS)
@pytest.mark.parametrize("scheme", ["redis", "rediss"])
def test_whole_url_password_is_masked_whatever_it_holds(scheme: str, password: str) -> None:
    url = f"{scheme}://user:{password}@cache.example:6380/2"
    assert secrets.redact_url(url) == f"{scheme}://user:***@cache.example:6380/2"
    assert secrets.url_password(url) == password


@pytest.mark.parametrize("password", AWKWARD + ENDS_ADDRESS)
def test_url_password_is_masked_inside_free_text_without_any_registration(password: str) -> None:
    # A line from a library that echoes a URL this process never registered: structural masking only.
    line = f"Error connecting to redis://u:{password}@h:6379/0: refused"
    assert secrets.redact(line) == "Error connecting to redis://u:***@h:6379/0: refused"


def test_free_text_guess_errs_towards_masking_and_leaves_plain_addresses_alone() -> None:
    assert (
        secrets.redact("redis://h:6379 down; mail ops@example.com")
        == "redis://h:6379 down; mail ops@example.com"
    )
    assert secrets.redact("unix:///run/redis.sock is gone") == "unix:///run/redis.sock is gone"
    # Two URLs on one line, each masked on its own.
    assert (
        secrets.redact("from redis://:a@h1:1 to redis://:b@h2:2")
        == "from redis://:***@h1:1 to redis://:***@h2:2"
    )


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://name@host:6379", "redis://***@host:6379"),  # old style: the password as user name
        ("redis://:pw@host", "redis://:***@host"),
        ("redis://host:6379/0", "redis://host:6379/0"),
        ("unix:///run/redis.sock?db=0&password=a", "unix:///run/redis.sock?db=0&password=***"),
        ("unix:///run/redis.sock?password=p@ss w&db=1", "unix:///run/redis.sock?password=***&db=1"),
        ("unix://u:pw@/run/redis.sock?db=0", "unix://u:***@/run/redis.sock?db=0"),
        ("redis://h/0?PASSWORD=ab#x", "redis://h/0?PASSWORD=***#x"),
    ],
)
def test_user_names_unix_sockets_and_query_passwords(url: str, expected: str) -> None:
    assert secrets.redact_url(url) == expected
    # In free text a query value ends at whitespace; registering the URL covers it whole there too.
    secrets.register_url(url)
    assert secrets.redact(f"at {url} now") == f"at {expected} now"


def test_registered_url_is_masked_verbatim_and_its_password_in_every_written_form() -> None:
    url = "redis://u:p%40ss w0rd@h:1/0"
    secrets.register_url(url)
    assert secrets.redact(f"x {url} y") == "x redis://u:***@h:1/0 y"
    assert secrets.redact("AUTH p@ss w0rd failed") == "AUTH *** failed"  # decoded
    assert secrets.redact("raw p%40ss w0rd") == "raw ***"  # as written


def test_short_passwords_are_masked_structurally_not_as_substrings() -> None:
    for password in ("a", "ab", "abc"):
        secrets.register_url(f"redis://u:{password}@h:1/0")
    # Masking every "a", "ab", "abc" would wreck every line (and spell the secret out by its gaps).
    assert secrets.redact("a cab about abc") == "a cab about abc"
    # Wherever they are written as secrets, they are masked whatever their length.
    assert (
        secrets.redact("to redis://u:ab@h:1/0 and rediss://:a@x")
        == "to redis://u:***@h:1/0 and rediss://:***@x"
    )
    assert secrets.redact_value({"password": "a", "api_key": "ab", "Authorization": "Token abc"}) == {
        "password": "***",
        "api_key": "***",
        "Authorization": "Token ***",
    }


def test_deepgram_key_never_shows_in_text_fields_or_exceptions() -> None:
    key = "0123456789abcdef0123456789abcdef01234567"  # 40 hex characters, like a Deepgram key
    secrets.register_secret(key)
    assert (
        secrets.redact(f"GET /v1/listen Authorization: Token {key}")
        == "GET /v1/listen Authorization: Token ***"
    )
    assert key[:20] not in str(secrets.redact_value({"headers": [f"Token {key}"], "exc": ValueError(key)}))


@pytest.mark.parametrize("password", ENDS_ADDRESS)
def test_a_password_redis_py_would_misread_is_refused_without_quoting_it(
    password: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"redis://u:{password}@127.0.0.1:1/0"
    with pytest.raises(secrets.URLPasswordError) as info:
        secrets.check_url_password(url)
    assert "percent-encode" in str(info.value)
    monkeypatch.setenv("VOXQUEUE_REDIS_URL", url)
    with pytest.raises(ConfigError) as config:
        load_settings(deepgram_url="ws://127.0.0.1:1")
    assert "VOXQUEUE_REDIS_URL" in str(config.value) and "percent-encode" in str(config.value)
    for fragment in password.replace("/", " ").replace("?", " ").replace("#", " ").split():
        if len(fragment) > 1:
            assert fragment not in str(config.value)
            assert fragment not in str(info.value)


def test_library_messages_about_a_url_with_a_password_are_withheld_when_they_could_quote_it() -> None:
    # urllib quotes what it took for a port: here "s3cr", a part of the password no substring rule knows.
    exc = ValueError("Port could not be cast to integer value as 's3cr'")
    described = secrets.describe_url_error(exc, "redis://u:s3cr/t@h/0")
    assert described.startswith("ValueError") and "s3cr" not in described
    refused = ConnectionError("Error 111 connecting to h:6379. Connection refused.")
    assert secrets.describe_url_error(refused, "redis://u:ab@h:6379") == (
        "ConnectionError: Error 111 connecting to h:6379. Connection refused."
    )


def _wav(path: Path) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"\0" * 640 * 2)
    return path


@pytest.mark.parametrize("password", ["pa ss@w0rd:X", "ab", "p%40ss"])
def test_cli_error_for_unreachable_redis_never_shows_the_password(password: str, tmp_path: Path) -> None:
    url = f"redis://u:{password}@127.0.0.1:{free_port()}/0"
    result = CliRunner().invoke(
        producer_main,
        ["produce", str(_wav(tmp_path / "a.wav")), "--speed", "0"],
        env={"VOXQUEUE_REDIS_URL": url},
        catch_exceptions=False,
    )
    assert result.exit_code == 1
    assert "cannot reach Redis at redis://u:***@127.0.0.1:" in result.stderr
    assert "ConnectionError" in result.stderr
    assert f":{password}@" not in result.output
    if len(password) >= secrets.MIN_SECRET_LEN:
        assert password not in result.output


def test_cli_refuses_a_url_it_would_misread_without_quoting_the_password(tmp_path: Path) -> None:
    url = f"redis://u:s3cr/t@127.0.0.1:{free_port()}/0"
    result = CliRunner().invoke(
        producer_main,
        ["produce", str(_wav(tmp_path / "a.wav")), "--speed", "0"],
        env={"VOXQUEUE_REDIS_URL": url},
        catch_exceptions=False,
    )
    assert result.exit_code == 2
    assert "percent-encode" in result.stderr and "'/' as %2F" in result.stderr
    assert "s3cr" not in result.output
