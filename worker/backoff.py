"""Exponential backoff with full jitter, bounded: no retry storms against Deepgram or Redis."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

# One generator for every Backoff that is not given its own: `random.Random()` seeds itself from
# os.urandom (a syscall and ~2.5 KB of state), and a Backoff is made for every Redis call a session
# retries, so per-instance generators showed up in the worker's profile.
_SHARED_RNG = random.Random()


@dataclass(slots=True)
class Backoff:
    initial: float = 0.2
    maximum: float = 10.0
    multiplier: float = 2.0
    attempts: int = 0
    rng: random.Random = field(default_factory=lambda: _SHARED_RNG)

    def next_delay(self) -> float:
        """The next wait: uniform in [cap/2, cap] where cap grows exponentially up to `maximum`.

        Half-jitter rather than full jitter keeps a floor, so a fleet that lost Deepgram at once
        spreads out but never hammers it with near-zero waits.
        """
        cap = min(self.maximum, self.initial * self.multiplier**self.attempts)
        self.attempts += 1
        return self.rng.uniform(cap / 2, cap)

    def reset(self) -> None:
        self.attempts = 0
