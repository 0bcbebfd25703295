"""ops/bench's reporting on tiny synthetic results: the sweep table and ratios, the PNG plots, and
the refusal to compare or plot results of different machines. No load is run."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from ops.bench import __main__ as bench_main
from ops.bench import report as rep

HOST = {"cpu": "Test CPU 9000", "cores": 2, "python": "3.11.7", "platform": "Linux"}


def _phase(sessions: int, fpm: int, *, worker: float, producer: float, lag_p99: float) -> dict[str, Any]:
    return {
        "name": "pipeline",
        "sessions": sessions,
        "seconds": 10.0,
        "frames_produced": sessions * 500,
        "frames_delivered": sessions * 500,
        "backlog_at_stop": 1,
        "on_time": 1.0,
        "lag_ms": {"p50": lag_p99 / 2, "p99": lag_p99, "max": lag_p99 + 5},
        "transcript_ms": {"count": 10, "p50": 2.0, "p99": 5.0, "max": 6.0},
        "cpu_us_per_frame": {"worker": worker, "producer": producer},
        "frames_per_message_setting": fpm,
        "frames_per_message": float(fpm),
    }


def _direct(sessions: int, cpu: float, lag_p99: float = 3.0) -> dict[str, Any]:
    return {
        "name": "direct",
        "sessions": sessions,
        "seconds": 10.0,
        "frames_produced": sessions * 500,
        "frames_delivered": sessions * 500,
        "backlog_at_stop": 0,
        "on_time": 1.0,
        "lag_ms": {"p50": 0.2, "p99": lag_p99, "max": 9.0},
        "transcript_ms": {"count": 10, "p50": 3.0, "p99": 9.0, "max": 11.0},
        "cpu_us_per_frame": {"direct": cpu},
        "frames_per_message_setting": 1,
        "frames_per_message": 1.0,
    }


def sweep_report(host: dict[str, Any] = HOST) -> dict[str, Any]:
    return {
        "machine": dict(host),
        "sweep": [
            {
                "sessions": 50,
                "pipeline": [
                    _phase(50, 1, worker=50.0, producer=22.0, lag_p99=15.0),
                    _phase(50, 2, worker=40.0, producer=22.0, lag_p99=60.0),  # held 40 ms: fine
                ],
                "direct": _direct(50, 45.0),
                "pacing_us_per_frame": 15.0,
            },
            {
                "sessions": 200,
                "pipeline": [
                    _phase(200, 1, worker=40.0, producer=12.0, lag_p99=70.0),  # over 50 ms: not held
                    _phase(200, 2, worker=30.0, producer=12.0, lag_p99=80.0),
                ],
                "direct": _direct(200, 31.0, lag_p99=12.0),
                "pacing_us_per_frame": 7.0,
            },
        ],
    }


def test_ratios_rows_and_sustained() -> None:
    report = sweep_report()
    first = rep.entries(report)[0]
    r = rep.ratios(first)
    assert r["producer_vs_direct_net_of_pacing@1"] == pytest.approx((22 - 15) / (45 - 15))
    assert r["worker_vs_direct@2"] == pytest.approx(40 / 45)
    rows = rep.sweep_rows(report)
    assert len(rows) == 6  # per S: two pipeline settings and direct
    assert [row[-1] for row in rows] == ["yes", "yes", "yes", "NO", "yes", "yes"]
    figures = rep.key_figures(report)
    assert figures["S=200 pipeline 2 f/msg worker ÷ direct"] == pytest.approx(30 / 31)
    assert figures["S=50 direct transcript p99 ms"] == 9.0
    assert rep.hold_ms(1) == 0 and rep.worker_env_for(4) == {"VOXQUEUE_SEND_INTERVAL_MS": "80"}


def test_single_run_reads_as_one_entry() -> None:
    entry = sweep_report()["sweep"][0]
    single = {
        "machine": HOST,
        "pipeline": entry["pipeline"][0],
        "pipelines": entry["pipeline"],
        "direct": entry["direct"],
        "pacing_us_per_frame": 15.0,
    }
    (only,) = rep.entries(single)
    assert only["sessions"] == 50 and len(only["pipeline"]) == 2


def test_plots_of_a_sweep_and_of_two_runs_drawn_over_each_other(tmp_path: Path) -> None:
    paths = rep.plot([("run", sweep_report())], tmp_path / "run")
    assert sorted(p.name for p in paths) == ["run-cpu.png", "run-lag.png", "run-sustained.png"]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    later = copy.deepcopy(sweep_report())
    later["sweep"][0]["pipeline"][0]["cpu_us_per_frame"]["producer"] = 18.0
    both = rep.plot([("before", sweep_report()), ("after", later)], tmp_path / "before-vs-after")
    assert all(p.exists() and p.stat().st_size > 1000 for p in both)


def test_results_of_different_machines_are_refused(tmp_path: Path) -> None:
    other = sweep_report({**HOST, "cpu": "Other CPU 1"})
    with pytest.raises(rep.MachineMismatch, match="Other CPU 1"):
        rep.check_same_machine([("a", sweep_report()), ("b", other)])
    with pytest.raises(rep.MachineMismatch, match="cores"):
        rep.check_same_machine([("a", sweep_report()), ("b", sweep_report({**HOST, "cores": 8}))])
    with pytest.raises(rep.MachineMismatch, match="no CPU model"):
        rep.check_same_machine([("a", sweep_report()), ("b", {"sweep": []})])
    with pytest.raises(rep.MachineMismatch):
        rep.plot([("a", sweep_report()), ("b", other)], tmp_path / "x")
    assert not list(tmp_path.glob("*.png"))


def _cli(monkeypatch: pytest.MonkeyPatch, *argv: str) -> int:
    monkeypatch.setattr(sys, "argv", ["python -m ops.bench", *argv])
    with pytest.raises(SystemExit) as exit_info:
        bench_main.main()
    return int(exit_info.value.code or 0)


def test_cli_exit_codes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    here = tmp_path / "here.json"
    here.write_text(json.dumps(sweep_report(rep.machine())))
    same = tmp_path / "same.json"
    same.write_text(json.dumps(sweep_report(rep.machine())))
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text(json.dumps(sweep_report({**HOST, "cpu": "Elsewhere CPU"})))
    old_format = tmp_path / "old.json"
    old_format.write_text(json.dumps({"machine": HOST, "sweep": [{"sessions": 300, "lag_ms": {}}]}))

    assert _cli(monkeypatch, "--compare", str(here), str(same)) == 0
    assert "new ÷ old" in capsys.readouterr().out
    assert _cli(monkeypatch, "--compare", str(here), str(elsewhere)) == bench_main.EXIT_MACHINE_MISMATCH
    assert "different machines" in capsys.readouterr().err
    assert _cli(monkeypatch, "--plot", str(here), str(elsewhere)) == bench_main.EXIT_MACHINE_MISMATCH
    # Before a run: refused at once, nothing started (a run would take minutes and need Redis).
    assert (
        _cli(monkeypatch, "--compare", str(elsewhere), "--sessions", "1") == bench_main.EXIT_MACHINE_MISMATCH
    )
    assert "this machine" in capsys.readouterr().err
    assert _cli(monkeypatch, "--plot", str(old_format)) == bench_main.EXIT_BAD_RESULTS
    assert "older bench" in capsys.readouterr().err
    assert _cli(monkeypatch, "--plot", str(here)) == 0
    assert (tmp_path / "here-lag.png").exists()
