"""`python -m ops.bench` (or `make bench`): the pipeline against the direct-SDK pattern, in one run.

Everything runs on this machine in separate processes: a private redis-server, the emulator
(marker engine), one worker, and the load generators of ops/bench/loads.py. Prints one table and
writes JSON (ops/bench-results/latest.json by default).

    python -m ops.bench                         # S = 200 sessions for 20 s, pipeline then direct
    python -m ops.bench --sessions 100 --seconds 10
    python -m ops.bench --sweep 50,100,200      # pipeline, direct and pacing at each S; PNG plots
    python -m ops.bench --frames-per-message 1,2,4   # the pipeline once per worker setting
    python -m ops.bench --compare old.json      # this run's key figures beside an earlier run's
    python -m ops.bench --compare old.json new.json  # two saved runs, no new run
    python -m ops.bench --plot a.json [b.json]  # plots of saved runs, drawn over each other
    python -m ops.bench --flux                  # Flux (listen v2) sessions, 80 ms messages, both sides
    python -m ops.bench --cluster 3             # the same pipeline load on one Redis, then on a
                                                # 3-master local Redis Cluster: Redis CPU per shard

Runs are compared or plotted together only if they come from the same CPU model and core count
(recorded in every JSON); otherwise the bench says so and exits with code 3.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aioredis

from ops.bench import report as rep
from ops.bench.loads import FLUX_FRAMES_PER_MESSAGE
from ops.bench.procs import percentile, sample
from producer import protocol as p
from worker.redis_server import RedisCluster, RedisServer, free_port

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
SUSTAIN_P99_MS = rep.SUSTAIN_P99_MS
EXIT_MACHINE_MISMATCH = 3
EXIT_BAD_RESULTS = 4


@dataclass
class PhaseResult:
    name: str
    sessions: int
    seconds: float
    frames_produced: int = 0
    frames_delivered: int = 0
    backlog_at_stop: int = 0
    on_time: float = 1.0
    lag_ms: dict[str, float] = field(default_factory=dict)
    transcript_ms: dict[str, float] = field(default_factory=dict)
    cpu_us_per_frame: dict[str, float] = field(default_factory=dict)
    worker_rss_per_session_kib: float | None = None
    round_trips_per_frame: float | None = None
    partitions: int = 1
    # The worker's setting (1: default; k: VOXQUEUE_SEND_INTERVAL_MS = 20·k, about k real-time
    # frames per WebSocket message), and what it sent: frames ÷ WebSocket messages the emulator got.
    frames_per_message_setting: int = 1
    frames_per_message: float | None = None
    sustained: bool | None = None
    # Per Redis process (one Redis, or each cluster master): its CPU over the window (/proc, all its
    # threads) per frame of the whole load, and the sessions whose partitions it serves.
    redis_cpu_us_per_frame: dict[str, float] = field(default_factory=dict)
    redis_sessions: dict[str, int] = field(default_factory=dict)
    redis_partitions: dict[str, list[int]] = field(default_factory=dict)
    # Each Redis process's CPU with the worker idle and no sessions (% of a core): the part of its
    # per-frame figure that is a fixed cost per node (server cron, cluster bus, idle claim reads).
    redis_idle_cpu_pct: dict[str, float] = field(default_factory=dict)
    redis_commands_per_frame: float | None = None  # INFO stats total_commands_processed, all nodes
    # INFO memory used_memory, all nodes: growth from before the sessions opened to the end of the
    # window (sessions live, their audio kept), and what is still held once every session ended.
    redis_memory_per_live_session_bytes: float | None = None
    redis_memory_per_frame_bytes: float | None = None
    redis_memory_per_ended_session_bytes: float | None = None


@dataclass(frozen=True, slots=True)
class RedisSample:
    cpu_s: float
    used_memory: int
    commands: int


def redis_sample(node: RedisServer) -> RedisSample:
    assert node.process is not None
    client = redis.Redis(port=node.port, socket_timeout=5)
    try:
        memory = client.info("memory")
        stats = client.info("stats")
    finally:
        client.close()
    return RedisSample(
        sample(node.process.pid).cpu_s, int(memory["used_memory"]), int(stats["total_commands_processed"])
    )


class Bench:
    def __init__(self, tmp: Path, worker_env: dict[str, str], partitions: int = 1) -> None:
        self.tmp = tmp
        self.worker_env = worker_env
        self.partitions = partitions
        self.keys = p.Keys(partitions=partitions)
        self.redis = RedisServer()
        self.cluster: RedisCluster | None = None
        self.idle_redis_pct: dict[str, float] = {}
        self.emulator_port = free_port()
        self.procs: list[subprocess.Popen[bytes]] = []
        self.worker: subprocess.Popen[bytes] | None = None
        self.flush_interval: float | None = None  # the producer's; None: the library default
        self.flux = False  # Deepgram Flux sessions (listen v2) in both patterns

    # ----------------------------------------------------------------------------- processes

    def start(self) -> None:
        self.redis.start()
        self.emulator = self._spawn(
            [
                PY,
                "-m",
                "worker.cli",
                "emulator",
                "--port",
                str(self.emulator_port),
                "--engine",
                "marker",
                "--silence-timeout",
                "30",
            ],
            "emulator.log",
        )
        self._wait_http("/_emulator/health")

    def use_cluster(self, masters: int) -> None:
        """From now on the load runs on a fresh local Redis Cluster of `masters` masters (no
        replicas: the figure is the masters' own CPU per frame)."""
        self.cluster = RedisCluster(masters=masters).start()

    @property
    def redis_url(self) -> str:
        return self.cluster.url if self.cluster else self.redis.url

    def redis_nodes(self) -> dict[str, RedisServer]:
        """The Redis processes carrying the load, by a label for the report."""
        if self.cluster is None:
            return {f"redis :{self.redis.port}": self.redis}
        return {f"shard {i + 1} :{n.port}": n for i, n in enumerate(self.cluster.nodes)}

    def partition_urls(self) -> list[str]:
        """A plain redis:// URL of the node serving each partition. The bench's own readers talk
        to that node directly: nothing moves slots during a run, and it keeps the measuring
        side out of the cluster client's connection handling."""
        if self.cluster is None:
            return [self.redis.url] * self.partitions
        return [self.cluster.master_of(self.keys.sessions(i)).url for i in range(self.partitions)]

    def partitions_by_node(self) -> dict[str, list[int]]:
        if self.cluster is None:
            return {label: list(range(self.partitions)) for label in self.redis_nodes()}
        by_port = {n.port: label for label, n in self.redis_nodes().items()}
        out: dict[str, list[int]] = {label: [] for label in by_port.values()}
        for i in range(self.partitions):
            out[by_port[self.cluster.master_of(self.keys.sessions(i)).port]].append(i)
        return out

    def start_worker(self, extra_env: dict[str, str] | None = None) -> None:
        env = {
            "VOXQUEUE_REDIS_URL": self.redis_url,
            "VOXQUEUE_PARTITIONS": str(self.partitions),
            "VOXQUEUE_DEEPGRAM_URL": self.ws_url,
            "VOXQUEUE_CONCURRENCY": "5000",
            "VOXQUEUE_LOG_FORMAT": "json",
            "VOXQUEUE_LOG_LEVEL": "warning",
            **self.worker_env,
            **(extra_env or {}),
        }
        self.worker = self._spawn([PY, "-m", "worker.cli", "worker", "--name", "bench"], "worker.log", env)

    def stop_worker(self) -> None:
        if self.worker and self.worker.poll() is None:
            self.worker.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.worker.wait(30)
            if self.worker.poll() is None:
                self.worker.kill()
        self.worker = None

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        self.redis.cleanup()
        if self.cluster is not None:
            self.cluster.cleanup()

    def _spawn(self, argv: list[str], log: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        out = (self.tmp / log).open("ab")
        proc = subprocess.Popen(
            argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
        self.procs.append(proc)
        return proc

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.emulator_port}"

    def emulator_get(self, path: str) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.emulator_port}{path}", timeout=30) as resp:
            return json.loads(resp.read())

    def _wait_http(self, path: str) -> None:
        deadline = time.monotonic() + 20
        while True:
            try:
                self.emulator_get(path)
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    # ----------------------------------------------------------------------------- phases

    async def idle_worker_cpu(self, seconds: float = 3.0) -> float:
        """Percent of one core the worker uses with no sessions (no busy polling allowed)."""
        assert self.worker is not None
        await asyncio.sleep(1.0)
        nodes = self.redis_nodes()
        before = sample(self.worker.pid)
        redis0 = {label: sample(n.process.pid).cpu_s for label, n in nodes.items() if n.process}
        await asyncio.sleep(seconds)
        after = sample(self.worker.pid)
        redis1 = {label: sample(n.process.pid).cpu_s for label, n in nodes.items() if n.process}
        self.idle_redis_pct = {k: 100.0 * (redis1[k] - redis0[k]) / seconds for k in redis0}
        return 100.0 * (after.cpu_s - before.cpu_s) / seconds

    async def wait_worker_ready(self, limit_s: float = 30.0) -> None:
        """Until the worker waits for sessions (its blocking XREADGROUP on a sessions stream shows
        in CLIENT LIST), so a restarted worker is not measured while it starts."""
        deadline = time.monotonic() + limit_s
        clients = [aioredis.Redis.from_url(url) for url in sorted(set(self.partition_urls()))]
        try:
            while time.monotonic() < deadline:
                for client in clients:
                    if any(c.get("cmd") == "xreadgroup" for c in await client.client_list()):
                        await asyncio.sleep(0.5)  # past its first reads
                        return
                await asyncio.sleep(0.05)
            raise RuntimeError(f"the worker did not start within {limit_s:g} s (see worker.log)")
        finally:
            for client in clients:
                await client.aclose()

    async def pipeline(
        self, sessions: int, seconds: float, tag: str, frames_per_message: int = 1
    ) -> PhaseResult:
        assert self.worker is not None
        result = PhaseResult(
            "pipeline",
            sessions,
            seconds,
            partitions=self.partitions,
            # Flux: both patterns send 80 ms messages (the worker's Flux default), held on purpose.
            frames_per_message_setting=FLUX_FRAMES_PER_MESSAGE if self.flux else frames_per_message,
        )
        result.redis_idle_cpu_pct = dict(self.idle_redis_pct)
        self.emulator_get("/_emulator/stats?reset=1")
        self.emulator_get("/_emulator/finals?reset=1")
        rss_idle = sample(self.worker.pid).rss_bytes
        nodes = self.redis_nodes()
        redis_idle = {label: redis_sample(node) for label, node in nodes.items()}
        reader = FinalsReader(self.partition_urls(), self.keys)
        reader_task = asyncio.create_task(reader.run())
        out = self.tmp / f"producer-{tag}.json"
        proc = await start_load(
            "producer",
            "--redis-url",
            self.redis_url,
            "--partitions",
            str(self.partitions),
            "--sessions",
            str(sessions),
            "--seconds",
            str(seconds),
            "--tag",
            tag,
            *(["--flush-interval", str(self.flush_interval)] if self.flush_interval is not None else []),
            *(["--flux"] if self.flux else []),
            out=out,
        )
        assert proc.stdout is not None
        await _expect(proc.stdout, "START")
        frames0 = self.emulator_get("/_emulator/stats?reset=1")["frames_received"]
        worker0 = sample(self.worker.pid)
        redis0 = {label: redis_sample(node) for label, node in nodes.items()}
        await _expect(proc.stdout, "STOP")
        worker1 = sample(self.worker.pid)
        redis1 = {label: redis_sample(node) for label, node in nodes.items()}
        stats = self.emulator_get("/_emulator/stats")
        await proc.wait()
        produced = json.loads(out.read_text())
        result.frames_per_message = stats["frames_received"] / max(1, stats["messages_received"])
        delivered_in_window = stats["frames_received"]
        result.frames_produced = produced["frames"]
        result.backlog_at_stop = max(0, produced["frames"] - frames0 - delivered_in_window)
        result.on_time = produced["on_time"]
        result.lag_ms = _lag(stats["lag"])
        result.worker_rss_per_session_kib = (worker1.rss_bytes - rss_idle) / 1024 / max(1, sessions)
        result.round_trips_per_frame = produced["round_trips"] / max(1, produced["frames"])
        result.cpu_us_per_frame = {
            "worker": 1e6 * (worker1.cpu_s - worker0.cpu_s) / max(1, delivered_in_window),
            "producer": 1e6 * produced["cpu_s"] / max(1, produced["frames"]),
        }
        window_frames = max(1, delivered_in_window)
        result.redis_cpu_us_per_frame = {
            label: 1e6 * (redis1[label].cpu_s - redis0[label].cpu_s) / window_frames for label in nodes
        }
        result.redis_commands_per_frame = (
            sum(redis1[k].commands - redis0[k].commands for k in nodes) / window_frames
        )
        grown = sum(redis1[k].used_memory - redis_idle[k].used_memory for k in nodes)
        result.redis_memory_per_live_session_bytes = grown / max(1, sessions)
        result.redis_memory_per_frame_bytes = grown / max(1, produced["frames"])
        result.redis_partitions = self.partitions_by_node()
        shard_of = {i: label for label, parts in result.redis_partitions.items() for i in parts}
        result.redis_sessions = {label: 0 for label in nodes}
        for i in range(sessions):
            result.redis_sessions[shard_of[self.keys.partition(f"bench-{tag}-{i}")]] += 1
        # Let every session end, then count what reached the emulator in all.
        await self._wait_sessions_ended(sessions, tag, limit_s=60 + seconds)
        ended = {label: redis_sample(node) for label, node in nodes.items()}
        result.redis_memory_per_ended_session_bytes = sum(
            ended[k].used_memory - redis_idle[k].used_memory for k in nodes
        ) / max(1, sessions)
        result.frames_delivered = frames0 + self.emulator_get("/_emulator/stats")["frames_received"]
        reader_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader_task
        finals = self.emulator_get("/_emulator/finals?reset=1")["finals"]
        result.transcript_ms = reader.latencies(finals)
        await reader.aclose()
        result.sustained = rep.sustained(asdict(result), "pipeline")
        return result

    async def direct(self, sessions: int, seconds: float) -> PhaseResult:
        result = PhaseResult(
            "direct",
            sessions,
            seconds,
            frames_per_message_setting=FLUX_FRAMES_PER_MESSAGE if self.flux else 1,
        )
        self.emulator_get("/_emulator/stats?reset=1")
        out = self.tmp / "direct.json"
        proc = await start_load(
            "direct",
            "--deepgram-url",
            self.ws_url,
            "--sessions",
            str(sessions),
            "--seconds",
            str(seconds),
            *(["--flux"] if self.flux else []),
            out=out,
        )
        assert proc.stdout is not None
        await _expect(proc.stdout, "START")
        self.emulator_get("/_emulator/stats?reset=1")
        self.emulator_get("/_emulator/finals?reset=1")
        await _expect(proc.stdout, "STOP")
        stats = self.emulator_get("/_emulator/stats")
        await proc.wait()
        sent = json.loads(out.read_text())
        result.frames_produced = sent["frames"]
        result.frames_delivered = self.emulator_get("/_emulator/stats")["frames_received"]
        result.frames_per_message = stats["frames_received"] / max(1, stats["messages_received"])
        result.on_time = sent["on_time"]
        result.lag_ms = _lag(stats["lag"])
        result.cpu_us_per_frame = {"direct": 1e6 * sent["cpu_s"] / max(1, sent["frames"])}
        # Transcript latency as the pipeline's is measured: from the emulator sending a final to
        # the backend holding it (here the SDK's `async for` in the direct load).
        finals = self.emulator_get("/_emulator/finals?reset=1")["finals"]
        received = {(rid, round(end, 3)): ns for rid, end, ns in sent.get("finals", [])}
        result.transcript_ms = _summary(
            [
                (received[(rid, round(end, 3))] - sent_ns) / 1e6
                for rid, end, sent_ns in finals
                if (rid, round(end, 3)) in received
            ]
        )
        result.sustained = rep.sustained(asdict(result), "direct")
        return result

    async def pacing(self, sessions: int, seconds: float) -> float:
        """CPU µs per frame of the simulated backend's pacing alone (common to both patterns)."""
        out = self.tmp / "pacing.json"
        proc = await start_load(
            "pacing",
            "--sessions",
            str(sessions),
            "--seconds",
            str(seconds),
            out=out,
            stdout=asyncio.subprocess.DEVNULL,
        )
        await proc.wait()
        result = json.loads(out.read_text())
        return 1e6 * result["cpu_s"] / max(1, result["frames"])

    async def _wait_sessions_ended(self, sessions: int, tag: str, limit_s: float) -> None:
        clients = {url: aioredis.Redis.from_url(url) for url in set(self.partition_urls())}
        by_partition = [clients[url] for url in self.partition_urls()]
        deadline = time.monotonic() + limit_s
        try:
            pending = [f"bench-{tag}-{i}" for i in range(sessions)]
            while pending and time.monotonic() < deadline:
                # One pipeline per node (a plain one: each names only that node's keys).
                groups: dict[aioredis.Redis, list[str]] = {}
                for sid in pending:
                    groups.setdefault(by_partition[self.keys.partition(sid)], []).append(sid)
                still: list[str] = []
                for client, sids in groups.items():
                    pipe = client.pipeline(transaction=False)
                    for sid in sids:
                        pipe.hget(self.keys.session(sid).state, "status")
                    statuses = await pipe.execute()
                    still += [
                        sid for sid, st in zip(sids, statuses, strict=True) if st not in (b"ended", b"failed")
                    ]
                pending = still
                await asyncio.sleep(0.2)
            if pending:
                print(f"warning: {len(pending)} sessions did not end in time", file=sys.stderr)
        finally:
            for client in clients.values():
                await client.aclose()


async def start_load(mode: str, *args: str, out: Path, stdout: int | None = asyncio.subprocess.PIPE) -> Any:
    """One load generator of ops/bench/loads.py as a child process."""
    return await asyncio.create_subprocess_exec(
        PY, "-m", "ops.bench.loads", mode, *args, "--out", str(out), cwd=ROOT, stdout=stdout
    )


class FinalsReader:
    """Reads the partition results streams as a downstream consumer would, noting when each final
    became readable, to join with the emulator's send times. One XREAD per partition: on a cluster
    the partitions live on different shards, and one XREAD may not name keys of several slots."""

    def __init__(self, urls: list[str], keys: p.Keys) -> None:
        """urls[i]: a plain URL of the node serving partition i."""
        self.clients = {url: aioredis.Redis.from_url(url) for url in set(urls)}
        self.follow = [(self.clients[url], keys.results(i)) for i, url in enumerate(urls)]
        self.seen: dict[tuple[str, float], int] = {}
        self.built: dict[tuple[str, float], int] = {}  # the event's ts: when the worker built it

    async def run(self) -> None:
        await asyncio.gather(*(self._follow(client, key) for client, key in self.follow))

    async def _follow(self, client: aioredis.Redis, key: str) -> None:
        last = "$"
        while True:
            reply: Any = await client.xread({key: last}, count=1000, block=1000)
            now = time.time_ns()
            for _, entries in reply or ():
                for entry_id, fields in entries:
                    last = entry_id
                    kind = fields.get(b"type")
                    if kind not in (b"final", b"turn"):
                        continue
                    event = p.decode_event(fields)
                    if kind == b"turn" and event.get("event") != "EndOfTurn":
                        continue  # a Flux session's final is its EndOfTurn
                    self.seen[(event["request_id"], round(event["end"], 3))] = now
                    self.built[(event["request_id"], round(event["end"], 3))] = event["ts"] * 1_000_000

    def latencies(self, finals: list[list[Any]]) -> dict[str, float]:
        values = [
            (self.seen[(rid, round(end, 3))] - sent_ns) / 1e6
            for rid, end, sent_ns in finals
            if (rid, round(end, 3)) in self.seen
        ]
        out = _summary(values)
        # Split: emulator send -> worker built the event (ms clock), and built -> readable.
        to_worker = [
            (self.built[(rid, round(end, 3))] - sent_ns) / 1e6
            for rid, end, sent_ns in finals
            if (rid, round(end, 3)) in self.built
        ]
        out["to_worker_p50"] = percentile(to_worker, 0.5)
        out["to_worker_p99"] = percentile(to_worker, 0.99)
        return out

    async def aclose(self) -> None:
        for client in self.clients.values():
            await client.aclose()


async def _expect(stream: asyncio.StreamReader, word: str) -> None:
    while True:
        line = await stream.readline()
        if not line:
            raise RuntimeError(f"load generator exited before printing {word}")
        if line.strip() == word.encode():
            return


def _lag(summary: dict[str, Any]) -> dict[str, float]:
    return {k: summary.get(f"{k}_ms", float("nan")) for k in ("p50", "p99", "max")}


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "count": len(values),
        "p50": percentile(values, 0.5),
        "p99": percentile(values, 0.99),
        "max": max(values) if values else float("nan"),
    }


# --------------------------------------------------------------------------------- report


machine = rep.machine


def print_table(
    pipes: list[PhaseResult], direct: PhaseResult, idle_pct: float, pacing_us: float
) -> list[tuple[str, ...]]:
    """The pipeline (one column per frames-per-message setting) beside the direct pattern."""
    d = direct.cpu_us_per_frame["direct"]

    def each(cell: Any) -> list[str]:
        return [cell(x) for x in pipes]

    rows: list[tuple[str, ...]] = [
        ("", *(f"pipeline, {x.frames_per_message_setting} f/msg" for x in pipes), "direct SDK"),
        (
            "sessions × seconds",
            *each(lambda x: f"{x.sessions} × {x.seconds:g}"),
            f"{direct.sessions} × {direct.seconds:g}",
        ),
        (
            "frames produced / delivered",
            *each(lambda x: f"{x.frames_produced} / {x.frames_delivered}"),
            f"{direct.frames_produced} / {direct.frames_delivered}",
        ),
        ("frames on schedule", *each(lambda x: f"{x.on_time:.1%}"), f"{direct.on_time:.1%}"),
        (
            "frames per WebSocket message",
            *each(lambda x: f"{x.frames_per_message or 0:.2f}"),
            f"{direct.frames_per_message or 0:.2f}",
        ),
        ("frame lag p50 / p99 / max (ms)", *each(lambda x: _fmt3(x.lag_ms)), _fmt3(direct.lag_ms)),
        (
            "transcript latency p50 / p99 (ms)",
            *each(lambda x: _fmt2(x.transcript_ms)),
            _fmt2(direct.transcript_ms),
        ),
        ("worker CPU µs per frame", *each(lambda x: f"{x.cpu_us_per_frame['worker']:.1f}"), "—"),
        ("worker ÷ direct CPU per frame", *each(lambda x: f"{x.cpu_us_per_frame['worker'] / d:.2f}"), "1.00"),
        (
            "sender CPU µs per frame",
            *each(lambda x: f"producer {x.cpu_us_per_frame['producer']:.1f}"),
            f"{d:.1f}",
        ),
        (
            "producer ÷ direct CPU per frame",
            *each(lambda x: f"{x.cpu_us_per_frame['producer'] / d:.2f}"),
            "1.00",
        ),
        (
            "  of which the simulated backend's pacing (µs)",
            *each(lambda x: f"{pacing_us:.1f}"),
            f"{pacing_us:.1f}",
        ),
        (
            "producer ÷ direct, net of that pacing",
            *each(lambda x: f"{(x.cpu_us_per_frame['producer'] - pacing_us) / (d - pacing_us):.2f}"),
            "1.00",
        ),
        ("Redis round trips per produced frame", *each(lambda x: f"{x.round_trips_per_frame:.3f}"), "—"),
        ("worker RSS per session (KiB)", *each(lambda x: f"{x.worker_rss_per_session_kib:.0f}"), "—"),
        ("backlog at end of window (frames)", *each(lambda x: str(x.backlog_at_stop)), "—"),
        (
            "sustained in real time",
            *each(lambda x: "yes" if x.sustained else "NO"),
            "yes" if direct.sustained else "NO",
        ),
        ("idle worker CPU (% of a core)", *each(lambda x: f"{idle_pct:.2f}"), "—"),
    ]
    print()
    rep.print_rows(rows[0], rows[1:])
    return rows


def print_cluster_table(one: PhaseResult, shards: PhaseResult) -> list[tuple[str, str, str]]:
    """The same pipeline load on one Redis and on a cluster, side by side: what each Redis
    process spends per frame of the whole load (on a cluster each master carries only the
    sessions of its partitions, so its share should be about 1/N of the one-Redis figure)."""
    n = len(shards.redis_cpu_us_per_frame)
    (one_label, one_cpu), *_ = one.redis_cpu_us_per_frame.items()
    rows = [
        ("sessions × seconds, partitions", f"{one.sessions} × {one.seconds:g}, P = {one.partitions}", ""),
        ("", "one Redis", f"{n}-shard cluster"),
        (
            "frames produced / delivered",
            f"{one.frames_produced} / {one.frames_delivered}",
            f"{shards.frames_produced} / {shards.frames_delivered}",
        ),
        ("frame lag p50 / p99 / max (ms)", _fmt3(one.lag_ms), _fmt3(shards.lag_ms)),
        ("transcript latency p50 / p99 (ms)", _fmt2(one.transcript_ms), _fmt2(shards.transcript_ms)),
        (
            "worker CPU µs per frame",
            f"{one.cpu_us_per_frame['worker']:.1f}",
            f"{shards.cpu_us_per_frame['worker']:.1f}",
        ),
        (
            "producer CPU µs per frame",
            f"{one.cpu_us_per_frame['producer']:.1f}",
            f"{shards.cpu_us_per_frame['producer']:.1f}",
        ),
        (
            "Redis CPU µs per frame, all nodes",
            f"{one_cpu:.2f}",
            f"{sum(shards.redis_cpu_us_per_frame.values()):.2f}",
        ),
    ]
    # Partitions hash to slots unevenly, so a shard's share of the sessions is not exactly 1/N:
    # its CPU per frame of the whole load is set beside its share, and per frame it served.
    for label, cpu in shards.redis_cpu_us_per_frame.items():
        share = shards.redis_sessions[label] / max(1, shards.sessions)
        served = f", {cpu / share:.1f} per frame served" if share else ""
        rows.append(
            (
                f"  {label}: {len(shards.redis_partitions[label])} partitions, {share:.0%} of sessions",
                "",
                f"{cpu:.2f} = {cpu / one_cpu:.2f} × one Redis{served}" if one_cpu else f"{cpu:.2f}",
            )
        )
    rows += [
        (
            "Redis idle CPU, % of a core per node",
            ", ".join(f"{v:.2f}" for v in one.redis_idle_cpu_pct.values()),
            ", ".join(f"{v:.2f}" for v in shards.redis_idle_cpu_pct.values()),
        ),
        (
            "Redis commands per frame, all nodes",
            f"{one.redis_commands_per_frame:.3f}",
            f"{shards.redis_commands_per_frame:.3f}",
        ),
        (
            "Redis memory per live session (KiB)",
            f"{(one.redis_memory_per_live_session_bytes or 0) / 1024:.0f}",
            f"{(shards.redis_memory_per_live_session_bytes or 0) / 1024:.0f}",
        ),
        (
            "  per stored frame (bytes)",
            f"{one.redis_memory_per_frame_bytes or 0:.0f}",
            f"{shards.redis_memory_per_frame_bytes or 0:.0f}",
        ),
        (
            "Redis memory per ended session (KiB)",
            f"{(one.redis_memory_per_ended_session_bytes or 0) / 1024:.0f}",
            f"{(shards.redis_memory_per_ended_session_bytes or 0) / 1024:.0f}",
        ),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"\n{'':{width}}  {'(' + one_label + ')':>24}  {'':>44}")
    for name, a, b in rows:
        print(f"{name:{width}}  {a:>24}  {b:>44}")
    return rows


def _fmt3(d: dict[str, float]) -> str:
    return " / ".join(f"{d.get(k, float('nan')):.1f}" for k in ("p50", "p99", "max"))


def _fmt2(d: dict[str, float]) -> str:
    return " / ".join(f"{d.get(k, float('nan')):.1f}" for k in ("p50", "p99"))


def frames_per_message_plan(
    args: argparse.Namespace, worker_env: dict[str, str]
) -> list[tuple[int, dict[str, str]]]:
    """(setting, extra worker environment) for each pipeline run. Without --frames-per-message the
    setting is read off a VOXQUEUE_SEND_INTERVAL_MS given with --worker-env (or 1)."""
    if args.frames_per_message is None:
        held = int(worker_env.get("VOXQUEUE_SEND_INTERVAL_MS", "0") or 0)
        return [(max(1, held // rep.FRAME_MS), {})]
    return [(k, rep.worker_env_for(k)) for k in rep.parse_frames_per_message(args.frames_per_message)]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="voxqueue-bench-"))
    worker_env = dict(kv.split("=", 1) for kv in args.worker_env)
    plan = frames_per_message_plan(args, worker_env)
    # The same P for the one-Redis run and the cluster run: the same load, only spread out.
    partitions = args.partitions or (4 * args.cluster if args.cluster else 1)
    bench = Bench(tmp, worker_env, partitions)
    bench.flush_interval = args.flush_interval
    bench.flux = args.flux
    host = machine()
    cpu = host["cpu"] or "unknown CPU"
    print(f"machine: {cpu}, {host['cores']} cores, Python {host['python']}", flush=True)
    report: dict[str, Any] = {
        "machine": host,
        "partitions": partitions,
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "args": vars(args),
        "worker_env": worker_env,
    }
    try:
        bench.start()
        bench.start_worker(plan[0][1])
        idle = await bench.idle_worker_cpu()
        report["idle_worker_cpu_pct"] = idle
        if args.sweep:
            await run_sweep(bench, args, plan, report)
        else:
            await run_single(bench, args, plan, report, idle)
    finally:
        bench.stop_worker()
        bench.stop()
    out = Path(args.out)
    await asyncio.to_thread(_write_json, out, report)
    print(f"\nwrote {out}  (process logs in {tmp})")
    if args.sweep:
        plot_files(out, [(out.stem, report)])
    return report


async def run_sweep(
    bench: Bench, args: argparse.Namespace, plan: list[tuple[int, dict[str, str]]], report: dict[str, Any]
) -> None:
    """Every S with the pipeline (once per frames-per-message setting, one worker each), then
    every S with the direct pattern and the pacing alone: ratios within one run."""
    sizes = [int(x) for x in args.sweep.split(",")]
    pipes: dict[int, list[PhaseResult]] = {s: [] for s in sizes}
    for index, (k, extra) in enumerate(plan):
        if index:
            bench.stop_worker()
            bench.start_worker(extra)
            await bench.wait_worker_ready()
        for s in sizes:
            res = await bench.pipeline(s, args.seconds, tag=f"s{s}f{k}", frames_per_message=k)
            pipes[s].append(res)
            print(
                f"S={s:5d} pipeline {k} f/msg: lag p50/p99/max {_fmt3(res.lag_ms)} ms  "
                f"backlog {res.backlog_at_stop}  on schedule {res.on_time:.1%}  "
                f"worker {res.cpu_us_per_frame['worker']:.1f} µs/frame  "
                f"producer {res.cpu_us_per_frame['producer']:.1f} µs/frame  "
                f"{'sustained' if res.sustained else 'NOT sustained'}",
                flush=True,
            )
    bench.stop_worker()  # the direct phases share the machine with the emulator only
    report["sweep"] = []
    for s in sizes:
        direct = await bench.direct(s, args.seconds)
        pacing_us = await bench.pacing(s, min(args.seconds, 10.0))
        print(
            f"S={s:5d} direct: lag p50/p99/max {_fmt3(direct.lag_ms)} ms  "
            f"{direct.cpu_us_per_frame['direct']:.1f} µs/frame (pacing {pacing_us:.1f})  "
            f"{'sustained' if direct.sustained else 'NOT sustained'}",
            flush=True,
        )
        entry = {
            "sessions": s,
            "pipeline": [asdict(x) for x in pipes[s]],
            "direct": asdict(direct),
            "pacing_us_per_frame": pacing_us,
        }
        entry["ratios"] = rep.ratios(entry)
        report["sweep"].append(entry)
    most: dict[str, int] = {}
    for entry in report["sweep"]:
        for phase in entry["pipeline"]:
            label = f"pipeline, {phase['frames_per_message_setting']} f/msg"
            most.setdefault(label, 0)
            if phase["sustained"]:
                most[label] = max(most[label], entry["sessions"])
        most.setdefault("direct SDK", 0)
        if entry["direct"]["sustained"]:
            most["direct SDK"] = max(most["direct SDK"], entry["sessions"])
    report["max_sustained_sessions"] = most
    print()
    rep.print_rows(rep.SWEEP_HEADER, rep.sweep_rows(report))
    print("most real-time sessions sustained: " + ", ".join(f"{k} {v}" for k, v in most.items()))


async def run_single(
    bench: Bench,
    args: argparse.Namespace,
    plan: list[tuple[int, dict[str, str]]],
    report: dict[str, Any],
    idle: float,
) -> None:
    pipes = []
    for index, (k, extra) in enumerate(plan):
        if index:
            bench.stop_worker()
            bench.start_worker(extra)
            await bench.wait_worker_ready()
        pipes.append(
            await bench.pipeline(args.sessions, args.seconds, tag=f"main-f{k}", frames_per_message=k)
        )
    bench.stop_worker()  # the direct phase shares the machine with the emulator only
    pipe = pipes[0]
    shards: PhaseResult | None = None
    if args.cluster:
        bench.use_cluster(args.cluster)
        bench.start_worker(plan[0][1])
        cluster_idle = await bench.idle_worker_cpu()
        shards = await bench.pipeline(
            args.sessions, args.seconds, tag="cluster", frames_per_message=plan[0][0]
        )
        bench.stop_worker()
        report["cluster"] = {
            "masters": args.cluster,
            "partitions": bench.partitions,
            "idle_worker_cpu_pct": cluster_idle,
            "pipeline": asdict(shards),
        }
    direct = await bench.direct(args.sessions, args.seconds)
    pacing_us = await bench.pacing(args.sessions, min(args.seconds, 10.0))
    report["pipeline"], report["direct"] = asdict(pipe), asdict(direct)
    if len(pipes) > 1:
        report["pipelines"] = [asdict(x) for x in pipes]
    report["pacing_us_per_frame"] = pacing_us
    d = direct.cpu_us_per_frame["direct"]
    report["ratios"] = {
        "worker_vs_direct": pipe.cpu_us_per_frame["worker"] / d,
        "producer_vs_direct": pipe.cpu_us_per_frame["producer"] / d,
        "producer_vs_direct_net_of_pacing": (pipe.cpu_us_per_frame["producer"] - pacing_us) / (d - pacing_us),
    }
    if len(pipes) > 1:
        report["ratios"]["by_frames_per_message"] = rep.ratios(rep.entries(report)[0])
    report["table"] = print_table(pipes, direct, idle, pacing_us)
    if shards is not None:
        report["cluster"]["table"] = print_cluster_table(pipe, shards)


def plot_files(json_path: Path, runs: list[tuple[str, dict[str, Any]]]) -> bool:
    """PNG plots next to the JSON; False (and a note) without matplotlib."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(
            "no plots: matplotlib is not installed (pip install 'voxqueue[bench]')",
            file=sys.stderr,
        )
        return False
    stem = json_path.with_suffix("")
    if len(runs) > 1:
        stem = stem.with_name("-vs-".join(name for name, _ in runs))
    for path in rep.plot(runs, stem):
        print(f"wrote {path}")
    return True


def load_results(path: str) -> tuple[str, dict[str, Any]]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise rep.BadResults(f"{path}: {exc}") from None
    if not isinstance(data, dict):
        raise rep.BadResults(f"{path}: not a bench results file")
    return Path(path).stem, data


def compare(old: tuple[str, dict[str, Any]], new: tuple[str, dict[str, Any]]) -> None:
    rep.check_same_machine([old, new])
    rows = rep.compare_rows(old[1], new[1])
    if not rows:
        raise rep.BadResults(f"{old[0]} and {new[0]} have no figure in common (different S?)")
    print(f"\ncompared on {old[1]['machine']['cpu']}, {old[1]['machine']['cores']} cores:")
    rep.print_rows(("figure", old[0], new[0], "new ÷ old"), rows)


def _write_json(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str))


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m ops.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument(
        "--sweep",
        help="comma-separated session counts: pipeline, direct and pacing at each, and PNG plots "
        "(CPU per frame, frame lag p99, sessions sustained against S) next to the JSON",
    )
    parser.add_argument(
        "--frames-per-message",
        metavar="K,K,...",
        help="run the pipeline once per value, with the worker holding live frames 20·K ms "
        "(VOXQUEUE_SEND_INTERVAL_MS; 1 = the default, no hold), e.g. 1,2,4",
    )
    parser.add_argument(
        "--worker-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for the worker, e.g. VOXQUEUE_MAX_FRAMES_PER_MESSAGE=5",
    )
    parser.add_argument(
        "--cluster",
        type=int,
        default=0,
        metavar="N",
        help="also run the pipeline load on a local Redis Cluster of N masters (0: one Redis only)",
    )
    parser.add_argument(
        "--partitions",
        type=int,
        default=0,
        help="VOXQUEUE_PARTITIONS for every run (default: 4 per shard with --cluster, else 1)",
    )
    parser.add_argument(
        "--flux",
        action="store_true",
        help="Deepgram Flux sessions (listen v2) in both patterns: a turn ends every 0.5 s of audio; "
        "the worker sends 80 ms messages (its Flux default) and so does the direct pattern",
    )
    parser.add_argument(
        "--flush-interval", type=float, help="the producer's flush_interval, seconds (default: the library's)"
    )
    parser.add_argument(
        "--compare",
        nargs="+",
        metavar="JSON",
        help="OLD: after this run, its key figures beside OLD's; OLD NEW: compare two saved runs, no run. "
        "Refused (exit 3) for results of another CPU model or core count",
    )
    parser.add_argument(
        "--plot",
        nargs="+",
        metavar="JSON",
        help="no run: PNG plots of saved results (several: drawn over each other, same machine only)",
    )
    parser.add_argument("--out", default=str(ROOT / "ops" / "bench-results" / "latest.json"))
    args = parser.parse_args()
    if args.cluster < 0 or args.partitions < 0:
        parser.error("--cluster and --partitions must be >= 0")
    if args.cluster and args.sweep:
        parser.error("--cluster compares one pipeline run per topology; it does not combine with --sweep")
    if args.compare and len(args.compare) > 2:
        parser.error("--compare takes OLD, or OLD NEW")
    try:
        if args.frames_per_message is not None:
            plan = rep.parse_frames_per_message(args.frames_per_message)
            if any(kv.startswith("VOXQUEUE_SEND_INTERVAL_MS=") for kv in args.worker_env):
                parser.error("--frames-per-message sets VOXQUEUE_SEND_INTERVAL_MS: do not also pass it")
            if args.cluster and len(plan) > 1:
                parser.error("--cluster runs one frames-per-message setting")
    except ValueError as exc:
        parser.error(str(exc))
    sys.exit(dispatch(args))


def dispatch(args: argparse.Namespace) -> int:
    """Run, compare or plot; the exit code. Saved results are checked before a long run starts."""
    try:
        if args.plot:
            runs = [load_results(path) for path in args.plot]
            for _, data in runs:
                rep.entries(data)  # readable at all
            rep.check_same_machine(runs)
            return 0 if plot_files(Path(args.plot[0]), runs) else 2
        old = load_results(args.compare[0]) if args.compare else None
        if args.compare and len(args.compare) == 2:
            assert old is not None
            compare(old, load_results(args.compare[1]))
            return 0
        if old is not None:  # before the run: refuse at once rather than after minutes of load
            rep.check_same_machine([old, ("this machine", {"machine": machine()})])
            rep.entries(old[1])
        import uvloop

        report = uvloop.run(run(args))
        if old is not None:
            compare(old, (Path(args.out).stem, report))
        return 0
    except rep.MachineMismatch as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_MACHINE_MISMATCH
    except rep.BadResults as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_RESULTS
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    main()
