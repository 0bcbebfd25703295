"""The dashboard's panels (ops/grafana/dashboard.py) drawn with matplotlib from a recorded run, for
docs/ where no Grafana runs (the picture in docs/operations.md).

  python -m ops.grafana.plot record docs/dashboard-run.json   # a real run: redis, emulator, workers
  python -m ops.grafana.plot plot docs/dashboard-run.json docs/dashboard.png

`record` starts a private redis-server, the marker emulator and two workers (metrics on free ports),
runs live sessions at real time, SIGKILLs one worker halfway and starts another (so the takeover
panels have something to show), and scrapes every worker's /metrics once a second. `plot`
evaluates each panel's PromQL on the recording with the small evaluator below, which knows the
three shapes the dashboard uses: histogram_quantile over sum by (le) of rates, sum of rates, and
sum/max of gauges. Rates use RATE_WINDOW (the dashboard's 1m window is too long for a short run).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from ops.grafana.dashboard import PANELS

RATE_WINDOW = 10.0
Sample = tuple[str, dict[str, str], float]
Snapshot = dict[str, Any]  # {"t": seconds, "workers": {name: [sample, ...]}}

_QUANTILE = re.compile(
    r"histogram_quantile\(([\d.]+), sum by \(le\) \(rate\((\w+)_bucket(\{[^}]*\})?\[\w+\]\)\)\)$"
)
_SUM_RATE = re.compile(r"sum\(rate\((\w+)(\{[^}]*\})?\[\w+\]\)\)$")
_AGG = re.compile(r"(sum|max)\((\w+)(\{[^}]*\})?\)$")


def _selector(text: str | None) -> dict[str, str]:
    return dict(re.findall(r'(\w+)="([^"]*)"', text or ""))


def parse_query(expr: str) -> tuple[str, str, dict[str, str], float]:
    """(shape, metric, label selector, quantile) of one of the dashboard's queries."""
    if m := _QUANTILE.match(expr):
        return "quantile", m.group(2), _selector(m.group(3)), float(m.group(1))
    if m := _SUM_RATE.match(expr):
        return "sum_rate", m.group(1), _selector(m.group(2)), 0.0
    if m := _AGG.match(expr):
        return m.group(1), m.group(2), _selector(m.group(3)), 0.0
    raise ValueError(f"query shape not supported by the plot: {expr}")


def _values(samples: list[Sample], name: str, sel: dict[str, str]) -> dict[tuple[Any, ...], float]:
    return {
        tuple(sorted(labels.items())): value
        for sample_name, labels, value in samples
        if sample_name == name and all(labels.get(k) == v for k, v in sel.items())
    }


def _rates(snaps: list[Snapshot], i: int, name: str, sel: dict[str, str]) -> dict[tuple[Any, ...], float]:
    """Per-series rate over RATE_WINDOW ending at snapshot i, summed over workers by label set."""
    now = snaps[i]["t"]
    j = next(k for k in range(i + 1) if now - snaps[k]["t"] <= RATE_WINDOW)
    if j == i:
        return {}
    span = now - snaps[j]["t"]
    out: dict[tuple[Any, ...], float] = {}
    for worker, samples in snaps[i]["workers"].items():
        before = _values(snaps[j]["workers"].get(worker, []), name, sel)
        for key, value in _values(samples, name, sel).items():
            out[key] = out.get(key, 0.0) + max(0.0, value - before.get(key, 0.0)) / span
    return out


def _quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus's histogram_quantile: linear interpolation inside the bucket holding rank q."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * ((rank - below) / (count - below) if count > below else 0.0)
        lower, below = bound, count
    return lower


def evaluate(expr: str, snaps: list[Snapshot], i: int) -> float | None:
    shape, metric, sel, q = parse_query(expr)
    if shape == "quantile":
        per_le: dict[float, float] = {}
        for key, rate in _rates(snaps, i, metric + "_bucket", sel).items():
            le = float(dict(key)["le"])
            per_le[le] = per_le.get(le, 0.0) + rate
        return _quantile(q, per_le)
    if shape == "sum_rate":
        rates = _rates(snaps, i, metric, sel)
        return sum(rates.values()) if rates else None
    values = [v for samples in snaps[i]["workers"].values() for v in _values(samples, metric, sel).values()]
    if not values:
        return None
    return sum(values) if shape == "sum" else max(values)


def plot(recording: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    snaps: list[Snapshot] = json.loads(recording.read_text())["snapshots"]
    t0 = snaps[0]["t"]
    rows = (len(PANELS) + 1) // 2
    fig, axes = plt.subplots(rows, 2, figsize=(14, 3.2 * rows), constrained_layout=True)
    for ax, panel in zip(axes.flat, PANELS, strict=False):
        for legend, expr in panel.targets:
            xs, ys = [], []
            for i, snap in enumerate(snaps):
                value = evaluate(expr, snaps, i)
                if value is not None:
                    xs.append(snap["t"] - t0)
                    ys.append(value * 1000 if panel.unit == "s" else value)
            ax.plot(xs, ys, label=legend)
        ax.set_title(panel.title, fontsize=10)
        ax.set_ylabel("ms" if panel.unit == "s" else ("per s" if panel.unit == "ops" else ""))
        ax.set_xlabel("seconds into the run")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    for ax in list(axes.flat)[len(PANELS) :]:
        ax.set_visible(False)
    fig.suptitle(json.loads(recording.read_text()).get("title", "voxqueue"), fontsize=11)
    fig.savefig(out, dpi=80)


# ------------------------------------------------------------------------------ recording


def _scrape(port: int) -> list[Sample]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
        text = resp.read().decode()
    return [
        (s.name, dict(s.labels), float(s.value))
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("voxqueue_") and not s.name.endswith("_created")
    ]


def record(out: Path, sessions: int, seconds: float) -> None:
    from worker.redis_server import RedisServer, free_port

    cli = [sys.executable, "-m", "worker.cli"]
    with RedisServer() as redis:
        emu_port = free_port()
        env = dict(
            os.environ,
            VOXQUEUE_REDIS_URL=redis.url,
            VOXQUEUE_DEEPGRAM_URL=f"ws://127.0.0.1:{emu_port}",
            VOXQUEUE_LOG_LEVEL="warning",
            VOXQUEUE_LEASE_SECONDS="3",
        )
        procs: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
        devnull = subprocess.DEVNULL
        emulator = subprocess.Popen(
            [*cli, "emulator", "--port", str(emu_port)], env=env, stdout=devnull, stderr=devnull
        )

        def start(name: str) -> None:
            port = free_port()
            proc = subprocess.Popen(
                [*cli, "worker", "--name", name],
                env={**env, "VOXQUEUE_METRICS_PORT": str(port)},
                stdout=devnull,
                stderr=devnull,
            )
            procs[name] = (proc, port)

        try:
            start("worker-a")
            start("worker-b")
            time.sleep(3)
            snaps = asyncio.run(_run_load(redis.url, procs, start, sessions, seconds))
        finally:
            for proc, _ in procs.values():
                proc.kill()
                proc.wait(10)
            emulator.kill()
            emulator.wait(10)
    title = (
        f"recorded run: {sessions} live sessions at real time, 2 workers on a shared 2-core machine; "
        f"worker-a SIGKILLed at {seconds / 2:.0f} s, worker-c started"
    )
    out.write_text(json.dumps({"title": title, "snapshots": snaps}))


async def _run_load(
    url: str, procs: dict[str, Any], start: Any, sessions: int, seconds: float
) -> list[Snapshot]:
    import redis.asyncio as aioredis

    from producer.audio import marker_frame
    from producer.client import Producer

    client = aioredis.Redis.from_url(url)
    producer = Producer(client)
    snaps: list[Snapshot] = []
    t0 = time.monotonic()

    async def one(n: int) -> None:
        await asyncio.sleep(n * seconds / sessions / 3)  # staggered starts
        session = await producer.open_session()
        frames = int((seconds * 0.8 - n * seconds / sessions / 3) / 0.02)
        begin = time.monotonic()
        for seq in range(frames):
            delay = begin + seq * 0.02 - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await session.send_frame(marker_frame(seq, time.time_ns()), wait=False)
        await session.end()

    async def scraper() -> None:
        killed = False
        while time.monotonic() - t0 < seconds:
            snap: Snapshot = {"t": time.time(), "workers": {}}
            for name, (proc, port) in list(procs.items()):
                if proc.poll() is None:
                    with contextlib.suppress(OSError):  # killed between poll() and the scrape
                        snap["workers"][name] = await asyncio.to_thread(_scrape, port)
            snaps.append(snap)
            if not killed and time.monotonic() - t0 > seconds / 2:
                procs["worker-a"][0].send_signal(signal.SIGKILL)
                start("worker-c")
                killed = True
            await asyncio.sleep(1.0)

    try:
        await asyncio.gather(scraper(), *(one(n) for n in range(sessions)))
    finally:
        await producer.aclose()
        await client.aclose()
    return snaps


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m ops.grafana.plot")
    sub = parser.add_subparsers(dest="cmd", required=True)
    rec = sub.add_parser("record")
    rec.add_argument("out", type=Path)
    rec.add_argument("--sessions", type=int, default=40)
    rec.add_argument("--seconds", type=float, default=90.0)
    drw = sub.add_parser("plot")
    drw.add_argument("recording", type=Path)
    drw.add_argument("out", type=Path)
    args = parser.parse_args()
    if args.cmd == "record":
        record(args.out, args.sessions, args.seconds)
    else:
        plot(args.recording, args.out)


if __name__ == "__main__":
    main()
