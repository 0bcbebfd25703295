"""Drain on SIGTERM: each session's lease is released as soon as that session has stopped, so another
worker takes it over at its next scan; a session that does not stop keeps its lease; every wait
on the way out, the worker's and the tests' own, is bounded."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import statistics
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from producer import protocol as p
from producer.audio import marker_frame
from producer.client import Producer
from tests import harness
from tests.harness import (
    Stack,
    TeardownTimeout,
    assert_perfect,
    check_marker_session,
    produce_marker_session,
    rig,
    sessions_pending,
    wait_until_ended,
)
from worker.pool import SESSION_STOP_SECONDS, WorkerPool
from worker.session_runner import SessionRunner

KEYS = p.Keys()
SESSIONS = 100
FRAMES = 400  # 8 s of real-time audio each
# 30 s: a session that went through lease expiry instead of the release would take >= 30 s. And a
# 10 s scan period: one picked up by the periodic takeover scan instead of the hand-over notice
# (a publish on the namespace's hand-over channel) would take up to 10 s.
LONG_LEASE = {"VOXQUEUE_LEASE_SECONDS": "30", "VOXQUEUE_RENEW_SECONDS": "10"}


async def _states(redis: object, sids: list[str], field: str) -> list[bytes | None]:
    pipe = redis.pipeline(transaction=False)  # type: ignore[attr-defined]
    for sid in sids:
        pipe.hget(KEYS.session(sid).state, field)
    return list(await pipe.execute())


async def _wait_owned_by(redis: object, sids: list[str], owner: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        owners = await _states(redis, sids, "owner")
        missing = [sid for sid, o in zip(sids, owners, strict=True) if o != owner.encode()]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(missing)} sessions not owned by {owner} after {timeout} s")
        await asyncio.sleep(0.05)


@pytest.mark.slow
async def test_sigterm_hands_100_busy_sessions_over_within_a_second(tmp_path: Path) -> None:
    stack = Stack(tmp_path, worker_env=LONG_LEASE).start()
    redis = stack.client()
    try:
        stack.start_worker("h1")
        await stack.wait_workers_ready(1)
        sids = [f"hand-{i}" for i in range(SESSIONS)]
        async with Producer(stack.client()) as producer:
            producing = asyncio.gather(
                *(produce_marker_session(producer, sid, FRAMES, realtime=True) for sid in sids)
            )
            try:
                await _wait_owned_by(redis, sids, "h1", 15)
                stack.start_worker("h2")  # only now, so that h1 holds all 100
                await stack.wait_workers_ready(2)
                term_at = time.time()
                stack.signal_worker("h1", signal.SIGTERM)
                await _wait_owned_by(redis, sids, "h2", 45)
                claimed = await _states(redis, sids, "claimed_at")
                handover = sorted(int(c or 0) / 1000 - term_at for c in claimed)
                code = await asyncio.to_thread(stack.workers["h1"].wait, 15)
            finally:
                await asyncio.wait_for(producing, 60)
        await wait_until_ended(redis, KEYS, sids, 30)
        for sid in sids:
            assert_perfect(await check_marker_session(redis, KEYS, sid, FRAMES), FRAMES)
        assert await sessions_pending(redis, KEYS) == 0
        p99 = handover[int(len(handover) * 0.99) - 1]
        drained = _log_event(stack.worker_log("h1"), "drained")
        released_in = datetime.fromisoformat(drained["timestamp"]).timestamp() - term_at
        print(
            f"CHAOS drain handover sessions={len(handover)} median={statistics.median(handover):.2f}s "
            f"p99={p99:.2f}s max={handover[-1]:.2f}s; all released {released_in:.2f}s after SIGTERM "
            f"(handed={drained.get('handed')} stuck={drained.get('stuck', 0)}) worker_exit={code}"
        )
        assert code == 0
        assert drained.get("handed") == SESSIONS, drained  # every lease released, none left to expire
        # Any session that went through lease expiry took >= 30 s, through the periodic scan up to
        # 10 s: under 5 s means released on drain and picked up on the hand-over notice.
        assert handover[-1] < 5, f"slowest hand-over {handover[-1]:.2f}s: not released and announced"
    finally:
        await harness.bounded(redis.aclose(), 5, "closing the redis client")
        stack.stop()


def _log_event(log: str, event: str) -> dict[str, Any]:
    for line in log.splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if record.get("event") == event:
                return dict(record)
    raise AssertionError(f"no {event!r} line in the worker log")


def _stubborn_run(
    let_go: asyncio.Event, cancels: list[int], swallow: int = 1_000_000
) -> Callable[[SessionRunner], Awaitable[None]]:
    async def run(self: SessionRunner) -> None:
        # A session task that swallows its first `swallow` cancellations, as one does when the
        # cancel lands inside asyncio.wait_for (CPython gh-86296): it then just goes on.
        while not let_go.is_set():
            try:
                await let_go.wait()
            except asyncio.CancelledError:
                cancels.append(1)
                if len(cancels) > swallow:
                    raise

    return run


async def _claimed(r: harness.Rig, sid: str) -> None:
    deadline = time.monotonic() + 10
    while sid not in r.pool.owned or not await r.redis.hget(KEYS.session(sid).state, "owner"):
        assert time.monotonic() < deadline, "the worker never claimed the session"
        await asyncio.sleep(0.02)


async def test_a_lost_cancellation_is_repeated_and_the_session_still_handed_over(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    let_go, cancels = asyncio.Event(), list[int]()
    monkeypatch.setattr(SessionRunner, "run", _stubborn_run(let_go, cancels, swallow=1))
    async with rig(lease_seconds=30, renew_seconds=1) as r:
        try:
            await r.producer.open_session(sid="deaf-once")
            await _claimed(r, "deaf-once")
            r.pool.stop_requested.set()
            done, _ = await asyncio.wait([r.task], timeout=SESSION_STOP_SECONDS + 5)
            assert done, "the worker did not stop"
            assert len(cancels) == 2  # the first was lost; the drain cancelled it again
            state = await r.redis.hgetall(KEYS.session("deaf-once").state)
            assert state.get(b"released") == b"1", "a session that did stop must be released"
            assert r.pool.unstopped == []
        finally:
            let_go.set()


async def test_a_session_that_ignores_cancel_keeps_its_lease_and_the_worker_still_stops(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    let_go, cancels = asyncio.Event(), list[int]()
    monkeypatch.setattr(SessionRunner, "run", _stubborn_run(let_go, cancels))
    async with rig() as r:
        try:
            await r.producer.open_session(sid="stuck")
            await _claimed(r, "stuck")
            stopping = time.monotonic()
            r.pool.stop_requested.set()
            done, _ = await asyncio.wait([r.task], timeout=4 * SESSION_STOP_SECONDS + 5)
            took = time.monotonic() - stopping
            assert done, "the worker waited for a session that ignores cancellation"
            print(f"DRAIN stuck session: worker stopped in {took:.2f}s after {len(cancels)} cancels")
            assert cancels, "the session was never cancelled"
            assert r.pool.unstopped == ["stuck"]
            # Not released: still owned, still pending for this worker, epoch unchanged.
            state = await r.redis.hgetall(KEYS.session("stuck").state)
            assert state[b"owner"] == r.pool.consumer.encode()
            assert b"released" not in state
            pending = await r.redis.xpending(KEYS.sessions(0), p.WORKERS_GROUP)
            assert pending["pending"] == 1
            assert pending["consumers"][0]["name"] == r.pool.consumer.encode()
        finally:
            let_go.set()


async def test_rig_teardown_is_bounded_when_the_worker_ignores_stop_and_cancel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    let_go = asyncio.Event()

    async def deaf_run(self: WorkerPool) -> None:
        while not let_go.is_set():
            # Cancellation swallowed: the worker neither drains nor dies.
            with contextlib.suppress(asyncio.CancelledError):
                await let_go.wait()

    monkeypatch.setattr(WorkerPool, "run", deaf_run)
    monkeypatch.setattr(harness, "RIG_STOP_SECONDS", 0.5)
    monkeypatch.setattr(harness, "RIG_CANCEL_SECONDS", 0.5)
    started = time.monotonic()
    try:
        with pytest.raises(TeardownTimeout, match=r"nor 0\.5 s after cancel"):
            async with rig() as r:
                await r.redis.ping()
        assert time.monotonic() - started < 10
    finally:
        let_go.set()  # so the event loop's own teardown is not left with it


async def test_rig_reports_a_worker_that_needed_cancel(monkeypatch: pytest.MonkeyPatch) -> None:
    async def slow_run(self: WorkerPool) -> None:
        await asyncio.sleep(3600)  # ignores stop_requested, but does stop when cancelled

    monkeypatch.setattr(WorkerPool, "run", slow_run)
    monkeypatch.setattr(harness, "RIG_STOP_SECONDS", 0.5)
    with pytest.raises(TeardownTimeout, match="cancelled it"):
        async with rig() as r:
            await r.redis.ping()


async def test_a_drained_in_process_session_is_released_not_left_to_expire() -> None:
    """The in-process view of the hand-over: a live session's lease is released on drain (epoch
    bumped, owner gone, `released` set), well before the 30 s lease could have run out."""
    async with rig(lease_seconds=30, renew_seconds=1) as r:
        session = await r.producer.open_session(sid="live")
        for n in range(20):
            await session.send_frame(marker_frame(n))
        await _claimed(r, "live")
        epoch = int(await r.redis.hget(KEYS.session("live").state, "epoch") or 0)
        r.pool.stop_requested.set()
        done, _ = await asyncio.wait([r.task], timeout=10)
        assert done
        state = await r.redis.hgetall(KEYS.session("live").state)
        assert state.get(b"released") == b"1"
        assert b"owner" not in state
        assert int(state[b"epoch"]) == epoch + 1
        assert state[b"status"] == b"active"  # still to be finished, by whoever takes it next
        assert r.pool.unstopped == []
