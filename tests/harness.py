"""End-to-end harness: real redis-server, the emulator and workers as separate processes.

Used by the end-to-end and chaos tests. Sessions are made of marker frames (`f<seq>` words), so a
session's transcript proves which frames reached Deepgram, how often and in what order.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import warnings
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

import redis.asyncio as aioredis

from producer import protocol as p
from producer.audio import marker_frame
from producer.client import Producer
from worker.config import load_settings
from worker.emulator import EmulatorServer
from worker.pool import WorkerPool
from worker.redis_server import RedisServer, free_port

T = TypeVar("T")

# Teardown bounds. Every await and every process wait on a teardown path has one, so a test that
# fails (or a worker that misbehaves) can never hang the run; see also the watchdog in conftest.py.
PROCESS_EXIT_SECONDS = 10.0
CLOSE_SECONDS = 5.0
RIG_STOP_SECONDS = 15.0  # the pool's own drain and teardown are bounded well inside this
RIG_CANCEL_SECONDS = 5.0


class TeardownTimeout(AssertionError):
    """Something on a teardown path did not finish within its bound."""


async def bounded(aw: Awaitable[T], seconds: float, what: str) -> T | None:
    """Awaits `aw` for at most `seconds`. Past that it is cancelled, given a second, bounded wait
    (a cancellation can be lost inside asyncio.wait_for, CPython gh-86296, so never `await` it
    unbounded) and left behind with a warning: teardown goes on. Its exception, if any, is raised."""
    task = asyncio.ensure_future(aw)
    done, _ = await asyncio.wait([task], timeout=seconds)
    if not done:
        task.cancel()
        await asyncio.wait([task], timeout=1.0)
        warnings.warn(f"{what} did not finish within {seconds} s; left behind", stacklevel=2)
        return None
    return task.result()


def reap(proc: subprocess.Popen[bytes], seconds: float = PROCESS_EXIT_SECONDS) -> bool:
    """Kills a child process (continuing it first if it was stopped) and waits, boundedly, for it
    to go. False if it outlived SIGKILL for `seconds` (uninterruptible sleep): it is left behind."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    try:
        proc.wait(seconds)
    except subprocess.TimeoutExpired:
        warnings.warn(f"process {proc.pid} still alive {seconds} s after SIGKILL", stacklevel=2)
        return False
    return True


VOXQUEUE = [sys.executable, "-m", "worker.cli"]


@dataclass
class Stack:
    tmp: Path
    appendonly: bool = True
    worker_env: dict[str, str] = field(default_factory=dict)
    emulator_args: list[str] = field(default_factory=list)
    redis: RedisServer = field(init=False)
    emulator: subprocess.Popen[bytes] | None = None
    emulator_port: int = 0
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    keys: p.Keys = field(default_factory=p.Keys)
    _logs: list[IO[bytes]] = field(default_factory=list)

    def start(self) -> Stack:
        self.redis = RedisServer(appendonly=self.appendonly).start()
        try:
            self.emulator_port = free_port()
            log = self._log("emulator.log", "wb")
            self.emulator = subprocess.Popen(
                [*VOXQUEUE, "emulator", "--port", str(self.emulator_port), *self.emulator_args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._env(),
            )
            _wait_http(f"http://127.0.0.1:{self.emulator_port}/_emulator/stats", 15)
        except BaseException:
            self.stop()  # the caller's try/finally has not started yet
            raise
        return self

    def _log(self, name: str, mode: str) -> IO[bytes]:
        handle: IO[bytes] = (self.tmp / name).open(mode)  # type: ignore[assignment]
        self._logs.append(handle)
        return handle

    def _env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            VOXQUEUE_REDIS_URL=self.redis.url,
            VOXQUEUE_DEEPGRAM_URL=f"ws://127.0.0.1:{self.emulator_port}",
            VOXQUEUE_CATCHUP_SPEED="0",
            VOXQUEUE_LOG_FORMAT="json",
            VOXQUEUE_LOG_LEVEL="info",
        )
        env.update(self.worker_env)
        env.update(extra)
        return env

    def start_worker(self, name: str, **env: str) -> subprocess.Popen[bytes]:
        log = self._log(f"worker-{name}.log", "ab")
        proc = subprocess.Popen(
            [*VOXQUEUE, "worker", "--name", name],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self._env(**env),
        )
        self.workers[name] = proc
        return proc

    async def wait_workers_ready(self, count: int, timeout: float = 20) -> None:
        """Until `count` workers are blocked waiting for new sessions (XREADGROUP on the sessions
        stream; Redis lists a consumer only once it has been given an entry, so ask CLIENT LIST)."""
        redis = self.client()
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                clients = await redis.client_list()
                if sum(1 for c in clients if c.get("cmd") == "xreadgroup") >= count:
                    return
                await asyncio.sleep(0.05)
            raise AssertionError(f"{count} workers did not start within {timeout} s")
        finally:
            await redis.aclose()

    def worker_log(self, name: str) -> str:
        return (self.tmp / f"worker-{name}.log").read_text(errors="replace")

    def signal_worker(self, name: str, sig: int) -> None:
        proc = self.workers[name]
        if proc.poll() is None:
            os.kill(proc.pid, sig)

    def faults(self, **params: Any) -> dict[str, Any]:
        query = "&".join(f"{k}={v}" for k, v in params.items())
        return _get_json(f"http://127.0.0.1:{self.emulator_port}/_emulator/faults?{query}")

    def emulator_stats(self) -> dict[str, Any]:
        return _get_json(f"http://127.0.0.1:{self.emulator_port}/_emulator/stats")

    def stop(self) -> None:
        """Kills everything, each step bounded and each attempted even if an earlier one failed."""
        try:
            for proc in self.workers.values():
                reap(proc)
            if self.emulator is not None:
                reap(self.emulator)
        finally:
            for handle in self._logs:
                handle.close()
            if not os.environ.get("VOXQUEUE_KEEP_REDIS"):
                self.redis.cleanup()

    def client(self) -> aioredis.Redis:
        return aioredis.Redis.from_url(self.redis.url)


@dataclass
class Rig:
    redis: aioredis.Redis
    producer: Producer
    emulator: EmulatorServer
    pool: WorkerPool
    task: asyncio.Task[None]  # the pool's run()


@contextlib.asynccontextmanager
async def rig(**settings: Any) -> AsyncIterator[Rig]:
    """A worker pool in this process with a private redis-server and the marker emulator."""
    with RedisServer() as server:
        async with EmulatorServer(engine="marker", port=0, silence_timeout=3.0) as emulator:
            config = load_settings(
                redis_url=server.url,
                deepgram_url=emulator.url,
                catchup_speed=0,
                log_format="json",
                **settings,
            )
            pool = WorkerPool(config)
            task = asyncio.create_task(pool.run(), name="rig-worker")
            redis = aioredis.Redis.from_url(server.url)
            producer = Producer(redis)
            try:
                yield Rig(redis, producer, emulator, pool, task)
            finally:
                try:
                    await stop_pool(pool, task)
                finally:
                    await bounded(producer.aclose(), CLOSE_SECONDS, "closing the producer")
                    await bounded(redis.aclose(), CLOSE_SECONDS, "closing the redis client")


async def stop_pool(pool: WorkerPool, task: asyncio.Task[None]) -> None:
    """Asks the pool to stop, as SIGTERM does, and waits for it, boundedly: RIG_STOP_SECONDS for
    the drain, then cancel() and RIG_CANCEL_SECONDS more. A pool that needed the cancel, or
    outlived it, fails the test (TeardownTimeout); one that crashed raises its exception."""
    pool.stop_requested.set()
    done, _ = await asyncio.wait([task], timeout=RIG_STOP_SECONDS)
    if done:
        task.result()
        return
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=RIG_CANCEL_SECONDS)
    if done:
        raise TeardownTimeout(f"the worker did not stop within {RIG_STOP_SECONDS} s; cancelled it")
    raise TeardownTimeout(
        f"the worker did not stop within {RIG_STOP_SECONDS} s, nor {RIG_CANCEL_SECONDS} s after cancel(); "
        "left it running"
    )


def _get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


def _wait_http(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            _get_json(url)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


async def produce_marker_session(
    producer: Producer,
    sid: str,
    frames: int,
    *,
    realtime: bool = False,
    options: dict[str, Any] | None = None,
) -> None:
    """A session whose frame n is the marker word f<n>; `realtime` paces it at 50 frames/s."""
    session = await producer.open_session(sid=sid, options=options or {})
    start = time.monotonic()
    for n in range(frames):
        if realtime:
            delay = start + n * 0.02 - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        await session.send_frame(marker_frame(n, time.time_ns()), wait=False)
    await session.end()


async def session_events(redis: aioredis.Redis, keys: p.Keys, sid: str) -> list[dict[str, Any]]:
    entries = await redis.xrange(keys.session(sid).results)
    return [p.decode_event(fields) for _, fields in entries]


async def wait_until_ended(redis: aioredis.Redis, keys: p.Keys, sids: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending = set(sids)
    while pending:
        for sid in list(pending):
            if await redis.hget(keys.session(sid).state, "status") in (b"ended", b"failed"):
                pending.discard(sid)
        if not pending:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(pending)} sessions did not end in {timeout} s: {sorted(pending)[:5]}")
        await asyncio.sleep(0.1)


@dataclass
class SessionReport:
    sid: str
    words: list[str]
    duplicated_finals: int
    lost_frames: int
    bad_timestamps: int
    ended: int
    end_reason: str
    unacked: int  # frames after the session's commit point


async def check_marker_session(redis: aioredis.Redis, keys: p.Keys, sid: str, frames: int) -> SessionReport:
    """Everything the delivery guarantees promise about one marker session."""
    events = await session_events(redis, keys, sid)
    finals = [e for e in events if e["type"] == p.FINAL]
    words = [w for f in finals for w in f["words"]]
    names = [w["word"] for w in words]
    expected = [f"f{n}" for n in range(frames)]
    bad_ts = sum(
        1
        for w in words
        if not w["word"].startswith("f") or abs(w["start"] - int(w["word"][1:]) * 0.02) > 1e-6
    )
    final_ids = [f["id"] for f in finals]
    ended = [e for e in events if e["type"] == p.SESSION_ENDED]
    committed = int(await redis.hget(keys.session(sid).state, "committed_seq") or -1)
    return SessionReport(
        sid=sid,
        words=names,
        duplicated_finals=(len(final_ids) - len(set(final_ids))) + (len(names) - len(set(names))),
        lost_frames=len(set(expected) - set(names)),
        bad_timestamps=bad_ts,
        ended=len(ended),
        end_reason=ended[0]["reason"] if ended else "",
        unacked=frames - 1 - committed,
    )


def assert_perfect(report: SessionReport, frames: int) -> None:
    assert report.lost_frames == 0, f"{report.sid}: lost {report.lost_frames} frames"
    assert report.duplicated_finals == 0, f"{report.sid}: {report.duplicated_finals} duplicated"
    assert report.words == [f"f{n}" for n in range(frames)], f"{report.sid}: words out of order"
    assert report.bad_timestamps == 0, f"{report.sid}: {report.bad_timestamps} wrong timestamps"
    assert report.ended == 1 and report.end_reason == p.END_COMPLETED, f"{report.sid}: ended {report.ended}x"
    assert report.unacked == 0, f"{report.sid}: {report.unacked} frames never acked"


async def sessions_pending(redis: aioredis.Redis, keys: p.Keys) -> int:
    total = 0
    for key in keys.all_sessions():
        info = await redis.xpending(key, p.WORKERS_GROUP)
        total += int(info["pending"])
    return total
