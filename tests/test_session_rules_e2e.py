"""Session rules end to end, with a worker in this process: bad input, abandoned sessions,
transient Deepgram refusals, silent producers (real redis-server, real SDK, the emulator)."""

from __future__ import annotations

import asyncio
import json

import pytest

from producer import protocol as p
from producer.audio import marker_frame
from tests.harness import assert_perfect, check_marker_session, rig, session_events, wait_until_ended

KEYS = p.Keys()


async def test_bad_frames_are_reported_and_the_session_goes_on() -> None:
    async with rig() as r:
        session = await r.producer.open_session(sid="bad-frames")
        sk = KEYS.session("bad-frames")
        for n in range(30):
            await session.send_frame(marker_frame(n))
        await r.redis.xadd(sk.audio, {"seq": "30", "pcm": b"short"})  # wrong size: dropped, reported
        await r.redis.xadd(sk.audio, {"seq": "30", "pcm": marker_frame(30), "extra": "x"})  # unknown field
        await r.redis.xadd(sk.audio, p.frame_fields(30, marker_frame(30)))
        await r.redis.xadd(sk.audio, p.frame_fields(30, marker_frame(30)))  # a producer retry: duplicate
        await r.redis.xadd(sk.audio, p.frame_fields(31, marker_frame(31)))
        await r.redis.xadd(sk.audio, p.end_fields(32))
        await wait_until_ended(r.redis, KEYS, ["bad-frames"], 20)
        assert_perfect(await check_marker_session(r.redis, KEYS, "bad-frames", 32), 32)
        errors = [e for e in await session_events(r.redis, KEYS, "bad-frames") if e["type"] == p.ERROR]
        assert sorted(e["code"] for e in errors) == ["bad_entry", "bad_frame_size"]
        assert not any(e["fatal"] for e in errors)
        dead = await r.redis.xrange(KEYS.dead(0))
        assert len(dead) == 2


async def test_missing_frames_become_silence_with_a_gap_error() -> None:
    async with rig() as r:
        session = await r.producer.open_session(sid="gap")
        for n in (0, 1, 2, 5, 6):
            await r.redis.xadd(KEYS.session("gap").audio, p.frame_fields(n, marker_frame(n)))
        await session.end()
        await r.redis.xadd(KEYS.session("gap").audio, p.end_fields(7))
        await wait_until_ended(r.redis, KEYS, ["gap"], 20)
        events = await session_events(r.redis, KEYS, "gap")
        words = [(w["word"], w["start"]) for e in events if e["type"] == p.FINAL for w in e["words"]]
        assert words == [("f0", 0.0), ("f1", 0.02), ("f2", 0.04), ("f5", 0.1), ("f6", 0.12)]
        # The library's end() came first (the frames went around it, so it counts 0 frames sent
        # while 7 arrived: end_mismatch); the second marker is late.
        codes = sorted(e["code"] for e in events if e["type"] == p.ERROR)
        assert codes == ["after_end", "end_mismatch", "seq_gap"]


async def test_disallowed_option_rejects_the_session() -> None:
    async with rig() as r:
        await r.redis.xadd(
            KEYS.sessions(0),
            {"sid": "exfil", "options": json.dumps({"callback": "https://evil.example/hook"})},
        )
        await wait_until_ended(r.redis, KEYS, ["exfil"], 20)
        events = await session_events(r.redis, KEYS, "exfil")
        assert [e["type"] for e in events] == [p.ERROR, p.SESSION_ENDED]
        assert events[0]["code"] == "option_not_allowed" and events[1]["reason"] == p.END_REJECTED
        assert await r.redis.ttl(KEYS.session("exfil").audio) > 0  # late frames expire with it
        assert r.emulator.stats_json()["connections_accepted"] == 0
        assert len(await r.redis.xrange(KEYS.dead(0))) == 1


async def test_malformed_session_entry_is_dead_lettered() -> None:
    async with rig() as r:
        await r.redis.xadd(KEYS.sessions(0), {"sid": "odd", "sample_rate": "lots"})
        await r.redis.xadd(KEYS.sessions(0), {"nosid": "1"})
        for _ in range(100):
            if len(await r.redis.xrange(KEYS.dead(0))) == 2:
                break
            await asyncio.sleep(0.05)
        reasons = sorted(f[b"reason"].split(b":")[0] for _, f in await r.redis.xrange(KEYS.dead(0)))
        assert reasons == [b"bad_format", b"unknown_fields"]
        events = await session_events(r.redis, KEYS, "odd")
        assert [e["type"] for e in events] == [p.ERROR, p.SESSION_ENDED]
        assert await r.redis.ttl(KEYS.session("odd").audio) > 0
        assert (await r.redis.xpending(KEYS.sessions(0), p.WORKERS_GROUP))["pending"] == 0


async def test_abandoned_session_ends_with_reason_abandoned() -> None:
    async with rig(idle_timeout=1.0) as r:
        session = await r.producer.open_session(sid="ghost")
        for n in range(40):
            await session.send_frame(marker_frame(n))
        await wait_until_ended(r.redis, KEYS, ["ghost"], 20)
        events = await session_events(r.redis, KEYS, "ghost")
        assert events[-1]["type"] == p.SESSION_ENDED and events[-1]["reason"] == p.END_ABANDONED
        words = [w["word"] for e in events if e["type"] == p.FINAL for w in e["words"]]
        assert words == [f"f{n}" for n in range(40)]  # what did arrive is still transcribed


async def test_silent_producer_is_kept_alive_past_deepgrams_idle_timeout() -> None:
    """The emulator closes 1011 after 3 s without data; KeepAlive every 1 s keeps the link open."""
    async with rig(keepalive_seconds=1.0) as r:
        session = await r.producer.open_session(sid="quiet")
        await session.send_frame(marker_frame(0))
        await asyncio.sleep(4.5)
        await session.send_frame(marker_frame(1))
        await session.end()
        await wait_until_ended(r.redis, KEYS, ["quiet"], 20)
        assert_perfect(await check_marker_session(r.redis, KEYS, "quiet", 2), 2)
        assert r.emulator.stats_json()["connections_accepted"] == 1  # never reconnected


@pytest.mark.parametrize("status", [429, 500])
async def test_transient_handshake_refusals_are_retried(status: int) -> None:
    async with rig(backoff_initial=0.05, backoff_max=0.2) as r:
        r.emulator.set_faults({"handshake_status": status, "handshake_count": 3})
        session = await r.producer.open_session(sid="retry2")
        for n in range(60):
            await session.send_frame(marker_frame(n))
        await session.end()
        await wait_until_ended(r.redis, KEYS, ["retry2"], 20)
        assert_perfect(await check_marker_session(r.redis, KEYS, "retry2", 60), 60)
        assert not [e for e in await session_events(r.redis, KEYS, "retry2") if e["type"] == p.ERROR]


async def test_crash_looping_session_is_failed_not_run() -> None:
    async with rig(max_takeovers=2) as r:
        sk = KEYS.session("poison")
        # As a session looks after its workers died on it twice: active, owned, taken over twice.
        await r.redis.hset(
            sk.state, mapping={"status": "active", "epoch": "3", "takeovers": "2", "owner": "dead"}
        )
        # Raw XADDs: the library refuses to open a session whose state exists (SessionExists).
        await r.redis.xadd(sk.sessions, p.SessionStart("poison").to_fields())
        await r.redis.xadd(sk.audio, p.frame_fields(0, marker_frame(0)))
        await wait_until_ended(r.redis, KEYS, ["poison"], 20)
        events = await session_events(r.redis, KEYS, "poison")
        assert [(e["type"], e.get("code")) for e in events][-2:] == [
            (p.ERROR, "crash_loop"),
            (p.SESSION_ENDED, None),
        ]
        assert events[-1]["reason"] == p.END_FAILED
        assert await r.redis.hget(sk.state, "status") == b"failed"
        assert r.emulator.stats_json()["connections_accepted"] == 0
        assert len(await r.redis.xrange(KEYS.dead(0))) == 1


async def test_send_interval_coalesces_live_frames_into_fewer_messages() -> None:
    async with rig(send_interval_ms=60) as r:
        session = await r.producer.open_session(sid="coalesced")
        loop = asyncio.get_running_loop()
        start = loop.time()
        for n in range(100):  # real time: one frame every 20 ms
            await asyncio.sleep(max(0.0, start + n * 0.02 - loop.time()))
            await session.send_frame(marker_frame(n))
        await session.end()
        await wait_until_ended(r.redis, KEYS, ["coalesced"], 20)
        assert_perfect(await check_marker_session(r.redis, KEYS, "coalesced", 100), 100)
        stats = r.emulator.stats_json()
        # ~3 frames per message at a 60 ms interval; one message per frame without it.
        assert stats["messages_received"] < 60, stats["messages_received"]
