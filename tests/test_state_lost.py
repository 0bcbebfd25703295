"""Redis loses a running session (restart without persistence, eviction): the worker says so instead
of blaming another worker, readers get an error instead of waiting forever, and the producer's
audio streams expire on their own (real redis-server, real SDK, the emulator)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
import wave
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
import structlog
from structlog.testing import LogCapture

from producer import protocol as p
from producer.audio import marker_frame
from producer.client import Producer, SessionLost, connect
from producer.transcripts import follow_session
from tests.harness import CLOSE_SECONDS, bounded, stop_pool
from worker.config import load_settings
from worker.emulator import EmulatorServer
from worker.metrics import METRICS
from worker.pool import WorkerPool
from worker.redis_server import RedisServer, child_env

KEYS = p.Keys()
STATE_LOST_LINE = "session state vanished from Redis"
BOUND = 15.0  # seconds any wait below may take before the test fails


@dataclass
class Rig:
    server: RedisServer
    redis: aioredis.Redis
    producer: Producer
    pool: WorkerPool
    logs: LogCapture


@contextlib.asynccontextmanager
async def rig(**settings: Any) -> AsyncIterator[Rig]:
    with RedisServer() as server:  # appendonly off: a restart comes back empty
        async with EmulatorServer(engine="marker", port=0, silence_timeout=3.0) as emulator:
            config = load_settings(
                redis_url=server.url,
                deepgram_url=emulator.url,
                catchup_speed=0,
                log_format="json",
                **settings,
            )
            pool = WorkerPool(config)
            # The pool's own log lines, whatever another test did to structlog's global config.
            logs = LogCapture()
            pool.log = structlog.wrap_logger(None, processors=[logs]).bind(worker=pool.consumer)
            task = asyncio.create_task(pool.run())
            client = connect(server.url, retries=20)  # rides out a restart of the server
            try:
                async with Producer(client) as producer:
                    yield Rig(server, client, producer, pool, logs)
            finally:
                await stop_pool(pool, task)  # bounded, as every teardown
                await bounded(client.aclose(), CLOSE_SECONDS, "closing the redis client")


def metric(name: str) -> float:
    return METRICS.registry.get_sample_value(name) or 0.0


async def poll(condition: Any, what: str, timeout: float = BOUND) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def committed(r: Rig, sid: str, seq: int) -> None:
    async def done() -> bool:
        value = await r.redis.hget(KEYS.session(sid).state, "committed_seq")
        return value is not None and int(value) >= seq

    await poll(done, f"{sid} to commit frame {seq}")


async def lose_everything(r: Rig, how: str) -> None:
    if how == "flushall":
        await r.redis.flushall()
    else:
        await asyncio.to_thread(r.server.restart)


async def dropped(r: Rig, sid: str) -> None:
    async def gone() -> bool:
        return sid not in r.pool.owned

    await poll(gone, f"the worker to drop {sid}")


def assert_state_lost_reported(r: Rig, sid: str) -> None:
    mine = [e for e in r.logs.entries if e.get("sid") == sid]
    assert [e for e in mine if STATE_LOST_LINE in e["event"]], mine
    assert not [e for e in mine if "another worker" in e["event"] or "lease lost" in e["event"]], mine


# ------------------------------------------------------------------------------ worker


async def test_publishing_worker_reports_vanished_state_not_a_takeover() -> None:
    """The runner's next commit is fenced: classified as state lost (lease renewal kept out of it)."""
    async with rig(lease_seconds=600, renew_seconds=300) as r:
        lost_before = metric("voxqueue_sessions_state_lost_total")
        taken_before = metric("voxqueue_sessions_lost_total")
        session = await r.producer.open_session(sid="flushed")
        for n in range(50):
            await session.send_frame(marker_frame(n))
        await committed(r, "flushed", 24)
        await r.redis.flushall()
        for n in range(50, 100):  # a final every 25 frames: the worker tries to commit again
            await session.send_frame(marker_frame(n))
        await dropped(r, "flushed")
        assert_state_lost_reported(r, "flushed")
        assert metric("voxqueue_sessions_state_lost_total") == lost_before + 1
        assert metric("voxqueue_sessions_lost_total") == taken_before
        # It wrote nothing: no state re-created, no event published after the loss.
        assert not await r.redis.exists(KEYS.session("flushed").state, KEYS.session("flushed").results)


@pytest.mark.parametrize("how", ["flushall", "restart"])
async def test_idle_session_whose_state_vanished_is_reported_by_the_lease_renewal(how: str) -> None:
    """Nothing to publish: the renew loop finds the lease gone and says why."""
    async with rig(lease_seconds=1.0, renew_seconds=0.2) as r:
        lost_before = metric("voxqueue_sessions_state_lost_total")
        taken_before = metric("voxqueue_sessions_lost_total")
        session = await r.producer.open_session(sid="idle")
        for n in range(50):
            await session.send_frame(marker_frame(n))
        await committed(r, "idle", 49)  # every frame covered: the session is parked, writing nothing
        await lose_everything(r, how)
        await dropped(r, "idle")
        assert_state_lost_reported(r, "idle")
        assert metric("voxqueue_sessions_state_lost_total") == lost_before + 1
        assert metric("voxqueue_sessions_lost_total") == taken_before


# ------------------------------------------------------------------------------ readers


async def collect(events: AsyncIterator[dict[str, Any]], into: list[dict[str, Any]]) -> None:
    async for event in events:
        into.append(event)


@pytest.mark.parametrize("how", ["flushall", "restart"])
async def test_library_readers_get_session_lost_instead_of_waiting_forever(how: str) -> None:
    async with rig() as r:
        # A reader that starts before the session exists is waiting, not lost.
        early: list[dict[str, Any]] = []
        early_task = asyncio.create_task(
            collect(follow_session(r.redis, KEYS, "lib", block_ms=100, state_check_seconds=0.1), early)
        )
        done, _ = await asyncio.wait([early_task], timeout=1.0)
        assert not done, early_task.exception()

        session = await r.producer.open_session(sid="lib")
        late: list[dict[str, Any]] = []
        late_task = asyncio.create_task(collect(session.events(), late))  # library defaults
        for n in range(50):
            await session.send_frame(marker_frame(n))

        async def both_have_finals() -> bool:
            return all(any(e["type"] == p.FINAL for e in got) for got in (early, late))

        await poll(both_have_finals, "both readers to see a final")
        await lose_everything(r, how)
        done, pending = await asyncio.wait([early_task, late_task], timeout=BOUND)
        for task in pending:
            task.cancel()
        assert not pending, "a reader kept waiting for a session Redis lost"
        for task in done:
            exc = task.exception()
            assert isinstance(exc, SessionLost), repr(exc)
            assert "maxmemory-policy noeviction" in str(exc) and "persistence" in str(exc)
        assert not [e for e in early + late if e["type"] == p.SESSION_ENDED]


def cli(*args: str, url: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "producer.cli", *args],
        env=child_env(VOXQUEUE_REDIS_URL=url),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@contextlib.contextmanager
def reaped(proc: subprocess.Popen[str]) -> Iterator[subprocess.Popen[str]]:
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def claim_like_a_worker(r: redis.Redis, sid: str) -> dict[str, Any]:
    """What a worker leaves in Redis once it runs a session: its state hash and session_started."""
    sk = KEYS.session(sid)
    r.hset(sk.state, mapping={"status": "active", "epoch": "1", "owner": "w", "started_at": "1"})
    started = {
        "v": 1,
        "id": f"{sid}/session_started",
        "type": p.SESSION_STARTED,
        "sid": sid,
        "ts": 1,
        "epoch": 1,
    }
    r.xadd(sk.results, p.encode_event(started))  # type: ignore[arg-type]
    return started


def finish_with_lost_session(proc: subprocess.Popen[str]) -> str:
    started = time.monotonic()
    try:
        _, err = proc.communicate(timeout=BOUND)
    except subprocess.TimeoutExpired:
        pytest.fail("the command kept waiting for a session Redis lost")
    assert proc.returncode == 1, err
    assert "was lost by Redis" in err and "maxmemory-policy noeviction" in err, err
    assert "Traceback" not in err
    return f"{time.monotonic() - started:.1f}"


def test_tail_session_exits_1_when_redis_loses_the_session(redis_server: RedisServer) -> None:
    r = redis.Redis.from_url(redis_server.url)
    with reaped(cli("tail", "--session", "t", "--json", url=redis_server.url)) as proc:
        assert proc.stderr is not None and proc.stdout is not None
        assert "waiting for session t to start" in proc.stderr.readline()
        # Longer than one state check (2 s): no state yet is waiting, not lost.
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(2.5)
        started = claim_like_a_worker(r, "t")
        assert json.loads(proc.stdout.readline()) == started
        r.flushall()
        finish_with_lost_session(proc)
    r.close()


def test_produce_follow_exits_1_while_still_sending_when_redis_loses_the_session(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    audio_seconds = 30
    with wave.open(str(tmp_path / "long.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"".join(marker_frame(n) for n in range(audio_seconds * 50)))
    r = redis.Redis.from_url(redis_server.url)
    started_at = time.monotonic()
    args = ("produce", str(tmp_path / "long.wav"), "--session", "pf", "--follow", "--json")
    with reaped(cli(*args, url=redis_server.url)) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "pf"
        started = claim_like_a_worker(r, "pf")
        assert json.loads(proc.stdout.readline()) == started
        r.flushall()
        finish_with_lost_session(proc)
    # It stopped sending at once instead of streaming the rest of the file first.
    assert time.monotonic() - started_at < audio_seconds - 5
    r.close()


# ------------------------------------------------------------------------------ producer TTL


async def test_audio_stream_has_a_ttl_from_its_first_frame_and_it_is_refreshed(
    redis_client: aioredis.Redis,
) -> None:
    audio = KEYS.session("ttl").audio
    async with Producer(redis_client, audio_ttl=3) as producer:  # refreshed at most every 1 s
        session = await producer.open_session("ttl")
        await session.send_frame(marker_frame(0))
        assert 2000 < await redis_client.pttl(audio) <= 3000

        async def aged() -> bool:
            return await redis_client.pttl(audio) < 1800  # more than the refresh interval ago

        await poll(aged, "the TTL to run down")
        for n in range(1, 100):  # the first send after the interval refreshes it, the rest do not
            await session.send_frame(marker_frame(n), wait=n == 99)
        assert await redis_client.pttl(audio) > 2500
        assert producer.stats.expires == 2  # per session and interval, not per frame
        assert producer.stats.commands == 1 + 100  # the session entry and the frames (XADDs)
        await session.end()
        assert await redis_client.pttl(audio) > 2500
        assert producer.stats.expires == 3


async def test_default_audio_ttl_is_the_retention(redis_client: aioredis.Redis) -> None:
    async with Producer(redis_client) as producer:
        session = await producer.open_session("day")
        await session.send(bytes(640 * 3))
        assert 86_000 < await redis_client.ttl(KEYS.session("day").audio) <= 86_400
