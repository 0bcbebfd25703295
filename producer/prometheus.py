"""Optional Prometheus metrics of a producer: register_producer_metrics(producer, registry).

prometheus-client is imported only when this is called, so the producer library itself never pays
for it. The collector reads the batcher's counters (producer.batcher.BatcherStats) at scrape time:
nothing is added to the send path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

    from producer.batcher import BatcherStats

# BatcherStats field -> (metric name, help). Counters get `_total` from prometheus-client.
COUNTERS = {
    "flushes": ("voxqueue_producer_redis_round_trips", "Pipelines sent to Redis (round trips)"),
    "commands": ("voxqueue_producer_commands", "XADDs stored (frames, end markers, session entries)"),
    "frames": ("voxqueue_producer_frames", "Audio frames stored"),
    "bytes": ("voxqueue_producer_audio_bytes", "Audio payload bytes stored"),
    "expires": ("voxqueue_producer_expires", "Audio TTLs set or refreshed"),
    "errors": ("voxqueue_producer_errors", "Flushes that failed or commands Redis refused"),
    "retries": ("voxqueue_producer_retries", "Flushes retried after a connection failure"),
    "backpressure_waits": (
        "voxqueue_producer_backpressure_waits",
        "Sends without wait that waited anyway because Redis fell behind (max_pending_frames)",
    ),
    "queue_full": (
        "voxqueue_producer_queue_full",
        "send_nowait calls refused with QueueFull because Redis fell behind (max_pending_frames)",
    ),
}


def register_producer_metrics(
    source: Any | Callable[[], BatcherStats], registry: CollectorRegistry | None = None
) -> Any:
    """Registers a collector for a Producer (anything with `.stats`) or a callable returning
    BatcherStats, on `registry` (default: prometheus-client's global one). Returns the collector
    (pass it to registry.unregister to remove it)."""
    from prometheus_client import REGISTRY
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    from prometheus_client.registry import Collector

    read: Callable[[], BatcherStats] = source if callable(source) else (lambda: source.stats)

    class ProducerCollector(Collector):
        def collect(self) -> Iterator[Any]:
            stats = read()
            for field, (name, text) in COUNTERS.items():
                yield CounterMetricFamily(name, text, value=getattr(stats, field))
            yield GaugeMetricFamily(
                "voxqueue_producer_max_batch", "Most commands in one pipeline so far", value=stats.max_batch
            )
            if not callable(source) and hasattr(source, "outstanding_frames"):
                yield GaugeMetricFamily(
                    "voxqueue_producer_outstanding_frames",
                    "Frames queued or not yet acknowledged by Redis (send_nowait raises QueueFull "
                    "past max_pending_frames)",
                    value=source.outstanding_frames,
                )

    collector = ProducerCollector()
    (registry or REGISTRY).register(collector)
    return collector
