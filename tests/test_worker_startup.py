"""A worker that cannot reach Redis at start-up says where and why, and stops on the first SIGTERM.

Real worker processes, pointed at a port where nothing listens (connection refused) or at a socket
that accepts connections and never answers (a command that never returns): the start-up retry loop
must name the masked address and the error, never the password, and a SIGTERM must end the process
promptly with exit status 0 in both cases.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.harness import reap
from worker.redis_server import free_port

# Awkward but valid for redis-py: '@', ':' and a space are read as part of the password.
PASSWORD = "pW@ss w0rd:Qz"
FRAGMENTS = ("pW@ss", "ss w0rd", "w0rd:Qz", "Qz")
START_SECONDS = 20.0  # interpreter start and imports on a loaded 2-core machine
STOP_SECONDS = 5.0  # SIGTERM to exit: the start-up has nothing to drain


StartWorker = Callable[[int], tuple[subprocess.Popen[bytes], Path, str]]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOXQUEUE_") and k != "DEEPGRAM_API_KEY"}
    env.update(
        VOXQUEUE_DEEPGRAM_URL="ws://127.0.0.1:1",  # never reached: the worker stops before any session
        VOXQUEUE_LOG_FORMAT="json",
        VOXQUEUE_LOG_LEVEL="info",
    )
    return env


def _lines(path: Path) -> list[dict]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _wait_for(path: Path, event: str, count: int, proc: subprocess.Popen[bytes]) -> list[dict]:
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        found = [line for line in _lines(path) if line.get("event") == event]
        if len(found) >= count:
            return found
        assert proc.poll() is None, f"worker exited early:\n{path.read_text(errors='replace')}"
        time.sleep(0.05)
    raise AssertionError(
        f"no {count}x {event!r} within {START_SECONDS} s:\n{path.read_text(errors='replace')}"
    )


def _stop_and_time(proc: subprocess.Popen[bytes]) -> float:
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(STOP_SECONDS)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"worker still running {STOP_SECONDS} s after SIGTERM") from None
    assert code == 0
    return time.monotonic() - sent


@pytest.fixture
def worker_at(tmp_path: Path) -> Iterator[StartWorker]:
    procs: list[subprocess.Popen[bytes]] = []
    handles = []

    def start(port: int) -> tuple[subprocess.Popen[bytes], Path, str]:
        url = f"redis://u:{PASSWORD}@127.0.0.1:{port}/0"
        log = tmp_path / f"worker-{port}.log"
        handle = log.open("wb")
        handles.append(handle)
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "worker", "--name", "w1", "--redis-url", url],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=_env(),
        )
        procs.append(proc)
        return proc, log, url

    try:
        yield start
    finally:
        for proc in procs:
            reap(proc)
        for handle in handles:
            handle.close()


def _assert_no_password(text: str) -> None:
    for fragment in (PASSWORD, *FRAGMENTS):
        assert fragment not in text, f"{fragment!r} leaked:\n{text}"


def test_unreachable_redis_is_named_masked_and_sigterm_stops_the_start_up(worker_at: StartWorker) -> None:
    port = free_port()  # nothing listens there: connection refused, again and again
    proc, log, _url = worker_at(port)
    warnings = _wait_for(log, "redis unreachable at start-up, retrying", 2, proc)

    first = warnings[0]
    assert first["redis"] == f"redis://u:***@127.0.0.1:{port}/0"
    assert first["error"].startswith("ConnectionError: ")
    assert f"127.0.0.1:{port}" in first["error"]  # the library's message, not just a type name
    assert first["retry_in"] > 0

    took = _stop_and_time(proc)
    text = log.read_text(errors="replace")
    _assert_no_password(text)
    events = [line.get("event") for line in _lines(log)]
    assert "signal received during start-up: stopping" in events
    assert events[-1] == "worker stopped during start-up"
    print(f"SIGTERM to exit while retrying: {took:.2f} s")


def test_sigterm_stops_a_start_up_stuck_on_a_redis_that_never_answers(worker_at: StartWorker) -> None:
    # A server that accepts and reads but never answers: the worker's first command waits for a
    # reply that never comes, and no retry warning is ever due. Only the signal can end that wait.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        silent.settimeout(START_SECONDS)
        port = silent.getsockname()[1]
        proc, log, _url = worker_at(port)
        conn, _ = silent.accept()
        with conn:
            conn.settimeout(START_SECONDS)
            assert conn.recv(4096)  # a command has been sent: the worker now waits for its reply
            took = _stop_and_time(proc)
    _assert_no_password(log.read_text(errors="replace"))
    events = [line.get("event") for line in _lines(log)]
    assert events[-1] == "worker stopped during start-up"
    print(f"SIGTERM to exit with a command in flight: {took:.2f} s")
