"""`voxqueue status`, `sessions` and `dead [requeue]` against real redis-server and worker processes."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import redis as sync_redis

from producer import protocol as p
from producer.audio import marker_frame
from producer.client import Producer
from tests.harness import VOXQUEUE, Stack, check_marker_session, wait_until_ended

LEASE = "1.5"
FAST_LEASES = {"VOXQUEUE_LEASE_SECONDS": LEASE, "VOXQUEUE_RENEW_SECONDS": "0.3"}


def run(redis_url: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Runs a voxqueue command against `redis_url`, bounded, capturing its output."""
    return subprocess.run(
        [*VOXQUEUE, *args, "--redis-url", redis_url], capture_output=True, text=True, timeout=30, env=env
    )


def cli(stack: Stack, *args: str) -> list[dict[str, Any]]:
    """Runs a voxqueue command (stdout is a pipe: JSON lines) and parses its output."""
    result = run(stack.redis.url, *args, env=stack._env(VOXQUEUE_LEASE_SECONDS=LEASE))
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


async def poll(what: str, check: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.1)


async def test_a_worker_killed_mid_session_shows_as_gone_and_its_session_as_orphaned(tmp_path: Path) -> None:
    stack = Stack(tmp_path, worker_env=FAST_LEASES).start()
    redis = stack.client()
    producer = Producer(redis)
    try:
        stack.start_worker("alpha")
        await stack.wait_workers_ready(1)
        session = await producer.open_session(sid="open1")  # no end marker: stays active
        for n in range(20):
            await session.send_frame(marker_frame(n, 0))
        state = stack.keys.session("open1").state
        await poll("alpha owns open1", lambda: _owner_is(redis, state, b"alpha"), 15)

        lines = await asyncio.to_thread(cli, stack, "status")
        workers = {line["name"]: line for line in lines if line["kind"] == "worker"}
        assert workers["alpha"]["state"] == "alive" and workers["alpha"]["sessions"] == 1
        part = next(line for line in lines if line["kind"] == "partition")
        assert part["leased"] == 1 and part["unclaimed"] == 0

        stack.signal_worker("alpha", signal.SIGKILL)
        stack.workers["alpha"].wait(10)

        async def alpha_gone() -> list[dict[str, Any]] | None:
            lines = await asyncio.to_thread(cli, stack, "status")
            gone = [
                w for w in lines if w["kind"] == "worker" and w["name"] == "alpha" and w["state"] == "gone"
            ]
            return gone or None

        gone = await poll("status shows alpha gone", alpha_gone, 15)
        assert gone[0]["sessions"] == 1  # its lease, still pending until someone takes it over
        orphaned = await asyncio.to_thread(cli, stack, "sessions", "--state", "orphaned")
        assert [(s["sid"], s["owner"]) for s in orphaned] == [("open1", "alpha")]
        assert orphaned[0]["committed_seq"] + orphaned[0]["lag_frames"] == 19

        stack.start_worker("beta")
        await poll("beta takes open1 over", lambda: _owner_is(redis, state, b"beta"), 20)
        active = await asyncio.to_thread(cli, stack, "sessions", "--state", "active")
        assert [(s["sid"], s["owner"], s["takeovers"]) for s in active] == [("open1", "beta", 1)]
        await session.end()
        await wait_until_ended(redis, stack.keys, ["open1"], 20)
        ended = await asyncio.to_thread(cli, stack, "sessions", "--state", "ended")
        assert [(s["sid"], s["frames"], s["reason"]) for s in ended] == [("open1", 20, p.END_COMPLETED)]
    finally:
        await producer.aclose()
        await redis.aclose()
        stack.stop()


async def _owner_is(redis: Any, state: str, owner: bytes) -> bool:
    return bool(await redis.hget(state, "owner") == owner)


async def test_a_dead_letter_requeued_runs_again_as_a_new_session(tmp_path: Path) -> None:
    stack = Stack(tmp_path).start()
    redis = stack.client()
    producer = Producer(redis)
    try:
        stack.start_worker("w1")
        await stack.wait_workers_ready(1)
        frames, bad = 30, 12
        await producer.open_session(sid="dl1")
        audio = stack.keys.session("dl1").audio
        for n in range(frames):
            pcm = b"short" if n == bad else marker_frame(n, 0)  # a frame of the wrong size
            await redis.xadd(audio, p.frame_fields(n, pcm))
        await redis.xadd(audio, p.end_fields(frames))
        await wait_until_ended(redis, stack.keys, ["dl1"], 20)

        letters = await asyncio.to_thread(cli, stack, "dead")
        assert [letter["sid"] for letter in letters] == ["dl1"]
        assert letters[0]["stream"] == audio

        result = await asyncio.to_thread(run, stack.redis.url, "dead", "requeue", letters[0]["id"])
        assert result.returncode == 0, result.stderr
        new_sid = result.stdout.split()[0]
        assert new_sid != "dl1"
        await wait_until_ended(redis, stack.keys, [new_sid], 20)
        report = await check_marker_session(redis, stack.keys, new_sid, frames)
        # The retained audio ran again: every good frame's marker, the bad one as silence.
        assert report.words == [f"f{n}" for n in range(frames) if n != bad]
        assert report.end_reason == p.END_COMPLETED
        labels = json.loads(await redis.hget(stack.keys.session(new_sid).state, "labels"))
        assert labels["requeue_of"] == "dl1" and labels["dead_letter"] == letters[0]["id"]
        assert new_sid == f"rq-{letters[0]['id']}"

        # Asked again (a retried script): the same id, and nothing runs twice.
        again = await asyncio.to_thread(run, stack.redis.url, "dead", "requeue", letters[0]["id"])
        assert again.returncode == 0, again.stderr
        assert again.stdout.split() == [new_sid]
        assert "requeued already" in again.stderr
        requeued = [
            key
            async for key in redis.scan_iter(match=stack.keys.session("*").state)
            if b"requeue_of" in (await redis.hget(key, "labels") or b"")
        ]
        assert len(requeued) == 1, requeued
        # --again runs it once more, under a new id.
        forced = await asyncio.to_thread(run, stack.redis.url, "dead", "requeue", letters[0]["id"], "--again")
        assert forced.returncode == 0, forced.stderr
        forced_sid = forced.stdout.split()[0]
        assert forced_sid not in (new_sid, "dl1")
        await wait_until_ended(redis, stack.keys, [forced_sid], 20)
        report = await check_marker_session(redis, stack.keys, forced_sid, frames)
        assert report.words == [f"f{n}" for n in range(frames) if n != bad]

        missing = await asyncio.to_thread(run, stack.redis.url, "dead", "requeue", "1-1")
        assert missing.returncode == 2 and "no dead letter 1-1" in missing.stderr
    finally:
        await producer.aclose()
        await redis.aclose()
        stack.stop()


def test_a_dead_letter_id_in_two_partitions_is_requeued_only_with_its_partition_named(
    redis_server: Any,
) -> None:
    """Each partition's dead letters are a stream of their own, so one entry id can be in two: the
    requeue refuses to guess, and --partition picks one (whose requeue id names it)."""
    keys = p.Keys(partitions=2)
    client = sync_redis.Redis.from_url(redis_server.url)
    try:
        for n, sid in ((0, "gone-a"), (1, "gone-b")):
            client.xadd(keys.dead(n), {"sid": sid, "reason": "test"}, id="5-1")
    finally:
        client.close()

    def requeue(*extra: str) -> subprocess.CompletedProcess[str]:
        return run(redis_server.url, "dead", "requeue", "5-1", *extra, "--partitions", "2")

    ambiguous = requeue()
    assert ambiguous.returncode == 2 and "in partitions 0, 1" in ambiguous.stderr, ambiguous.stderr
    chosen = requeue("--partition", "1")
    # Partition 1's letter, whose session's audio is gone: the error names that session.
    assert chosen.returncode == 2 and "gone-b has no recorded audio" in chosen.stderr, chosen.stderr


def test_requeue_ids_name_the_partition_past_the_first() -> None:
    from worker.admin import requeue_sid

    assert requeue_sid(0, "5-1") == "rq-5-1"
    assert requeue_sid(3, "5-1") == "rq-p3-5-1"
    for n in (0, 3):
        p.validate_sid(requeue_sid(n, "1764115200000-12"))
