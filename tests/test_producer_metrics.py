"""The producer's optional Prometheus collector reads the batcher's real counters."""

from __future__ import annotations

import re

import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, generate_latest

from producer.audio import marker_frame
from producer.client import Producer
from producer.prometheus import register_producer_metrics


def value(text: str, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", text, re.M)
    assert match, f"{name} missing"
    return float(match.group(1))


async def test_producer_metrics_count_frames_and_round_trips(redis_client: aioredis.Redis) -> None:
    registry = CollectorRegistry()
    producer = Producer(redis_client)
    register_producer_metrics(producer, registry)
    try:
        session = await producer.open_session(sid="pm1")
        for n in range(40):
            await session.send_frame(marker_frame(n, 0), wait=False)
        await session.end()
        text = generate_latest(registry).decode()
        assert value(text, "voxqueue_producer_frames_total") == 40
        trips = value(text, "voxqueue_producer_redis_round_trips_total")
        assert 1 <= trips < 40  # batched: fewer round trips than frames
        assert trips == producer.stats.flushes
    finally:
        await producer.aclose()
