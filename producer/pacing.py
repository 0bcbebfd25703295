"""When to send the next frame of a recording so it reaches Redis like live audio would.

Pure arithmetic on a clock the caller passes in; the caller sleeps. Keeping the sleep out makes the
schedule testable without waiting and lets one loop pace many sessions.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Pacer:
    """Frames go out at `speed` x real time: frame k is due `k * frame_seconds / speed` after the
    first one. Speed 0 means as fast as possible (never wait).

    The schedule is anchored to the first frame rather than to the previous one, so sleeps that
    overshoot (a busy event loop) are caught up by later frames instead of accumulating as drift.
    """

    speed: float = 1.0
    frame_seconds: float = 0.02
    _start: float | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.speed < 0:
            raise ValueError("speed must be >= 0")
        if self.frame_seconds <= 0:
            raise ValueError("frame_seconds must be > 0")

    def delay(self, frame_index: int, now: float) -> float:
        """Seconds to wait, at monotonic time `now`, before sending frame `frame_index` (0-based)."""
        if self.speed == 0:
            return 0.0
        if self._start is None:
            self._start = now - frame_index * self.frame_seconds / self.speed
        due = self._start + frame_index * self.frame_seconds / self.speed
        return max(0.0, due - now)
