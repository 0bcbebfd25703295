"""Session intake: hostile sessions entries, the crash-loop budget, a bounded sessions stream, and
ended sessions that never run twice (real redis-server 7.x and 6.2; real SDK and the emulator for
the end-to-end cases)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
import redis.asyncio as aioredis
import structlog

from producer import protocol as p
from producer.audio import marker_frame
from producer.options import validate_options
from tests.harness import (
    CLOSE_SECONDS,
    assert_perfect,
    bounded,
    check_marker_session,
    session_events,
    stop_pool,
    wait_until_ended,
)
from tests.test_session_rules_e2e import rig
from tests.test_store import final, redis, start_session, store_for  # noqa: F401  (redis: fixture)
from worker.config import load_settings
from worker.events import standalone_event
from worker.ledger import Commit
from worker.pool import WorkerPool
from worker.store import Rejection

KEYS = p.Keys()


async def poll(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


# ------------------------------------------------------------------------------ (b) decoding


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"labels": "[" * 100_000 + "]" * 100_000}, "bad_labels"),  # RecursionError in json.loads
        ({"labels": '{"a":' * 50_000 + '"x"' + "}" * 50_000}, "bad_labels"),
        ({"labels": json.dumps({"k": "v" * p.MAX_LABELS_BYTES})}, "bad_labels"),  # too many bytes
        ({"labels": json.dumps({"k": {"nested": "v"}})}, "bad_labels"),  # deeper than 1
        ({"options": '{"keywords": [["a"]]}'}, "bad_options"),  # deeper than 2
        ({"options": json.dumps({"tag": ["x" * 200] * 400})}, "bad_options"),  # over 64 KiB
        ({"options": '{"utterance_end_ms": ' + "9" * 5000 + "}"}, "bad_options"),  # int digits limit
    ],
)
def test_hostile_json_is_a_protocol_error(fields: dict[str, str], code: str) -> None:
    with pytest.raises(p.ProtocolError) as caught:
        p.SessionStart.from_fields({"sid": "s", **fields})
    assert caught.value.code == code


@pytest.mark.parametrize("literal", ["1e999", "NaN", "-Infinity", "1e300", "1.5", "-1", "600001"])
def test_non_finite_or_out_of_range_json_numbers_are_bad_option(literal: str) -> None:
    start = p.SessionStart.from_fields({"sid": "s", "options": f'{{"utterance_end_ms": {literal}}}'})
    with pytest.raises(p.ProtocolError) as caught:
        validate_options(start.options)  # 1e999 used to raise OverflowError here
    assert caught.value.code == "bad_option"


def test_limits_leave_room_for_every_legitimate_entry() -> None:
    options = {"keywords": ["w" * 256] * 100, "keyterm": ["t" * 256] * 100, "model": "nova-3"}
    start = p.SessionStart("ok", options=options, labels={f"k{i}": "v" * 100 for i in range(100)})
    assert p.SessionStart.from_fields(start.to_fields()) == start
    with pytest.raises(p.ProtocolError) as caught:  # the producer learns the limit before sending
        p.SessionStart("big", options={**options, "tag": ["g" * 256] * 100}).to_fields()
    assert caught.value.code == "bad_options"
    assert p.json_depth(b'{"a": ["[[[{{{", {"b": "\\"]"}]}') == 3  # brackets inside strings ignored


@pytest.mark.parametrize(
    "value",
    [
        float("inf"),
        float("nan"),
        1e300,
        pytest.param(10**5000, id="huge-int"),
        -1,
        600_001,
        1.5,
        "9" * 5000,
        [1],
        {"a": 1},
    ],
)
def test_non_finite_or_out_of_range_int_options_are_bad_option(value: Any) -> None:
    for name in ("utterance_end_ms", "endpointing"):
        with pytest.raises(p.ProtocolError) as caught:
            validate_options({name: value})
        assert caught.value.code == "bad_option"


@pytest.mark.parametrize("value", [float("inf"), float("nan"), pytest.param(10**5000, id="huge-int")])
def test_non_finite_or_huge_text_options_are_bad_option(value: Any) -> None:
    with pytest.raises(p.ProtocolError) as caught:
        validate_options({"tag": value})
    assert caught.value.code == "bad_option"


async def test_poison_entries_in_a_batch_cost_only_themselves(monkeypatch: pytest.MonkeyPatch) -> None:
    """Poison entries between good sessions in one claimed batch: the good sessions complete, each
    poison entry is dead-lettered (with error + session_ended(rejected) when it names a valid sid)
    and no background loop ever fails."""
    real_from_fields = p.SessionStart.from_fields.__func__  # type: ignore[attr-defined]

    def buggy_from_fields(cls: type[p.SessionStart], raw: Any) -> p.SessionStart:
        if raw.get(b"sid") == b"bug":  # stands for a decoding bug nobody has found yet
            raise RuntimeError("a bug in decoding one entry")
        return real_from_fields(cls, raw)

    monkeypatch.setattr(p.SessionStart, "from_fields", classmethod(buggy_from_fields))
    poison = [
        {"sid": "deep", "labels": "[" * 100_000},
        {"sid": "inf", "options": '{"utterance_end_ms": 1e999}'},
        {"sid": "nan", "options": '{"endpointing": NaN}'},
        {"sid": "bug"},
        {"sid": "bad sid{", "labels": "{" * 100_000},
    ]
    frames = 40
    with structlog.testing.capture_logs() as logs:
        async with rig(claim_batch=16) as r:
            # Stop nothing from claiming before the whole batch is in: add all entries in one go.
            pipe = r.redis.pipeline(transaction=True)
            pipe.xadd(KEYS.sessions(0), p.SessionStart("good-1").to_fields())
            for fields in poison:
                pipe.xadd(KEYS.sessions(0), fields)
            pipe.xadd(KEYS.sessions(0), p.SessionStart("good-2").to_fields())
            for sid in ("good-1", "good-2"):
                for n in range(frames):
                    pipe.xadd(KEYS.session(sid).audio, p.frame_fields(n, marker_frame(n)))
                pipe.xadd(KEYS.session(sid).audio, p.end_fields(frames))
            await pipe.execute()
            await wait_until_ended(r.redis, KEYS, ["good-1", "good-2", "deep", "inf", "nan", "bug"], 20)
            for sid in ("good-1", "good-2"):
                assert_perfect(await check_marker_session(r.redis, KEYS, sid, frames), frames)
            for sid, code in (("deep", "bad_labels"), ("inf", "bad_option"), ("nan", "bad_option")):
                events = await session_events(r.redis, KEYS, sid)
                assert [e["type"] for e in events] == [p.ERROR, p.SESSION_ENDED], sid
                assert events[0]["code"] == code and events[1]["reason"] == p.END_REJECTED
            assert [e.get("code") for e in await session_events(r.redis, KEYS, "bug")] == ["bad_entry", None]
            dead = [f[b"sid"] for _, f in await r.redis.xrange(KEYS.dead(0))]
            assert sorted(dead) == sorted(f["sid"].encode() for f in poison)
            assert await r.redis.xlen(KEYS.sessions(0)) == 0  # every entry retired
    failures = [e for e in logs if e["event"] == "background loop failed; restarting"]
    assert failures == []


# ------------------------------------------------------------------------------ (c) crash loops


async def test_takeovers_with_progress_never_reach_poison(redis: aioredis.Redis) -> None:  # noqa: F811
    store, sk = store_for(redis), KEYS.session("long")
    entry = await start_session(redis, "long")
    acquired = await store.acquire(sk, "w0", 2, entry)
    seq = -1
    for i in range(1, 10):  # a worker dies after every commit, 9 times: never a crash loop
        await store.commit(
            sk, acquired.epoch, Commit(seq + 1, seq + 25, b"1-%d" % i), final("long", seq + 1, seq + 25)
        )
        seq += 25
        acquired = await store.acquire(sk, f"w{i}", 2, entry)
        assert acquired.status == "ok", f"failed as a crash loop after {i} takeovers with progress"
        assert (acquired.stalled, acquired.takeovers) == (0, i)
    # Now it stalls: takeovers without progress count, and the third over the limit is poison.
    statuses = [(await store.acquire(sk, f"x{i}", 2, entry)) for i in range(3)]
    assert [a.status for a in statuses] == ["ok", "ok", "poison"]
    poison = statuses[-1]
    # The poison reply carries the real commit point and counters, for session_ended to report.
    assert (poison.committed_seq, poison.committed_id, poison.frames, poison.finals) == (
        seq,
        b"1-9",
        seq + 1,
        9,
    )
    # FINISH never lowers the commit point, even with a frame count behind it.
    ended = standalone_event("long", p.SESSION_ENDED, "end", reason="failed")
    await store.finish(sk, poison.epoch, entry, status="failed", reason="failed", event=ended, frames=0)
    state = await redis.hgetall(sk.state)
    assert (state[b"committed_seq"], state[b"frames"], state[b"status"]) == (
        str(seq).encode(),
        b"225",
        b"failed",
    )


async def test_progress_resets_the_count_between_stalls(redis: aioredis.Redis) -> None:  # noqa: F811
    store, sk = store_for(redis), KEYS.session("bumpy")
    entry = await start_session(redis, "bumpy")
    acquired = await store.acquire(sk, "w0", 2, entry)
    seq = -1
    for round_ in range(3):
        for _ in range(2):  # two stalled takeovers: at the limit, not over it
            acquired = await store.acquire(sk, "w", 2, entry)
            assert acquired.status == "ok"
        await store.commit(
            sk, acquired.epoch, Commit(seq + 1, seq + 10, b"2-%d" % round_), final("bumpy", seq + 1, seq + 10)
        )
        seq += 10
    assert (await store.acquire(sk, "w", 2, entry)).stalled == 0


async def _seed_resumed_session(r: Any, sid: str, frames: int, state: dict[str, Any]) -> None:
    """Audio already in Redis (frames + end marker) and a state hash as an earlier owner left it,
    with frames 0..9 committed; then the sessions entry."""
    sk = KEYS.session(sid)
    ids = [await r.redis.xadd(sk.audio, p.frame_fields(n, marker_frame(n))) for n in range(frames)]
    await r.redis.xadd(sk.audio, p.end_fields(frames))
    base = {"status": "active", "epoch": "7", "owner": "dead", "committed_seq": "9", "committed_id": ids[9]}
    await r.redis.hset(sk.state, mapping={**base, "frames": "10", "finals": "1", **state})
    entry = await r.redis.xadd(KEYS.sessions(0), p.SessionStart(sid).to_fields())
    await r.redis.hset(sk.state, "start_id", entry)


async def test_a_session_that_makes_progress_is_not_failed_however_often_taken_over() -> None:
    async with rig(max_takeovers=2) as r:
        # Taken over 5 times already (over the limit of 2), but frames 0..9 were committed since.
        await _seed_resumed_session(r, "healthy", 60, {"takeovers": "5", "takeover_seq": "-1"})
        await wait_until_ended(r.redis, KEYS, ["healthy"], 20)
        events = await session_events(r.redis, KEYS, "healthy")
        assert events[-1]["reason"] == p.END_COMPLETED and events[-1]["frames"] == 60
        words = [w["word"] for e in events if e["type"] == p.FINAL for w in e["words"]]
        assert words == [f"f{n}" for n in range(10, 60)]  # resumed after the commit point
        assert not [e for e in events if e["type"] == p.ERROR]


async def test_a_crash_looping_session_reports_its_real_progress() -> None:
    async with rig(max_takeovers=2) as r:
        # Frames 0..9 committed, then two takeovers without progress: the next one is poison.
        await _seed_resumed_session(
            r, "stuck", 60, {"takeovers": "4", "takeover_seq": "9", "stalled_takeovers": "2"}
        )
        await wait_until_ended(r.redis, KEYS, ["stuck"], 20)
        events = await session_events(r.redis, KEYS, "stuck")
        assert [e.get("code") for e in events] == ["crash_loop", None]
        assert (events[-1]["reason"], events[-1]["frames"], events[-1]["finals"]) == (p.END_FAILED, 10, 1)
        state = await r.redis.hgetall(KEYS.session("stuck").state)
        assert (state[b"status"], state[b"committed_seq"]) == (b"failed", b"9")
        assert r.emulator.stats_json()["connections_accepted"] == 0


# ------------------------------------------------------------------------------ (i) rejecting


def _rejection(
    sid: str, entry: bytes, reason: str = "bad_format: x", sk: p.SessionKeys | None = None
) -> Rejection:
    error = standalone_event(sid, p.ERROR, "bad_format", code="bad_format", message="m", fatal=True)
    if sk is None:
        return Rejection(entry, sid.encode(), reason, error)
    ended = standalone_event(sid, p.SESSION_ENDED, "end", reason=p.END_REJECTED, frames=0, finals=0)
    reused = standalone_event(sid, p.ERROR, "sid_reused", code="sid_reused", message="m", fatal=False)
    return Rejection(entry, sid.encode(), reason, error, sk.audio, sk, ended, reused, "sid_reused: m")


HERE = (KEYS.sessions(0), KEYS.dead(0), KEYS.results(0))


async def _deliver(redis: aioredis.Redis, fields: dict[str, Any]) -> bytes:  # noqa: F811
    await store_for(redis).ensure_group(KEYS.sessions(0))
    entry = await redis.xadd(KEYS.sessions(0), fields)
    await redis.xreadgroup(p.WORKERS_GROUP, "w1", {KEYS.sessions(0): ">"})
    return entry


async def test_reject_script_reports_a_new_sid_once(redis: aioredis.Redis) -> None:  # noqa: F811
    store, sk = store_for(redis), KEYS.session("nope")
    entry = await _deliver(redis, {"sid": "nope", "sample_rate": "lots"})
    rejection = _rejection("nope", entry, sk=sk)
    assert await store.reject_session(*HERE, rejection) == "rejected"
    assert await store.reject_session(*HERE, rejection) == "dup"  # a retry after a lost reply: nothing twice
    assert [f[b"type"] for _, f in await redis.xrange(sk.results)] == [b"error", b"session_ended"]
    assert await redis.xlen(sk.partition_results) == 2 and await redis.xlen(KEYS.dead(0)) == 1
    state = await redis.hgetall(sk.state)
    assert (state[b"status"], state[b"reason"], state[b"start_id"]) == (b"failed", b"rejected", entry)
    assert state[b"sample_rate"] == b"lots"  # the entry's fields, as for every ended session
    for key in (sk.state, sk.results, sk.audio):
        assert 0 < await redis.ttl(key) <= 60
    assert await redis.xlen(sk.audio) == 0  # created empty, only to carry the TTL
    assert await redis.xlen(KEYS.sessions(0)) == 0
    assert (await redis.xpending(KEYS.sessions(0), p.WORKERS_GROUP))["pending"] == 0
    # The producer retries its XADD (the same entry again): dropped without a word.
    retry = await _deliver(redis, {"sid": "nope", "sample_rate": "lots"})
    assert await store.reject_session(*HERE, _rejection("nope", retry, sk=sk)) == "duplicate"
    assert await redis.xlen(sk.results) == 2 and await redis.xlen(KEYS.dead(0)) == 1
    # Another entry naming the same sid is a reuse: reported, but session_ended stays unique.
    again = await _deliver(redis, {"sid": "nope", "frame_ms": "x"})
    assert await store.reject_session(*HERE, _rejection("nope", again, sk=sk)) == "reused"
    types = [(f[b"type"], p.decode_event(f).get("code")) for _, f in await redis.xrange(sk.results)]
    assert types == [(b"error", "bad_format"), (b"session_ended", None), (b"error", "sid_reused")]
    assert await redis.xlen(KEYS.dead(0)) == 2
    assert await redis.hget(sk.state, "start_id") == entry


async def test_reject_script_reports_a_reuse_without_touching_the_session(redis: aioredis.Redis) -> None:  # noqa: F811
    store, sk = store_for(redis), KEYS.session("live")
    live_entry = await start_session(redis, "live")
    await store.acquire(sk, "w1", 5, live_entry)
    before = await redis.hgetall(sk.state)
    bad = await _deliver(redis, {"sid": "live", "options": '{"callback": "x"}'})
    assert await store.reject_session(*HERE, _rejection("live", bad, sk=sk)) == "reused"
    assert await redis.hgetall(sk.state) == before
    (event,) = [p.decode_event(f) for _, f in await redis.xrange(sk.results)]
    assert (event["code"], event["fatal"]) == ("sid_reused", False)  # the session goes on
    assert await redis.ttl(sk.state) == -1  # the live session's keys keep no TTL
    assert [e for e, _ in await redis.xrange(KEYS.sessions(0))] == [live_entry]  # only the bad one went
    pending = await redis.xpending_range(KEYS.sessions(0), p.WORKERS_GROUP, "-", "+", 10)
    assert [x["message_id"] for x in pending] == [live_entry]


async def test_acquire_tells_a_retried_entry_from_a_reused_sid(redis: aioredis.Redis) -> None:  # noqa: F811
    """Fails when ACQUIRE takes every second entry for a sid as a harmless duplicate (a reuse was
    dropped silently) or every one as a reuse (a retried XADD would be reported)."""
    store, sk = store_for(redis), KEYS.session("twice")
    first = await start_session(redis, "twice")
    assert (await store.acquire(sk, "w1", 5, first)).status == "ok"
    retry = await _deliver(redis, p.SessionStart("twice").to_fields())  # the same fields again
    assert (await store.acquire(sk, "w1", 5, retry)).status == "duplicate"
    other = await _deliver(redis, p.SessionStart("twice", labels={"x": "y"}).to_fields())
    assert (await store.acquire(sk, "w1", 5, other)).status == "reused"
    pending = await redis.xpending_range(KEYS.sessions(0), p.WORKERS_GROUP, "-", "+", 10)
    assert sorted(x["message_id"] for x in pending) == sorted([first, other])  # left for REJECT_SESSION
    assert await redis.hget(sk.state, "start_id") == first


async def test_reject_script_with_an_invalid_sid_reports_in_the_partition(redis: aioredis.Redis) -> None:  # noqa: F811
    store = store_for(redis)
    bad = await _deliver(redis, {"nosid": "1"})
    assert await store.reject_session(*HERE, _rejection("", bad, "missing_fields: x")) == "dead"
    ((_, letter),) = await redis.xrange(KEYS.dead(0))
    assert letter == {
        b"sid": b"",
        b"reason": b"missing_fields: x",
        b"stream": KEYS.sessions(0).encode(),
        b"entry": bad,
    }
    # A reader can see it: the partition's results stream is the one place without a valid sid.
    ((_, fields),) = await redis.xrange(KEYS.results(0))
    assert p.decode_event(fields)["type"] == p.ERROR
    assert await redis.xlen(KEYS.sessions(0)) == 0
    assert await redis.keys("*:s:*") == []


# ------------------------------------------------------------------------------ (f) bounded stream


async def test_scripts_retire_ended_duplicate_and_rejected_entries(redis: aioredis.Redis) -> None:  # noqa: F811
    store = store_for(redis)
    ended = standalone_event("x", p.SESSION_ENDED, "end", reason="completed")
    for n in range(200):  # sessions that end: FINISH deletes their entries
        sk = KEYS.session(f"e{n}")
        entry = await start_session(redis, f"e{n}")
        acquired = await store.acquire(sk, "w1", 5, entry)
        if n % 2:  # and a retried XADD of each: ACQUIRE retires the duplicate
            dup = await _deliver(redis, p.SessionStart(f"e{n}").to_fields())
            assert (await store.acquire(sk, "w1", 5, dup)).status == "duplicate"
        await store.finish(
            sk, acquired.epoch, entry, status="ended", reason="completed", event=ended, frames=0
        )
        assert (await store.acquire(sk, "w2", 5, entry)).status == "done"  # a late redelivery
    assert await redis.xlen(KEYS.sessions(0)) == 0
    assert (await redis.xpending(KEYS.sessions(0), p.WORKERS_GROUP))["pending"] == 0
    # FINISH kept what tools need from the deleted entry (replay reads options from the state).
    state = await redis.hgetall(KEYS.session("e1").state)
    assert (state[b"options"], state[b"sample_rate"]) == (b"{}", b"16000")


async def test_trim_drops_only_entries_nobody_needs(redis: aioredis.Redis) -> None:  # noqa: F811
    store = store_for(redis)
    done = [await _deliver(redis, {"sid": f"old{n}"}) for n in range(5)]
    for entry in done:  # acknowledged without XDEL (as older workers did)
        await redis.xack(KEYS.sessions(0), p.WORKERS_GROUP, entry)
    lease = await _deliver(redis, {"sid": "leased"})  # pending: a lease
    acked_after = await _deliver(redis, {"sid": "later"})
    await redis.xack(KEYS.sessions(0), p.WORKERS_GROUP, acked_after)
    waiting = await redis.xadd(KEYS.sessions(0), {"sid": "new"})  # never delivered yet
    assert await store.trim_sessions(KEYS.sessions(0)) == 5
    assert [e for e, _ in await redis.xrange(KEYS.sessions(0))] == [lease, acked_after, waiting]
    await redis.xack(KEYS.sessions(0), p.WORKERS_GROUP, lease)
    assert await store.trim_sessions(KEYS.sessions(0)) == 2  # up to the undelivered one
    assert [e for e, _ in await redis.xrange(KEYS.sessions(0))] == [waiting]
    await redis.xgroup_create(KEYS.sessions(0), "audit", id="0")  # another group: hands off
    assert await store.trim_sessions(KEYS.sessions(0)) == 0


@pytest.mark.slow  # CPU-heavy: runs in the second tier, alone
async def test_ten_thousand_session_entries_leave_the_stream_empty(redis_server: Any) -> None:
    """10,000 session entries through a real worker pool (duplicates of an ended session, rejected
    entries): the sessions stream ends empty instead of keeping every entry forever."""
    client = aioredis.Redis.from_url(redis_server.url)
    settings = load_settings(
        redis_url=redis_server.url, deepgram_url="ws://127.0.0.1:1", claim_batch=200, log_level="warning"
    )
    pool = WorkerPool(settings)
    task = asyncio.create_task(pool.run())
    try:
        store = store_for(client)
        entry = await _deliver(client, p.SessionStart("ended").to_fields())
        acquired = await store.acquire(KEYS.session("ended"), "w0", 5, entry)
        ended = standalone_event("ended", p.SESSION_ENDED, "end", reason="completed")
        await store.finish(
            KEYS.session("ended"),
            acquired.epoch,
            entry,
            status="ended",
            reason="completed",
            event=ended,
            frames=0,
        )
        started = time.monotonic()
        big = "x" * 100_000  # over the labels limit: rejected unparsed, and deleted with its entry
        ids: list[bytes] = []
        for chunk in range(20):
            pipe = client.pipeline(transaction=False)
            for n in range(500):
                i = chunk * 500 + n
                if i % 2:
                    pipe.xadd(KEYS.sessions(0), p.SessionStart("ended").to_fields())  # duplicates
                elif i % 4:
                    pipe.xadd(KEYS.sessions(0), {"sid": f"r{i}", "labels": big})
                else:
                    pipe.xadd(KEYS.sessions(0), {"sid": "bad sid", "x": "1"})
            ids += await pipe.execute()

        async def all_handled() -> bool:
            (group,) = await client.xinfo_groups(KEYS.sessions(0))
            pending = (await client.xpending(KEYS.sessions(0), p.WORKERS_GROUP))["pending"]
            return group["last-delivered-id"] == ids[-1] and pending == 0

        await poll(all_handled, 30, "the worker to handle 10,000 entries")
        elapsed = time.monotonic() - started
        assert await client.xlen(KEYS.sessions(0)) == 0
        assert await client.xlen(KEYS.dead(0)) == 5_000  # one dead letter per rejected entry
        print(f"10,000 entries handled in {elapsed:.2f} s")
    finally:
        await stop_pool(pool, task)  # bounded, as every teardown
        await bounded(client.aclose(), CLOSE_SECONDS, "closing the redis client")


# ------------------------------------------------------------------------------ (g) never twice


async def test_an_ended_session_never_runs_again_after_its_group_is_recreated() -> None:
    async with rig() as r:
        first = await r.producer.open_session(sid="first")
        for n in range(20):
            await first.send_frame(marker_frame(n))
        await first.end()
        await wait_until_ended(r.redis, KEYS, ["first"], 20)
        await r.redis.delete(KEYS.session("first").state)  # its retention ran out
        await r.redis.xgroup_destroy(KEYS.sessions(0), p.WORKERS_GROUP)
        # A later session can only run once the worker has recreated the group (at id 0).
        second = await r.producer.open_session(sid="second")
        for n in range(20):
            await second.send_frame(marker_frame(n))
        await second.end()
        await wait_until_ended(r.redis, KEYS, ["second"], 20)
        assert_perfect(await check_marker_session(r.redis, KEYS, "second", 20), 20)
        events = await session_events(r.redis, KEYS, "first")
        assert [e["type"] for e in events].count(p.SESSION_STARTED) == 1
        assert [e["type"] for e in events].count(p.SESSION_ENDED) == 1
        assert await r.redis.exists(KEYS.session("first").state) == 0  # not recreated by a rerun
