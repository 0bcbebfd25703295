"""`voxqueue demo`: the whole pipeline on one machine with nothing configured.

Starts what is missing (a private redis-server, the Deepgram emulator), runs a worker in this
process, produces the bundled speech sample through Redis, prints the transcript as it arrives,
then a summary. Everything it started is stopped before it returns, whatever happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from importlib import resources
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from rich.console import Console

from producer import protocol as p
from producer.audio import AudioFileError, read_audio_file
from producer.client import Producer
from worker.config import ConfigError, load_settings
from worker.logs import configure_logging, redact_url, register_secret
from worker.redis_server import RedisServer, RedisServerError

DEMO_NAMESPACE = "vqdemo"


class DemoError(RuntimeError):
    pass


class DemoInputError(DemoError):
    """The user's input cannot work (the --file): exit 2, like the other commands' bad input."""


async def _check_redis(url: str) -> None:
    """Fail at once with a clear message rather than let a worker retry an unreachable Redis."""
    client = aioredis.Redis.from_url(url, socket_connect_timeout=3)
    try:
        await client.ping()
    except (RedisError, OSError) as exc:
        raise DemoError(f"cannot reach Redis at {redact_url(url)}: {type(exc).__name__}") from None
    finally:
        await client.aclose()


def sample_path() -> Path:
    return Path(str(resources.files("worker") / "assets" / "sample.wav"))


async def run_demo(
    engine: str = "auto", audio_file: str | None = None, speed: float = 1.0, as_json: bool = False
) -> int:
    console = Console(highlight=False)
    err = Console(stderr=True, highlight=False)
    configure_logging("warning", "console")
    path = Path(audio_file) if audio_file else sample_path()
    try:
        fmt, pcm = read_audio_file(path)
    except AudioFileError as exc:
        raise DemoInputError(str(exc)) from None
    if not pcm:
        raise DemoInputError(f"{path.name} has no audio")

    async with contextlib.AsyncExitStack() as stack:
        redis_url = os.environ.get("VOXQUEUE_REDIS_URL")
        if not redis_url:
            try:
                server = RedisServer()
                await asyncio.to_thread(server.start)
            except RedisServerError as exc:
                raise DemoError(str(exc)) from None
            stack.callback(server.cleanup)
            redis_url = server.url
            err.print(f"[dim]started redis-server on port {server.port}[/dim]")

        api_key = os.environ.get("DEEPGRAM_API_KEY", "")
        if api_key:
            register_secret(api_key)
            deepgram_url = os.environ.get("VOXQUEUE_DEEPGRAM_URL", "wss://api.deepgram.com")
            err.print(f"[dim]using Deepgram at {deepgram_url}[/dim]")
        else:
            from worker.emulator import EmulatorServer, speech_available

            chosen = engine
            if engine == "auto":
                chosen = "speech" if speech_available() else "marker"
            if chosen == "speech" and not speech_available():
                raise DemoError("engine 'speech' needs pocketsphinx: pip install 'voxqueue[speech]'")
            emulator = await stack.enter_async_context(EmulatorServer(engine=chosen, port=0))
            deepgram_url = emulator.url
            err.print(f"[dim]started the Deepgram emulator ({chosen} engine) at {deepgram_url}[/dim]")

        await _check_redis(redis_url)
        try:
            settings = load_settings(
                partitions=1,
                redis_url=redis_url,
                deepgram_url=deepgram_url,
                deepgram_api_key=api_key or None,
                namespace=DEMO_NAMESPACE,
                concurrency=4,
                retention_seconds=3600,
                catchup_speed=0 if not api_key else None,
                log_level="warning",
                log_format="console",
            )
        except ConfigError as exc:
            raise DemoError(str(exc)) from None

        from worker.pool import WorkerPool

        pool = WorkerPool(settings)
        worker_task = asyncio.create_task(pool.run())

        async def stop_worker() -> None:
            pool.claiming = False
            pool.stop_requested.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(worker_task, 10)

        stack.push_async_callback(stop_worker)
        err.print(
            f"[dim]started a worker; sending {path.name} ({len(pcm) / fmt.sample_rate / 2:.1f} s) "
            f"at {'full speed' if speed <= 0 else f'{speed:g}x real time'}[/dim]\n"
        )
        keys = p.Keys(DEMO_NAMESPACE)
        async with Producer(redis_url, namespace=DEMO_NAMESPACE) as producer:
            return await _stream_and_print(producer, keys, pcm, fmt, speed, console, as_json, worker_task)
    return 1


async def _stream_and_print(
    producer: Producer,
    keys: p.Keys,
    pcm: bytes,
    fmt: p.AudioFormat,
    speed: float,
    console: Console,
    as_json: bool,
    worker_task: asyncio.Task[None],
) -> int:
    session = await producer.open_session(options={"interim_results": True, "punctuate": True}, format=fmt)
    frame_bytes = fmt.frame_bytes
    sent_at: list[float] = []

    async def send() -> None:
        start = time.monotonic()
        for offset in range(0, len(pcm), frame_bytes):
            if speed > 0:
                due = start + len(sent_at) * fmt.frame_seconds / speed
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            sent_at.append(time.time())
            await session.send(pcm[offset : offset + frame_bytes], wait=False)
        await session.end()

    sender = asyncio.create_task(send())
    finals: list[dict[str, Any]] = []
    latencies: list[float] = []
    ended: dict[str, Any] | None = None
    partial_shown = False
    live = console.is_terminal and not as_json
    try:
        async with asyncio.timeout(max(60.0, len(pcm) / frame_bytes * fmt.frame_seconds * 3 + 30)):
            async for event in session.events():
                if as_json:
                    print(json.dumps(event), flush=True)
                kind = event["type"]
                if kind == p.FINAL:
                    finals.append(event)
                    seq_to = event["seq_to"]
                    if seq_to < len(sent_at):
                        latencies.append(event["ts"] / 1000 - sent_at[seq_to])
                    if not as_json:
                        if partial_shown:
                            console.print("\r\033[K", end="")
                            partial_shown = False
                        console.print(
                            f"[cyan][{event['start']:6.2f}–{event['end']:6.2f}][/cyan] {event['transcript']}"
                        )
                elif kind == p.PARTIAL and live:
                    console.print(f"\r\033[K[dim]… {event['transcript'][-100:]}[/dim]", end="")
                    partial_shown = True
                elif kind == p.ERROR and not as_json:
                    console.print(f"[red]error {event['code']}: {event['message']}[/red]")
                elif kind == p.SESSION_ENDED:
                    ended = event
                    break
                if worker_task.done():
                    break
    except TimeoutError:
        console.print("[red]timed out waiting for the transcript[/red]")
    finally:
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
    if worker_task.done() and worker_task.exception():
        raise DemoError(f"worker failed: {worker_task.exception()!r}")
    if ended is None:
        return 1
    if not as_json:
        _summary(console, session.sid, ended, finals, latencies)
    return 0 if ended["reason"] == p.END_COMPLETED else 1


def _summary(
    console: Console, sid: str, ended: dict[str, Any], finals: list[dict[str, Any]], latencies: list[float]
) -> None:
    latencies.sort()
    median = latencies[len(latencies) // 2] * 1000 if latencies else 0.0
    worst = latencies[-1] * 1000 if latencies else 0.0
    console.print()
    console.print(f"[bold]session[/bold] {sid}: {ended['reason']}")
    console.print(f"  frames {ended['frames']}  audio {ended['audio_seconds']:.2f} s  finals {len(finals)}")
    console.print(
        f"  latency, last frame of a final sent → final readable: median {median:.0f} ms, max {worst:.0f} ms"
    )
