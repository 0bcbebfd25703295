"""The wire contract at its edges, end to end with a worker in this process (real redis-server,
real SDK, the marker emulator): one sid is one session, rejections are visible where
docs/protocol.md says, every session ends with a state hash and a session_ended, the end marker's
count is checked, and the deployment settings key."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable

import pytest
import redis.asyncio as aioredis

from producer import protocol as p
from producer.audio import marker_frame
from producer.client import DeploymentMismatch, Producer, SessionExists
from tests.harness import assert_perfect, check_marker_session, rig, session_events, wait_until_ended
from worker.config import load_settings
from worker.pool import WorkerPool
from worker.redis_server import RedisServer

KEYS = p.Keys()


async def poll(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


async def events_of(redis: aioredis.Redis, stream: str) -> list[dict[str, object]]:
    return [p.decode_event(f) for _, f in await redis.xrange(stream)]


async def raw_session(redis: aioredis.Redis, sid: str, frames: int, **fields: str) -> None:
    """A session as a raw producer (redis-cli) writes it."""
    sk = KEYS.session(sid)
    await redis.xadd(sk.sessions, {"sid": sid, **fields})
    for n in range(frames):
        await redis.xadd(sk.audio, p.frame_fields(n, marker_frame(n)))
    await redis.xadd(sk.audio, p.end_fields(frames))


# ------------------------------------------------------------------------------ one sid, one session


async def test_reusing_the_sid_of_an_ended_session_is_an_explicit_error() -> None:
    """Fails when a second entry for an ended sid is dropped silently (it was), when it disturbs
    the first session (a second session_ended, a changed state), or when the worker writes into the
    producer's audio stream."""
    async with rig() as r:
        sk = KEYS.session("reuse")
        await raw_session(r.redis, "reuse", 30, labels='{"try":"1"}')
        await wait_until_ended(r.redis, KEYS, ["reuse"], 20)
        state = await r.redis.hgetall(sk.state)
        before = await session_events(r.redis, KEYS, "reuse")
        connections = r.emulator.stats_json()["connections_accepted"]
        await r.redis.xadd(sk.sessions, {"sid": "reuse", "labels": '{"try":"2"}'})
        await poll(lambda: _more(r.redis, sk.results, len(before)), 10, "sid_reused")
        after = await session_events(r.redis, KEYS, "reuse")
        assert after[: len(before)] == before
        (extra,) = after[len(before) :]
        assert (extra["type"], extra["code"], extra["fatal"]) == (p.ERROR, "sid_reused", False)
        assert [e["type"] for e in after].count(p.SESSION_ENDED) == 1
        assert await r.redis.hgetall(sk.state) == state
        assert r.emulator.stats_json()["connections_accepted"] == connections
        reasons = [f[b"reason"] for _, f in await r.redis.xrange(sk.dead)]
        assert len(reasons) == 1 and reasons[0].startswith(b"sid_reused: ")
        assert await r.redis.xlen(KEYS.sessions(0)) == 0
        # The worker never wrote into the audio stream: the producer's 30 frames and its marker only.
        assert await r.redis.xlen(sk.audio) == 31


async def _more(redis: aioredis.Redis, stream: str, count: int) -> bool:
    return int(await redis.xlen(stream)) > count


async def test_a_retried_xadd_of_the_same_entry_is_harmless() -> None:
    """The same entry twice (a producer retrying an XADD whose reply it lost): no error, one session."""
    async with rig() as r:
        sk = KEYS.session("retried")
        fields = p.SessionStart("retried", labels={"a": "b"}).to_fields()
        await r.redis.xadd(sk.sessions, fields)
        await r.redis.xadd(sk.sessions, fields)
        for n in range(20):
            await r.redis.xadd(sk.audio, p.frame_fields(n, marker_frame(n)))
        await r.redis.xadd(sk.audio, p.end_fields(20))
        await wait_until_ended(r.redis, KEYS, ["retried"], 20)
        assert_perfect(await check_marker_session(r.redis, KEYS, "retried", 20), 20)
        assert not [e for e in await session_events(r.redis, KEYS, "retried") if e["type"] == p.ERROR]
        await poll(lambda: _empty(r.redis, KEYS.sessions(0)), 10, "the duplicate entry to be retired")
        assert await r.redis.xlen(sk.dead) == 0


async def _empty(redis: aioredis.Redis, stream: str) -> bool:
    return int(await redis.xlen(stream)) == 0


async def test_a_corrected_retry_after_a_rejection_is_refused_not_lost_silently() -> None:
    """The issue's case: options rejected, the producer fixes them and retries with the same sid.
    Before, the retry was ignored without an event (and after an entry rejection it "completed"
    with 0 frames, on the `end 1` the worker had written into the audio stream)."""
    async with rig() as r:
        sk = KEYS.session("fixme")
        await r.redis.xadd(sk.sessions, {"sid": "fixme", "options": json.dumps({"callback": "x"})})
        await wait_until_ended(r.redis, KEYS, ["fixme"], 20)
        assert await r.redis.exists(sk.audio) and await r.redis.xlen(sk.audio) == 0  # TTL only
        assert await r.redis.ttl(sk.audio) > 0
        await raw_session(r.redis, "fixme", 10, options=json.dumps({"model": "nova-3"}))
        await poll(lambda: _more(r.redis, sk.results, 2), 10, "sid_reused")
        events = await session_events(r.redis, KEYS, "fixme")
        assert [(e["type"], e.get("code")) for e in events] == [
            (p.ERROR, "option_not_allowed"),
            (p.SESSION_ENDED, None),
            (p.ERROR, "sid_reused"),
        ]
        assert await r.redis.ttl(sk.audio) > 0  # the raw producer's frames expire with the session
        assert r.emulator.stats_json()["connections_accepted"] == 0


async def test_the_library_refuses_a_reused_sid() -> None:
    async with rig() as r:
        session = await r.producer.open_session(sid="mine")
        await session.send_frame(marker_frame(0))
        await session.end()
        with pytest.raises(SessionExists):
            await r.producer.open_session(sid="mine")
        await wait_until_ended(r.redis, KEYS, ["mine"], 20)
        with pytest.raises(SessionExists):
            await r.producer.open_session(sid="mine")


# ------------------------------------------------------------------------------ rejections a reader sees


async def test_wrong_partition_is_reported_in_both_partitions_and_ends_the_session() -> None:
    """crc32("cli-demo-1") % 3 == 2; written to p0 by a producer that got its partition wrong.
    Fails when the rejection is only a dead letter (it was), when the session in its correct
    partition gets no state hash and session_ended, or the misplaced audio no TTL."""
    keys = p.Keys("vq", 3)
    async with rig(partitions=3) as r:
        sid = "cli-demo-1"
        right, wrong = keys.session(sid), keys.session_in(sid, 0)
        await r.redis.xadd(wrong.sessions, {"sid": sid})
        await r.redis.xadd(wrong.audio, p.frame_fields(0, marker_frame(0)))
        await poll(lambda: _more(r.redis, wrong.dead, 0), 10, "the dead letter")
        own = await events_of(r.redis, right.results)
        assert [(e["type"], e.get("code")) for e in own] == [
            (p.ERROR, "wrong_partition"),
            (p.SESSION_ENDED, None),
        ]
        assert "vq:{p2}:sessions" in str(own[0]["message"])
        assert [e["type"] for e in await events_of(r.redis, right.partition_results)] == [
            p.ERROR,
            p.SESSION_ENDED,
        ]
        state = await r.redis.hgetall(right.state)
        assert (state[b"status"], state[b"reason"]) == (b"failed", b"rejected")
        (seen,) = await events_of(r.redis, wrong.partition_results)
        assert (seen["sid"], seen["code"]) == (sid, "wrong_partition")
        assert await r.redis.ttl(wrong.audio) > 0  # misplaced audio expires
        assert await r.redis.xlen(wrong.audio) == 1  # and was not written into


@pytest.mark.parametrize(
    ("fields", "code"), [({"sid": "a{b}"}, "bad_sid"), ({"encoding": "linear16"}, "missing_fields")]
)
async def test_entries_without_a_valid_sid_are_reported_in_the_partition_results(
    fields: dict[str, str], code: str
) -> None:
    async with rig() as r:
        entry = await r.redis.xadd(KEYS.sessions(0), fields)
        await poll(lambda: _more(r.redis, KEYS.results(0), 0), 10, "the partition error")
        (event,) = await events_of(r.redis, KEYS.results(0))
        assert (event["type"], event["code"]) == (p.ERROR, code)
        assert event["id"].endswith(f"/{code}/{entry.decode()}")
        ((_, letter),) = await r.redis.xrange(KEYS.dead(0))
        assert letter[b"reason"].startswith(f"{code}: ".encode()) and letter[b"entry"] == entry


async def test_an_unspoken_protocol_version_is_rejected() -> None:
    async with rig() as r:
        await r.redis.xadd(KEYS.sessions(0), {"sid": "future", "v": "2"})
        await wait_until_ended(r.redis, KEYS, ["future"], 20)
        events = await session_events(r.redis, KEYS, "future")
        assert [(e["type"], e.get("code")) for e in events] == [
            (p.ERROR, "bad_version"),
            (p.SESSION_ENDED, None),
        ]
        assert events[1]["reason"] == p.END_REJECTED


# ------------------------------------------------------------------------------ end marker


async def test_an_end_marker_with_a_wrong_count_is_reported() -> None:
    async with rig() as r:
        sk = KEYS.session("miscount")
        await r.redis.xadd(sk.sessions, {"sid": "miscount"})
        for n in range(30):
            await r.redis.xadd(sk.audio, p.frame_fields(n, marker_frame(n)))
        await r.redis.xadd(sk.audio, p.end_fields(25))  # 30 were sent: last seq + 1 = 30
        await wait_until_ended(r.redis, KEYS, ["miscount"], 20)
        assert_perfect(await check_marker_session(r.redis, KEYS, "miscount", 30), 30)
        (error,) = [e for e in await session_events(r.redis, KEYS, "miscount") if e["type"] == p.ERROR]
        assert (error["code"], error["fatal"]) == ("end_mismatch", False)


# ------------------------------------------------------------------------------ deployment settings


async def test_workers_store_the_deployment_settings_and_producers_check_them() -> None:
    async with rig(partitions=3) as r:
        await poll(lambda: r.redis.exists(KEYS.deployment()), 10, "the deployment key")
        assert await r.redis.hgetall(KEYS.deployment()) == {b"partitions": b"3", b"protocol": b"1"}
        with pytest.raises(DeploymentMismatch) as caught:
            await r.producer.open_session()  # the rig's producer assumes P = 1
        assert "partitions 3 there, 1 here" in str(caught.value)
        assert await r.redis.xlen(KEYS.sessions(0)) == 0  # nothing was written
        async with Producer(r.redis, partitions=3) as good:
            await good.open_session(sid="fine")


async def test_a_worker_with_another_partition_count_refuses_to_start() -> None:
    with RedisServer() as server:
        client = aioredis.Redis.from_url(server.url)
        try:
            await client.hset(KEYS.deployment(), mapping={"partitions": "3", "protocol": "1"})
            pool = WorkerPool(
                load_settings(redis_url=server.url, deepgram_url="ws://127.0.0.1:9", partitions=2)
            )
            with pytest.raises(p.DeploymentMismatch) as caught:
                await asyncio.wait_for(pool.run(), 20)
            assert "partitions 3 there, 2 here" in str(caught.value)
            assert await client.hgetall(KEYS.deployment()) == {b"partitions": b"3", b"protocol": b"1"}
        finally:
            await client.aclose()


async def test_concurrent_opens_check_the_deployment_once_and_correctly() -> None:
    """Fails when concurrent open_session calls misread each other's replies (one of them setting
    the "deployment checked" flag while another's round trip is in flight made that one raise
    SessionExists for a new id)."""
    with RedisServer() as server:
        client = aioredis.Redis.from_url(server.url)
        try:
            await client.hset(KEYS.deployment(), mapping={"partitions": "1", "protocol": "1"})
            async with Producer(client) as producer:
                opened = await asyncio.gather(*(producer.open_session(sid=f"c{i}") for i in range(50)))
            assert len({s.sid for s in opened}) == 50
            assert await client.xlen(KEYS.sessions(0)) == 50
        finally:
            await client.aclose()
