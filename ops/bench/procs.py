"""CPU time and memory of other processes, from /proc (Linux)."""

from __future__ import annotations

import os
from dataclasses import dataclass

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class ProcSample:
    cpu_s: float  # user + system CPU seconds so far
    rss_bytes: int


def sample(pid: int) -> ProcSample:
    with open(f"/proc/{pid}/stat") as f:
        # The command name may contain spaces: split after its closing parenthesis.
        fields = f.read().rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])
    rss_pages = int(fields[21])
    return ProcSample((utime + stime) / CLOCK_TICKS, rss_pages * os.sysconf("SC_PAGE_SIZE"))


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]
