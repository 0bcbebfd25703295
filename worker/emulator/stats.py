"""Counters the emulator keeps for tests and benchmarks, served as JSON at `/_emulator/stats`.

Updated on the hot path, so they are plain attributes and dicts, never locks or per-frame objects.
Lag samples (producer timestamp to emulator arrival) go into a bounded reservoir: exact while the
sample count is below its capacity, a uniform random sample after that, so a long benchmark keeps
constant memory while count, mean and max stay exact.
"""

from __future__ import annotations

import random
import time
from collections import Counter, deque
from typing import Any

DEFAULT_RESERVOIR = 200_000


class LagReservoir:
    def __init__(self, capacity: int = DEFAULT_RESERVOIR, seed: int | None = None) -> None:
        self.capacity = capacity
        self._rng = random.Random(seed)
        self.samples: list[int] = []
        self.count = 0
        self.total = 0
        self.max = 0

    def add(self, lags_ns: list[int]) -> None:
        self.count += len(lags_ns)
        self.total += sum(lags_ns)
        self.max = max(self.max, max(lags_ns, default=0))
        room = self.capacity - len(self.samples)
        if room >= len(lags_ns):
            self.samples.extend(lags_ns)
            return
        self.samples.extend(lags_ns[:room])
        # Algorithm R for the rest: the i-th sample seen replaces a random slot with p = capacity / i.
        seen = self.count - len(lags_ns) + room
        for lag in lags_ns[room:]:
            seen += 1
            j = self._rng.randrange(seen)
            if j < self.capacity:
                self.samples[j] = lag

    def summary(self) -> dict[str, Any]:
        if not self.count:
            return {"count": 0, "p50_ms": None, "p99_ms": None, "max_ms": None, "mean_ms": None}
        ordered = sorted(self.samples)

        def pct(p: float) -> float:
            return round(ordered[min(len(ordered) - 1, int(p * len(ordered)))] / 1e6, 3)

        return {
            "count": self.count,
            "p50_ms": pct(0.50),
            "p99_ms": pct(0.99),
            "max_ms": round(self.max / 1e6, 3),
            "mean_ms": round(self.total / self.count / 1e6, 3),
        }


FINAL_TIMES_KEPT = 500_000


class EmulatorStats:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.connections_accepted = 0
        self.handshakes_rejected: Counter[int] = Counter()  # HTTP status -> count
        self.drops: Counter[str] = Counter()  # "close" | "abrupt" | "fail" -> count
        self.stalls = 0
        self.frames_received = 0
        self.bytes_received = 0
        self.messages_received = 0
        self.messages_sent: Counter[str] = Counter()  # Results, Metadata, SpeechStarted, ...
        self.finals_sent = 0
        self.interims_sent = 0
        self.close_codes: Counter[int] = Counter()  # close codes the emulator sent
        self.lag = LagReservoir()
        # When each final left: (request id, its end on the connection, time.time_ns()). Lets a
        # benchmark measure transcript latency to the moment the final is readable downstream.
        self.final_times: deque[tuple[str, float, int]] = deque(maxlen=FINAL_TIMES_KEPT)

    def record_final(self, request_id: str, end: float) -> None:
        self.final_times.append((request_id, round(end, 3), time.time_ns()))

    def to_json(self, connections_open: int = 0) -> dict[str, Any]:
        # Open connections are a fact about the server, not a counter: a reset must not zero them.
        return {
            "connections_accepted": self.connections_accepted,
            "connections_open": connections_open,
            "handshakes_rejected": {str(k): v for k, v in sorted(self.handshakes_rejected.items())},
            "drops": dict(self.drops),
            "stalls": self.stalls,
            "frames_received": self.frames_received,
            "bytes_received": self.bytes_received,
            "messages_received": self.messages_received,
            "messages_sent": dict(self.messages_sent),
            "finals_sent": self.finals_sent,
            "interims_sent": self.interims_sent,
            "close_codes": {str(k): v for k, v in sorted(self.close_codes.items())},
            "lag": self.lag.summary(),
        }
