"""Shared fixtures: real redis-server processes on free ports (never 6379, never fakeredis).

Also a watchdog that keeps the suite from ever hanging. pytest-timeout's timer fires once per
test: after it has failed a test, a teardown that then hangs (an async fixture waiting for a
worker, pytest-asyncio's loop teardown gathering a task that swallows its cancellation) is not
bounded by anything. The watchdog is faulthandler's C-level timer, armed for every test's whole
protocol (setup, call, teardown) a grace period past its timeout: it dumps every thread's stack to
the real stderr and exits the process, which no Python code can swallow.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.harness import bounded
from worker.redis_server import RedisServer

WATCHDOG_GRACE_SECONDS = 60.0
WATCHDOG_DEFAULT_SECONDS = 600.0  # tests with no timeout at all
_watchdog_fd: int | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _watchdog_fd
    # Captured output never reaches the terminal if the process exits: write to a copy of the
    # stderr that pytest started with (capture is suspended while plugins are configured).
    with contextlib.suppress(OSError, ValueError):
        _watchdog_fd = os.dup(2)


def watchdog_seconds(item: pytest.Item) -> float:
    marker = item.get_closest_marker("timeout")
    raw: Any = marker.args[0] if marker and marker.args else item.config.getini("timeout")
    try:
        timeout = float(raw)
    except (TypeError, ValueError):
        timeout = 0.0
    return (timeout if timeout > 0 else WATCHDOG_DEFAULT_SECONDS) + WATCHDOG_GRACE_SECONDS


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[object]:
    if _watchdog_fd is not None:
        faulthandler.dump_traceback_later(watchdog_seconds(item), exit=True, file=_watchdog_fd)
    try:
        return (yield)
    finally:
        faulthandler.cancel_dump_traceback_later()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer(appendonly=True).start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        yield client
    finally:
        await bounded(client.aclose(), 5, "closing the redis client")
