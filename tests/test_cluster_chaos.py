"""Chaos on a real Redis Cluster: worker processes in cluster mode (redis+cluster:// URL), 16
partitions over 3 masters. kill -9 of a worker (takeover), SIGTERM (drain and hand-over), and
kill -9 of a Redis master mid-stream (its replica is promoted), with every session finishing.

Each test prints its measurements (`CLUSTER ...` lines, visible with `pytest -s`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import wave
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from producer import protocol as p
from producer.audio import marker_frame
from producer.client import Producer, connect
from tests.harness import (
    VOXQUEUE,
    Stack,
    _wait_http,
    assert_perfect,
    check_marker_session,
    produce_marker_session,
    reap,
    session_events,
    sessions_pending,
    wait_until_ended,
)
from worker.redis_server import RedisCluster, child_env, free_port

pytestmark = pytest.mark.slow

PARTITIONS = 16
FAST_LEASES = {"VOXQUEUE_LEASE_SECONDS": "3", "VOXQUEUE_RENEW_SECONDS": "0.5"}


@dataclass
class ClusterStack(Stack):
    """tests.harness.Stack on a Redis Cluster: the same emulator and worker processes, with a
    redis+cluster:// URL and 16 partitions."""

    cluster: RedisCluster = field(default_factory=RedisCluster)
    keys: p.Keys = field(default_factory=lambda: p.Keys(partitions=PARTITIONS))

    def start(self) -> ClusterStack:
        self.redis = self.cluster  # type: ignore[assignment]  # url and cleanup(), as RedisServer
        self.worker_env = {"VOXQUEUE_PARTITIONS": str(PARTITIONS), **self.worker_env}
        try:
            self.emulator_port = free_port()
            log = self._log("emulator.log", "wb")
            self.emulator = subprocess.Popen(
                [*VOXQUEUE, "emulator", "--port", str(self.emulator_port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._env(),
            )
            _wait_http(f"http://127.0.0.1:{self.emulator_port}/_emulator/stats", 15)
        except BaseException:
            self.stop()
            raise
        return self

    def client(self) -> aioredis.Redis:
        return connect(self.cluster.url)

    async def wait_claiming(self, workers: int, timeout: float = 30) -> None:
        """Until `workers` workers have a blocked claim read on every partition (CLIENT LIST of
        every master: one xreadgroup connection per partition per worker)."""
        deadline = time.monotonic() + timeout
        while True:
            blocked = 0
            for node in self.cluster.masters_now():
                plain = aioredis.Redis(port=node.port)
                try:
                    blocked += sum(1 for c in await plain.client_list() if c.get("cmd") == "xreadgroup")
                finally:
                    await plain.aclose()
            if blocked >= workers * PARTITIONS:
                return
            assert time.monotonic() < deadline, f"{blocked} claim reads, not {workers * PARTITIONS}"
            await asyncio.sleep(0.05)


@contextlib.contextmanager
def cluster_stack(tmp: Path, cluster: RedisCluster, **env: str) -> Iterator[ClusterStack]:
    stack = ClusterStack(tmp, worker_env=dict(env), cluster=cluster).start()
    try:
        yield stack
    finally:
        stack.stop()


async def produce(url: str, sessions: dict[str, int], stagger: float) -> None:
    async with Producer(url, partitions=PARTITIONS) as producer:

        async def one(i: int, sid: str, frames: int) -> None:
            await asyncio.sleep(i * stagger)
            await produce_marker_session(producer, sid, frames, realtime=True)

        await asyncio.gather(*(one(i, sid, n) for i, (sid, n) in enumerate(sessions.items())))


async def owners(redis: aioredis.Redis, keys: p.Keys, sids: list[str]) -> dict[str, str]:
    out = {}
    for sid in sids:
        owner = await redis.hget(keys.session(sid).state, "owner")
        out[sid] = owner.decode() if owner else ""
    return out


async def test_worker_kill_nine_and_drain_on_a_cluster(tmp_path: Path, redis_cluster: RedisCluster) -> None:
    """24 real-time sessions over 16 partitions, 3 workers: kill -9 one mid-stream (its sessions
    are taken over after the lease), SIGTERM another (its sessions are handed over at once). Every
    session exact: finals once, in order, seq-exact times, one session_ended, nothing pending."""
    with cluster_stack(tmp_path, redis_cluster, **FAST_LEASES) as stack:
        for name in ("c1", "c2", "c3"):
            stack.start_worker(name)
        await stack.wait_claiming(3)
        sessions = {f"ck-{i}": 250 + 10 * i for i in range(24)}  # 5-10 s of real time
        producing = asyncio.create_task(produce(redis_cluster.url, sessions, stagger=0.05))
        redis = stack.client()
        try:
            await asyncio.sleep(2.0)
            victims = [s for s, o in (await owners(redis, stack.keys, list(sessions))).items() if o == "c1"]
            assert victims, "the killed worker owned no session"
            stack.signal_worker("c1", signal.SIGKILL)
            await asyncio.sleep(1.0)
            drained = [s for s, o in (await owners(redis, stack.keys, list(sessions))).items() if o == "c2"]
            term_at = time.monotonic()
            stack.signal_worker("c2", signal.SIGTERM)
            assert stack.workers["c2"].wait(30) == 0, "the drained worker did not exit cleanly"
            drain_seconds = time.monotonic() - term_at
            await producing
            await wait_until_ended(redis, stack.keys, list(sessions), timeout=60)
            for sid, frames in sessions.items():
                assert_perfect(await check_marker_session(redis, stack.keys, sid, frames), frames)
            assert await sessions_pending(redis, stack.keys) == 0
            for sid in victims + drained:  # moved on (taken over, or handed over), not restarted
                epoch = int(await redis.hget(stack.keys.session(sid).state, "epoch") or 0)
                assert epoch >= 2, f"{sid}: never taken over (epoch {epoch})"
            print(
                f"CLUSTER kill-9 taken over={len(victims)} drained={len(drained)} "
                f"drain exit={drain_seconds:.2f}s"
            )
        finally:
            await redis.aclose()


def dedupe_by_id(events: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """Events with a repeated event id dropped (the copy a failover can repeat), and how many."""
    seen: set[str] = set()
    out = []
    for event in events:
        if event["id"] in seen:
            continue
        seen.add(event["id"])
        out.append(event)
    return out, len(events) - len(out)


async def test_master_failover_mid_stream_every_session_finishes(
    tmp_path: Path, redis_cluster_replicated: RedisCluster
) -> None:
    """kill -9 of the Redis master serving the most sessions, mid-stream; its replica is promoted
    (1 s node timeout). Every session ends completed with every frame transcribed, in order, at
    seq-exact times. What asynchronous replication allows (README "Scaling past one Redis"): an
    event repeated with the same id; after dropping repeats by id, each session is exact."""
    cluster = redis_cluster_replicated
    with cluster_stack(tmp_path, cluster, **FAST_LEASES) as stack:
        for name in ("f1", "f2"):
            stack.start_worker(name)
        await stack.wait_claiming(2)
        sessions = {f"fo-{i}": 300 + 10 * i for i in range(16)}  # 6-9 s of real time
        keys = stack.keys
        masters: dict[int, list[str]] = {}
        for sid in sessions:
            masters.setdefault(cluster.master_of(keys.session(sid).state).port, []).append(sid)
        victim_port = max(masters, key=lambda port: len(masters[port]))
        victim = next(n for n in cluster.nodes if n.port == victim_port)
        producing = asyncio.create_task(produce(cluster.url, sessions, stagger=0.05))
        redis = stack.client()
        try:
            await asyncio.sleep(2.5)
            killed_at = time.monotonic()
            victim.stop(kill=True)
            # In a thread: the producer keeps sending (and retrying) while the cluster fails over.
            await asyncio.to_thread(cluster.wait_failover, victim, 30)
            promoted_after = time.monotonic() - killed_at
            assert victim_port not in {n.port for n in cluster.masters_now()}
            await producing
            await wait_until_ended(redis, keys, list(sessions), timeout=90)
            repeated = 0
            for sid, frames in sessions.items():
                events, again = dedupe_by_id(await session_events(redis, keys, sid))
                repeated += again
                finals = [e for e in events if e["type"] == p.FINAL]
                words = [w["word"] for f in finals for w in f["words"]]
                assert words == [f"f{n}" for n in range(frames)], f"{sid}: frames lost or out of order"
                assert all(
                    abs(w["start"] - int(w["word"][1:]) * 0.02) < 1e-6 for f in finals for w in f["words"]
                )
                ended = [e for e in events if e["type"] == p.SESSION_ENDED]
                assert [e["reason"] for e in ended] == [p.END_COMPLETED], f"{sid}: {ended}"
            assert await sessions_pending(redis, keys) == 0
            print(
                f"CLUSTER failover sessions={len(sessions)} on killed master={len(masters[victim_port])} "
                f"promoted after={promoted_after:.2f}s repeated events (same id)={repeated}"
            )
        finally:
            await redis.aclose()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/<pid>/stat, fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def test_idle_cost_and_claim_latency_on_a_three_shard_cluster(
    tmp_path: Path, redis_cluster: RedisCluster
) -> None:
    """The hot paths' cost must not grow with P: one idle worker on 3 shards with P = 16 (its CPU
    over 5 s with no session), then the delay from a session being opened to a worker
    claiming it, over 96 sessions in every partition. Prints the figures (README "Scaling past one
    Redis"); asserts only that every session was claimed, no timing."""
    with cluster_stack(tmp_path, redis_cluster) as stack:
        worker = stack.start_worker("idle")
        await stack.wait_claiming(1)
        await asyncio.sleep(2.0)  # past start-up work (first autoclaim and trim passes)
        before, started = cpu_seconds(worker.pid), time.monotonic()
        await asyncio.sleep(5.0)
        idle = (cpu_seconds(worker.pid) - before) / (time.monotonic() - started)
        delays: list[float] = []
        redis = stack.client()
        try:
            async with Producer(redis_cluster.url, partitions=PARTITIONS) as producer:
                for i in range(96):
                    sent = time.time()  # before the entry is stored: an upper bound on the delay
                    session = await producer.open_session(sid=f"lat-{i}")
                    state = stack.keys.session(session.sid).state
                    deadline = time.monotonic() + 10
                    while not (claimed := await redis.hget(state, "claimed_at")):
                        assert time.monotonic() < deadline, f"lat-{i} not claimed within 10 s"
                        await asyncio.sleep(0.001)
                    delays.append(max(0.0, int(claimed) / 1000 - sent))
                    await session.end()
        finally:
            await redis.aclose()
    delays.sort()
    p50, p99 = delays[len(delays) // 2], delays[int(len(delays) * 0.99) - 1]
    print(
        f"CLUSTER idle worker (3 shards, P={PARTITIONS}): cpu={idle * 100:.2f}% of a core; "
        f"claim delay p50={p50 * 1000:.1f} ms p99={p99 * 1000:.1f} ms max={delays[-1] * 1000:.1f} ms"
    )


def cli(args: list[str], url: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args],
        env=child_env(VOXQUEUE_REDIS_URL=url, VOXQUEUE_PARTITIONS=str(PARTITIONS)),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


async def test_cli_produce_tail_status_sessions_on_a_cluster(
    tmp_path: Path, redis_cluster: RedisCluster
) -> None:
    """The commands a user runs, with a redis+cluster:// URL: `produce --follow`, `tail` of every
    partition (one XREAD per slot), `status` and `sessions` (every partition's keys)."""
    pcm = b"".join(marker_frame(n) for n in range(20))
    with wave.open(str(tmp_path / "a.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(pcm)
    with cluster_stack(tmp_path, redis_cluster) as stack:
        stack.start_worker("cli")
        await stack.wait_claiming(1)
        tail = subprocess.Popen(  # noqa: ASYNC220 (starting it is quick; it runs on its own)
            [sys.executable, "-m", "producer.cli", "tail", "--json"],
            env=child_env(VOXQUEUE_REDIS_URL=redis_cluster.url, VOXQUEUE_PARTITIONS=str(PARTITIONS)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            # Tail has resolved its "$" cursors by then (not a sync: a late tail misses events).
            await asyncio.sleep(1.0)
            produced = await asyncio.to_thread(
                cli,
                ["producer.cli", "produce", str(tmp_path / "a.wav"), "--speed", "0", "--follow", "--json"],
                redis_cluster.url,
            )
            assert produced.returncode == 0, produced.stderr
            sid, *lines = produced.stdout.splitlines()
            events = [json.loads(line) for line in lines]
            words = [w["word"] for e in events if e["type"] == p.FINAL for w in e["words"]]
            assert words == [f"f{n}" for n in range(20)]
            assert events[-1]["type"] == p.SESSION_ENDED
            assert tail.stdout is not None
            lines_out: queue.Queue[str] = queue.Queue()
            stdout = tail.stdout
            threading.Thread(target=lambda: [lines_out.put(x) for x in stdout], daemon=True).start()
            seen: list[dict[str, Any]] = []
            deadline = time.monotonic() + 20
            while not any(e["type"] == p.SESSION_ENDED and e["sid"] == sid for e in seen):
                assert time.monotonic() < deadline, f"tail saw {len(seen)} events, no session_ended"
                with contextlib.suppress(queue.Empty):
                    seen.append(json.loads(await asyncio.to_thread(lines_out.get, True, 0.5)))
            assert [e["id"] for e in seen if e["sid"] == sid] == [e["id"] for e in events]
        finally:
            tail.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                tail.communicate(timeout=10)
            reap(tail)
        status = await asyncio.to_thread(cli, ["worker.cli", "status", "--json"], redis_cluster.url)
        assert status.returncode == 0, status.stderr
        assert any('"cli"' in line for line in status.stdout.splitlines()), status.stdout
        sessions = await asyncio.to_thread(cli, ["worker.cli", "sessions", "--json"], redis_cluster.url)
        assert sessions.returncode == 0, sessions.stderr
        assert sid in sessions.stdout
