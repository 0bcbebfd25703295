"""The two load generators of the benchmark, each run as its own process so its CPU is its own.

* `producer`: S sessions through the voxqueue producer library into Redis (the pipeline).
* `direct`:   S deepgram-sdk connections straight to the emulator, one `send_media` per 20 ms frame
              (the pattern of Deepgram's own SDK docs, which voxqueue replaces).

Both send marker frames (`VQMK` + seq + send time) at 50 frames/s per session. Each session starts
at its own random moment within the first second, as independent callers would: sessions started in
the same millisecond would also get their finals in the same millisecond (the emulator finalises
every 0.5 s of audio), a synchronised burst real traffic does not have. Each prints `START` and
`STOP` lines on stdout around the steady sending window and writes a JSON result file.

    python -m ops.bench.loads producer --redis-url URL --sessions 200 --seconds 20 --out p.json
    python -m ops.bench.loads direct --deepgram-url ws://127.0.0.1:8765 --sessions 200 --seconds 20 \
        --out d.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import time
from collections.abc import Awaitable, Callable
from typing import Any

import uvloop

from producer.audio import marker_frame
from producer.client import Producer
from worker.cli import tune_gc

FRAME_S = 0.02
PHASE_SPREAD_S = 1.0  # session start offsets are uniform in [0, this)
# --flux: Deepgram Flux sessions (model flux-general-en, /v2/listen). A turn ends every 25 frames
# (0.5 s, as often as v1's marker finals), by the emulator's end-of-turn flag on the last frame;
# the direct pattern sends 80 ms messages (4 frames), as Deepgram recommends for Flux and as the
# worker does by default.
FLUX_OPTIONS = {"model": "flux-general-en"}
FLUX_TURN_FRAMES = 25
FLUX_FRAMES_PER_MESSAGE = 4


def bench_frame(n: int, flux: bool) -> bytes:
    if flux:
        return marker_frame(n, time.time_ns(), end_of_turn=n % FLUX_TURN_FRAMES == FLUX_TURN_FRAMES - 1)
    return marker_frame(n, time.time_ns())


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def paced_frames(
    seconds: float, start: float, phase: float, send: Callable[[int], Awaitable[None]]
) -> int:
    """Awaits send(n) at start + phase + n × 20 ms until `seconds` have passed; returns frames
    sent. For an API whose send is a coroutine (deepgram-sdk's `send_media`)."""
    frames = int(seconds / FRAME_S)
    for n in range(frames):
        delay = start + phase + n * FRAME_S - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        await send(n)
    return frames


async def paced_calls(seconds: float, start: float, phase: float, send: Callable[[int], object]) -> int:
    """The same schedule with a plain call per frame (the producer's `send_nowait`, and the pacing
    baseline: what a backend pays to produce a frame on time, whatever it then does with it)."""
    frames = int(seconds / FRAME_S)
    for n in range(frames):
        delay = start + phase + n * FRAME_S - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        send(n)
    return frames


def announce(word: str) -> None:
    print(word, flush=True)


async def run_producer(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(1)
    tuning = {"flush_interval": args.flush_interval} if args.flush_interval is not None else {}
    async with Producer(args.redis_url, partitions=args.partitions, **tuning) as producer:
        options = FLUX_OPTIONS if args.flux else None
        sessions = [
            await producer.open_session(sid=f"bench-{args.tag}-{i}", options=options)
            for i in range(args.sessions)
        ]
        # Steady state, not a thundering herd: let the worker claim every session and open its
        # Deepgram connection before the first frame (sessions opened at once are not the
        # pattern under test; their ramp is measured by the chaos and end-to-end tests).
        warmup = 1.0 + args.sessions / 200
        start = time.monotonic() + warmup
        await asyncio.sleep(warmup)
        announce("START")
        cpu0, t0 = cpu_seconds(), time.monotonic()
        flushes0 = producer.stats.flushes

        async def one(session: Any) -> int:
            send_nowait = session.send_nowait
            flux = args.flux

            def send(n: int) -> None:
                # Synchronous: the frame joins the next pipeline; no await, no task switch.
                send_nowait(bench_frame(n, flux))

            return await paced_calls(args.seconds, start, rng.uniform(0, PHASE_SPREAD_S), send)

        counts = await asyncio.gather(*(one(s) for s in sessions))
        await producer.flush()
        cpu1, t1 = cpu_seconds(), time.monotonic()
        flushes = producer.stats.flushes - flushes0
        announce("STOP")
        for session in sessions:
            await session.end()
    frames = sum(counts)
    return {
        "frames": frames,
        "cpu_s": cpu1 - cpu0,
        "wall_s": t1 - t0,
        "round_trips": flushes,
        "on_time": frames / (args.sessions * args.seconds / FRAME_S) if args.sessions else 1.0,
        "late_s": max(0.0, (t1 - t0) - args.seconds - 0.5),
    }


async def run_direct(args: argparse.Namespace) -> dict[str, Any]:
    from deepgram import AsyncDeepgramClient
    from deepgram.environment import DeepgramClientEnvironment

    base = args.deepgram_url.replace("ws://", "http://").replace("wss://", "https://")
    env = DeepgramClientEnvironment(
        base=base, production=args.deepgram_url, agent=args.deepgram_url, agent_rest=base
    )
    client = AsyncDeepgramClient(api_key="bench", environment=env)
    rng = random.Random(1)
    ready = asyncio.Event()
    go = asyncio.Event()
    opened = 0
    start_at = 0.0
    # When each final arrived: [request id, its end, time.time_ns()], joined by the bench with the
    # emulator's send times (transcript latency, as it measures the pipeline's).
    finals: list[tuple[str, float, int]] = []

    def connect() -> Any:
        if args.flux:
            return client.listen.v2.connect(encoding="linear16", sample_rate="16000", **FLUX_OPTIONS)
        return client.listen.v1.connect(
            model="nova-3", encoding="linear16", sample_rate="16000", channels="1"
        )

    async def one(i: int) -> int:
        nonlocal opened
        async with connect() as conn:

            async def read() -> None:
                async for message in conn:
                    kind = getattr(message, "type", None)
                    if kind == "TurnInfo" and message.event == "EndOfTurn":
                        end = round(message.audio_window_end, 3)
                        finals.append((message.request_id, end, time.time_ns()))
                        continue
                    final = kind == "Results" and message.is_final
                    if final and (not message.channel_index or message.channel_index[0] == 0):
                        end = round(message.start + message.duration, 3)
                        finals.append((message.metadata.request_id, end, time.time_ns()))

            reader = asyncio.create_task(read())
            opened += 1
            if opened == args.sessions:
                ready.set()
            await go.wait()
            held: list[bytes] = []

            async def send(n: int) -> None:
                if not args.flux:
                    await conn.send_media(bench_frame(n, False))
                    return
                held.append(bench_frame(n, True))  # Flux: one 80 ms message per 4 frames
                if len(held) == FLUX_FRAMES_PER_MESSAGE:
                    await conn.send_media(b"".join(held))
                    held.clear()

            sent = await paced_frames(args.seconds, start_at, rng.uniform(0, FRAME_S), send)
            if held:
                await conn.send_media(b"".join(held))
            await conn.send_close_stream()
            await reader
            return sent

    tasks = [asyncio.create_task(one(i)) for i in range(args.sessions)]
    await ready.wait()
    start_at = time.monotonic() + 0.5
    announce("START")
    cpu0, t0 = cpu_seconds(), time.monotonic()
    go.set()
    # The window ends when the last frame went out: measure then, before the close handshakes.
    await asyncio.sleep(max(0.0, start_at + args.seconds + PHASE_SPREAD_S + 0.03 - time.monotonic()))
    cpu1, t1 = cpu_seconds(), time.monotonic()
    announce("STOP")
    counts = await asyncio.gather(*tasks)
    frames = sum(counts)
    return {
        "frames": frames,
        "cpu_s": cpu1 - cpu0,
        "wall_s": t1 - t0,
        "on_time": frames / (args.sessions * args.seconds / FRAME_S) if args.sessions else 1.0,
        "finals": finals,
    }


async def run_pacing(args: argparse.Namespace) -> dict[str, Any]:
    """The simulated backend alone: the same per-session timers, sending nothing. Its CPU is what
    both patterns pay for pacing, so it can be taken out to compare what each does per frame."""
    rng = random.Random(1)
    start = time.monotonic() + 0.2
    announce("START")
    cpu0, t0 = cpu_seconds(), time.monotonic()

    def nothing(n: int) -> None:
        marker_frame(n, time.time_ns())

    counts = await asyncio.gather(
        *(
            paced_calls(args.seconds, start, rng.uniform(0, PHASE_SPREAD_S), nothing)
            for _ in range(args.sessions)
        )
    )
    cpu1, t1 = cpu_seconds(), time.monotonic()
    announce("STOP")
    return {"frames": sum(counts), "cpu_s": cpu1 - cpu0, "wall_s": t1 - t0, "on_time": 1.0}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m ops.bench.loads")
    parser.add_argument("mode", choices=["producer", "direct", "pacing"])
    parser.add_argument("--sessions", type=int, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--redis-url")
    parser.add_argument("--deepgram-url")
    parser.add_argument("--tag", default="0")
    parser.add_argument("--partitions", type=int, default=1, help="the deployment's VOXQUEUE_PARTITIONS")
    parser.add_argument(
        "--flush-interval", type=float, help="the Producer's flush_interval in seconds (default: its own)"
    )
    parser.add_argument("--flux", action="store_true", help="Deepgram Flux sessions (listen v2)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    runner = {"producer": run_producer, "direct": run_direct, "pacing": run_pacing}[args.mode]
    # The same collector settings as `voxqueue worker`, for both patterns alike.
    tune_gc()
    result = uvloop.run(runner(args))
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
