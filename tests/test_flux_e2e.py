"""Flux sessions end to end: real workers, real redis-server, the emulator's /v2/listen driven by
deepgram-sdk's listen.v2 client. Every turn must end exactly once, with turn indices 0, 1, 2, …
and exactly the words said in it, across kill -9 of a worker mid-turn and dropped connections.

A turn is a run of marker frames (word `f<n>` for frame n) whose last frame carries the emulator's
end-of-turn flag; silence (zero frames) lies between turns (worker/emulator/flux.py).
"""

from __future__ import annotations

import asyncio
import random
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from producer import protocol as p
from producer.audio import marker_frame
from producer.client import Producer
from tests.harness import Stack, rig, session_events, sessions_pending, wait_until_ended

FLUX = {"model": "flux-general-en"}
SILENCE = bytes(640)


@dataclass(frozen=True)
class Script:
    """A Flux session's audio: frames, and the word frames of each turn in order."""

    frames: list[bytes]
    turns: list[list[int]]


def script(
    rng: random.Random, turns: int, *, words: tuple[int, int] = (2, 8), gap: tuple[int, int] = (5, 30)
) -> Script:
    frames: list[bytes] = []
    spoken: list[list[int]] = []
    for _ in range(turns):
        frames += [SILENCE] * rng.randint(*gap)
        count = rng.randint(*words)
        turn = list(range(len(frames), len(frames) + count))
        frames += [marker_frame(n, end_of_turn=(n == turn[-1])) for n in turn]
        spoken.append(turn)
    frames += [SILENCE] * rng.randint(*gap)
    return Script(frames, spoken)


async def produce(
    producer: Producer, sid: str, s: Script, *, realtime: bool, options: dict[str, Any] | None = None
) -> None:
    session = await producer.open_session(sid=sid, options=options or FLUX)
    start = time.monotonic()
    for n, frame in enumerate(s.frames):
        if realtime:
            delay = start + n * 0.02 - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        await session.send_frame(frame, wait=False)
    await session.end()


def turn_ends(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == p.TURN and e["event"] == "EndOfTurn"]


async def check_turns(redis: aioredis.Redis, keys: p.Keys, sid: str, s: Script) -> None:
    """Judged by stream order: each turn ends once, numbered 0..n-1, with exactly its words."""
    events = await session_events(redis, keys, sid)
    ends = turn_ends(events)
    assert [e["turn_index"] for e in ends] == list(range(len(s.turns))), f"{sid}: turn ends {ends}"
    for end, words in zip(ends, s.turns, strict=True):
        assert end["transcript"].split() == [f"f{n}" for n in words], f"{sid}: {end}"
        assert end["id"] == f"{sid}/turn/t{end['turn_index']}"
        assert end["start"] <= words[0] * 0.02 + 1e-6 and end["end"] >= (words[-1] + 1) * 0.02 - 1e-6
    ended = [e for e in events if e["type"] == p.SESSION_ENDED]
    assert len(ended) == 1 and ended[0]["reason"] == p.END_COMPLETED, ended
    assert ended[0]["finals"] == len(s.turns) and ended[0]["frames"] == len(s.frames)
    assert events[-1]["type"] == p.SESSION_ENDED


# ------------------------------------------------------------------------------------ fast tier


async def test_a_flux_session_publishes_each_turn_end_once_with_control_entries() -> None:
    """Model ends, an eager end, a forced end and a configure, through one worker in-process."""
    async with rig() as r:
        session = await r.producer.open_session(sid="flux-1", options={**FLUX, "eager_eot_threshold": 0.5})
        frames = [SILENCE] * 5 + [marker_frame(n, end_of_turn=(n == 7)) for n in range(5, 8)]
        frames += [SILENCE] * 5 + [marker_frame(13, eager=True), marker_frame(14, end_of_turn=True)]
        await session.send(b"".join(frames))
        await session.configure(eot_threshold=0.8, eot_timeout_ms=3000)
        await session.send(b"".join([SILENCE] * 3 + [marker_frame(n) for n in range(18, 21)]))
        await session.force_end_turn()  # the third turn has no flag: ended by the producer
        await session.send(SILENCE * 10)
        await session.end()
        events = [e async for e in session.events()]
        ends = turn_ends(events)
        assert [(e["turn_index"], e["transcript"], e["trigger"]) for e in ends] == [
            (0, "f5 f6 f7", "model"),
            (1, "f13 f14", "model"),
            (2, "f18 f19 f20", "manual"),
        ]
        assert [e["seq_to"] for e in ends] == [7, 14, 20]  # the frame numbers are the words
        eager = [e for e in events if e["type"] == p.TURN and e["event"] == "EagerEndOfTurn"]
        assert [e["turn_index"] for e in eager] == [1]
        assert all(not e["is_final"] for e in events if e["type"] == p.TURN and e["event"] != "EndOfTurn")
        assert events[-1]["type"] == p.SESSION_ENDED and events[-1]["finals"] == 3
        state = await r.redis.hgetall(r.producer.keys.session("flux-1").state)
        assert state[b"configure"] == b'{"eot_threshold":"0.8","eot_timeout_ms":"3000"}'


async def test_flux_turns_are_exact_across_dropped_connections() -> None:
    """The emulator drops half of the connections mid-stream (close frame or TCP abort)."""
    async with rig() as r:
        r.emulator.set_faults({"drop_rate": 0.5, "drop_after_min": 5, "drop_after_max": 60, "seed": 3})
        rng = random.Random(5)
        scripts = {f"flux-drop-{i}": script(rng, turns=rng.randint(3, 8)) for i in range(6)}
        await asyncio.gather(*(produce(r.producer, sid, s, realtime=False) for sid, s in scripts.items()))
        await wait_until_ended(r.redis, r.producer.keys, list(scripts), 60)
        for sid, s in scripts.items():
            await check_turns(r.redis, r.producer.keys, sid, s)
        stats = r.emulator.stats_json()
        assert sum(stats["drops"].values()) >= 2, stats  # the faults really happened


# ------------------------------------------------------------------------------------ chaos tier


@pytest.mark.slow
async def test_flux_turns_are_exact_across_kill_nine_mid_turn(tmp_path: Path) -> None:
    """12 real-time Flux sessions on 2 workers; one worker is killed while its sessions are inside
    a turn; the other takes them over and no turn end is lost, repeated or renumbered."""
    stack = Stack(tmp_path, worker_env={"VOXQUEUE_LEASE_SECONDS": "3", "VOXQUEUE_RENEW_SECONDS": "0.5"})
    stack.start()
    try:
        stack.start_worker("f1")
        stack.start_worker("f2")
        await stack.wait_workers_ready(2)
        rng = random.Random(17)
        scripts = {
            f"flux-kill-{i}": script(rng, turns=rng.randint(6, 10), words=(10, 25), gap=(5, 15))
            for i in range(12)
        }
        redis = stack.client()
        async with Producer(redis) as producer:
            producing = asyncio.gather(
                *(produce(producer, sid, s, realtime=True) for sid, s in scripts.items())
            )
            await asyncio.sleep(2.5)
            victim = "f1"
            owned = [
                sid
                for sid in scripts
                if await redis.hget(stack.keys.session(sid).state, "owner") == victim.encode()
            ]
            stack.signal_worker(victim, signal.SIGKILL)
            await producing
        try:
            await wait_until_ended(redis, stack.keys, list(scripts), 60)
            assert owned, "the killed worker owned no session"
            for sid, s in scripts.items():
                await check_turns(redis, stack.keys, sid, s)
            taken = [
                sid for sid in owned if int(await redis.hget(stack.keys.session(sid).state, "takeovers") or 0)
            ]
            assert taken == owned
            assert await sessions_pending(redis, stack.keys) == 0
            print(f"CHAOS flux kill-9 sessions={len(scripts)} taken_over={len(taken)}")
        finally:
            await redis.aclose()
    finally:
        stack.stop()


def doc_block(name: str) -> str:
    text = (Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text()
    block = text.split(f"<!-- {name}:start -->", 1)[1].split(f"<!-- {name}:end -->", 1)[0]
    match = re.search(r"```sh\n(.*?)```", block, re.S)
    assert match, f"docs/protocol.md lost its {name} block"
    return match.group(1)


@pytest.mark.skipif(shutil.which("redis-cli") is None, reason="redis-cli is not installed")
async def test_the_redis_cli_control_entries_of_protocol_doc_work() -> None:
    async with rig() as r:
        session = await r.producer.open_session(sid="agent-7", options=FLUX)
        await session.send(b"".join(marker_frame(n) for n in range(5)))  # a turn, still open
        port = r.redis.connection_pool.connection_kwargs["port"]
        script = f'redis-cli() {{ command redis-cli -p {port} "$@"; }}\n' + doc_block("flux-control")
        result = await asyncio.to_thread(
            subprocess.run, ["bash", "-eu", "-c", script], capture_output=True, text=True, timeout=30
        )
        assert result.returncode == 0 and "ERR" not in result.stdout, result
        await session.send(SILENCE * 5)
        await session.end()
        ends = turn_ends([e async for e in session.events()])
        assert [(e["transcript"], e["trigger"]) for e in ends] == [("f0 f1 f2 f3 f4", "manual")]
        state = r.producer.keys.session("agent-7").state
        assert await r.redis.hget(state, "configure") == b'{"eot_threshold":"0.8"}'
