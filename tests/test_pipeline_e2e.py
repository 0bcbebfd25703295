"""End to end, marker engine: producer → Redis → 2 worker processes → emulator → results."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

from producer.client import Producer
from tests.harness import (
    Stack,
    assert_perfect,
    check_marker_session,
    produce_marker_session,
    sessions_pending,
    wait_until_ended,
)


async def test_twenty_sessions_across_two_workers(tmp_path: Path) -> None:
    stack = Stack(tmp_path).start()
    try:
        stack.start_worker("w1")
        stack.start_worker("w2")
        await stack.wait_workers_ready(2)
        rng = random.Random(2)
        sessions = {f"e2e-{i}": rng.randint(150, 500) for i in range(20)}  # 3-10 s each
        redis = stack.client()
        async with Producer(redis) as producer:

            async def staggered(i: int, sid: str, frames: int) -> None:
                await asyncio.sleep(i * 0.01)
                await produce_marker_session(producer, sid, frames)

            await asyncio.gather(*(staggered(i, sid, n) for i, (sid, n) in enumerate(sessions.items())))
        await wait_until_ended(redis, stack.keys, list(sessions), timeout=60)
        for sid, frames in sessions.items():
            assert_perfect(await check_marker_session(redis, stack.keys, sid, frames), frames)
        assert await sessions_pending(redis, stack.keys) == 0
        await redis.aclose()
        logs = stack.worker_log("w1") + stack.worker_log("w2")
        assert "session claimed" in stack.worker_log("w1") and "session claimed" in stack.worker_log("w2")
        assert "Traceback" not in logs
    finally:
        stack.stop()
