"""Prometheus metrics of a worker process (served when VOXQUEUE_METRICS_PORT is set)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.sessions_active = Gauge("voxqueue_sessions_active", "Sessions this worker owns", registry=r)
        self.sessions_claimed = Counter("voxqueue_sessions_claimed", "Sessions claimed", ["how"], registry=r)
        self.sessions_ended = Counter("voxqueue_sessions_ended", "Sessions ended", ["reason"], registry=r)
        self.sessions_lost = Counter("voxqueue_sessions_lost", "Sessions lost to another worker", registry=r)
        self.sessions_state_lost = Counter(
            "voxqueue_sessions_state_lost",
            "Sessions dropped: their state vanished from Redis (restart without persistence, eviction)",
            registry=r,
        )
        self.frames_sent = Counter("voxqueue_frames_sent", "Frames sent to Deepgram", registry=r)
        self.finals = Counter("voxqueue_finals_published", "Final transcripts published", registry=r)
        self.connections = Counter("voxqueue_deepgram_connections", "Deepgram connections opened", registry=r)
        self.reconnects = Counter("voxqueue_deepgram_reconnects", "Deepgram reconnects", registry=r)
        self.link_failures = Counter(
            "voxqueue_deepgram_failures", "Deepgram connection failures", ["code"], registry=r
        )
        self.commit_point_regressions = Counter(
            "voxqueue_commit_point_regressions",
            "Times Redis's commit point was behind ours (lost writes); the session replayed from it",
            registry=r,
        )
        self.bad_entries = Counter("voxqueue_bad_entries", "Producer entries rejected", ["code"], registry=r)

    def serve(self, port: int) -> None:
        start_http_server(port, addr="0.0.0.0", registry=self.registry)


METRICS = Metrics()
