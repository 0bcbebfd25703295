"""The producer's optional Prometheus collector reads the batcher's real counters."""

from __future__ import annotations

import asyncio
import re

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, generate_latest

from producer.audio import marker_frame
from producer.batcher import QueueFull
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


async def test_backpressure_waits_are_counted(redis_client: aioredis.Redis) -> None:
    """A send(wait=False) held back because more than max_pending_frames wait for Redis counts as
    a backpressure wait; with room in the queue it returns at once and counts nothing."""
    registry = CollectorRegistry()
    producer = Producer(redis_client, max_pending_frames=5)
    register_producer_metrics(producer, registry)
    try:
        session = await producer.open_session(sid="pm2")
        sends = [asyncio.ensure_future(session.send_frame(marker_frame(n, 0), wait=False)) for n in range(20)]
        await asyncio.gather(*sends)
        await session.end()
        waits = value(generate_latest(registry).decode(), "voxqueue_producer_backpressure_waits_total")
        assert waits == producer.stats.backpressure_waits > 0
    finally:
        await producer.aclose()
    relaxed = Producer(redis_client)
    try:
        session = await relaxed.open_session(sid="pm3")
        for n in range(20):
            await session.send_frame(marker_frame(n, 0), wait=False)
        await session.end()
        assert relaxed.stats.backpressure_waits == 0
    finally:
        await relaxed.aclose()


async def test_queue_full_and_outstanding_frames_are_exported(redis_client: aioredis.Redis) -> None:
    """send_nowait refusals (QueueFull) count, and the gauge shows the frames waiting for Redis."""
    registry = CollectorRegistry()
    producer = Producer(redis_client, max_pending_frames=2)
    register_producer_metrics(producer, registry)
    try:
        session = await producer.open_session(sid="pm4")
        session.send_nowait(marker_frame(0, 0))
        session.send_nowait(marker_frame(1, 0))
        with pytest.raises(QueueFull):
            session.send_nowait(marker_frame(2, 0))
        text = generate_latest(registry).decode()
        assert value(text, "voxqueue_producer_queue_full_total") == 1
        assert value(text, "voxqueue_producer_outstanding_frames") == 2
        await session.end()
        assert value(generate_latest(registry).decode(), "voxqueue_producer_outstanding_frames") == 0
    finally:
        await producer.aclose()
