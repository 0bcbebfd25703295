"""Fencing, fast: every fenced script refuses a stale owner and writes nothing, RELEASE hands a
session over at once, COMMIT is all-or-nothing, and the renew loop stops a session whose lease
was lost. Real redis-server (tests/conftest.py); each test takes well under a second or two.

Each test names, in its docstring, the line whose removal makes it fail; `make mutate` checks
that claim mechanically (ops/mutate.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from producer import protocol as p
from producer.audio import marker_frame
from producer.client import Producer
from tests.harness import CLOSE_SECONDS, bounded, stop_pool
from worker import lua
from worker.config import load_settings
from worker.emulator import EmulatorServer
from worker.events import standalone_event
from worker.ledger import Commit
from worker.pool import WorkerPool
from worker.redis_server import RedisServer
from worker.store import Fenced, SessionStore

KEYS = p.Keys()
PARKED_IDLE_MS = 3_600_000  # a lease parked at 1 h idle: a reset (RENEW) or a jump (RELEASE) shows
NORMAL_LEASE_MS = 5_000  # the default lease: what XAUTOCLAIM uses in a real pool


def store_for(redis: aioredis.Redis) -> SessionStore:
    return SessionStore(redis, KEYS, results_maxlen=1000, retention=60)


def final(sid: str, seq_from: int, seq_to: int) -> dict[str, Any]:
    return standalone_event(sid, p.FINAL, f"{seq_from}-{seq_to}", transcript="x", seq_from=seq_from)


def partial(sid: str, n: int, epoch: int = 0) -> dict[str, Any]:
    event = standalone_event(sid, p.PARTIAL, f"p{n}", transcript="y")
    event["epoch"] = epoch
    return event


def ended(sid: str) -> dict[str, Any]:
    return standalone_event(sid, p.SESSION_ENDED, "end", reason="completed")


async def start_session(redis: aioredis.Redis, sid: str, consumer: str = "w1") -> bytes:
    """A sessions entry delivered to `consumer` (its lease), as XREADGROUP in the pool does."""
    await store_for(redis).ensure_group(KEYS.sessions(0))
    entry_id: bytes = await redis.xadd(KEYS.sessions(0), p.SessionStart(sid).to_fields())
    await redis.xreadgroup(p.WORKERS_GROUP, consumer, {KEYS.sessions(0): ">"}, count=1)
    return entry_id


async def take_over(redis: aioredis.Redis, sk: p.SessionKeys, entry: bytes, consumer: str) -> int:
    """What another worker's XAUTOCLAIM + ACQUIRE do: move the lease, bump the epoch."""
    await redis.xclaim(KEYS.sessions(0), p.WORKERS_GROUP, consumer, 0, [entry], justid=True)
    acquired = await store_for(redis).acquire(sk, consumer, 5, entry)
    assert acquired.status == "ok"
    return acquired.epoch


async def park_lease(redis: aioredis.Redis, entry: bytes, consumer: str) -> None:
    """Set the entry's idle time to a known value (JUSTID: the delivery count stays)."""
    await redis.xclaim(
        KEYS.sessions(0), p.WORKERS_GROUP, consumer, 0, [entry], idle=PARKED_IDLE_MS, justid=True
    )


async def stream_or_value(redis: aioredis.Redis, key: str) -> Any:
    """A stream's entries; a key a test turned into a string reads as its value."""
    if await redis.type(key) == b"string":
        return await redis.get(key)
    return await redis.xrange(key)


async def snapshot(redis: aioredis.Redis, sk: p.SessionKeys) -> dict[str, Any]:
    """Everything a fenced script could write: results, dead letters, state, TTLs, the lease."""
    pel = await redis.xpending_range(KEYS.sessions(0), p.WORKERS_GROUP, min="-", max="+", count=100)
    return {
        "state": await redis.hgetall(sk.state),
        "results": await stream_or_value(redis, sk.results),
        "partition_results": await stream_or_value(redis, sk.partition_results),
        "dead": await stream_or_value(redis, sk.dead),
        "audio": await stream_or_value(redis, sk.audio),
        "ttl": {key: await redis.pttl(key) > 0 for key in (sk.state, sk.results, sk.audio)},
        "pel": [(e["message_id"], e["consumer"], e["times_delivered"]) for e in pel],
        # Bucketed: untouched, a parked lease reads PARKED_IDLE_MS plus the test's few ms.
        "idle_parked": [PARKED_IDLE_MS <= e["time_since_delivered"] < PARKED_IDLE_MS + 60_000 for e in pel],
    }


# ----------------------------------------------------------------------------- stale callers


@dataclass
class TakenOver:
    """Session `s` owned by w1 at epoch 1 (one final committed, one partial), then taken over by w2
    at epoch 2 (lease parked at a known idle time). w1 is the stale caller."""

    redis: aioredis.Redis
    store: SessionStore
    sk: p.SessionKeys
    entry: bytes
    stale: int
    current: int


@pytest.fixture
async def taken_over(redis_client: aioredis.Redis) -> TakenOver:
    redis, store, sk = redis_client, store_for(redis_client), KEYS.session("s")
    entry = await start_session(redis, "s", "w1")
    await redis.xadd(sk.audio, p.frame_fields(0, bytes(640)))
    first = await store.acquire(sk, "w1", 5, entry)
    assert await store.commit(sk, first.epoch, Commit(0, 24, b"1-24"), final("s", 0, 24)) == "ok"
    assert await store.publish(sk, first.epoch, partial("s", 1)) == "ok"
    current = await take_over(redis, sk, entry, "w2")
    assert current == first.epoch + 1
    await park_lease(redis, entry, "w2")
    return TakenOver(redis, store, sk, entry, first.epoch, current)


Call = Callable[[TakenOver, int, str], Awaitable[Any]]


async def _commit(t: TakenOver, epoch: int, owner: str) -> Any:
    return await t.store.commit(t.sk, epoch, Commit(25, 49, b"1-49"), final("s", 25, 49))


async def _commit_no_event(t: TakenOver, epoch: int, owner: str) -> Any:
    return await t.store.commit(t.sk, epoch, Commit(25, 49, b"1-49"), None)


async def _publish(t: TakenOver, epoch: int, owner: str) -> Any:
    return await t.store.publish(t.sk, epoch, partial("s", 2))


async def _publish_once(t: TakenOver, epoch: int, owner: str) -> Any:
    return await t.store.publish(t.sk, epoch, partial("s", 3), once="gap:7")


async def _finish(t: TakenOver, epoch: int, owner: str) -> Any:
    return await t.store.finish(
        t.sk, epoch, t.entry, status="failed", reason="x", event=ended("s"), frames=25, dead_reason="boom"
    )


async def _reject(t: TakenOver, epoch: int, owner: str) -> Any:
    event = standalone_event("s", p.ERROR, "bad", code="bad_entry", message="m", fatal=False)
    return await t.store.reject_entry(t.sk, epoch, t.sk.audio, b"1-5", "bad_entry", event)


async def _release(t: TakenOver, epoch: int, owner: str) -> Any:
    return await t.store.release(t.sk, owner, t.entry, epoch)


async def _renew(t: TakenOver, epoch: int, owner: str) -> Any:
    return await t.store.renew(KEYS.sessions(0), owner, [(t.sk.state, t.entry, epoch)])


async def _save_configure(t: TakenOver, epoch: int, owner: str) -> Any:
    return await t.store.save_configure(t.sk, epoch, {"eot_threshold": "0.8"})


# (call, what the stale caller gets: an exception type or a return value)
STALE_CASES: dict[str, tuple[Call, Any]] = {
    "COMMIT": (_commit, Fenced),
    "COMMIT-no-event": (_commit_no_event, Fenced),
    "PUBLISH": (_publish, Fenced),
    "PUBLISH-once": (_publish_once, Fenced),
    "FINISH": (_finish, Fenced),
    "REJECT_ENTRY": (_reject, Fenced),
    "RELEASE": (_release, False),
    "RENEW": (_renew, [0]),
    "SAVE_CONFIGURE": (_save_configure, Fenced),
}


@pytest.mark.parametrize("case", list(STALE_CASES))
async def test_a_stale_owner_is_refused_and_writes_nothing(taken_over: TakenOver, case: str) -> None:
    """Fails when the epoch guard (`if ... epoch ... then return 'fenced' end`, RENEW's epoch/owner
    test) of that script is removed or inverted: the stale call would write. The same call at the
    current epoch then does write, so the snapshot comparison is not vacuous."""
    t, (call, expected) = taken_over, STALE_CASES[case]
    before = await snapshot(t.redis, t.sk)
    if isinstance(expected, type):
        with pytest.raises(expected):
            await call(t, t.stale, "w1")
    else:
        assert await call(t, t.stale, "w1") == expected
    assert await snapshot(t.redis, t.sk) == before, f"{case} with a stale epoch wrote"
    # The current owner, same call: a write happens (RENEW: the lease's idle time is reset).
    await call(t, t.current, "w2")
    assert await snapshot(t.redis, t.sk) != before, f"{case} at the current epoch wrote nothing"


async def test_renew_refuses_the_right_epoch_from_another_owner(taken_over: TakenOver) -> None:
    """Fails when RENEW stops checking the owner: w1 quoting w2's epoch would steal the lease back
    (RENEW's XCLAIM has min-idle 0)."""
    t = taken_over
    before = await snapshot(t.redis, t.sk)
    assert await t.store.renew(KEYS.sessions(0), "w1", [(t.sk.state, t.entry, t.current)]) == [0]
    assert await snapshot(t.redis, t.sk) == before
    assert await t.store.renew(KEYS.sessions(0), "w2", [(t.sk.state, t.entry, t.current)]) == []


async def test_renew_reports_an_acked_lease_as_lost(redis_client: aioredis.Redis) -> None:
    """Fails when RENEW ignores an empty XCLAIM reply: an entry acked elsewhere (the session was
    finished) is no lease, whatever the state hash says."""
    store, sk = store_for(redis_client), KEYS.session("acked")
    entry = await start_session(redis_client, "acked", "w1")
    acquired = await store.acquire(sk, "w1", 5, entry)
    await redis_client.xack(KEYS.sessions(0), p.WORKERS_GROUP, entry)
    assert await store.renew(KEYS.sessions(0), "w1", [(sk.state, entry, acquired.epoch)]) == [0]


async def test_acquire_bumps_the_epoch_on_every_claim(redis_client: aioredis.Redis) -> None:
    """Fails when ACQUIRE stops incrementing the epoch (a takeover would not fence the old owner),
    also for a session that already ended (its late owner must stay fenced)."""
    redis, store, sk = redis_client, store_for(redis_client), KEYS.session("bump")
    entry = await start_session(redis, "bump", "w1")
    first = await store.acquire(sk, "w1", 5, entry)
    second = await store.acquire(sk, "w2", 5, entry)
    assert second.epoch == first.epoch + 1 and int(await redis.hget(sk.state, "epoch")) == second.epoch
    with pytest.raises(Fenced):
        await store.publish(sk, first.epoch, partial("bump", 1))
    assert (
        await store.finish(
            sk, second.epoch, entry, status="ended", reason="completed", event=ended("bump"), frames=0
        )
        == "ok"
    )
    third = await store.acquire(sk, "w3", 5, entry)
    assert third.status == "done" and third.epoch == second.epoch + 1
    assert await redis.xlen(sk.results) == 1  # only session_ended


# ----------------------------------------------------------------------------- release


async def test_release_fences_the_owner_and_frees_the_lease_at_once(redis_client: aioredis.Redis) -> None:
    """Fails when RELEASE stops bumping the epoch (the released owner could still write), stops
    aging the lease (XAUTOCLAIM with a normal min-idle would not take it), stops removing the
    owner, or stops marking the handover (the next claim would count as a crash takeover)."""
    redis, store, sk = redis_client, store_for(redis_client), KEYS.session("rel")
    entry = await start_session(redis, "rel", "w1")
    first = await store.acquire(sk, "w1", 5, entry)
    await store.commit(sk, first.epoch, Commit(0, 24, b"1-24"), final("rel", 0, 24))
    assert await store.release(sk, "w1", entry, first.epoch)
    state = await redis.hgetall(sk.state)
    assert int(state[b"epoch"]) == first.epoch + 1 and b"owner" not in state
    before = await snapshot(redis, sk)
    for call in (
        store.commit(sk, first.epoch, Commit(25, 49, b"1-49"), final("rel", 25, 49)),
        store.publish(sk, first.epoch, partial("rel", 1)),
        store.finish(
            sk, first.epoch, entry, status="ended", reason="completed", event=ended("rel"), frames=50
        ),
        store.commit_point(sk, first.epoch),
    ):
        with pytest.raises(Fenced):
            await call
    assert await snapshot(redis, sk) == before
    # No waiting out the lease: a normal XAUTOCLAIM (min-idle = a whole lease) takes it right away.
    reply = await redis.execute_command(
        "XAUTOCLAIM", KEYS.sessions(0), p.WORKERS_GROUP, "w3", NORMAL_LEASE_MS, "0-0", "COUNT", 10
    )
    assert [item[0] for item in reply[1]] == [entry]
    again = await store.acquire(sk, "w3", 5, entry)
    assert (again.status, again.epoch, again.takeovers, again.committed_seq) == ("ok", first.epoch + 2, 0, 24)


async def test_release_of_an_ended_session_changes_nothing(redis_client: aioredis.Redis) -> None:
    """Fails when RELEASE stops checking the status: releasing a finished session would re-open
    its lease and bump its epoch."""
    redis, store, sk = redis_client, store_for(redis_client), KEYS.session("relend")
    entry = await start_session(redis, "relend", "w1")
    first = await store.acquire(sk, "w1", 5, entry)
    await store.finish(
        sk, first.epoch, entry, status="ended", reason="completed", event=ended("relend"), frames=0
    )
    before = await snapshot(redis, sk)
    assert not await store.release(sk, "w1", entry, first.epoch)
    assert await snapshot(redis, sk) == before


# ----------------------------------------------------------------------------- commit point


async def test_commit_point_is_fenced(taken_over: TakenOver) -> None:
    """Fails when `SessionStore.commit_point` stops comparing the epoch: a stale owner would replay
    from a commit point it no longer owns."""
    t = taken_over
    with pytest.raises(Fenced):
        await t.store.commit_point(t.sk, t.stale)
    with pytest.raises(Fenced):
        await t.store.commit_point(t.sk, t.current + 1)
    assert (await t.store.commit_point(t.sk, t.current))[:2] == (24, b"1-24")
    with pytest.raises(Fenced):  # the state hash is gone (expired): nobody owns it
        await t.store.commit_point(KEYS.session("nobody"), 1)


async def test_commit_point_of_a_fresh_session(redis_client: aioredis.Redis) -> None:
    """A session with nothing committed yet starts before frame 0, at the start of the stream."""
    store, sk = store_for(redis_client), KEYS.session("fresh")
    entry = await start_session(redis_client, "fresh", "w1")
    acquired = await store.acquire(sk, "w1", 5, entry)
    assert (await store.commit_point(sk, acquired.epoch))[:2] == (-1, b"0-0")


# ----------------------------------------------------------------------------- commit atomicity


async def test_commit_publishes_and_moves_the_commit_point_together(taken_over: TakenOver) -> None:
    """Fails when COMMIT stops publishing the final, publishing it to either results stream,
    counting it, or moving committed_seq/committed_id/frames."""
    t = taken_over
    before = await t.redis.hgetall(t.sk.state)
    assert await _commit(t, t.current, "w2") == "ok"
    state = await t.redis.hgetall(t.sk.state)
    assert (state[b"committed_seq"], state[b"committed_id"], state[b"frames"]) == (b"49", b"1-49", b"50")
    assert int(state[b"finals"]) == int(before[b"finals"]) + 1
    for key in (t.sk.results, t.sk.partition_results):
        last = p.decode_event((await t.redis.xrevrange(key, count=1))[0][1])
        assert (last["type"], last["id"]) == (p.FINAL, final("s", 25, 49)["id"]), key
    # A final that covers nothing new (a retry after a lost reply) publishes nothing.
    snap = await snapshot(t.redis, t.sk)
    assert await _commit(t, t.current, "w2") == "dup"
    assert await snapshot(t.redis, t.sk) == snap


async def test_a_commit_without_a_final_moves_only_the_commit_point(taken_over: TakenOver) -> None:
    """Fails when COMMIT publishes (or counts) an event it was not given."""
    t = taken_over
    results = await t.redis.xrange(t.sk.results)
    assert await _commit_no_event(t, t.current, "w2") == "ok"
    assert await t.redis.xrange(t.sk.results) == results
    assert (await t.store.commit_point(t.sk, t.current))[:2] == (49, b"1-49")
    assert await t.redis.hget(t.sk.state, "finals") == b"1"


async def test_a_commit_whose_publish_fails_does_not_move_the_commit_point(taken_over: TakenOver) -> None:
    """Fails when COMMIT moves the commit point before (or apart from) publishing: here the publish
    fails inside the script (the results key has the wrong type), so neither may happen."""
    t = taken_over
    await t.redis.delete(t.sk.results)
    await t.redis.set(t.sk.results, "not a stream")
    before = await snapshot(t.redis, t.sk)
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await _commit(t, t.current, "w2")
    assert await snapshot(t.redis, t.sk) == before
    assert (await t.store.commit_point(t.sk, t.current))[:2] == (24, b"1-24")
    await t.redis.delete(t.sk.results)  # repaired: the retry does both
    assert await _commit(t, t.current, "w2") == "ok"
    assert (await t.store.commit_point(t.sk, t.current))[:2] == (49, b"1-49")
    assert [p.decode_event(f)["type"] for _, f in await t.redis.xrange(t.sk.results)] == [p.FINAL]


@pytest.mark.parametrize("broken", ["partition_results", "results"])
async def test_a_stream_key_of_the_wrong_type_stops_every_script_before_its_first_write(
    taken_over: TakenOver, broken: str
) -> None:
    """Redis keeps a script's writes made before a failing command: COMMIT used to add the final
    to the session's results, then fail on the partition stream with the commit point unmoved, and
    the replay published the final again. Each writing script now checks its streams first."""
    t = taken_over
    key = getattr(t.sk, broken)
    await t.redis.delete(key)
    await t.redis.set(key, "not a stream")
    before = await snapshot(t.redis, t.sk)
    event = standalone_event(t.sk.sid, p.SESSION_ENDED, "end", reason="completed")
    calls = [
        lambda: _commit(t, t.current, "w2"),
        lambda: t.store.publish(t.sk, t.current, event, once="flag"),
        lambda: t.store.reject_entry(t.sk, t.current, t.sk.audio, b"1-3", "bad", event),
        lambda: t.store.finish(
            t.sk, t.current, t.entry, status="ended", reason="completed", event=event, frames=50
        ),
    ]
    for call in calls:
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            await call()
        assert await snapshot(t.redis, t.sk) == before


async def test_a_commit_is_one_redis_command(taken_over: TakenOver) -> None:
    """Fails when `SessionStore.commit` is split into a publish and a separate commit-point update
    (two round trips: a crash between them publishes a final whose frames are then replayed, a
    duplicate). Counted in the server's slow log, which records every command (script-internal
    ones come from address `?:0`)."""
    t = taken_over
    for script in (
        lua.ACQUIRE,
        lua.COMMIT,
        lua.PUBLISH,
        lua.FINISH,
        lua.RENEW,
        lua.RELEASE,
        lua.REJECT_ENTRY,
    ):
        await t.redis.script_load(script)  # so the first EVALSHA does not fail NOSCRIPT
    await t.redis.config_set("slowlog-log-slower-than", 0)
    await t.redis.config_set("slowlog-max-len", 1000)
    await t.redis.slowlog_reset()
    assert await _commit(t, t.current, "w2") == "ok"
    log = await t.redis.slowlog_get(1000)
    await t.redis.config_set("slowlog-log-slower-than", 10_000)
    commands = [
        e["command"].split()[0].upper()
        for e in reversed(log)
        if e["client_address"] != b"?:0" and not e["command"].upper().startswith(b"SLOWLOG")
    ]
    assert commands == [b"EVALSHA"], commands
    assert (await t.store.commit_point(t.sk, t.current))[:2] == (49, b"1-49")


# ----------------------------------------------------------------------------- renew loop


async def test_the_renew_loop_stops_a_session_whose_lease_was_lost() -> None:
    """Fails when `WorkerPool._renew_leases` stops cancelling a session it lost (the
    `owned.task.cancel()` in the lost branch): the session, idle between finals, would run on.

    An in-process pool runs one session until its frames are committed and it is quiet, then a
    "thief" takes the lease (XCLAIM + epoch bump, as another worker's takeover does) and writes
    one entry at its epoch. The old session task must be cancelled within a few renewals, and in
    stream order nothing of the old epoch may follow the thief's entry. Also checks that every
    published final went through COMMIT (the `finals` counter), so a runner that publishes finals
    apart from their commit point fails here too."""
    sid = "lost"
    sk = KEYS.session(sid)
    with RedisServer() as server:
        async with EmulatorServer(engine="marker", port=0, silence_timeout=10.0) as emulator:
            config = load_settings(
                redis_url=server.url,
                deepgram_url=emulator.url,
                catchup_speed=0,
                log_format="json",
                lease_seconds=30,  # long: the pool must not take the session back during the test
                renew_seconds=0.1,
            )
            pool = WorkerPool(config)
            running = asyncio.create_task(pool.run())
            redis = aioredis.Redis.from_url(server.url)
            try:
                async with Producer(redis) as producer:
                    session = await producer.open_session(sid=sid)
                    for n in range(50):
                        await session.send_frame(marker_frame(n))
                    # Quiet: every frame sent is committed (finals every 0.5 s of audio: 0-24, 25-49).
                    await poll(
                        lambda: committed_seq(redis, sk), lambda seq: seq == 49, 10, "frames committed"
                    )
                    owned = pool.owned[sid]
                    finals = [e for e in await events(redis, sk.results) if e["type"] == p.FINAL]
                    assert finals and int(await redis.hget(sk.state, "finals")) == len(finals)
                    old_epoch = int(await redis.hget(sk.state, "epoch"))
                    assert not owned.task.done()

                    thief = store_for(redis)
                    await redis.xclaim(
                        KEYS.sessions(0), p.WORKERS_GROUP, "thief", 0, [owned.entry_id], justid=True
                    )
                    new_epoch = await redis.hincrby(sk.state, "epoch", 1)
                    await redis.hset(sk.state, "owner", "thief")
                    assert await thief.publish(sk, new_epoch, partial(sid, 99, new_epoch)) == "ok"
                    stolen_at = time.monotonic()

                    await poll(lambda: done(owned.task), bool, 3, "the lost session to stop")
                    took = time.monotonic() - stolen_at
                    print(f"FENCING lost lease: session cancelled {took:.2f}s after the steal")
                    assert owned.task.cancelled(), f"ended otherwise: {owned.task.exception()!r}"
                    assert pool.owned.get(sid) is not owned
                    for key in (sk.results, sk.partition_results):
                        epochs = [e["epoch"] for e in await events(redis, key) if e["sid"] == sid]
                        assert new_epoch in epochs and old_epoch in epochs, (key, epochs)
                        late = [i for i, epoch in enumerate(epochs) if epoch < max(epochs[: i + 1])]
                        assert not late, f"{key}: an older epoch wrote after a newer one: {epochs}"
            finally:
                await stop_pool(pool, running)  # bounded, as every teardown
                await bounded(redis.aclose(), CLOSE_SECONDS, "closing the redis client")


async def poll(
    read: Callable[[], Awaitable[Any]], ok: Callable[[Any], bool], timeout: float, what: str
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await read()
        if ok(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {value!r})")
        await asyncio.sleep(0.02)


async def committed_seq(redis: aioredis.Redis, sk: p.SessionKeys) -> int:
    return int(await redis.hget(sk.state, "committed_seq") or -1)


async def done(task: asyncio.Task[Any]) -> bool:
    return task.done()


async def events(redis: aioredis.Redis, key: str) -> list[dict[str, Any]]:
    return [p.decode_event(f) for _, f in await redis.xrange(key)]


# ----------------------------------------------------------------------------- what the current owner writes
# The guards above are only worth something if the scripts do their writes: each of these fails
# when one write of a script is dropped (found by `make mutate`).


async def test_acquire_keeps_the_start_time_counts_takeovers_and_makes_the_state_permanent(
    redis_client: aioredis.Redis,
) -> None:
    """Fails when ACQUIRE stops clearing the `released` mark (a crash after a handover would not
    count towards the crash-loop limit), overwrites/forgets started_at, or leaves a TTL on the
    state of a session it runs (the state would expire under a live session)."""
    redis, store, sk = redis_client, store_for(redis_client), KEYS.session("acq")
    entry = await start_session(redis, "acq", "w1")
    first = await store.acquire(sk, "w1", 5, entry)
    started = await redis.hget(sk.state, "started_at")
    assert started is not None
    assert await store.release(sk, "w1", entry, first.epoch)
    await redis.expire(sk.state, 30)
    handed = await store.acquire(sk, "w2", 5, entry)
    assert handed.takeovers == 0 and await redis.pttl(sk.state) == -1
    crashed = await store.acquire(sk, "w3", 5, entry)  # w2 died: this one is a takeover
    assert crashed.takeovers == 1
    assert await redis.hget(sk.state, "started_at") == started


async def test_publish_once_publishes_at_most_once(taken_over: TakenOver) -> None:
    """Fails when PUBLISH ignores its once flag (a gap error repeated by every replay)."""
    t = taken_over
    before = await t.redis.xlen(t.sk.results)
    assert await _publish_once(t, t.current, "w2") == "ok"
    assert await _publish_once(t, t.current, "w2") == "dup"
    assert await t.redis.xlen(t.sk.results) == before + 1


async def test_finish_writes_the_end_everywhere(taken_over: TakenOver) -> None:
    """Fails when FINISH stops publishing session_ended to the partition stream, writing the dead
    letter it is asked for (or writes one it is not asked for), giving the results the TTL, or
    making sure the audio stream exists with the TTL (without touching an existing one)."""
    t = taken_over
    audio = await t.redis.xrange(t.sk.audio)
    assert await _finish(t, t.current, "w2") == "ok"
    for key in (t.sk.results, t.sk.partition_results):
        assert p.decode_event((await t.redis.xrevrange(key, count=1))[0][1])["type"] == p.SESSION_ENDED
    dead = await t.redis.xrange(t.sk.dead)
    assert [(f[b"sid"], f[b"reason"], f[b"entry"]) for _, f in dead] == [(b"s", b"boom", t.entry)]
    assert await t.redis.xrange(t.sk.audio) == audio  # it existed: left as it was
    for key in (t.sk.state, t.sk.results, t.sk.audio):
        assert 0 < await t.redis.ttl(key) <= 60, key
    pending = await t.redis.xpending(KEYS.sessions(0), p.WORKERS_GROUP)
    assert pending["pending"] == 0


async def test_finish_without_audio_or_dead_letter(redis_client: aioredis.Redis) -> None:
    """A session ended before any frame: the audio stream is created EMPTY only to carry the TTL
    (late frames expire with it; the worker never writes an entry into a producer's audio stream),
    and no dead letter is written when none is asked for."""
    redis, store, sk = redis_client, store_for(redis_client), KEYS.session("noaudio")
    entry = await start_session(redis, "noaudio", "w1")
    first = await store.acquire(sk, "w1", 5, entry)
    await store.finish(
        sk, first.epoch, entry, status="ended", reason="completed", event=ended("noaudio"), frames=0
    )
    assert await redis.exists(sk.audio) and await redis.xlen(sk.audio) == 0
    assert await redis.xinfo_groups(sk.audio) == []
    await redis.xadd(sk.audio, p.frame_fields(0, bytes(640)))  # a late frame keeps the TTL
    assert 0 < await redis.ttl(sk.audio) <= 60
    assert await redis.xlen(sk.dead) == 0


async def test_reject_entry_reports_once(taken_over: TakenOver) -> None:
    """Fails when REJECT_ENTRY stops writing its error event (either results stream) or its dead
    letter, or reports the same bad entry twice (a replay after a takeover)."""
    t = taken_over
    results, partition = await t.redis.xlen(t.sk.results), await t.redis.xlen(t.sk.partition_results)
    assert await _reject(t, t.current, "w2") == "ok"
    assert await _reject(t, t.current, "w2") == "dup"
    assert await t.redis.xlen(t.sk.results) == results + 1
    assert await t.redis.xlen(t.sk.partition_results) == partition + 1
    last = p.decode_event((await t.redis.xrevrange(t.sk.results, count=1))[0][1])
    assert (last["type"], last["code"]) == (p.ERROR, "bad_entry")
    dead = await t.redis.xrange(t.sk.dead)
    assert [(f[b"sid"], f[b"reason"], f[b"entry"]) for _, f in dead] == [(b"s", b"bad_entry", b"1-5")]


async def test_ensure_group_and_ack(redis_client: aioredis.Redis) -> None:
    """ensure_group tolerates an existing group but not other errors; ack_session_entry ends a lease."""
    store = store_for(redis_client)
    entry = await start_session(redis_client, "ack", "w1")
    await store.ensure_group(KEYS.sessions(0))  # exists already: fine
    await redis_client.set("not-a-stream", "x")
    with pytest.raises(ResponseError):
        await store.ensure_group("not-a-stream")
    await store.ack_session_entry(KEYS.sessions(0), entry)
    assert (await redis_client.xpending(KEYS.sessions(0), p.WORKERS_GROUP))["pending"] == 0
