"""Chaos: crashes, drops, stalls, Redis restarts, drains and freezes, with zero frames lost and zero
finals duplicated. Real worker processes, real redis-server, the emulator's marker engine.

Each test prints its measurements (`CHAOS ...` lines, visible with `pytest -s`).
"""

from __future__ import annotations

import asyncio
import random
import signal
import statistics
import time
from pathlib import Path

import pytest

from producer import protocol as p
from producer.client import Producer
from tests.harness import (
    Stack,
    assert_perfect,
    check_marker_session,
    produce_marker_session,
    session_events,
    sessions_pending,
    wait_until_ended,
)

pytestmark = pytest.mark.slow

FAST_LEASES = {"VOXQUEUE_LEASE_SECONDS": "3", "VOXQUEUE_RENEW_SECONDS": "0.5"}


async def produce_all(
    stack: Stack, sessions: dict[str, int], *, realtime: bool, stagger: float = 0.0
) -> None:
    redis = stack.client()
    async with Producer(redis) as producer:

        async def one(i: int, sid: str, frames: int) -> None:
            await asyncio.sleep(i * stagger)
            await produce_marker_session(producer, sid, frames, realtime=realtime)

        await asyncio.gather(*(one(i, sid, n) for i, (sid, n) in enumerate(sessions.items())))
    await redis.aclose()


async def verify_all(stack: Stack, sessions: dict[str, int], timeout: float) -> None:
    redis = stack.client()
    try:
        await wait_until_ended(redis, stack.keys, list(sessions), timeout)
        lost = duplicated = 0
        for sid, frames in sessions.items():
            report = await check_marker_session(redis, stack.keys, sid, frames)
            lost += report.lost_frames
            duplicated += report.duplicated_finals
            assert_perfect(report, frames)
        assert await sessions_pending(redis, stack.keys) == 0
        frames = sum(sessions.values())
        print(f"CHAOS sessions={len(sessions)} frames={frames} lost={lost} duplicated={duplicated}")
    finally:
        await redis.aclose()


async def owners(stack: Stack, sids: list[str]) -> dict[str, str]:
    redis = stack.client()
    try:
        out = {}
        for sid in sids:
            owner = await redis.hget(stack.keys.session(sid).state, "owner")
            out[sid] = owner.decode() if owner else ""
        return out
    finally:
        await redis.aclose()


async def claimed_at(stack: Stack, sid: str) -> float:
    redis = stack.client()
    try:
        return int(await redis.hget(stack.keys.session(sid).state, "claimed_at") or 0) / 1000
    finally:
        await redis.aclose()


async def test_kill_nine_two_workers_mid_stream(tmp_path: Path) -> None:
    """30 sessions on 3 workers; kill -9 one worker, then another, at random moments."""
    stack = Stack(tmp_path).start()  # default lease (5 s) and renewal (1 s): measure the real figure
    try:
        for name in ("k1", "k2", "k3"):
            stack.start_worker(name)
        rng = random.Random(11)
        sessions = {f"kill-{i}": rng.randint(300, 600) for i in range(30)}  # 6-12 s, real time
        producing = asyncio.create_task(produce_all(stack, sessions, realtime=True, stagger=0.05))
        takeover_times: list[float] = []
        for victim in ("k1", "k2"):
            await asyncio.sleep(rng.uniform(1.5, 3.0))
            victims = [sid for sid, o in (await owners(stack, list(sessions))).items() if o == victim]
            killed_at = time.time()
            stack.signal_worker(victim, signal.SIGKILL)
            for sid in victims:
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline:
                    if (await owners(stack, [sid]))[sid] not in ("", victim) or await _ended(stack, sid):
                        break
                    await asyncio.sleep(0.05)
                at = await claimed_at(stack, sid)
                if at > killed_at:
                    takeover_times.append(at - killed_at)
        await producing
        await verify_all(stack, sessions, timeout=60)
        assert takeover_times, "no session was owned by the killed workers"
        print(
            f"CHAOS kill-9 takeovers={len(takeover_times)} "
            f"median={statistics.median(takeover_times):.2f}s max={max(takeover_times):.2f}s"
        )
        assert max(takeover_times) < 10
    finally:
        stack.stop()


async def redis_dump(stack: Stack) -> list[object]:
    """Every event and dead letter in Redis, for checking that no secret ended up there."""
    redis = stack.client()
    try:
        out: list[object] = []
        for key in await redis.keys("*"):
            if await redis.type(key) == b"stream":
                out += await redis.xrange(key)
        return out
    finally:
        await redis.aclose()


async def _ended(stack: Stack, sid: str) -> bool:
    redis = stack.client()
    try:
        return await redis.hget(stack.keys.session(sid).state, "status") in (b"ended", b"failed")
    finally:
        await redis.aclose()


async def test_emulator_drops_and_stalls(tmp_path: Path) -> None:
    """1 connection in 5 dropped at a random point (with and without a close frame), one stalls."""
    stack = Stack(tmp_path, worker_env={"VOXQUEUE_STALL_SECONDS": "1.5", **FAST_LEASES}).start()
    try:
        stack.faults(
            drop_rate=0.2,
            drop_kind="any",
            drop_after_min=5,
            drop_after_max=150,
            stall_next=1,
            stall_after=30,
            seed=5,
        )
        stack.start_worker("d1")
        stack.start_worker("d2")
        sessions = {f"drop-{i}": 150 + 20 * i for i in range(16)}
        await produce_all(stack, sessions, realtime=True, stagger=0.02)
        await verify_all(stack, sessions, timeout=60)
        stats = stack.emulator_stats()
        print(f"CHAOS emulator faults: {stats.get('drops')} stalls={stats.get('stalls')}")
        logs = stack.worker_log("d1") + stack.worker_log("d2")
        assert "reconnecting" in logs
    finally:
        stack.stop()


async def test_redis_restart_mid_stream(tmp_path: Path) -> None:
    stack = Stack(tmp_path, worker_env=FAST_LEASES).start()
    try:
        stack.start_worker("r1")
        stack.start_worker("r2")
        sessions = {f"redis-{i}": 250 for i in range(10)}
        producing = asyncio.create_task(produce_all(stack, sessions, realtime=True))
        await asyncio.sleep(2.0)
        await asyncio.to_thread(
            stack.redis.restart, False
        )  # SHUTDOWN: AOF flushed, restarted on the same port
        await producing
        await verify_all(stack, sessions, timeout=60)
    finally:
        stack.stop()


async def test_sigterm_hands_sessions_over(tmp_path: Path) -> None:
    # A 30 s lease: a session that went through lease expiry instead of the release shows (>= 30 s).
    stack = Stack(tmp_path, worker_env={"VOXQUEUE_LEASE_SECONDS": "30"}).start()
    try:
        stack.start_worker("t1")
        await asyncio.sleep(1.0)
        sessions = {f"drain-{i}": 400 for i in range(8)}
        producing = asyncio.create_task(produce_all(stack, sessions, realtime=True))
        await asyncio.sleep(2.0)
        stack.start_worker("t2")
        await asyncio.sleep(1.0)
        busy = [sid for sid, o in (await owners(stack, list(sessions))).items() if o == "t1"]
        assert busy
        term_at = time.time()
        stack.signal_worker("t1", signal.SIGTERM)
        handover: list[float] = []
        for sid in busy:
            deadline = time.monotonic() + 15
            while (await owners(stack, [sid]))[sid] in ("", "t1") and time.monotonic() < deadline:
                if await _ended(stack, sid):
                    break
                await asyncio.sleep(0.02)
            handover.append(await claimed_at(stack, sid) - term_at)
        assert stack.workers["t1"].wait(30) == 0
        await producing
        await verify_all(stack, sessions, timeout=60)
        print(
            f"CHAOS sigterm handover sessions={len(handover)} median={statistics.median(handover):.2f}s "
            f"max={max(handover):.2f}s"
        )
        assert max(handover) < 5
    finally:
        stack.stop()


async def test_frozen_worker_publishes_nothing_after_takeover(tmp_path: Path) -> None:
    """SIGSTOP a worker, let another take its sessions over, SIGCONT it: the thawed worker must
    write nothing. Judged by stream order, not by the events' `ts` (stamped when an event is
    built, so an event built before the freeze and published after it would look on time): in
    XRANGE order, once an entry of epoch N is in a results stream, no entry of an epoch < N may
    follow it."""
    stack = Stack(tmp_path, worker_env=FAST_LEASES).start()

    def epoch_regressions(entries: list[tuple[bytes, dict[bytes, bytes]]]) -> list[str]:
        """Entries written by an owner after a newer owner had already written (one sid)."""
        newest, late = 0, []
        for entry_id, fields in entries:
            event = p.decode_event(fields)
            if event["epoch"] < newest:
                late.append(f"{entry_id.decode()} {event['type']} of epoch {event['epoch']} after {newest}")
            newest = max(newest, event["epoch"])
        return late

    async def produce_with_interims(stack: Stack, sessions: dict[str, int]) -> None:
        redis = stack.client()
        try:
            async with Producer(redis) as producer:
                options = {"interim_results": True}
                await asyncio.gather(
                    *(
                        produce_marker_session(producer, sid, n, realtime=True, options=options)
                        for sid, n in sessions.items()
                    )
                )
        finally:
            await redis.aclose()

    try:
        stack.start_worker("z1")
        sessions = {f"freeze-{i}": 500 for i in range(4)}
        # Interim results: besides finals (which COMMIT's commit-point check also refuses once z2
        # has moved on) z1 then has best-effort partials to publish when it thaws, which only the
        # epoch fence stops.
        producing = asyncio.create_task(produce_with_interims(stack, sessions))
        await asyncio.sleep(2.0)
        stack.start_worker("z2")
        before = await owners(stack, list(sessions))
        assert set(before.values()) == {"z1"}
        # Results delayed by 1.5 s: at the freeze z1 has results in flight, which land in its
        # socket while it is frozen, so it has words to publish the instant it thaws.
        stack.faults(slow_results_ms=1500)
        await asyncio.sleep(1.6)
        stack.signal_worker("z1", signal.SIGSTOP)
        stack.faults(reset=1)  # z2 then gets its results at once; z1's queued ones still arrive
        deadline = time.monotonic() + 20
        while set((await owners(stack, list(sessions))).values()) - {"z2"} and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert set((await owners(stack, list(sessions))).values()) == {"z2"}, "z2 did not take over"
        # Thaw z1 only once z2 has written to every session: a late write of z1 then lands after
        # an entry of the newer epoch, where stream order exposes it.
        redis = stack.client()
        try:
            waiting = set(sessions)
            while waiting and time.monotonic() < deadline:
                for sid in list(waiting):
                    sk = stack.keys.session(sid)
                    epoch = int(await redis.hget(sk.state, "epoch") or 0)
                    if any(p.decode_event(f)["epoch"] == epoch for _, f in await redis.xrange(sk.results)):
                        waiting.discard(sid)
                await asyncio.sleep(0.1)
            assert not waiting, f"z2 wrote nothing for {sorted(waiting)} before the deadline"
        finally:
            await redis.aclose()
        stack.signal_worker("z1", signal.SIGCONT)
        await producing
        redis = stack.client()
        try:
            await wait_until_ended(redis, stack.keys, list(sessions), timeout=60)
            by_sid: dict[str, list[tuple[bytes, dict[bytes, bytes]]]] = {sid: [] for sid in sessions}
            for entry_id, fields in await redis.xrange(stack.keys.results(0)):
                sid = fields[p.R_SID.encode()].decode()
                if sid in by_sid:
                    by_sid[sid].append((entry_id, fields))
            for sid in sessions:
                entries = await redis.xrange(stack.keys.session(sid).results)
                epochs = {p.decode_event(f)["epoch"] for _, f in entries}
                assert len(epochs) >= 2, f"{sid}: expected entries of both owners, got epochs {epochs}"
                late = epoch_regressions(entries)
                assert not late, f"{sid}: the frozen worker published after losing the lease: {late}"
                late = epoch_regressions(by_sid[sid])
                assert not late, f"{sid}: partition results, published after losing the lease: {late}"
        finally:
            await redis.aclose()
        await verify_all(stack, sessions, timeout=60)
        log_deadline = time.monotonic() + 5
        while time.monotonic() < log_deadline and not (
            "lease lost" in stack.worker_log("z1") or "lost the session" in stack.worker_log("z1")
        ):
            await asyncio.sleep(0.1)
        assert "lease lost" in stack.worker_log("z1") or "lost the session" in stack.worker_log("z1")
    finally:
        stack.stop()


async def test_deepgram_401_fails_sessions_once_and_worker_keeps_serving(tmp_path: Path) -> None:
    stack = Stack(tmp_path).start()
    try:
        stack.faults(handshake_status=401, handshake_count=3)
        # One at a time, so the first 3 sessions get the 401s; a distinctive key to look for in the output.
        stack.start_worker("a1", VOXQUEUE_CONCURRENCY="1", DEEPGRAM_API_KEY="dg-secret-4f9a1c")
        bad = {f"auth-{i}": 50 for i in range(3)}
        good = {f"ok-{i}": 100 for i in range(3)}
        await produce_all(stack, bad, realtime=False)
        redis = stack.client()
        await wait_until_ended(redis, stack.keys, list(bad), timeout=30)
        await produce_all(stack, good, realtime=False)
        await verify_all(stack, good, timeout=30)
        for sid in bad:
            events = await session_events(redis, stack.keys, sid)
            errors = [e for e in events if e["type"] == p.ERROR]
            assert len(errors) == 1 and errors[0]["fatal"] and errors[0]["code"] == "http_401"
            ended = [e for e in events if e["type"] == p.SESSION_ENDED]
            assert len(ended) == 1 and ended[0]["reason"] == p.END_FAILED
        dead = await redis.xrange(stack.keys.dead(0))
        assert len(dead) == 3
        await redis.aclose()
        stats = stack.emulator_stats()
        assert stats["connections_accepted"] == 3, stats  # 3 good sessions; the 3 rejected were never retried
        everything = stack.worker_log("a1") + repr(await redis_dump(stack))
        assert "dg-secret-4f9a1c" not in everything, "the Deepgram key leaked into logs or events"
    finally:
        stack.stop()


async def test_second_signal_exits_at_once(tmp_path: Path) -> None:
    """SIGTERM drains (an ending session may finish); a second SIGTERM does not wait for it."""
    stack = Stack(tmp_path, worker_env={"VOXQUEUE_DRAIN_SECONDS": "60"}).start()
    try:
        stack.faults(slow_results_ms=20000)  # Deepgram takes "forever" to flush: the session keeps ending
        stack.start_worker("s1")
        await stack.wait_workers_ready(1)
        await produce_all(stack, {"slow-0": 50}, realtime=False)
        while (await owners(stack, ["slow-0"]))["slow-0"] != "s1":
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # the end marker has been read: draining would wait for the session
        stack.signal_worker("s1", signal.SIGTERM)
        await asyncio.sleep(1.0)
        assert stack.workers["s1"].poll() is None, "the first signal must drain, not exit"
        second = time.monotonic()
        stack.signal_worker("s1", signal.SIGTERM)
        code = await asyncio.to_thread(stack.workers["s1"].wait, 10)
        print(f"CHAOS second signal: exited {time.monotonic() - second:.2f}s after it (code {code})")
        assert time.monotonic() - second < 5
        assert "second signal" in stack.worker_log("s1")
    finally:
        stack.stop()
