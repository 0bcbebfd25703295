"""Redis Cluster: a real local cluster (tests/conftest.py redis_cluster), the worker and the producer
in cluster mode (a redis+cluster:// URL), with partitions spread over 3 masters.

What a single Redis never shows: a command naming keys of two partitions is refused (CROSSSLOT),
so every multi-key read, pipeline and script must stay within one partition's slot, and the hot
paths (claim, audio read, producer flush) must group per slot and per node.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.connection import SSLConnection
from redis.exceptions import RedisClusterException, ResponseError

from producer import protocol as p
from producer.client import Producer, connect
from producer.cluster import CLUSTER_ENV, is_cluster, split_url
from tests.harness import (
    CLOSE_SECONDS,
    assert_perfect,
    bounded,
    check_marker_session,
    produce_marker_session,
    sessions_pending,
    stop_pool,
    wait_until_ended,
)
from worker.config import load_settings
from worker.emulator import EmulatorServer
from worker.pool import WorkerPool
from worker.redis_server import RedisCluster

PARTITIONS = 16


def sids_per_partition(prefix: str, each: int) -> list[str]:
    """`each` session ids in every partition, partition by partition."""
    out: list[str] = []
    for n in range(PARTITIONS):
        found = (f"{prefix}-{i}" for i in range(100_000) if p.partition_of(f"{prefix}-{i}", PARTITIONS) == n)
        out += [next(found) for _ in range(each)]
    return out


def node_of_partition(cluster: RedisCluster, keys: p.Keys) -> dict[int, int]:
    """partition -> port of the master serving it."""
    return {n: cluster.master_of(keys.sessions(n)).port for n in range(keys.partitions)}


def test_fixture_starts_a_three_master_cluster_with_partitions_on_every_master(
    redis_cluster: RedisCluster,
) -> None:
    assert len(redis_cluster.nodes) == 3
    assert all(port < 55536 for port in redis_cluster.ports)
    assert len(redis_cluster.masters_now()) == 3
    spread = node_of_partition(redis_cluster, p.Keys(partitions=PARTITIONS))
    assert set(spread.values()) == set(redis_cluster.ports), "16 partitions should land on all 3 masters"


async def test_a_read_across_two_partitions_is_refused_on_a_cluster(redis_cluster: RedisCluster) -> None:
    """Why the worker reads per partition: the cluster refuses one XREAD over two slots."""
    keys = p.Keys(partitions=PARTITIONS)
    node = redis_cluster.master_of(keys.sessions(0))
    plain = aioredis.Redis(port=node.port)
    client = connect(redis_cluster.url)
    try:
        with pytest.raises(ResponseError, match=r"(?i)same slot|CROSSSLOT"):
            await plain.xread({keys.sessions(0): "0", keys.sessions(1): "0"})
        with pytest.raises((ResponseError, RedisClusterException), match=r"(?i)same slot|CROSSSLOT"):
            await client.xread({keys.sessions(0): "0", keys.sessions(1): "0"})
    finally:
        await plain.aclose()
        await client.aclose()


@contextlib.asynccontextmanager
async def cluster_rig(
    cluster: RedisCluster, url: str = "", **settings: Any
) -> AsyncIterator[tuple[WorkerPool, Producer]]:
    """A worker pool in this process on the cluster, with the marker emulator, and a producer."""
    url = url or cluster.url
    async with EmulatorServer(engine="marker", port=0, silence_timeout=3.0) as emulator:
        config = load_settings(
            redis_url=url,
            deepgram_url=emulator.url,
            catchup_speed=0,
            log_format="json",
            partitions=PARTITIONS,
            **settings,
        )
        pool = WorkerPool(config)
        task = asyncio.create_task(pool.run(), name="cluster-worker")
        producer = Producer(url, partitions=PARTITIONS)
        try:
            yield pool, producer
        finally:
            try:
                await stop_pool(pool, task)
            finally:
                await bounded(producer.aclose(), CLOSE_SECONDS, "closing the producer")


async def test_sessions_in_every_partition_are_exact_on_a_cluster(redis_cluster: RedisCluster) -> None:
    """32 sessions over 16 partitions on 3 masters: every final once, in order, seq-exact times, one
    session_ended, nothing left pending. Fails if any hot path sends a cross-slot command (the
    claim read, the audio read, the producer's pipeline, a fenced script) or routes a partition's
    commands to the wrong node."""
    keys = p.Keys(partitions=PARTITIONS)
    sessions = {sid: 40 + i for i, sid in enumerate(sids_per_partition("cl", 2))}
    assert {keys.session(sid).partition for sid in sessions} == set(range(PARTITIONS))
    async with cluster_rig(redis_cluster) as (_, producer):
        await asyncio.gather(*(produce_marker_session(producer, sid, n) for sid, n in sessions.items()))
        await producer.flush()
        redis = connect(redis_cluster.url)
        try:
            await wait_until_ended(redis, keys, list(sessions), timeout=60)
            for sid, frames in sessions.items():
                assert_perfect(await check_marker_session(redis, keys, sid, frames), frames)
            assert await sessions_pending(redis, keys) == 0
            stats = producer.stats
            # One pipeline per node per flush: far fewer round trips than commands.
            assert stats.flushes < stats.commands / 4, stats
        finally:
            await redis.aclose()


async def test_a_new_session_is_claimed_promptly_in_every_partition(redis_cluster: RedisCluster) -> None:
    """Each partition has its own blocking claim read: a session in any partition is claimed at
    once, not after a poll period (prints the claim delays; no timed assert)."""
    keys = p.Keys(partitions=PARTITIONS)
    delays: list[float] = []
    async with cluster_rig(redis_cluster) as (pool, producer):
        redis = connect(redis_cluster.url)
        try:
            # Warm-up: the worker is up (groups created, deployment checked) once it claims one.
            warm = await producer.open_session(sid="warm-up")
            deadline = time.monotonic() + 20
            while "warm-up" not in pool.owned:
                assert time.monotonic() < deadline, "the worker did not start within 20 s"
                await asyncio.sleep(0.01)
            await warm.end()
            await asyncio.sleep(0.5)  # every partition's claim read is blocked again (not a sync)
            for n in range(PARTITIONS):
                sid = sids_per_partition(f"claim{n}", 1)[n]
                sent = time.monotonic()
                session = await producer.open_session(sid=sid)
                deadline = sent + 10
                while sid not in pool.owned:
                    assert time.monotonic() < deadline, f"partition {n}: session not claimed within 10 s"
                    await asyncio.sleep(0.002)
                delays.append(time.monotonic() - sent)
                await session.end()
            await wait_until_ended(redis, keys, [s for s in pool.owned], timeout=30)
        finally:
            await redis.aclose()
    delays.sort()
    print(
        f"CLUSTER claim delay over {len(delays)} partitions: median={delays[len(delays) // 2] * 1000:.1f} ms "
        f"max={delays[-1] * 1000:.1f} ms"
    )


@pytest.mark.parametrize(
    ("url", "env", "cluster", "plain"),
    [
        ("redis+cluster://h:7000", "", True, "redis://h:7000"),
        ("rediss+cluster://u:pw@h:7000/0", "", True, "rediss://u:pw@h:7000/0"),
        ("redis://h:7000", "1", True, "redis://h:7000"),
        ("redis://h:7000", "", False, "redis://h:7000"),
        ("redis://h:7000", "0", False, "redis://h:7000"),
    ],
)
def test_cluster_mode_comes_from_the_scheme_or_the_setting(
    monkeypatch: pytest.MonkeyPatch, url: str, env: str, cluster: bool, plain: str
) -> None:
    if env:
        monkeypatch.setenv(CLUSTER_ENV, env)
    assert split_url(url) == (cluster, plain)
    settings = load_settings(redis_url=url, deepgram_url="ws://127.0.0.1:1")
    assert settings.cluster is cluster
    assert is_cluster(connect(url)) is cluster


def test_a_cluster_url_keeps_user_password_and_tls() -> None:
    client = connect("rediss+cluster://app:s3cret@127.0.0.1:7000")
    kwargs = client.nodes_manager.connection_kwargs  # type: ignore[attr-defined]
    assert (kwargs["username"], kwargs["password"]) == ("app", "s3cret")
    assert issubclass(kwargs["connection_class"], SSLConnection)


async def test_an_acl_user_runs_sessions_on_a_cluster(redis_cluster: RedisCluster) -> None:
    """The worker and the producer authenticate as an ACL user on every node (the URL's user and
    password), with the cluster client's own connections and the hand-packed hot paths' ones."""
    for node in redis_cluster.nodes:
        plain = aioredis.Redis(port=node.port)
        try:
            await plain.execute_command("ACL", "SETUSER", "vq", "on", ">pw-1", "~*", "&*", "+@all")
            await plain.execute_command("ACL", "SETUSER", "default", "off")
        finally:
            await plain.aclose()
    port = redis_cluster.ports[0]
    keys = p.Keys(partitions=PARTITIONS)
    sessions = {sid: 30 for sid in sids_per_partition("acl", 1)}
    url = f"redis+cluster://vq:pw-1@127.0.0.1:{port}"
    async with cluster_rig(redis_cluster, url) as (_, producer):
        await asyncio.gather(*(produce_marker_session(producer, sid, n) for sid, n in sessions.items()))
        redis = connect(url)
        try:
            await wait_until_ended(redis, keys, list(sessions), timeout=60)
            for sid, frames in sessions.items():
                assert_perfect(await check_marker_session(redis, keys, sid, frames), frames)
        finally:
            await redis.aclose()
