"""Health of a worker process: /healthz, /readyz and /metrics on the metrics port, and the monitor
loop that samples what they report.

The HTTP server runs IN the worker's event loop (asyncio.start_server), on purpose: a probe is
answered only if the loop is free to answer it, so an event loop blocked by a bug (a synchronous
call, a runaway computation) fails /healthz by timing out, which a server in its own thread would
never notice. Nothing in a handler awaits Redis: /readyz reads the monitor's cached PING result.

  /healthz  200 when the event loop answers, every background loop is running (or restarting
            within its failure budget, see WorkerPool._supervised) and the monitor ticked
            recently (timers fire). 503 otherwise. Liveness: a restart is the cure.
  /readyz   200 when Redis answered a PING within READY_REDIS_SECONDS, the worker is not draining
            and holds fewer sessions than its concurrency. 503 otherwise. Readiness: nothing to
            restart, but no reason to count this worker as able to take work.
  /metrics  Prometheus text exposition of worker.metrics.METRICS.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import TYPE_CHECKING, Any, cast

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import ResponseError

from producer import protocol as p
from worker.metrics import METRICS
from worker.store import TRANSIENT_REDIS_ERRORS

if TYPE_CHECKING:
    from worker.pool import WorkerPool

log = structlog.get_logger("voxqueue.health")

MONITOR_SECONDS = 1.0  # PING and local gauges
BACKLOG_EVERY = 5  # monitor ticks between two samples of the sessions streams' consumer groups
PING_TIMEOUT_SECONDS = 1.0
READY_REDIS_SECONDS = 3.0  # a PING older than this: Redis counts as unreachable
MONITOR_STALE_SECONDS = 10.0  # no monitor tick this long: timers do not fire, /healthz fails
REQUEST_TIMEOUT_SECONDS = 5.0  # a client that sends no request line in time is dropped
MAX_REQUEST_BYTES = 8192


class Monitor:
    """Samples what the probes and gauges report; one cheap periodic task per worker. Redis
    errors are expected here (that is what it measures) and never end the loop."""

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool
        self.redis_ok_at: float | None = None
        self.redis_error = ""
        self.ticked_at: float | None = None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        tick = 0
        while True:
            await self._ping()
            self.sample_local()
            if tick % BACKLOG_EVERY == 0:
                # A gauge left stale is all a failed sample costs (the claim loops report a
                # sessions key of the wrong type themselves).
                with contextlib.suppress(*TRANSIENT_REDIS_ERRORS, ResponseError, TimeoutError):
                    async with asyncio.timeout(PING_TIMEOUT_SECONDS * 2):
                        await self.sample_backlog()
            tick += 1
            self.ticked_at = loop.time()
            await asyncio.sleep(MONITOR_SECONDS)

    async def _ping(self) -> None:
        try:
            async with asyncio.timeout(PING_TIMEOUT_SECONDS):
                await self.pool.redis.ping()
        except (*TRANSIENT_REDIS_ERRORS, TimeoutError) as exc:
            self.redis_error = type(exc).__name__
            METRICS.redis_up.set(0)
            return
        self.redis_ok_at = asyncio.get_running_loop().time()
        self.redis_error = ""
        METRICS.redis_up.set(1)

    def sample_local(self) -> None:
        pool = self.pool
        METRICS.capacity.set(pool.settings.concurrency)
        METRICS.sessions_active.set(len(pool.owned))
        unsent = uncommitted = most = 0
        for owned in list(pool.owned.values()):
            runner = owned.runner
            unsent += len(runner.inbox.entries)
            pending = runner.machine.ledger.pending_frames
            uncommitted += pending
            most = max(most, pending)
        METRICS.frames_unsent.set(unsent)
        METRICS.frames_uncommitted.set(uncommitted)
        METRICS.frames_uncommitted_max.set(most)

    async def sample_backlog(self) -> None:
        """XINFO GROUPS per partition: `lag` = entries never delivered to any worker (Redis >= 7.0),
        `pending` = entries leased. Every worker reports the same deployment-wide figures: take
        max() over workers in queries, not sum()."""
        unclaimed = leased = 0
        for key in self.pool.keys.all_sessions():
            groups = cast(list[dict[Any, Any]], await self.pool.redis.xinfo_groups(key))
            for group in groups:
                if _text(group.get("name", b"")) != p.WORKERS_GROUP:
                    continue
                unclaimed += int(group.get("lag") or 0)
                leased += int(group.get("pending") or 0)
        METRICS.sessions_unclaimed.set(unclaimed)
        METRICS.sessions_leased.set(leased)

    # ------------------------------------------------------------------------------ verdicts

    def liveness(self) -> tuple[bool, dict[str, Any]]:
        now = asyncio.get_running_loop().time()
        loops = dict(self.pool.loop_state)
        dead = [name for name, state in loops.items() if state in ("dead", "stopped")]
        stale = self.ticked_at is not None and now - self.ticked_at > MONITOR_STALE_SECONDS
        ok = not dead and not stale
        return ok, {"ok": ok, "loops": loops, "monitor_stale": stale}

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        pool = self.pool
        now = asyncio.get_running_loop().time()
        redis_ok = self.redis_ok_at is not None and now - self.redis_ok_at <= READY_REDIS_SECONDS
        draining = pool.stop_requested.is_set() or not pool.claiming
        full = len(pool.owned) >= pool.settings.concurrency
        live, _ = self.liveness()
        ok = redis_ok and not draining and not full and live
        return ok, {
            "ok": ok,
            "redis": redis_ok,
            "redis_error": self.redis_error or None,
            "draining": draining,
            "sessions": len(pool.owned),
            "capacity": pool.settings.concurrency,
            "live": live,
        }


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class HealthServer:
    """A minimal HTTP/1.0 server for three GET paths, in the worker's event loop (see above)."""

    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor
        self.server: asyncio.Server | None = None

    async def start(self, port: int, host: str = "0.0.0.0") -> int:
        self.server = await asyncio.start_server(self._serve, host, port)
        return int(self.server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_SECONDS):
                head = await reader.readuntil(b"\r\n\r\n")
            status, ctype, body = self.respond(head[:MAX_REQUEST_BYTES])
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            writer.close()
            return
        except Exception as exc:  # a probe must never take anything down
            log.error("health request failed", error=repr(exc)[:300])
            status, ctype, body = "500 Internal Server Error", "text/plain", b"error\n"
        try:
            writer.write(
                f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode()
                + body
            )
            async with asyncio.timeout(REQUEST_TIMEOUT_SECONDS):
                await writer.drain()
        except (ConnectionError, TimeoutError):
            pass
        finally:
            writer.close()

    def respond(self, head: bytes) -> tuple[str, str, bytes]:
        parts = head.split(b"\r\n", 1)[0].split()
        if len(parts) < 2 or parts[0] not in (b"GET", b"HEAD"):
            return "405 Method Not Allowed", "text/plain", b"GET only\n"
        path = parts[1].split(b"?", 1)[0]
        if path == b"/metrics":
            return "200 OK", CONTENT_TYPE_LATEST, generate_latest(METRICS.registry)
        if path == b"/healthz":
            ok, detail = self.monitor.liveness()
        elif path == b"/readyz":
            ok, detail = self.monitor.readiness()
        else:
            return "404 Not Found", "text/plain", b"not found: /healthz /readyz /metrics\n"
        body = (json.dumps(detail, sort_keys=True) + "\n").encode()
        return ("200 OK" if ok else "503 Service Unavailable"), "application/json", body
