"""The one redactor: secrets never reach a log line, an event or an exception message, even in part.

Everything that prints a URL or text that might hold a secret goes through here: the producer CLI's
error messages, the worker's log processor (worker/logs.py), configuration errors, the worker's
start-up warnings.

    redact_url("redis://u:p@ss@host:6379/0")   -> "redis://u:***@host:6379/0"
    register_url(settings.redis_url)           # its exact text and its password, from now on
    register_secret(settings.api_key())        # the Deepgram key
    redact("cannot reach redis://u:p@ss@host") -> "cannot reach redis://u:***@host"

How secrets are found, and why in three ways:

1. Structurally, in URLs. A URL's user information is everything between `scheme://` and the
   *last* `@` of the URL, whatever characters the password holds: an unescaped `@`, `/`, `?`, `#`,
   `:` or a space in a password must not make a parser see a shorter password, a host, a path or
   a fragment and print the rest. If the user information has a `:`, the part after the first one
   is the password and is replaced by `***`; a user name alone (`redis://name@host`) is masked
   whole, because old-style Redis URLs put the password there. Query parameters that carry a
   password (`?password=`, `passwd`, `pass`, `pwd`, `token`, `secret`, `api_key`, `apikey`,
   `access_token`, as in `unix:///run/redis.sock?password=...`) are masked up to the next `&`,
   `#` or whitespace. Percent-encoded passwords are masked as written. `unix:///path` has no user
   information (the authority is empty), so its path is never mistaken for one.
   In free text the end of a URL is a guess: the token up to the next whitespace, or, when that
   token is `scheme://user:xyz` with no `@` and `xyz` is not a port, up to the last `@` of the line
   (a password with a space). The guess errs towards masking too much, never too little.

2. Exactly, for the URLs this process knows (`register_url`): its own Redis URL is replaced by its
   masked form wherever it appears verbatim, so no guess about where it ends is needed, and its
   password (as written, and percent-decoded) becomes a registered secret.

3. By substring, for registered secrets (`register_secret`: the Deepgram key, passwords), but only
   from MIN_SECRET_LEN (4) characters. A 1-3 character secret cannot be masked as a substring
   without masking every "a" or "ab" in every line, which would make logs useless and would itself
   reveal the secret (every masked spot spells it out). Short secrets are covered by (1) and (2)
   instead: in a URL, a query parameter or a field named like a secret (`redact_value` masks the
   whole value of keys such as `password`, `api_key`, `authorization`), they are masked whatever
   their length. Where a library would print a fragment of a password outside any URL (urllib's
   "Port could not be cast to integer value as 's3cr'" for a password with an unescaped `/`),
   `describe_url_error` withholds the library's text, and `check_url_password` rejects such URLs
   up front: a password with an unescaped `/`, `?` or `#` would make redis-py connect to a host
   made of part of the password, and print that host in its errors.
"""

from __future__ import annotations

import re
import threading
from typing import Any
from urllib.parse import unquote

__all__ = [
    "MASK",
    "MIN_SECRET_LEN",
    "URLPasswordError",
    "check_url_password",
    "clear_secrets",
    "describe_url_error",
    "redact",
    "redact_field",
    "redact_url",
    "redact_value",
    "register_secret",
    "register_url",
    "url_password",
]

MASK = "***"
MIN_SECRET_LEN = 4

# Field names whose whole value is a secret, whatever its length (lower-cased, '-' read as '_').
SECRET_KEYS = frozenset(
    {"password", "passwd", "pwd", "secret", "api_key", "apikey", "authorization", "access_token"}
)

_SCHEME_RE = re.compile(r"\b[A-Za-z][A-Za-z0-9+.\-]*://")
_WHOLE_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://\S")
_QUERY_SECRET_RE = re.compile(
    r"(?P<head>[?&;](?:password|passwd|pass|pwd|token|secret|api_key|apikey|access_token)=)"
    r"(?P<value>[^&#\s]*)",
    re.IGNORECASE,
)
_QUERY_SECRET_WHOLE_RE = re.compile(_QUERY_SECRET_RE.pattern.replace(r"[^&#\s]*", "[^&#]*"), re.IGNORECASE)
# What follows `host:` when it is a port and not a password: digits, then the end of the authority.
_PORT_RE = re.compile(r"^\d{1,5}(?:[/?#]|$)")

_lock = threading.Lock()
_secrets: set[str] = set()
_secrets_re: re.Pattern[str] | None = None
_urls: dict[str, str] = {}  # known URL -> its masked form, longest first when applied


# ------------------------------------------------------------------------------ one URL


def _split_userinfo(url: str) -> tuple[str, str, str] | None:
    """(scheme://, userinfo, rest after the last '@') of a whole URL, or None if it has none."""
    match = _SCHEME_RE.match(url)
    if not match:
        return None
    body = url[match.end() :]
    if body.startswith("/"):  # unix:///path: empty authority, so no user information
        return None
    at = body.rfind("@")
    if at < 0:
        return None
    return match.group(), body[:at], body[at + 1 :]


def _mask_userinfo(userinfo: str) -> str:
    user, sep, _password = userinfo.partition(":")
    return f"{user}:{MASK}" if sep else MASK


def url_password(url: str) -> str:
    """The password in a URL's user information as written ('' if none), whatever characters it holds."""
    parts = _split_userinfo(url.strip())
    if parts is None:
        return ""
    return parts[1].partition(":")[2]


def _query_secrets(url: str) -> list[str]:
    return [m.group("value") for m in _QUERY_SECRET_RE.finditer(url) if m.group("value")]


def redact_url(url: str) -> str:
    """The URL with its password (user information, password query parameters) replaced by ***.

    Given a whole URL (callers pass the URL itself), everything up to its last `@` is user
    information and a query value runs to the next `&` or `#`, spaces included. Text that does not
    start with a URL is masked as `redact` does, minus registered secrets.
    """
    if _WHOLE_URL_RE.match(url) and "\n" not in url:
        parts = _split_userinfo(url)
        if parts is not None:
            scheme, userinfo, rest = parts
            url = f"{scheme}{_mask_userinfo(userinfo)}@{rest}"
        return _QUERY_SECRET_WHOLE_RE.sub(_masked_value, url)
    return _redact_text(url)


def _masked_value(match: re.Match[str]) -> str:
    return match.group("head") + (MASK if match.group("value") else "")


def _redact_text(text: str) -> str:
    """Every URL in free text: its end is a guess (see the module docstring)."""
    text = _mask_urls_in_text(text)
    return _QUERY_SECRET_RE.sub(_masked_value, text) if "=" in text else text


def _mask_urls_in_text(text: str) -> str:
    if "://" not in text:
        return text
    out: list[str] = []
    pos = 0
    while True:
        match = _SCHEME_RE.search(text, pos)
        if not match:
            break
        start = match.end()
        out.append(text[pos:start])
        pos = start
        if text.startswith("/", start):
            continue
        line_end = text.find("\n", start)
        line_end = len(text) if line_end < 0 else line_end
        token_end = start
        while token_end < line_end and not text[token_end].isspace():
            token_end += 1
        token = text[start:token_end]
        at = token.rfind("@")
        if at < 0:
            # `scheme://user:xyz` with no '@' in the token: a password with a space, unless xyz is
            # a port. Then the user information runs to the last '@' of the line.
            user, sep, after = token.partition(":")
            if not sep or _PORT_RE.match(after) or "/" in user:
                continue
            at_line = text.rfind("@", start, line_end)
            if at_line < 0:
                continue
            at = at_line - start
        userinfo = text[start : start + at]
        out.append(_mask_userinfo(userinfo) + "@")
        pos = start + at + 1
    out.append(text[pos:])
    return "".join(out)


# ------------------------------------------------------------------------------ registry


def register_secret(value: str | None) -> None:
    """Mask `value` as a substring of every redacted text from now on.

    Values shorter than MIN_SECRET_LEN are not substring-masked (see the module docstring): they
    are masked structurally, in URLs, query parameters and secret-named fields.
    """
    global _secrets_re
    if not value or not isinstance(value, str) or len(value) < MIN_SECRET_LEN:
        return
    with _lock:
        if value in _secrets:
            return
        _secrets.add(value)
        # Longest first, so a secret that contains another one is masked whole.
        ordered = sorted(_secrets, key=len, reverse=True)
        _secrets_re = re.compile("|".join(re.escape(s) for s in ordered))


def register_url(url: str | None) -> None:
    """Mask this URL wherever it appears verbatim, and its password (as written and decoded) anywhere."""
    if not url:
        return
    url = url.strip()
    masked = redact_url(url)
    passwords = [url_password(url), *_query_secrets(url)]
    for password in passwords:
        register_secret(password)
        register_secret(unquote(password))
    if masked != url:
        with _lock:
            _urls[url] = masked


def clear_secrets() -> None:
    """Forget every registered secret and URL (for tests)."""
    global _secrets_re
    with _lock:
        _secrets.clear()
        _secrets_re = None
        _urls.clear()


def redact(text: str) -> str:
    """Mask known URLs, registered secrets and every URL's password in `text`."""
    urls = _urls
    if urls:
        for known in sorted(urls, key=len, reverse=True):
            if known in text:
                text = text.replace(known, urls[known])
    pattern = _secrets_re
    if pattern is not None:
        text = pattern.sub(MASK, text)
    return _redact_text(text)


def _secret_key(key: Any) -> bool:
    return isinstance(key, str) and key.lower().replace("-", "_") in SECRET_KEYS


_AUTH_SCHEME_RE = re.compile(r"^(Token|Bearer|Basic) \S")


def _mask_field(key: str, value: Any) -> Any:
    """The whole value of a secret-named field, masked; an Authorization header keeps its scheme word."""
    if not value:
        return value
    if key.lower() == "authorization" and isinstance(value, str):
        match = _AUTH_SCHEME_RE.match(value)
        if match:
            return f"{match.group(1)} {MASK}"
    return MASK


def redact_field(key: Any, value: Any) -> Any:
    """The value of field `key`: masked whole if the name says it is a secret, else redacted."""
    return _mask_field(key, value) if _secret_key(key) else redact_value(value)


def redact_value(value: Any, _depth: int = 0) -> Any:
    """Redact strings inside `value`, recursing into dicts, lists, tuples and sets (copies, never
    mutates). A dict value under a secret-named key (`password`, `api_key`, ...) is masked whole."""
    if isinstance(value, str):
        return redact(value)
    if _depth > 8:
        return value
    if isinstance(value, dict):
        return {
            k: (_mask_field(k, v) if _secret_key(k) else redact_value(v, _depth + 1))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [redact_value(v, _depth + 1) for v in value]
    if isinstance(value, tuple):
        return tuple(redact_value(v, _depth + 1) for v in value)
    if isinstance(value, set | frozenset):
        return {redact_value(v, _depth + 1) for v in value}
    if isinstance(value, BaseException):
        # An exception object passed as a value would be repr'd by a renderer: redact that text.
        return redact(repr(value))
    if isinstance(value, bytes):
        return redact(value.decode("utf-8", "replace"))
    return value


# ------------------------------------------------------------------------------ errors about a URL

# Characters that end the authority for urllib and redis-py even inside a password: unescaped,
# they make the client connect to a host built from part of the password.
_BREAKS_AUTHORITY = "/?#"


class URLPasswordError(ValueError):
    """A URL's password is written so that clients would misread it; the message never quotes it."""


def check_url_password(url: str) -> None:
    """Raise ValueError (a message without the password) if the URL's password cannot be parsed
    as written: an unescaped `/`, `?` or `#` in it makes redis-py see another host and password."""
    password = url_password(url)
    bad = sorted({c for c in password if c in _BREAKS_AUTHORITY})
    if bad:
        codes = ", ".join(f"'{c}' as %{ord(c):02X}" for c in bad)
        raise URLPasswordError(
            f"the password holds a character that ends the address: percent-encode it ({codes})"
        )


def describe_url_error(exc: BaseException, url: str) -> str:
    """`Type: message` for an error about `url`, with no part of its password.

    When the URL has a password, a parser's message may quote any fragment of it (a 'port' or a
    'host' cut out of the password), which substring masking cannot recognise: then only the
    exception's type is given, with the usual cause."""
    name = type(exc).__name__
    if isinstance(exc, URLPasswordError):
        return str(exc)
    if url_password(url) and isinstance(exc, ValueError):
        return f"{name} (message withheld: it may quote part of the password; percent-encode / ? # in it)"
    text = str(exc).replace(url.strip(), redact_url(url.strip())) if url else str(exc)
    for secret in [url_password(url), *_query_secrets(url)]:
        for form in {secret, unquote(secret)}:
            if len(form) >= MIN_SECRET_LEN:
                text = text.replace(form, MASK)
    text = redact(text)
    return f"{name}: {text}" if text else name
