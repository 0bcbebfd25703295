"""Health endpoints and metrics of a real worker process (worker/health.py, worker/metrics.py)."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.harness import Stack, produce_marker_session, rig, wait_until_ended
from worker.health import HealthServer
from worker.redis_server import free_port


def get(port: int, path: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def wait_for(port: int, path: str, want: int, timeout: float, check: Any = None) -> dict[str, Any]:
    """Polls until `path` answers `want` (and `check(body)` holds); returns the JSON body."""
    deadline = time.monotonic() + timeout
    last: tuple[int, str] | str = ""
    while time.monotonic() < deadline:
        try:
            last = get(port, path)
        except OSError as exc:
            last = repr(exc)
        else:
            if last[0] == want:
                body = json.loads(last[1]) if path != "/metrics" else {}
                if check is None or check(body):
                    return body
        time.sleep(0.05)
    raise AssertionError(f"{path} did not answer {want} within {timeout} s; last: {last}")


def metric(text: str, name: str, labels: str = "") -> float:
    pattern = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else "") + r" (\S+)"
    match = re.search(r"^" + pattern + r"$", text, re.M)
    assert match, f"{name}{{{labels}}} missing from /metrics"
    return float(match.group(1))


async def test_probes_and_metrics_of_a_worker_running_a_session(tmp_path: Path) -> None:
    port = free_port()
    stack = Stack(tmp_path).start()
    try:
        stack.start_worker("w1", VOXQUEUE_METRICS_PORT=str(port), VOXQUEUE_CONCURRENCY="1")
        # Answers from start-up on; the loops register as they start.
        live = await asyncio.to_thread(wait_for, port, "/healthz", 200, 20, lambda b: len(b["loops"]) == 6)
        assert set(live["loops"]) == {"reader", "claim", "autoclaim", "renew", "handover", "monitor"}
        assert set(live["loops"].values()) == {"running"}
        await asyncio.to_thread(wait_for, port, "/readyz", 200, 10)

        redis = stack.client()
        from producer.client import Producer

        producer = Producer(redis)
        try:
            frames = 100
            task = asyncio.create_task(produce_marker_session(producer, "h1", frames, realtime=True))
            # Concurrency 1 and one session held: full, so not ready (and still live).
            full = await asyncio.to_thread(
                wait_for, port, "/readyz", 503, 10, lambda b: b["sessions"] == 1 and not b["draining"]
            )
            assert full["redis"] is True and full["capacity"] == 1
            assert get(port, "/healthz")[0] == 200
            await task
            await wait_until_ended(redis, stack.keys, ["h1"], 20)
            await asyncio.to_thread(wait_for, port, "/readyz", 200, 10)
        finally:
            await producer.aclose()
            await redis.aclose()

        status, text = get(port, "/metrics")
        assert status == 200
        assert metric(text, "voxqueue_frames_sent_total") == frames
        assert metric(text, "voxqueue_capacity_sessions") == 1
        assert metric(text, "voxqueue_claim_delay_seconds_count") == 1
        # Paced at real time, sent as it arrives: lag well under a second on average, and at
        # least one observation per couple of frames (messages coalesce a few frames at most).
        lag_count = metric(text, "voxqueue_frame_lag_seconds_count")
        assert frames / 12 <= lag_count <= frames
        assert metric(text, "voxqueue_frame_lag_seconds_sum") / lag_count < 1.0
        finals = metric(text, "voxqueue_transcript_latency_seconds_count", 'type="final"')
        assert finals == metric(text, "voxqueue_finals_published_total") >= 1
        assert metric(text, "voxqueue_transcript_latency_seconds_sum", 'type="final"') / finals < 1.0
        assert metric(text, "voxqueue_loop_up", 'loop="claim"') == 1
        assert metric(text, "voxqueue_redis_up") == 1
    finally:
        stack.stop()


async def test_readyz_fails_while_redis_is_down_and_healthz_stays_up(tmp_path: Path) -> None:
    port = free_port()
    stack = Stack(tmp_path).start()
    try:
        stack.start_worker("w1", VOXQUEUE_METRICS_PORT=str(port))
        await asyncio.to_thread(wait_for, port, "/readyz", 200, 20)
        stack.redis.stop(kill=True)
        down = await asyncio.to_thread(wait_for, port, "/readyz", 503, 10, lambda b: not b["redis"])
        assert down["draining"] is False
        assert get(port, "/healthz")[0] == 200  # a restart would not bring Redis back
        stack.redis.restart(kill=False)
        await asyncio.to_thread(wait_for, port, "/readyz", 200, 15)
    finally:
        stack.stop()


async def test_worker_exits_nonzero_when_a_background_loop_keeps_failing(tmp_path: Path) -> None:
    port = free_port()
    stack = Stack(tmp_path).start()
    try:
        proc = stack.start_worker("w1", VOXQUEUE_METRICS_PORT=str(port))
        await asyncio.to_thread(wait_for, port, "/healthz", 200, 20)
        redis = stack.client()
        try:
            # Every XREADGROUP / XAUTOCLAIM on the sessions key now fails the same way.
            key = stack.keys.sessions(0)
            await redis.delete(key)
            await redis.set(key, "not a stream")
        finally:
            await redis.aclose()
        code = await asyncio.to_thread(proc.wait, 30)
        assert code == 3, stack.worker_log("w1")[-2000:]
        assert "keeps failing: giving up" in stack.worker_log("w1")
    finally:
        stack.stop()


async def test_healthz_is_served_by_the_event_loop_so_a_blocked_loop_fails_it() -> None:
    async with rig() as r:
        server = HealthServer(r.pool.monitor)
        port = await server.start(0, "127.0.0.1")
        try:
            deadline = time.monotonic() + 10
            while r.pool.monitor.ticked_at is None or len(r.pool.loop_state) < 6:
                assert time.monotonic() < deadline, "the pool's loops did not start"
                await asyncio.sleep(0.05)
            assert (await asyncio.to_thread(get, port, "/healthz"))[0] == 200

            outcome: list[str] = []

            def probe() -> None:
                try:
                    outcome.append(str(get(port, "/healthz", timeout=0.5)[0]))
                except OSError as exc:  # urllib wraps the socket timeout
                    outcome.append(type(exc).__name__)

            thread = threading.Thread(target=probe)
            thread.start()
            time.sleep(1.5)  # noqa: ASYNC251 - blocks the loop on purpose: the bug liveness catches
            await asyncio.to_thread(thread.join, 5)
            assert outcome and outcome[0] != "200", outcome
        finally:
            await server.close()
