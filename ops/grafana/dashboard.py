"""The Grafana dashboard over the worker's metrics (worker/metrics.py), as data.

PANELS is the single source: `python -m ops.grafana.dashboard` writes ops/grafana/voxqueue.json
(provisioned by the compose `monitoring` profile), and ops/grafana/plot.py draws the same panels
from a recorded run. tests/test_ops_files.py checks that the JSON is current and that every query
names a metric the worker exports.

Every worker reports the deployment-wide backlog gauges (unclaimed, leased): those panels take
max(), not sum().
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

JSON_PATH = Path(__file__).with_name("voxqueue.json")
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}
W = "1m"  # rate window


def quantile(q: float, metric: str, extra: str = "") -> str:
    return f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket{extra}[{W}])))"


@dataclass(frozen=True)
class Panel:
    title: str
    unit: str  # Grafana unit id
    targets: tuple[tuple[str, str], ...]  # (legend, PromQL)
    description: str = ""


PANELS: tuple[Panel, ...] = (
    Panel(
        "Frame lag (producer XADD to send)",
        "s",
        (
            ("p50", quantile(0.5, "voxqueue_frame_lag_seconds")),
            ("p99", quantile(0.99, "voxqueue_frame_lag_seconds")),
        ),
        "Entry id milliseconds (Redis's clock at XADD) to the WebSocket send, newest frame per message.",
    ),
    Panel(
        "Transcript latency (Deepgram reply to event in Redis)",
        "s",
        (
            ("final p50", quantile(0.5, "voxqueue_transcript_latency_seconds", '{type="final"}')),
            ("final p99", quantile(0.99, "voxqueue_transcript_latency_seconds", '{type="final"}')),
        ),
    ),
    Panel(
        "Claim delay and takeover gap (p99)",
        "s",
        (
            ("claim delay", quantile(0.99, "voxqueue_claim_delay_seconds")),
            ("takeover gap", quantile(0.99, "voxqueue_takeover_gap_seconds")),
        ),
        "Claim delay: sessions entry XADD to ACQUIRE. Takeover gap: age of the oldest uncommitted "
        "frame when a new owner acquires the session.",
    ),
    Panel(
        "Sessions held and capacity",
        "short",
        (
            ("held", "sum(voxqueue_sessions_active)"),
            ("capacity", "sum(voxqueue_capacity_sessions)"),
        ),
    ),
    Panel(
        "Unclaimed and leased sessions",
        "short",
        (
            ("unclaimed", "max(voxqueue_sessions_unclaimed)"),
            ("leased", "max(voxqueue_sessions_leased)"),
        ),
        "Unclaimed: never read by a worker (the consumer group's lag). Leased: held or awaiting takeover.",
    ),
    Panel(
        "Frames not yet sent / not yet covered by a final",
        "short",
        (
            ("unsent", "sum(voxqueue_frames_unsent)"),
            ("uncommitted", "sum(voxqueue_frames_uncommitted)"),
            ("uncommitted, worst session", "max(voxqueue_session_frames_uncommitted_max)"),
        ),
    ),
    Panel(
        "Throughput",
        "ops",
        (
            ("frames sent/s", f"sum(rate(voxqueue_frames_sent_total[{W}]))"),
            ("finals/s", f"sum(rate(voxqueue_finals_published_total[{W}]))"),
        ),
    ),
    Panel(
        "Trouble",
        "ops",
        (
            ("deepgram failures/s", f"sum(rate(voxqueue_deepgram_failures_total[{W}]))"),
            ("reconnects/s", f"sum(rate(voxqueue_deepgram_reconnects_total[{W}]))"),
            ("takeovers/s", f'sum(rate(voxqueue_sessions_claimed_total{{how="takeover"}}[{W}]))'),
            ("bad entries/s", f"sum(rate(voxqueue_bad_entries_total[{W}]))"),
            ("loop restarts/s", f"sum(rate(voxqueue_loop_restarts_total[{W}]))"),
        ),
    ),
)


def dashboard() -> dict[str, Any]:
    panels = []
    for n, panel in enumerate(PANELS):
        panels.append(
            {
                "id": n + 1,
                "type": "timeseries",
                "title": panel.title,
                "description": panel.description,
                "datasource": DATASOURCE,
                "gridPos": {"h": 8, "w": 12, "x": (n % 2) * 12, "y": (n // 2) * 8},
                "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
                "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
                "targets": [
                    {
                        "refId": chr(ord("A") + i),
                        "datasource": DATASOURCE,
                        "expr": expr,
                        "legendFormat": legend,
                    }
                    for i, (legend, expr) in enumerate(panel.targets)
                ],
            }
        )
    return {
        "uid": "voxqueue",
        "title": "voxqueue",
        "tags": ["voxqueue"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    JSON_PATH.write_text(render())
    sys.stdout.write(f"wrote {JSON_PATH}\n")
