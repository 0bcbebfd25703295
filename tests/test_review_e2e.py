"""Adversarial review, end to end: real redis-server, the real AudioReader, and (with `rig`) a real
worker pool with the SDK and the emulator. Each test started as a guarantee the review found broken
(fixed since); an xfail(strict=True) one is still open, its reason says which and why."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest
import redis.asyncio as aioredis

from producer import protocol as p
from producer.audio import marker_frame
from tests.harness import assert_perfect, bounded, check_marker_session, rig, session_events, wait_until_ended
from worker.audio_reader import AudioReader, Entry, Inbox
from worker.redis_server import RedisServer
from worker.store import SessionStore

KEYS = p.Keys()


async def _wait_for(predicate_coro: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate_coro():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


async def _final_published(redis: aioredis.Redis, sid: str) -> bool:
    return any(e["type"] == p.FINAL for e in await session_events(redis, KEYS, sid))


# ------------------------------------------------------------------------- the shared reader


@pytest.mark.timeout(60)
async def test_one_audio_key_of_the_wrong_type_costs_only_its_session() -> None:
    async with rig() as r:
        bad = await r.producer.open_session(sid="wrongtype")
        good = await r.producer.open_session(sid="bystander")
        for n in range(30):
            await bad.send_frame(marker_frame(n))
            await good.send_frame(marker_frame(n))
        # Both sessions are live (following with the shared reader) once their first finals are in.
        await _wait_for(lambda: _final_published(r.redis, "wrongtype"), 20, "a final of wrongtype")
        await _wait_for(lambda: _final_published(r.redis, "bystander"), 20, "a final of bystander")
        audio = KEYS.session("wrongtype").audio
        await r.redis.delete(audio)
        await r.redis.set(audio, b"not a stream")  # a broken producer (hostile input)
        for n in range(30, 60):
            await good.send_frame(marker_frame(n))
        await good.end()
        # On the current code this wait times out, and the rig's teardown then re-raises the
        # worker's own LoopDied ('reader' failed 5 times in a row): both are the bug.
        await wait_until_ended(r.redis, KEYS, ["bystander"], 10)
        assert_perfect(await check_marker_session(r.redis, KEYS, "bystander", 60), 60)
        assert not r.task.done(), "the worker stopped"
        # The broken session itself fails, as input it cannot survive, after flushing what it sent.
        await wait_until_ended(r.redis, KEYS, ["wrongtype"], 20)
        events = await session_events(r.redis, KEYS, "wrongtype")
        assert [e["code"] for e in events if e["type"] == p.ERROR] == ["bad_input"]
        assert events[-1]["type"] == p.SESSION_ENDED and events[-1]["reason"] == p.END_FAILED
        await r.redis.delete(audio)


@pytest.mark.timeout(30)
async def test_a_blocked_inline_send_does_not_hold_other_sessions_audio() -> None:
    with RedisServer() as server:
        redis = aioredis.Redis.from_url(server.url)
        reader = AudioReader(aioredis.Redis.from_url(server.url), count=64, block_ms=50)
        released = asyncio.Event()

        async def blocked_send(entries: list[Entry]) -> bool:
            # What send_inline does while websockets waits for a socket nobody reads.
            await released.wait()
            return True

        slow, other = Inbox(limit=500), Inbox(limit=500)
        reader.follow("a:slow", slow, b"0-0", blocked_send)
        reader.follow("a:other", other, b"0-0")
        task = asyncio.create_task(reader.run())
        try:
            await redis.xadd("a:slow", {"seq": "0", "pcm": b"x"})
            await redis.xadd("a:other", {"seq": "0", "pcm": b"y"})
            deadline = time.monotonic() + 3.0
            while not other.entries and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert other.entries, "the other session's frame waited for a blocked socket of another session"
        finally:
            released.set()
            task.cancel()
            await bounded(asyncio.wait([task]), 5, "stopping the reader")
            await bounded(redis.aclose(), 5, "closing redis")
            await bounded(reader.redis.aclose(), 5, "closing the reader's redis")


# ------------------------------------------------------------------------- the contract


@pytest.mark.timeout(60)
async def test_a_reused_sid_is_reported_while_its_session_runs_on_this_worker() -> None:
    async with rig() as r:
        sk = KEYS.session("live-reuse")
        await r.redis.xadd(sk.sessions, {"sid": "live-reuse", "labels": '{"try":"1"}'})
        for n in range(30):
            await r.redis.xadd(sk.audio, p.frame_fields(n, marker_frame(n)))
        await _wait_for(lambda: _final_published(r.redis, "live-reuse"), 20, "the session to run")
        await r.redis.xadd(sk.sessions, {"sid": "live-reuse", "labels": '{"try":"2"}'})

        async def reported() -> bool:
            events = await session_events(r.redis, KEYS, "live-reuse")
            return any(e["type"] == p.ERROR and e.get("code") == "sid_reused" for e in events)

        try:
            await _wait_for(reported, 5, "a sid_reused error")
            assert await r.redis.xlen(sk.dead) == 1
        finally:
            await r.redis.xadd(sk.audio, p.end_fields(30))
            await wait_until_ended(r.redis, KEYS, ["live-reuse"], 20)


# ------------------------------------------------------------------------- fencing


@pytest.mark.timeout(30)
async def test_an_epoch_is_never_handed_out_twice_even_after_the_state_vanished(
    redis_client: aioredis.Redis,
) -> None:
    store = SessionStore(redis_client, KEYS, results_maxlen=1000, retention=60)
    sk = KEYS.session("evicted")
    await store.ensure_group(KEYS.sessions(0))
    entry_id = await redis_client.xadd(KEYS.sessions(0), p.SessionStart("evicted").to_fields())
    await redis_client.xreadgroup(p.WORKERS_GROUP, "w1", {KEYS.sessions(0): ">"}, count=1)
    first = await store.acquire(sk, "w1", 10, entry_id)
    await redis_client.delete(sk.state)  # evicted while w1 is frozen
    second = await store.acquire(sk, "w2", 10, entry_id)  # the takeover after the lease ran out
    assert second.epoch != first.epoch, f"both owners hold epoch {first.epoch}"
