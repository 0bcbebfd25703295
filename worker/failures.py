"""Which Deepgram failures end a session and which are worth a reconnect (README "Guarantees").

Classification only looks at exception types and codes; it never formats the exception itself,
because the SDK's ApiError carries the request headers, including `Authorization: Token <key>`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Final

from deepgram.core.api_error import ApiError
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from worker.store import StaleCommitPoint

# Handshake statuses that will not get better by retrying.
FATAL_STATUSES: Final = frozenset({400, 401, 402, 403, 404, 405, 413, 414})
# Close codes that mean the audio or the request is wrong, not the network.
FATAL_CLOSE_CODES: Final = frozenset({1003, 1007, 1008, 1009})


@dataclass(frozen=True, slots=True)
class Failure:
    fatal: bool
    code: str  # stable machine-readable code for events and metrics
    reason: str  # human-readable, secret-free

    def __str__(self) -> str:
        return f"{self.code}: {self.reason}"


class StalledConnection(Exception):
    """The watchdog saw audio go out and nothing come back for too long (half-open stream)."""


class UnexpectedClose(Exception):
    """Deepgram closed normally before we asked it to (no CloseStream sent)."""


def classify(exc: BaseException) -> Failure:
    if isinstance(exc, ApiError):
        status = exc.status_code or 0
        reason = _dg_error(exc) or f"handshake rejected with HTTP {status}"
        if status in FATAL_STATUSES:
            return Failure(True, f"http_{status}", reason)
        return Failure(False, f"http_{status}", reason)
    if isinstance(exc, InvalidStatus):
        status = exc.response.status_code
        return Failure(status in FATAL_STATUSES, f"http_{status}", f"handshake rejected with HTTP {status}")
    if isinstance(exc, ConnectionClosed):
        frame = exc.rcvd
        if frame is None:
            return Failure(False, "ws_1006", "connection dropped without a close frame")
        reason = frame.reason or "no reason given"
        if frame.code in FATAL_CLOSE_CODES:
            return Failure(True, f"ws_{frame.code}", reason)
        return Failure(False, f"ws_{frame.code}", reason)
    if isinstance(exc, StalledConnection):
        return Failure(False, "stalled", str(exc))
    if isinstance(exc, UnexpectedClose):
        return Failure(False, "closed_early", str(exc))
    if isinstance(exc, StaleCommitPoint):
        return Failure(False, "stale_commit_point", "commit point moved on in Redis: replaying from there")
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return Failure(False, "timeout", "timed out talking to Deepgram")
    if isinstance(exc, InvalidHandshake):
        return Failure(False, "handshake", type(exc).__name__)
    if isinstance(exc, OSError):
        return Failure(
            False, "unreachable", f"cannot reach Deepgram ({type(exc).__name__}: {exc.strerror or exc})"
        )
    return Failure(False, "unexpected", type(exc).__name__)


def _dg_error(exc: ApiError) -> str | None:
    """Deepgram's own reason, from the `dg-error` response header the SDK leaves on __context__."""
    ctx = exc.__context__
    headers = getattr(ctx, "headers", None)
    if headers is None:
        response = getattr(ctx, "response", None)
        headers = getattr(response, "headers", None)
    if headers is None:
        return None
    try:
        value = headers.get("dg-error")
    except Exception:  # headers of an unknown type: no reason rather than a crash
        return None
    return str(value)[:300] if value else None
