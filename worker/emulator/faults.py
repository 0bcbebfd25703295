"""Injectable faults: what goes wrong, for which connection, and when.

A `FaultPlan` is set at start-up (EmulatorServer(faults=...), CLI flags) or at run time with
`GET /_emulator/faults?<param>=<value>&...` (which replaces the whole plan; no parameters = read it;
`reset=1` clears it). Parameters:

| param | default | meaning |
|---|---|---|
| drop_rate | 0 | probability that a connection is dropped mid-stream |
| drop_kind | any | `close` (close frame 1011), `abrupt` (TCP abort, client sees 1006), `any` (random) |
| drop_after_min / drop_after_max | 10 / 200 | the drop happens after a random frame count in this range |
| fail_after_frames | 0 | if > 0: close 1011 after this many frames ... |
| fail_count | -1 | ... on the next N connections (-1 = every connection) |
| stall_next | 0 | the next N connections (-1 = all) go half-open ... |
| stall_after | 20 | ... after this many frames: audio accepted, nothing ever sent, never closed |
| handshake_status | 0 | if set (401, 429, 500, ...): answer the handshake with this HTTP status ... |
| handshake_count | 1 | ... for the next N handshakes (-1 = all) |
| slow_results_ms | 0 | delay every message the server sends by this much, order kept (applies live) |
| seed | none | seeds the drop RNG so a run is reproducible |

Faults are decided once per connection when it is accepted (`ConnectionFaults`), from a seeded RNG,
so the same plan and the same connection order give the same drops. A "frame" is the connection's
20 ms frame (640 bytes at 16 kHz mono) counted from its first byte. When a fault fires, the audio
message that reached the threshold is not transcribed, as audio in flight is lost in a real drop.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

DROP_KINDS = ("any", "close", "abrupt")

# Reasons within the 123-byte limit of a close frame, in Deepgram's "<CODE>: text" style.
DROP_REASON = "NET-0000: The service has encountered an internal error (emulated drop)."
FAIL_REASON = "NET-0000: The service has encountered an internal error (fail_after_frames)."

_HANDSHAKE_ERRORS = {
    401: ("INVALID_AUTH", "Invalid credentials."),
    402: ("ASR_PAYMENT_REQUIRED", "Project does not have enough credits for an ASR request."),
    403: ("INSUFFICIENT_PERMISSIONS", "Project does not have access to the requested resource."),
    429: ("TOO_MANY_REQUESTS", "Too many requests. Please try again later."),
    500: ("INTERNAL_SERVER_ERROR", "The service has encountered an internal error."),
    503: ("SERVICE_UNAVAILABLE", "The service is temporarily unavailable."),
}


def handshake_error(status: int) -> tuple[str, str]:
    """(err_code, err_msg) Deepgram sends with this HTTP status."""
    return _HANDSHAKE_ERRORS.get(status, ("REQUEST_FAILED", f"Request failed with status {status}."))


class FaultPlanError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class FaultPlan:
    drop_rate: float = 0.0
    drop_kind: str = "any"
    drop_after_min: int = 10
    drop_after_max: int = 200
    fail_after_frames: int = 0
    fail_count: int = -1
    stall_next: int = 0
    stall_after: int = 20
    handshake_status: int = 0
    handshake_count: int = 1
    slow_results_ms: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.drop_rate <= 1.0:
            raise FaultPlanError("drop_rate must be within [0, 1]")
        if self.drop_kind not in DROP_KINDS:
            raise FaultPlanError(f"drop_kind must be one of {', '.join(DROP_KINDS)}")
        if not 0 <= self.drop_after_min <= self.drop_after_max:
            raise FaultPlanError("need 0 <= drop_after_min <= drop_after_max")
        if self.handshake_status and not 400 <= self.handshake_status <= 599:
            raise FaultPlanError("handshake_status must be an HTTP error status (400..599)")
        for name in ("fail_after_frames", "stall_after", "slow_results_ms"):
            if getattr(self, name) < 0:
                raise FaultPlanError(f"{name} must not be negative")

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> FaultPlan:
        """Build a plan from query parameters or CLI options (strings or typed values)."""
        types = {f.name: f.type for f in fields(cls)}
        values: dict[str, Any] = {}
        for name, raw in params.items():
            if name not in types:
                raise FaultPlanError(f"unknown fault parameter {name!r}")
            if raw is None or raw == "":
                continue
            kind = types[name]
            try:
                if kind == "float":
                    values[name] = float(raw)
                elif kind == "str":
                    values[name] = str(raw)
                else:
                    values[name] = int(raw)
            except (TypeError, ValueError):
                raise FaultPlanError(f"fault parameter {name} has a bad value {raw!r}") from None
        return cls(**values)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class ConnectionFaults:
    """What will happen to one connection, in frames since its start (None = never)."""

    drop_at: int | None = None
    drop_kind: str = "close"  # "close" | "abrupt"
    fail_at: int | None = None
    stall_at: int | None = None

    def first(self) -> tuple[int, str] | None:
        """The earliest fault as (frame count, kind), kind in close|abrupt|fail|stall."""
        due = [
            (at, kind)
            for at, kind in (
                (self.stall_at, "stall"),
                (self.fail_at, "fail"),
                (self.drop_at, self.drop_kind),
            )
            if at is not None
        ]
        return min(due, key=lambda d: d[0]) if due else None


NO_FAULTS = ConnectionFaults()


class FaultInjector:
    """The live plan plus its countdowns and RNG; one per server."""

    def __init__(self, plan: FaultPlan | None = None) -> None:
        self.set_plan(plan or FaultPlan())

    def set_plan(self, plan: FaultPlan) -> None:
        self.plan = plan
        self._rng = random.Random(plan.seed)
        self._handshakes_left = plan.handshake_count if plan.handshake_status else 0
        self._stalls_left = plan.stall_next
        self._fails_left = plan.fail_count if plan.fail_after_frames else 0

    def reset(self) -> None:
        self.set_plan(FaultPlan())

    @property
    def slow_results_s(self) -> float:
        return self.plan.slow_results_ms / 1000.0

    def pending(self) -> dict[str, int]:
        """How many of the counted faults are still to come (-1 = unlimited)."""
        return {
            "handshakes_left": self._handshakes_left,
            "stalls_left": self._stalls_left,
            "fails_left": self._fails_left,
        }

    def handshake_fault(self) -> int | None:
        """The HTTP status to refuse this handshake with, or None to let it through."""
        if self._handshakes_left == 0:
            return None
        if self._handshakes_left > 0:
            self._handshakes_left -= 1
        return self.plan.handshake_status

    def for_connection(self) -> ConnectionFaults:
        plan = self.plan
        if not (plan.drop_rate or self._stalls_left or self._fails_left):
            return NO_FAULTS
        stall_at = fail_at = drop_at = None
        drop_kind = "close"
        if self._stalls_left:
            self._stalls_left -= self._stalls_left > 0
            stall_at = plan.stall_after
        if self._fails_left:
            self._fails_left -= self._fails_left > 0
            fail_at = plan.fail_after_frames
        if plan.drop_rate:
            # Always draw the same number of values per connection, so that a connection's fate
            # depends only on the seed and its position, not on what earlier connections drew.
            hit = self._rng.random() < plan.drop_rate
            at = self._rng.randint(plan.drop_after_min, plan.drop_after_max)
            kind = self._rng.choice(("close", "abrupt"))
            if hit:
                drop_at = at
                drop_kind = kind if plan.drop_kind == "any" else plan.drop_kind
        return ConnectionFaults(drop_at=drop_at, drop_kind=drop_kind, fail_at=fail_at, stall_at=stall_at)
