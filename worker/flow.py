"""Timing rules of one Deepgram connection: catch-up pacing, keep-alive and the stall watchdog.

Pure logic: every method takes `now` (a monotonic clock reading) so tests need no sleeping.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class CatchupPacer:
    """Caps how fast audio goes out: at most `speed` × real time after an initial burst.

    Deepgram documents catch-up at about 1.25× real time; a backlog replayed after a reconnect or a
    takeover must not go faster. Live audio arrives at 1× and never waits. `speed` 0 = unpaced.
    """

    speed: float
    burst_seconds: float
    started_at: float = 0.0
    sent_seconds: float = 0.0

    def start(self, now: float) -> None:
        self.started_at = now
        self.sent_seconds = 0.0

    def delay(self, audio_seconds: float, now: float) -> float:
        """Seconds to wait before sending `audio_seconds` more audio."""
        if self.speed <= 0:
            return 0.0
        allowed = self.burst_seconds + self.speed * (now - self.started_at)
        excess = self.sent_seconds + audio_seconds - allowed
        return excess / self.speed if excess > 0 else 0.0

    def sent(self, audio_seconds: float) -> None:
        self.sent_seconds += audio_seconds


@dataclass(slots=True)
class LinkClock:
    """When to send KeepAlive, and when a connection is half-open (audio in, nothing out)."""

    keepalive_seconds: float
    stall_seconds: float
    last_sent_at: float = 0.0  # audio or KeepAlive: anything that keeps Deepgram's idle timer happy
    last_audio_at: float = 0.0
    last_reply_at: float = 0.0
    # First audio sent after the last reply: the watchdog counts from here, not from the reply, so a
    # quiet producer (no audio, only KeepAlive) never looks like a stalled server.
    awaiting_reply_since: float | None = None

    def start(self, now: float) -> None:
        self.last_sent_at = self.last_audio_at = self.last_reply_at = now
        self.awaiting_reply_since = None

    def audio_sent(self, now: float) -> None:
        self.last_sent_at = self.last_audio_at = now
        if self.awaiting_reply_since is None:
            self.awaiting_reply_since = now

    def keepalive_sent(self, now: float) -> None:
        self.last_sent_at = now

    def reply_received(self, now: float) -> None:
        self.last_reply_at = now
        self.awaiting_reply_since = None

    def keepalive_due(self, now: float) -> bool:
        return now - self.last_sent_at >= self.keepalive_seconds

    def stalled(self, now: float) -> bool:
        return self.awaiting_reply_since is not None and now - self.awaiting_reply_since >= self.stall_seconds

    def next_check_in(self, now: float) -> float:
        """How long the supervisor may sleep before something could be due."""
        wait = self.keepalive_seconds - (now - self.last_sent_at)
        if self.awaiting_reply_since is not None:
            wait = min(wait, self.stall_seconds - (now - self.awaiting_reply_since))
        return max(wait, 0.01)
