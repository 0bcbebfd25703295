"""What the benchmark makes of its results, live or saved: the per-S table, the plots, comparisons
between runs, and the check that runs compared come from the same kind of machine.

Everything here works on the JSON the bench writes (ops/bench/__main__.py), so `--plot` and
`--compare` can redo it from saved files. CPU per frame depends on the processor far more than on
anything the code changes, so figures from two machines are never set side by side: the bench
refuses (`MachineMismatch`, exit code 3) instead.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

SUSTAIN_P99_MS = 50.0  # frame lag p99 a "sustained" run stays under (plus the worker's hold time)
FRAME_MS = 20


class MachineMismatch(Exception):
    """Results of different machines (CPU model or core count) were to be compared or plotted."""


class BadResults(Exception):
    """A results file the bench cannot read (not its JSON, or from a version without the data)."""


def machine() -> dict[str, Any]:
    """This machine: CPU model (/proc/cpuinfo "model name"), core count, Python, platform."""
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def check_same_machine(runs: list[tuple[str, dict[str, Any]]]) -> None:
    """Raise MachineMismatch unless every run names the same CPU model and core count (a run
    without that record is refused too: nothing says it is comparable)."""
    seen: dict[tuple[str, int], list[str]] = {}
    for name, report in runs:
        host = report.get("machine") if isinstance(report, dict) else None
        if not isinstance(host, dict) or not host.get("cpu") or not host.get("cores"):
            raise MachineMismatch(f"{name}: no CPU model and core count recorded; cannot compare it")
        seen.setdefault((str(host["cpu"]), int(host["cores"])), []).append(name)
    if len(seen) > 1:
        lines = [f"  {cpu}, {cores} cores: {', '.join(names)}" for (cpu, cores), names in seen.items()]
        raise MachineMismatch(
            "results from different machines are not comparable (CPU time per frame depends on the "
            "processor):\n" + "\n".join(lines)
        )


# ------------------------------------------------------------------------------- frames per message


def hold_ms(frames_per_message: int) -> int:
    """VOXQUEUE_SEND_INTERVAL_MS that makes the worker send about this many real-time frames per
    WebSocket message (it holds live frames this long): 0, the default, for one."""
    return 0 if frames_per_message <= 1 else FRAME_MS * frames_per_message


def worker_env_for(frames_per_message: int) -> dict[str, str]:
    held = hold_ms(frames_per_message)
    return {"VOXQUEUE_SEND_INTERVAL_MS": str(held)} if held else {}


def parse_frames_per_message(text: str) -> list[int]:
    values = [int(x) for x in text.split(",") if x.strip()]
    if not values or any(v < 1 or v > 12 for v in values) or len(set(values)) != len(values):
        raise ValueError("--frames-per-message takes distinct integers 1..12, e.g. 1,2,4")
    return values


def sustained(phase: dict[str, Any], pattern: str) -> bool:
    """Real time held: lag p99 under SUSTAIN_P99_MS (plus the time the worker holds frames on
    purpose), over 99 % of frames sent on schedule, and nothing piling up: for the pipeline a
    backlog of at most 2 frames per session at the end of the window, for direct every frame
    delivered."""
    allowed = SUSTAIN_P99_MS + hold_ms(int(phase.get("frames_per_message_setting") or 1))
    p99 = phase.get("lag_ms", {}).get("p99", math.nan)
    ok = p99 <= allowed and phase.get("on_time", 0.0) > 0.99
    if pattern == "pipeline":
        return bool(ok and phase.get("backlog_at_stop", 0) <= 2 * phase.get("sessions", 0))
    return bool(ok and phase.get("frames_delivered", 0) >= phase.get("frames_produced", 0))


# ------------------------------------------------------------------------------- per-S entries


def entries(report: dict[str, Any]) -> list[dict[str, Any]]:
    """A report as a list of per-S entries {sessions, pipeline: [phase per frames per message],
    direct: phase, pacing_us_per_frame}: a sweep has one per S, a single run one."""
    if not isinstance(report, dict):
        raise BadResults("not a bench results object")
    if "sweep" in report:
        sweep = report["sweep"]
        if not sweep or not isinstance(sweep[0], dict) or "direct" not in sweep[0]:
            raise BadResults(
                "this sweep has no direct results per S (written by an older bench): run it again"
            )
        return list(sweep)
    if "pipeline" in report and "direct" in report:
        return [
            {
                "sessions": report["pipeline"]["sessions"],
                "pipeline": report.get("pipelines") or [report["pipeline"]],
                "direct": report["direct"],
                "pacing_us_per_frame": report.get("pacing_us_per_frame", 0.0),
            }
        ]
    raise BadResults("neither a sweep nor a single run")


def ratios(entry: dict[str, Any]) -> dict[str, float]:
    """CPU per frame against the direct pattern's, measured in the same run."""
    direct = entry["direct"]["cpu_us_per_frame"]["direct"]
    pacing = entry.get("pacing_us_per_frame", 0.0)
    out: dict[str, float] = {}
    for phase in entry["pipeline"]:
        k = int(phase.get("frames_per_message_setting") or 1)
        cpu = phase["cpu_us_per_frame"]
        out[f"worker_vs_direct@{k}"] = _div(cpu["worker"], direct)
        out[f"producer_vs_direct@{k}"] = _div(cpu["producer"], direct)
        out[f"producer_vs_direct_net_of_pacing@{k}"] = _div(cpu["producer"] - pacing, direct - pacing)
    return out


def _div(a: float, b: float) -> float:
    return a / b if b > 0 else math.nan


def key_figures(report: dict[str, Any]) -> dict[str, float]:
    """Flat `figure name -> value`, for comparing two runs."""
    out: dict[str, float] = {}
    for entry in entries(report):
        s = entry["sessions"]
        direct = entry["direct"]
        out[f"S={s} direct CPU µs/frame"] = direct["cpu_us_per_frame"]["direct"]
        out[f"S={s} direct lag p99 ms"] = direct["lag_ms"].get("p99", math.nan)
        out[f"S={s} direct transcript p99 ms"] = direct.get("transcript_ms", {}).get("p99", math.nan)
        out[f"S={s} pacing CPU µs/frame"] = entry.get("pacing_us_per_frame", math.nan)
        r = ratios(entry)
        for phase in entry["pipeline"]:
            k = int(phase.get("frames_per_message_setting") or 1)
            tag = f"S={s} pipeline {k} f/msg"
            out[f"{tag} worker CPU µs/frame"] = phase["cpu_us_per_frame"]["worker"]
            out[f"{tag} producer CPU µs/frame"] = phase["cpu_us_per_frame"]["producer"]
            out[f"{tag} worker ÷ direct"] = r[f"worker_vs_direct@{k}"]
            out[f"{tag} producer ÷ direct, net of pacing"] = r[f"producer_vs_direct_net_of_pacing@{k}"]
            out[f"{tag} lag p99 ms"] = phase["lag_ms"].get("p99", math.nan)
            out[f"{tag} transcript p99 ms"] = phase.get("transcript_ms", {}).get("p99", math.nan)
    return out


def compare_rows(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(figure, old, new, new ÷ old) for every figure both runs have."""
    a, b = key_figures(old), key_figures(new)
    rows = []
    for name in a:
        if name in b:
            change = f"{b[name] / a[name]:.2f}×" if a[name] and not math.isnan(a[name]) else "—"
            rows.append((name, f"{a[name]:.2f}", f"{b[name]:.2f}", change))
    return rows


def print_rows(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = [
            str(c).rjust(w) if i else str(c).ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        print("  ".join(cells))


def sweep_rows(report: dict[str, Any]) -> list[tuple[str, ...]]:
    """One row per S and pattern: the sweep's table."""
    rows: list[tuple[str, ...]] = []
    for entry in entries(report):
        s = entry["sessions"]
        direct = entry["direct"]
        d_cpu = direct["cpu_us_per_frame"]["direct"]
        pacing = entry.get("pacing_us_per_frame", 0.0)
        r = ratios(entry)
        for phase in entry["pipeline"]:
            k = int(phase.get("frames_per_message_setting") or 1)
            cpu = phase["cpu_us_per_frame"]
            measured = phase.get("frames_per_message")
            rows.append(
                (
                    str(s),
                    f"pipeline, {k} f/msg",
                    f"{measured:.2f}" if measured else "—",
                    _fmt(phase["lag_ms"], ("p50", "p99")),
                    _fmt(phase.get("transcript_ms", {}), ("p99",)),
                    f"{cpu['worker']:.1f}",
                    f"{r[f'worker_vs_direct@{k}']:.2f}",
                    f"{cpu['producer']:.1f}",
                    f"{r[f'producer_vs_direct_net_of_pacing@{k}']:.2f}",
                    "yes" if sustained(phase, "pipeline") else "NO",
                )
            )
        rows.append(
            (
                str(s),
                "direct SDK",
                "1.00",
                _fmt(direct["lag_ms"], ("p50", "p99")),
                _fmt(direct.get("transcript_ms", {}), ("p99",)),
                "—",
                "1.00",
                f"{d_cpu:.1f} (pacing {pacing:.1f})",
                "1.00",
                "yes" if sustained(direct, "direct") else "NO",
            )
        )
    return rows


SWEEP_HEADER = (
    "S",
    "pattern",
    "frames/msg",
    "lag p50/p99 ms",
    "transcript p99 ms",
    "worker µs/f",
    "worker÷direct",
    "sender µs/f",
    "sender÷direct net",
    "sustained",
)


def _fmt(d: dict[str, float], keys: tuple[str, ...]) -> str:
    return " / ".join(f"{d.get(k, math.nan):.1f}" for k in keys)


# ------------------------------------------------------------------------------- plots


def plot_paths(stem: Path) -> dict[str, Path]:
    return {kind: stem.with_name(f"{stem.name}-{kind}.png") for kind in ("cpu", "lag", "sustained")}


def plot(runs: list[tuple[str, dict[str, Any]]], stem: Path) -> list[Path]:
    """Three PNGs against S: CPU per frame, frame lag p99, sessions sustained; pipeline (one
    curve per frames-per-message setting) and direct. Several runs are drawn over each other,
    labelled by name. Needs matplotlib (`pip install 'voxqueue[bench]'`)."""
    check_same_machine(runs)
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    series = _series(runs)
    host = runs[0][1]["machine"]
    subtitle = f"{host['cpu']}, {host['cores']} cores"
    paths = plot_paths(stem)
    styles = ["-", "--", ":", "-."]

    def lines(key: str, wanted: Callable[[str], bool], ylabel: str, title: str) -> Any:
        """One curve per run and label `wanted` keeps, of `key` against S; the figure, to finish."""
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, (run, curves) in enumerate(series.items()):
            ls = styles[i % len(styles)]
            for label, points in curves.items():
                if wanted(label):
                    xs, ys = _xy(points, key)
                    ax.plot(xs, ys, ls, marker="o", label=f"{label}{_run_label(run, series)}")
        ax.set(xlabel="sessions S", ylabel=ylabel, title=f"{title}\n{subtitle}")
        return fig, ax

    def save(fig: Any, ax: Any, path: Path) -> None:
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    fig, ax = lines(
        "cpu",
        lambda label: label.startswith(("worker", "producer", "direct")),
        "CPU µs per frame",
        "CPU per frame",
    )
    save(fig, ax, paths["cpu"])
    fig, ax = lines(
        "lag_p99",
        lambda label: label.startswith("pipeline") or label == "direct SDK",
        "frame lag p99 (ms)",
        "Frame lag p99",
    )
    ax.axhline(SUSTAIN_P99_MS, color="grey", lw=0.8, ls="--", label=f"{SUSTAIN_P99_MS:g} ms (1 f/msg limit)")
    save(fig, ax, paths["lag"])

    # Grouped bars, one group per S: a bar up to S where that pattern held real time, an "x" on
    # the axis where it did not (overlapping lines would hide each other).
    fig, ax = plt.subplots(figsize=(7, 4.5))
    every_s = sorted({p["sessions"] for curves in series.values() for pts in curves.values() for p in pts})
    bars = [
        (f"{label}{_run_label(run, series)}", points)
        for run, curves in series.items()
        for label, points in curves.items()
        if label.startswith("pipeline") or label == "direct SDK"
    ]
    width = 0.8 / max(1, len(bars))
    for i, (label, points) in enumerate(bars):
        by_s = {p["sessions"]: p for p in points}
        at = [j + (i - (len(bars) - 1) / 2) * width for j, s in enumerate(every_s) if s in by_s]
        heights = [s if by_s[s]["sustained"] else 0 for s in every_s if s in by_s]
        drawn = ax.bar(at, heights, width, label=label)
        missed = [x for x, h in zip(at, heights, strict=True) if h == 0]
        ax.plot(missed, [0] * len(missed), "x", color=drawn.patches[0].get_facecolor(), ms=8, mew=2)
    ax.set_xticks(range(len(every_s)), [str(s) for s in every_s])
    ax.set(
        xlabel="sessions S",
        ylabel="sessions sustained in real time",
        title=f"Sessions sustained (x: not sustained at that S)\n{subtitle}",
    )
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(paths["sustained"], dpi=110)
    plt.close(fig)
    return list(paths.values())


def _run_label(run: str, series: dict[str, Any]) -> str:
    return f" [{run}]" if len(series) > 1 else ""


def _series(runs: list[tuple[str, dict[str, Any]]]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """run name -> curve label -> points {sessions, cpu, lag_p99, sustained}, sorted by S."""
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for name, report in runs:
        curves: dict[str, list[dict[str, Any]]] = {}
        for entry in sorted(entries(report), key=lambda e: e["sessions"]):
            s = entry["sessions"]
            pacing = entry.get("pacing_us_per_frame", 0.0)
            direct = entry["direct"]
            d_cpu = direct["cpu_us_per_frame"]["direct"]
            d_point = {"sessions": s, "lag_p99": direct["lag_ms"].get("p99", math.nan)}
            d_point["sustained"] = sustained(direct, "direct")
            curves.setdefault("direct SDK", []).append({**d_point, "cpu": d_cpu})
            curves.setdefault("direct SDK, net of pacing", []).append({**d_point, "cpu": d_cpu - pacing})
            for phase in entry["pipeline"]:
                k = int(phase.get("frames_per_message_setting") or 1)
                cpu = phase["cpu_us_per_frame"]
                point = {
                    "sessions": s,
                    "lag_p99": phase["lag_ms"].get("p99", math.nan),
                    "sustained": sustained(phase, "pipeline"),
                }
                curves.setdefault(f"pipeline, {k} f/msg", []).append({**point, "cpu": math.nan})
                curves.setdefault(f"worker, {k} f/msg", []).append({**point, "cpu": cpu["worker"]})
                if k == int(entry["pipeline"][0].get("frames_per_message_setting") or 1):
                    # The producer does the same whatever the worker does: one curve.
                    curves.setdefault("producer", []).append({**point, "cpu": cpu["producer"]})
                    curves.setdefault("producer, net of pacing", []).append(
                        {**point, "cpu": cpu["producer"] - pacing}
                    )
        out[name] = curves
    return out


def _xy(points: list[dict[str, Any]], field: str) -> tuple[list[int], list[float]]:
    return [p["sessions"] for p in points], [p[field] for p in points]
