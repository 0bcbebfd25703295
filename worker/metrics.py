"""Prometheus metrics of a worker process (served with /healthz and /readyz by worker/health.py when
VOXQUEUE_METRICS_PORT is set; docs/operations.md lists them and says what each one measures).

Per-frame cost stays negligible: histograms are observed once per WebSocket message or per event,
never per frame, and the gauges are sampled by the health monitor's periodic task.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Frame lag and claim delay include Redis's clock against the worker's (entry ids are Redis's
# milliseconds); small buckets for the live path, large ones for catch-up and backlogs.
LAG_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
CLAIM_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


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

        # Latencies (histograms: one observation per message or event, never per frame).
        self.frame_lag = Histogram(
            "voxqueue_frame_lag_seconds",
            "Producer's XADD (the audio entry id's milliseconds) to the WebSocket send of the newest "
            "frame in each message; includes catch-up after a takeover",
            registry=r,
            buckets=LAG_BUCKETS,
        )
        self.transcript_latency = Histogram(
            "voxqueue_transcript_latency_seconds",
            "Deepgram message received to its event written to Redis (readable by consumers)",
            ["type"],
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.claim_delay = Histogram(
            "voxqueue_claim_delay_seconds",
            "New sessions: the sessions entry's XADD (its id's milliseconds) to ACQUIRE by a worker",
            registry=r,
            buckets=CLAIM_BUCKETS,
        )
        self.takeover_gap = Histogram(
            "voxqueue_takeover_gap_seconds",
            "Taken-over sessions: age, when the new owner acquires it, of the first frame after the "
            "commit point (the oldest audio no final covers yet); an upper bound of the time the "
            "session stood still between its old owner's last commit and the takeover",
            registry=r,
            buckets=CLAIM_BUCKETS,
        )

        # Gauges, sampled by worker.health.Monitor.
        self.capacity = Gauge("voxqueue_capacity_sessions", "Sessions this worker may hold", registry=r)
        self.sessions_unclaimed = Gauge(
            "voxqueue_sessions_unclaimed",
            "Sessions entries no worker has read yet (the consumer group's lag), whole deployment",
            registry=r,
        )
        self.sessions_leased = Gauge(
            "voxqueue_sessions_leased",
            "Sessions entries pending in the consumer group (held or awaiting takeover), whole deployment",
            registry=r,
        )
        self.frames_unsent = Gauge(
            "voxqueue_frames_unsent",
            "Frames read from Redis and waiting to be sent, summed over this worker's sessions",
            registry=r,
        )
        self.frames_uncommitted = Gauge(
            "voxqueue_frames_uncommitted",
            "Frames sent to Deepgram that no final covers yet, summed over this worker's sessions",
            registry=r,
        )
        self.frames_uncommitted_max = Gauge(
            "voxqueue_session_frames_uncommitted_max",
            "The most frames sent and not yet covered by a final in any one session of this worker",
            registry=r,
        )
        self.loop_up = Gauge(
            "voxqueue_loop_up",
            "1 while a background loop runs, 0 while it restarts or died",
            ["loop"],
            registry=r,
        )
        self.loop_restarts = Counter(
            "voxqueue_loop_restarts", "Background loop restarts after an error", ["loop"], registry=r
        )
        self.redis_up = Gauge(
            "voxqueue_redis_up", "1 if the monitor's last PING of Redis succeeded", registry=r
        )


METRICS = Metrics()


def entry_age(entry_id: bytes | None, now: float) -> float | None:
    """Seconds from a stream entry's id (Redis's clock at XADD, in ms) to `now` (time.time()); None
    for no id. Clock skew between Redis and this host is included, so it may even be negative."""
    if not entry_id:
        return None
    ms, _, _ = entry_id.partition(b"-")
    try:
        return now - int(ms) / 1000.0
    except ValueError:
        return None
