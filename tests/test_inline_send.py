"""The reader's inline send path (SessionRunner.send_inline) never writes where the write could
wait: one Deepgram socket that stops draining must not hold the shared audio reader."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from producer import protocol as p
from producer.audio import marker_frame
from worker.audio_reader import AudioReader
from worker.config import load_settings
from worker.deepgram_link import DeepgramLink
from worker.session_runner import SessionRunner, WorkerContext
from worker.store import Acquired, SessionStore


class Transport:
    """asyncio's write-buffer API: paused above the high-water mark until below the low one."""

    def __init__(self, buffered: int) -> None:
        self.buffered = buffered

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return 16 * 1024, 64 * 1024

    def get_write_buffer_size(self) -> int:
        return self.buffered


class Conn:
    def __init__(self, buffered: int) -> None:
        self._websocket = type("WS", (), {"transport": Transport(buffered)})()
        self.sent: list[bytes] = []

    async def send_media(self, payload: bytes) -> None:
        self.sent.append(payload)


def live_runner() -> SessionRunner:
    settings = load_settings(deepgram_url="ws://127.0.0.1:9", catchup_speed=0)
    client = aioredis.Redis()  # never used: no command is sent in these tests
    ctx = WorkerContext(
        settings,
        SessionStore(client, p.Keys(), results_maxlen=1000, retention=60),
        AudioReader(client, count=64),
        DeepgramLink(settings.deepgram_url, "", 1.0),
        "w1",
    )
    runner = SessionRunner(ctx, p.SessionStart("inline"), b"1-0", Acquired("ok", 1, -1, b"0-0", 0, 0, 0, 0))
    m = runner.machine
    m.begin(0.0, {"type": p.SESSION_STARTED})
    m.commit_point(-1, b"0-0")
    m.connected(0.0)
    m.caught_up([], 0.0)  # live now
    return runner


def frame_entry(seq: int) -> tuple[bytes, dict[bytes, Any]]:
    return f"1-{seq + 1}".encode(), {b"seq": str(seq).encode(), b"pcm": marker_frame(seq)}


async def test_inline_send_goes_out_only_below_the_low_water_mark() -> None:
    runner = live_runner()
    runner.parked_conn = conn = Conn(buffered=0)
    assert await runner.send_inline([frame_entry(0)])
    assert len(conn.sent) == 1 and runner.machine.ledger.next_seq == 1
    # A socket with 16 KiB waiting may be paused: the frame goes to the session's own task instead.
    runner.parked_conn = slow = Conn(buffered=16 * 1024)
    assert not await runner.send_inline([frame_entry(1)])
    assert slow.sent == [] and runner.machine.ledger.next_seq == 1  # nothing recorded either


async def test_a_frame_held_for_the_send_interval_goes_out_when_the_interval_is_over() -> None:
    """With a send interval, a frame that no other frame joins (the end of speech, a pause) is sent
    by the session's task when the interval is over: a timer wakes it. Without the timer the frame
    would wait for the task's next check (the KeepAlive timer, seconds away)."""
    import asyncio
    import time

    from tests.harness import rig

    async with rig(send_interval_ms=80) as r:
        session = await r.producer.open_session(sid="held-1")
        await session.send_frame(marker_frame(0))
        deadline = time.monotonic() + 10
        while r.emulator.stats_json()["frames_received"] < 1:  # the session's connection opens first
            assert time.monotonic() < deadline, "the frame never reached Deepgram"
            await asyncio.sleep(0.01)
        await session.send_frame(marker_frame(1))  # live now: held, alone
        sent_at = time.monotonic()
        while r.emulator.stats_json()["frames_received"] < 2:
            assert time.monotonic() - sent_at < 1.0, "a held frame waited far past the send interval"
            await asyncio.sleep(0.005)
        await session.end()
