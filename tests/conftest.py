"""Shared fixtures: real redis-server processes on free ports (never 6379, never fakeredis).

Also a watchdog that keeps the suite from ever hanging. pytest-timeout's timer fires once per
test: after it has failed a test, a teardown that then hangs (an async fixture waiting for a
worker, pytest-asyncio's loop teardown gathering a task that swallows its cancellation) is not
bounded by anything. The watchdog is faulthandler's C-level timer, armed for each phase of every test
(setup, call, teardown) a grace period past its timeout: it dumps every thread's stack to
the real stderr and exits the process, which no Python code can swallow.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.harness import bounded
from worker.redis_server import RedisCluster, RedisServer

# Past the test's own timeout; VOXQUEUE_TEST_WATCHDOG_GRACE overrides it (the watchdog's own test).
WATCHDOG_GRACE_SECONDS = float(os.environ.get("VOXQUEUE_TEST_WATCHDOG_GRACE", "60"))
WATCHDOG_DEFAULT_SECONDS = 600.0  # tests with no timeout at all
WATCHDOG_BACKSTOP_SECONDS = 30.0  # faulthandler's own timer, should no Python thread run any more
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


def _armed(item: pytest.Item, phase: str) -> Iterator[None]:
    """A watchdog over one phase of one test. A Python timer thread ends the run first, naming the
    test and phase at the very end of the output (CI logs are often read from their tail, where a
    bare stack dump would not say which test hung); faulthandler's C-level timer is the backstop for
    a process where no Python thread can run any more."""
    seconds = watchdog_seconds(item)
    timer: threading.Timer | None = None
    if _watchdog_fd is not None:
        timer = threading.Timer(seconds, _end_the_run, args=(item.nodeid, phase, seconds))
        timer.daemon = True
        timer.start()
        faulthandler.dump_traceback_later(seconds + WATCHDOG_BACKSTOP_SECONDS, exit=True, file=_watchdog_fd)
    try:
        yield
    finally:
        if timer is not None:
            timer.cancel()
        faulthandler.cancel_dump_traceback_later()


def _end_the_run(nodeid: str, phase: str, seconds: float) -> None:
    fd = _watchdog_fd
    if fd is None:
        return
    line = f"watchdog: {nodeid} ({phase}) still running after {seconds:.0f} s; the run is ended\n"
    with contextlib.suppress(OSError):
        os.write(fd, ("\n" + line + "every thread's stack, most recent call first:\n").encode())
        faulthandler.dump_traceback(file=fd, all_threads=True)
        os.write(fd, line.encode())
    os._exit(1)


# Armed afresh for each phase: pytest cancels faulthandler's timer whenever a test fails
# (pytest_exception_interact), so one timer over the whole protocol would be gone by teardown.
@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    with contextlib.contextmanager(_armed)(item, "setup"):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    with contextlib.contextmanager(_armed)(item, "call"):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    with contextlib.contextmanager(_armed)(item, "teardown"):
        return (yield)


# Knobs of the test suite itself, kept: everything else VOXQUEUE_* configures the code under test.
_SUITE_VARIABLES = ("VOXQUEUE_KEEP_REDIS", "VOXQUEUE_TEST_")


@pytest.fixture(autouse=True)
def _clean_voxqueue_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests start from no configuration: a VOXQUEUE_NAMESPACE (or any VOXQUEUE_* setting, or a
    DEEPGRAM_API_KEY) exported in the developer's shell must not change what a test runs against.
    Child processes inherit os.environ (harness.Stack, redis_server.child_env), so they start
    clean too."""
    for name in list(os.environ):
        if name == "DEEPGRAM_API_KEY" or (
            name.startswith("VOXQUEUE_") and not name.startswith(_SUITE_VARIABLES)
        ):
            monkeypatch.delenv(name)


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


@pytest.fixture
def redis_cluster() -> Iterator[RedisCluster]:
    """A real 3-master Redis Cluster on free ports below 55536 (bus ports + 10000)."""
    with RedisCluster(masters=3) as cluster:
        yield cluster


@pytest.fixture
def redis_cluster_replicated() -> Iterator[RedisCluster]:
    """3 masters with one replica each and a 1 s node timeout: for failover tests."""
    with RedisCluster(masters=3, replicas=1, node_timeout_ms=1000) as cluster:
        yield cluster
