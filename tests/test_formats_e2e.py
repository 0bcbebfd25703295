"""Marker sessions in other formats, end to end: real worker processes, real redis-server, the
emulator's marker engine through the real SDK. Sessions in every format (linear16 at each rate,
μ-law and A-law, 1 and 2 channels) come out exact (every frame once, per channel, seq-exact times);
8 kHz μ-law and 2-channel 48 kHz also when their worker is killed mid-session and another takes
over (the per-channel commit of lua.COMMIT)."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from producer import protocol as p
from producer.audio import format_marker_frame
from producer.client import Producer
from tests.harness import Stack, sessions_pending, wait_until_ended

MULAW = p.AudioFormat("mulaw", 8000)
STEREO48 = p.AudioFormat("linear16", 48000, 2)
# Channel 1 of a 2-channel session is silent on these frames, and the session asks for endpointing:
# channel 1 then gets a final at each of its pauses, channel 0 one every 0.5 s, so the channels'
# commit marks keep diverging (the session's commit point is the slower channel's).
SILENT_ON_1 = 7


def heard(fmt: p.AudioFormat, channel: int, n: int) -> bool:
    return not (fmt.channels > 1 and channel == 1 and n % SILENT_ON_1 == 3)


def frame(fmt: p.AudioFormat, n: int) -> bytes:
    data = bytearray(format_marker_frame(fmt, n))
    if not heard(fmt, 1, n):
        width, group = fmt.sample_width, fmt.sample_width * fmt.channels
        for k in range(width):
            data[width + k :: group] = bytes(len(data[width + k :: group]))
    return bytes(data)


FAST_LEASES = {"VOXQUEUE_LEASE_SECONDS": "2", "VOXQUEUE_RENEW_SECONDS": "0.5"}


async def produce(
    redis: aioredis.Redis, sessions: dict[str, tuple[p.AudioFormat, int]], realtime: bool
) -> None:
    async with Producer(redis) as producer:

        async def one(sid: str, fmt: p.AudioFormat, frames: int) -> None:
            options = {"endpointing": 20} if fmt.channels > 1 else {}
            session = await producer.open_session(sid=sid, format=fmt, options=options)
            start = time.monotonic()
            for n in range(frames):
                if realtime:
                    delay = start + n * 0.02 - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                await session.send_frame(frame(fmt, n), wait=False)
            await session.end()

        await asyncio.gather(*(one(sid, fmt, n) for sid, (fmt, n) in sessions.items()))


async def check_exact(redis: aioredis.Redis, keys: p.Keys, sid: str, fmt: p.AudioFormat, frames: int) -> int:
    """Asserts the session's transcript is exact on every channel; returns its number of finals."""
    sk = keys.session(sid)
    events = [p.decode_event(f) for _, f in await redis.xrange(sk.results)]
    finals = [e for e in events if e["type"] == p.FINAL]
    ids = [f["id"] for f in finals]
    assert len(ids) == len(set(ids)), f"{sid}: a final was published twice"
    for channel in range(fmt.channels):
        mine = [f for f in finals if f["channel"] == channel]
        words = [w for f in mine for w in f["words"]]
        expected = [f"f{n}" for n in range(frames) if heard(fmt, channel, n)]
        assert [w["word"] for w in words] == expected, f"{sid} channel {channel}"
        for w in words:
            assert abs(w["start"] - int(w["word"][1:]) * 0.02) < 1e-6, (sid, w)
        if fmt.channels > 1:
            assert all(f"/final/c{channel}/" in f["id"] for f in mine)
    ended = [e for e in events if e["type"] == p.SESSION_ENDED]
    assert [e["reason"] for e in ended] == [p.END_COMPLETED], sid
    started = next(e for e in events if e["type"] == p.SESSION_STARTED)
    assert started["format"]["encoding"] == fmt.encoding and started["format"]["channels"] == fmt.channels
    assert int(await redis.hget(sk.state, "committed_seq") or -1) == frames - 1
    return len(finals)


async def test_marker_sessions_are_exact_in_every_format(tmp_path: Path) -> None:
    stack = Stack(tmp_path).start()
    redis = stack.client()
    try:
        stack.start_worker("f1")
        await stack.wait_workers_ready(1)
        sessions = {
            "mulaw-1": (MULAW, 120),
            "stereo-1": (STEREO48, 120),
            "alaw-1": (p.AudioFormat("alaw", 8000), 60),
            "mulaw-2ch": (p.AudioFormat("mulaw", 8000, 2), 60),
            "pcm-8k": (p.AudioFormat("linear16", 8000), 60),
            "pcm-24k": (p.AudioFormat("linear16", 24000), 60),
            "pcm-32k": (p.AudioFormat("linear16", 32000), 60),
            "pcm-44k-2ch": (p.AudioFormat("linear16", 44100, 2), 60),
            "pcm-48k": (p.AudioFormat("linear16", 48000), 60),
        }
        await produce(redis, sessions, realtime=False)
        await wait_until_ended(redis, stack.keys, list(sessions), 60)
        for sid, (fmt, frames) in sessions.items():
            await check_exact(redis, stack.keys, sid, fmt, frames)
    finally:
        await redis.aclose()
        stack.stop()


@pytest.mark.slow
async def test_takeover_mid_session_keeps_mulaw_and_two_channel_sessions_exact(tmp_path: Path) -> None:
    """kill -9 of the owner mid-session: the new owner reads each channel's mark and replays from
    the minimum; a channel that was ahead publishes nothing twice."""
    stack = Stack(tmp_path, worker_env=FAST_LEASES).start()
    redis = stack.client()
    try:
        stack.start_worker("a")
        await stack.wait_workers_ready(1)
        sessions = {
            f"{kind}-{i}": (fmt, 250) for i in range(3) for kind, fmt in (("mu", MULAW), ("st", STEREO48))
        }
        producing = asyncio.create_task(produce(redis, sessions, realtime=True))
        # Wait until every session has committed something on worker a, then kill it.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            points = [await redis.hget(stack.keys.session(sid).state, "committed_seq") for sid in sessions]
            if all(pt is not None and int(pt) >= 40 for pt in points):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("sessions made no progress on the first worker")
        stack.signal_worker("a", signal.SIGKILL)
        stack.start_worker("b")
        await producing
        await wait_until_ended(redis, stack.keys, list(sessions), 60)
        takeovers: list[Any] = []
        for sid, (fmt, frames) in sessions.items():
            await check_exact(redis, stack.keys, sid, fmt, frames)
            takeovers.append(int(await redis.hget(stack.keys.session(sid).state, "takeovers") or 0))
        assert all(t >= 1 for t in takeovers), takeovers
        assert await sessions_pending(redis, stack.keys) == 0
    finally:
        await redis.aclose()
        stack.stop()
