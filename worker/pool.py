"""The worker process: claims sessions, keeps their leases, runs them, drains on SIGTERM.

Leases (docs/architecture.md): a session's entry in its partition's `sessions` stream stays pending in
the `workers` group while a worker owns it, so the group's pending list is the lease table. The
owner renews by resetting the entry's idle time (fenced RENEW script); any worker XAUTOCLAIMs
entries idle longer than the lease, which is how a crashed worker's sessions move on.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import socket
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import structlog
from redis.exceptions import ResponseError

from producer import protocol as p
from producer.cluster import is_cluster, node_of, private_connection
from producer.cluster import ready as cluster_ready
from producer.cluster import refresh as cluster_refresh
from producer.options import validate_options
from producer.resp import pack_xreadgroup
from producer.secrets import describe_url_error, redact_url
from worker.audio_reader import AudioReader, _entries_by_stream
from worker.backoff import Backoff
from worker.config import Settings
from worker.deepgram_link import DeepgramLink
from worker.events import standalone_event
from worker.health import Monitor
from worker.metrics import METRICS
from worker.session_runner import SessionRunner, WorkerContext
from worker.store import TRANSIENT_REDIS_ERRORS, Fenced, Rejection, SessionStore, StateLost, connect_redis

log = structlog.get_logger("voxqueue.worker")

AUTOCLAIM_PAGES_PER_SCAN = 20  # bounds one scan's work; the cursor carries on at the next one
TRIM_EVERY_SECONDS = 10.0
# Redis Cluster: each partition's claim read blocks this long when idle (one round trip per
# partition per period: with 16 partitions, 16 per second at 1 s, measured in BENCHMARKS.md).
CLUSTER_CLAIM_BLOCK_MS = 1000  # sessions streams: XDEL keeps them short, the periodic trim catches the rest
# Drain and shutdown bounds. A cancelled session aborts its Deepgram socket and stops in
# milliseconds; one that has not stopped after SESSION_STOP_SECONDS is taken to be stuck.
SESSION_STOP_SECONDS = 3.0
RELEASE_SECONDS = 3.0  # one RELEASE script call
TEARDOWN_SECONDS = 5.0  # background loops after cancel()
CLIENT_CLOSE_SECONDS = 2.0
RECANCEL_SECONDS = 1.0  # a task not stopped this long after cancel() is cancelled again
DRAIN_RESCAN_SECONDS = 0.2  # how often the drain looks for a session the claim loop just started
# A background loop that fails LOOP_FAILURES_MAX times in a row, all within LOOP_FAILURE_WINDOW
# seconds, "cannot be restarted": restarting it is not helping (a bug on every pass, a key of the
# wrong type), so the worker hands its sessions over and exits non-zero for its supervisor
# (Kubernetes, compose) to restart it. Redis outages never count: the loops wait those out.
LOOP_FAILURES_MAX = 5
LOOP_FAILURE_WINDOW = 60.0


class LoopDied(RuntimeError):
    """A background loop kept failing (see LOOP_FAILURES_MAX): the worker must exit."""


@dataclass(slots=True)
class Owned:
    runner: SessionRunner
    task: asyncio.Task[None]
    entry_id: bytes
    sessions_key: str


def default_consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class WorkerPool:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.consumer = settings.consumer_name or default_consumer_name()
        self.keys = p.Keys(settings.namespace, settings.partitions)
        self.redis = connect_redis(settings.redis_url, cluster=settings.cluster)
        self.claim_redis = connect_redis(settings.redis_url, blocking=True, cluster=settings.cluster)
        self.read_redis = connect_redis(settings.redis_url, blocking=True, cluster=settings.cluster)
        self._claim_reserved = 0  # claim capacity held by per-partition reads in flight (cluster)
        self.store = SessionStore(
            self.redis,
            self.keys,
            results_maxlen=settings.results_maxlen,
            retention=settings.retention_seconds,
        )
        self.reader = AudioReader(
            self.read_redis, count=settings.read_count, read_interval_ms=settings.read_interval_ms
        )
        self.link = DeepgramLink(settings.deepgram_url, settings.api_key(), settings.connect_timeout)
        self.ctx = WorkerContext(settings, self.store, self.reader, self.link, self.consumer)
        self.owned: dict[str, Owned] = {}
        self._autoclaim_cursor: dict[str, bytes] = {}
        self.partition_of_stream = {key: n for n, key in enumerate(self.keys.all_sessions())}
        self.claiming = True
        self.stop_requested = asyncio.Event()
        self.hard_stop = asyncio.Event()
        # Set when another worker released sessions (drain): scan for them now, not at the next
        # period, so a hand-over costs a round trip rather than up to renew_seconds.
        self.takeover_due = asyncio.Event()
        self.handover_channel = f"{settings.namespace}:handover"
        self.unstopped: list[str] = []  # sessions still running when run() returned
        self.log = log.bind(worker=self.consumer)
        # Background loop name -> running | restarting | dead | stopped, for /healthz.
        self.loop_state: dict[str, str] = {}
        self.monitor = Monitor(self)

    @property
    def free(self) -> int:
        return max(0, self.settings.concurrency - len(self.owned)) if self.claiming else 0

    # ------------------------------------------------------------------------------ main

    async def run(self) -> None:
        self.log.info(
            "worker starting",
            concurrency=self.settings.concurrency,
            partitions=self.settings.partitions,
            deepgram=self.settings.deepgram_url,
            redis=redact_url(self.settings.redis_url),
        )
        if not await self._ensure_session_groups():
            # A signal during start-up: nothing is owned yet, so there is nothing to drain.
            await self._teardown([])
            self.log.info("worker stopped during start-up")
            return
        await self._check_deployment()
        self.starting = False
        background = [
            asyncio.create_task(self._supervised("reader", self.reader.run)),
            asyncio.create_task(self._supervised("claim", self._claim_new)),
            asyncio.create_task(self._supervised("autoclaim", self._take_over_expired)),
            asyncio.create_task(self._supervised("renew", self._renew_leases)),
            asyncio.create_task(self._supervised("handover", self._listen_for_handovers)),
            asyncio.create_task(self._supervised("monitor", self.monitor.run)),
        ]
        stop = asyncio.create_task(self.stop_requested.wait())
        try:
            done, _ = await asyncio.wait([stop, *background], return_when=asyncio.FIRST_COMPLETED)
            failed = next(
                (t.exception() for t in done if t is not stop and not t.cancelled() and t.exception()), None
            )
            if failed is not None:
                # Hand the sessions over before exiting, rather than leaving them to the lease.
                self.log.error("a background loop died: draining, then exiting", error=repr(failed))
            await self._drain()
            if failed is not None:
                raise failed
        finally:
            stop.cancel()
            await self._teardown(background)
            self.log.info("worker stopped", unstopped_sessions=len(self.unstopped))

    async def _teardown(self, background: list[asyncio.Task[None]]) -> None:
        """Every wait here is bounded, so the worker always gets to exit: a task that swallows its
        cancellation (CPython gh-86296, inside redis-py's wait_for) must not hold the process."""
        if not await _stop(background, TEARDOWN_SECONDS):
            stuck = [t.get_name() for t in background if not t.done()]
            self.log.error("background loops did not stop when cancelled", loops=stuck)
        # Sessions that outlived the drain (a second signal, or a task that ignored cancel()):
        # cancel once more, wait briefly, and report what is left. Their leases are not released.
        await _stop([o.task for o in self.owned.values()], SESSION_STOP_SECONDS)
        self.unstopped = [sid for sid, o in self.owned.items() if not o.task.done()]
        if self.unstopped:
            self.log.error(
                "sessions did not stop when cancelled; their leases will expire",
                sessions=len(self.unstopped),
                sids=self.unstopped[:20],
            )
        self.store.close()
        closing = [
            asyncio.ensure_future(client.aclose())
            for client in (self.redis, self.claim_redis, self.read_redis)
        ]
        if not await _settled(closing, CLIENT_CLOSE_SECONDS):
            for task in closing:
                task.cancel()
            self.log.warning("redis connections did not close in time; leaving them")
        for task in closing:
            if task.done() and not task.cancelled():
                task.exception()  # retrieved: a failed close is of no consequence at exit

    async def _supervised(self, name: str, loop: Callable[[], Awaitable[None]]) -> None:
        """Keeps a background loop alive through unexpected errors: a bug or an odd reply in one
        loop must not take down every session this worker holds. A loop that keeps failing
        (LOOP_FAILURES_MAX in a row within LOOP_FAILURE_WINDOW) raises LoopDied instead."""
        backoff = Backoff(0.1, 5.0)
        clock = asyncio.get_running_loop()
        failures: deque[float] = deque(maxlen=LOOP_FAILURES_MAX)
        self.loop_state[name] = "running"
        METRICS.loop_up.labels(name).set(1)
        while True:
            started = clock.time()
            try:
                await loop()
                self.loop_state[name] = "stopped"
                METRICS.loop_up.labels(name).set(0)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                now = clock.time()
                if now - started > LOOP_FAILURE_WINDOW:  # it ran fine for a while: a fresh count
                    failures.clear()
                    backoff.reset()
                failures.append(now)
                METRICS.loop_up.labels(name).set(0)
                if len(failures) == LOOP_FAILURES_MAX and now - failures[0] <= LOOP_FAILURE_WINDOW:
                    self.loop_state[name] = "dead"
                    self.log.error(
                        "background loop keeps failing: giving up", loop=name, failures=len(failures)
                    )
                    raise LoopDied(f"background loop {name!r} failed {len(failures)} times in a row") from exc
                delay = backoff.next_delay()
                self.loop_state[name] = "restarting"
                METRICS.loop_restarts.labels(name).inc()
                self.log.error(
                    "background loop failed; restarting",
                    loop=name,
                    error=repr(exc),
                    retry_in=round(delay, 2),
                    exc_info=exc,
                )
                await asyncio.sleep(delay)
                self.loop_state[name] = "running"
                METRICS.loop_up.labels(name).set(1)

    starting = True  # until run() has its sessions groups: a signal then stops the start-up

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT stop the worker; install before run(), so start-up can be stopped too."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        if self.starting and not self.stop_requested.is_set():
            self.log.info("signal received during start-up: stopping", signal=sig.name)
            self.claiming = False
            self.stop_requested.set()
            return
        if self.stop_requested.is_set():
            self.log.warning("second signal: exiting now; leases will expire", signal=sig.name)
            self.hard_stop.set()
            for owned in self.owned.values():
                owned.task.cancel()
            return
        self.log.info("signal received: draining", signal=sig.name, sessions=len(self.owned))
        self.claiming = False
        self.stop_requested.set()

    async def _ensure_session_groups(self) -> bool:
        """Create the sessions groups, retrying while Redis is unreachable; False if a stop signal
        came first. Both the attempt (one can take a client's whole retry budget against an
        unreachable host) and the pause race the signal, so a stop during start-up is prompt."""
        url = self.settings.redis_url
        backoff = Backoff(0.1, 2.0)
        stop = asyncio.ensure_future(self.stop_requested.wait())
        try:
            while True:
                attempt = asyncio.ensure_future(self._create_session_groups())
                await asyncio.wait([attempt, stop], return_when=asyncio.FIRST_COMPLETED)
                if stop.done():
                    await _stop([attempt], SESSION_STOP_SECONDS)
                    return False
                try:
                    attempt.result()
                    return True
                except TRANSIENT_REDIS_ERRORS as exc:
                    delay = backoff.next_delay()
                    self.log.warning(
                        "redis unreachable at start-up, retrying",
                        redis=redact_url(url),
                        error=describe_url_error(exc, url),
                        retry_in=round(delay, 2),
                    )
                await asyncio.wait([stop], timeout=delay)
                if stop.done():
                    return False
        finally:
            stop.cancel()

    async def _create_session_groups(self) -> None:
        for key in self.keys.all_sessions():
            await self.store.ensure_group(key, "0")

    async def _check_deployment(self) -> None:
        """Stores the deployment's namespace settings (`NS:deployment`: partition count, protocol
        version) if no worker has yet, and refuses to start if they disagree with ours: a worker
        with another partition count would read streams no producer writes, and reject every
        entry it does read as wrong_partition. Producers read the same hash (docs/protocol.md §1)."""
        key = self.keys.deployment()
        backoff = Backoff(0.1, 2.0)
        for attempt in range(10):
            try:
                async with self.redis.pipeline(transaction=True) as pipe:
                    pipe.hsetnx(key, p.D_PARTITIONS, str(self.settings.partitions))
                    pipe.hsetnx(key, p.D_PROTOCOL, str(p.PROTOCOL_VERSION))
                    pipe.hgetall(key)
                    *_, stored = await pipe.execute()
                break
            except TRANSIENT_REDIS_ERRORS as exc:
                if attempt == 9:
                    raise
                self.log.warning("redis unavailable at start-up, retrying", error=type(exc).__name__)
                await asyncio.sleep(backoff.next_delay())
        try:
            p.check_deployment(stored, self.keys)
        except p.DeploymentMismatch as exc:
            self.log.error("refusing to start: deployment settings differ", error=str(exc), key=key)
            self.store.close()
            await _settled(
                [asyncio.ensure_future(c.aclose()) for c in (self.redis, self.claim_redis, self.read_redis)],
                CLIENT_CLOSE_SECONDS,
            )
            raise

    # ------------------------------------------------------------------------------ claiming

    async def _claim_new(self) -> None:
        """New sessions: XREADGROUP on the sessions streams, never more than free capacity."""
        if is_cluster(self.claim_redis):
            await self._claim_new_per_partition()
            return
        backoff = Backoff(0.05, 2.0)
        streams: dict[Any, Any] = dict.fromkeys(self.keys.all_sessions(), ">")
        while True:
            # Small batches, so that a burst of new sessions spreads over the workers that are
            # blocked waiting (Redis serves them in turn) instead of landing on one.
            free = min(self.free, self.settings.claim_batch)
            if free == 0:
                await asyncio.sleep(0.05)
                continue
            try:
                reply = await self.claim_redis.xreadgroup(
                    p.WORKERS_GROUP, self.consumer, streams, count=free, block=self.settings.claim_block_ms
                )
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                await self._ensure_session_groups()
                continue
            except TRANSIENT_REDIS_ERRORS as exc:
                await self._pause_after(backoff, exc)
                continue
            backoff.reset()
            for key, entries in cast(list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]], reply or []):
                for entry_id, fields in entries:
                    await self._start_session_safely(key.decode(), entry_id, fields, how="new")

    async def _claim_new_per_partition(self) -> None:
        """Redis Cluster: each partition's sessions stream is its own slot, and one XREADGROUP
        cannot name several slots, so each partition gets its own blocking read (its own task and
        connection; Redis wakes it the moment an entry arrives). An idle read costs one round
        trip per CLUSTER_CLAIM_BLOCK_MS per partition. The reads in flight share the free
        capacity through `_claim_reserved`, so together they never take more than it."""
        tasks = [
            asyncio.create_task(self._claim_partition(key), name=f"claim:{key}")
            for key in self.keys.all_sessions()
        ]
        try:
            await asyncio.gather(*tasks)
        finally:
            await _stop(tasks, TEARDOWN_SECONDS)

    async def _claim_partition(self, key: str) -> None:
        """One partition's claim read, hand-packed on a connection of its own to the partition's
        master (producer.cluster.private_connection): a blocked read must not share a pooled
        connection that a topology refresh recycles."""
        backoff = Backoff(0.05, 2.0)
        block = max(self.settings.claim_block_ms, CLUSTER_CLAIM_BLOCK_MS)
        conn: Any = None
        try:
            while True:
                count = min(self.free - self._claim_reserved, self.settings.claim_batch)
                if count <= 0:
                    await asyncio.sleep(0.05)
                    continue
                self._claim_reserved += count
                try:
                    try:
                        if conn is None:
                            cluster = await cluster_ready(self.claim_redis)
                            conn = private_connection(node_of(cluster, key))
                        await conn.send_packed_command(
                            pack_xreadgroup(p.WORKERS_GROUP, self.consumer, count, block, key),
                            check_health=False,
                        )
                        raw = await conn.read_response(disable_decoding=True)
                    except TRANSIENT_REDIS_ERRORS as exc:  # MOVED, ASK, CLUSTERDOWN included
                        # A dead node, a failover, a moved slot: route afresh, on a new connection.
                        if conn is not None:
                            await conn.disconnect()
                            conn = None
                        await cluster_refresh(self.claim_redis)
                        await self._pause_after(backoff, exc)
                        continue
                    except ResponseError as exc:
                        if "NOGROUP" not in str(exc):
                            raise
                        await self._ensure_session_groups()
                        continue
                    backoff.reset()
                    for _, entries in _entries_by_stream(raw):
                        for entry_id, fields in entries:
                            await self._start_session_safely(key, entry_id, fields, how="new")
                finally:
                    self._claim_reserved -= count
        finally:
            if conn is not None:
                await conn.disconnect()

    async def _take_over_expired(self) -> None:
        """Sessions whose owner stopped renewing (crashed, frozen, released on drain); also keeps
        the sessions streams trimmed (what the scripts' XDEL missed, see lua.TRIM_SESSIONS)."""
        backoff = Backoff(0.05, 2.0)
        min_idle = int(self.settings.lease_seconds * 1000)
        loop = asyncio.get_running_loop()
        next_trim = loop.time() + TRIM_EVERY_SECONDS
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.renew_seconds):
                    await self.takeover_due.wait()
            self.takeover_due.clear()
            if loop.time() >= next_trim:
                next_trim = loop.time() + TRIM_EVERY_SECONDS
                await self._trim_sessions()
            for key in self.keys.all_sessions():
                if self.free == 0:
                    break
                try:
                    entries = await self._autoclaim(key, min_idle, self.free)
                except TRANSIENT_REDIS_ERRORS as exc:
                    await self._pause_after(backoff, exc)
                    break
                except ResponseError as exc:
                    if "NOGROUP" not in str(exc):
                        raise
                    await self._ensure_session_groups()
                    continue
                for entry_id, fields in entries:
                    await self._start_session_safely(key, entry_id, fields, how="takeover")

    async def _listen_for_handovers(self) -> None:
        """Wakes the takeover scan when a draining worker announces released sessions. Only a
        hint: without it (a lost message, Redis down) the periodic scan still finds them."""
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        backoff = Backoff(0.1, 5.0)
        try:
            while True:
                try:
                    if not pubsub.subscribed:
                        await pubsub.subscribe(self.handover_channel)
                    message = await pubsub.get_message(timeout=self.settings.renew_seconds)
                except TRANSIENT_REDIS_ERRORS:  # redis-py re-subscribes when it reconnects
                    await asyncio.sleep(backoff.next_delay())
                    if is_cluster(self.redis):
                        # A cluster pub/sub stays on the node it picked, which may be the master
                        # that just died: start over on a node of the current slot map. PUBLISH
                        # reaches every node of a cluster, so any node will do.
                        with contextlib.suppress(Exception):
                            async with asyncio.timeout(CLIENT_CLOSE_SECONDS):
                                await pubsub.aclose()
                        await cluster_refresh(self.redis)
                        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
                    continue
                backoff.reset()
                if message is not None and self.free:
                    self.takeover_due.set()
        finally:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CLIENT_CLOSE_SECONDS):
                    await pubsub.aclose()

    async def _trim_sessions(self) -> None:
        for key in self.keys.all_sessions():
            try:
                trimmed = await self.store.trim_sessions(key)
            except TRANSIENT_REDIS_ERRORS:
                return  # next time
            except ResponseError as exc:  # e.g. the group vanished meanwhile: nothing to trim
                self.log.warning("could not trim a sessions stream", stream=key, error=str(exc)[:200])
                continue
            if trimmed:
                self.log.info("trimmed finished entries from a sessions stream", stream=key, entries=trimmed)

    async def _autoclaim(self, key: str, min_idle: int, count: int) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """Expired leases of one sessions stream: scans the whole pending list, a page per call
        (XAUTOCLAIM looks at about COUNT × 10 entries), carrying its cursor between calls so
        expired entries behind many live ones are found too."""
        out: list[tuple[bytes, dict[bytes, bytes]]] = []
        for _ in range(AUTOCLAIM_PAGES_PER_SCAN):
            cursor = self._autoclaim_cursor.get(key, b"0-0")
            page = await self._autoclaim_page(key, min_idle, count - len(out), cursor)
            out += page
            if len(out) >= count or self._autoclaim_cursor.get(key, b"0-0") in (b"0-0", "0-0"):
                break
        return out

    async def _autoclaim_page(
        self, key: str, min_idle: int, count: int, cursor: bytes
    ) -> list[tuple[bytes, dict[bytes, bytes]]]:
        # Raw command: the reply has 2 elements on Redis 6.2 and 3 on 7.x (deleted ids); read only
        # the cursor and the claimed entries, which come first and second in both.
        reply = await self.redis.execute_command(
            "XAUTOCLAIM", key, p.WORKERS_GROUP, self.consumer, min_idle, cursor, "COUNT", max(1, count)
        )
        self._autoclaim_cursor[key] = reply[0] if reply else b"0-0"
        claimed = reply[1] if reply and len(reply) >= 2 else []
        out = []
        for item in claimed:
            if item is None:  # an entry deleted from the stream while pending (Redis 6.2 reports nil)
                continue
            entry_id, fields = item[0], item[1]
            if fields is None:
                continue
            if not isinstance(fields, dict):  # a client without redis-py's reply parsing
                fields = dict(zip(fields[::2], fields[1::2], strict=False))
            out.append((entry_id, fields))
        return out

    async def _start_session_safely(
        self, sessions_key: str, entry_id: bytes, raw: dict[bytes, bytes], how: str
    ) -> None:
        """One entry's trouble must not cost the rest of a claimed batch, nor the claim loop: an
        entry left pending here is simply taken over (by us or another worker) once its lease runs
        out. Anything unexpected (a bug, an odd reply) is logged and costs this entry alone."""
        try:
            await self._start_session(sessions_key, entry_id, raw, how)
        except TRANSIENT_REDIS_ERRORS as exc:
            self.log.warning(
                "could not start a claimed session; its lease will expire and it will be retried",
                entry=entry_id.decode(),
                error=type(exc).__name__,
            )
        except Exception as exc:
            METRICS.bad_entries.labels("internal").inc()
            self.log.error(
                "could not start a claimed session; left pending, its lease will expire",
                entry=entry_id.decode(errors="replace"),
                error=repr(exc)[:300],
                exc_info=exc,
            )

    def _decode_entry(self, sessions_key: str, raw: dict[bytes, bytes]) -> p.SessionStart:
        """The session an entry announces, fully checked (format, options, labels, partition), or a
        ProtocolError. Nothing else may escape: hostile input must not crash the claim loops."""
        try:
            start = p.SessionStart.from_fields(raw)
            validate_options(start.options, start.format)
        except p.ProtocolError:
            raise
        except Exception as exc:  # a decoding bug: the entry is rejected, the loop goes on
            self.log.error("session entry could not be decoded", error=repr(exc)[:300], exc_info=exc)
            raise p.ProtocolError("bad_entry", "the session entry could not be decoded") from None
        sk = self.keys.session(start.sid)
        if sk.sessions != sessions_key:
            raise p.ProtocolError("wrong_partition", f"session {start.sid} belongs in {sk.sessions}")
        return start

    async def _start_session(
        self, sessions_key: str, entry_id: bytes, raw: dict[bytes, bytes], how: str
    ) -> None:
        try:
            start = self._decode_entry(sessions_key, raw)
        except p.ProtocolError as exc:
            await self._reject_session(sessions_key, entry_id, raw, exc)
            return
        owned = self.owned.get(start.sid)
        if owned is not None and owned.entry_id == entry_id:
            return  # our own lease, re-delivered: we are running it already
        # Another entry for a sid we run goes through ACQUIRE like anywhere else: a retried XADD
        # (same fields) is retired silently, a reuse is reported as sid_reused (never an epoch bump).
        sk = self.keys.session(start.sid)
        try:
            acquired = await self.store.acquire(sk, self.consumer, self.settings.max_takeovers, entry_id)
        except TRANSIENT_REDIS_ERRORS as exc:
            self.log.warning(
                "could not acquire session; it will be retried", sid=start.sid, error=type(exc).__name__
            )
            return
        if acquired.status == "reused":
            # Another entry owns this sid and this one differs from it: never a second session.
            error = p.ProtocolError(
                "sid_reused", f"session {start.sid} already exists; session ids are never reused"
            )
            await self._reject_session(sessions_key, entry_id, raw, error)
            return
        if acquired.status in ("done", "duplicate"):
            # ACQUIRE has already acknowledged and deleted the entry.
            if acquired.status == "duplicate":
                self.log.info("duplicate session entry acknowledged", sid=start.sid, entry=entry_id.decode())
            return
        runner = SessionRunner(self.ctx, start, entry_id, acquired)
        if acquired.status == "poison":
            self.log.error(
                "session keeps killing workers: failing it",
                sid=start.sid,
                takeovers=acquired.takeovers,
                without_progress=acquired.stalled,
            )
            task = asyncio.create_task(self._fail_poison(runner, acquired.stalled))
        else:
            task = asyncio.create_task(runner.run(), name=f"session:{start.sid}")
        self.owned[start.sid] = Owned(runner, task, entry_id, sessions_key)
        METRICS.sessions_claimed.labels(how).inc()
        METRICS.sessions_active.set(len(self.owned))
        task.add_done_callback(functools.partial(self._session_done, start.sid))
        self.log.info(
            "session claimed",
            sid=start.sid,
            how=how,
            epoch=acquired.epoch,
            resume_seq=acquired.committed_seq + 1,
        )

    async def _fail_poison(self, runner: SessionRunner, takeovers: int) -> None:
        """Ends a crash-looping session. The runner was built from ACQUIRE's poison reply, which
        carries the session's real commit point, frames and finals: session_ended reports them and
        FINISH keeps the commit point (it never lowers committed_seq)."""
        await runner.fail_crash_loop(takeovers)

    def _session_done(self, sid: str, task: asyncio.Task[None]) -> None:
        self.owned.pop(sid, None)
        METRICS.sessions_active.set(len(self.owned))
        if task.cancelled():
            return
        exc = task.exception()
        if isinstance(exc, StateLost):
            self._state_lost(sid)
        elif isinstance(exc, Fenced):
            METRICS.sessions_lost.inc()
            self.log.warning("lost the session to another worker; dropped it without writing", sid=sid)
        elif exc is not None:
            self.log.error("session crashed", sid=sid, error=repr(exc), exc_info=exc)

    def _state_lost(self, sid: str) -> None:
        # Nothing can be written for this session any more (every fenced script refuses a missing
        # state), so it is dropped as it is; readers following it are told by their own check of
        # the state hash (producer.transcripts.SessionLost). Its lease entry, if it survived (an
        # eviction, not an empty restart), stays pending: once the lease runs out a worker takes it
        # over, finds no state and runs it again from the first frame still in Redis (its finals
        # then repeat, with the same event ids), rather than leaving it without a session_ended.
        METRICS.sessions_state_lost.inc()
        self.log.error(
            "session state vanished from Redis (restarted without persistence, or evicted); "
            "dropped it without writing",
            sid=sid,
        )

    async def _lease_lost(self, sid: str) -> None:
        """Says why a renewal failed: the state hash gone, or another owner (one EXISTS, rare)."""
        try:
            vanished = not await self.store.state_exists(self.keys.session(sid))
        except TRANSIENT_REDIS_ERRORS:
            vanished = False
        if vanished:
            self._state_lost(sid)
        else:
            self.log.warning("lease lost: stopping the session without writing", sid=sid)
            METRICS.sessions_lost.inc()

    async def _reject_session(
        self, sessions_key: str, entry_id: bytes, raw: dict[bytes, bytes], exc: p.ProtocolError
    ) -> None:
        """A session entry we cannot run: dead-letter it and tell whoever can be told, in one atomic
        script (lua.REJECT_SESSION) per partition. Where a reader sees it (docs/protocol.md §2):
        * a valid sid of this partition with no session yet: the session's own results (error,
          session_ended rejected) and a state hash saying so;
        * a valid sid of this partition whose session exists (live or ended): a retry of its own
          entry is dropped silently, anything else is `sid_reused` (a non-fatal error in the
          session's results; the session is not touched);
        * a valid sid of another partition (wrong_partition): the session's own results and state
          in its correct partition as above, plus the error in this partition's results and a TTL on
          the misplaced audio stream;
        * no valid sid (bad_sid, missing_fields): the error in this partition's results only.
        Every case also writes a dead letter in this partition's dead stream."""
        METRICS.bad_entries.labels(exc.code).inc()
        sid_raw = raw.get(b"sid", b"")
        if not isinstance(sid_raw, bytes):
            sid_raw = str(sid_raw).encode()
        sid_raw = sid_raw[: p.MAX_SID_LENGTH * 4]  # bounded copies: the entry itself may be huge
        reason = f"{exc.code}: {exc}"[:1000]
        self.log.warning("rejected session entry", entry=entry_id.decode(), code=exc.code, reason=str(exc))
        partition = self.partition_of_stream[sessions_key]
        name = entry_id.decode()
        try:
            sid = sid_raw.decode()
            p.validate_sid(sid)
        except (UnicodeDecodeError, p.ProtocolError):
            sid = ""
        shown = sid or sid_raw.decode(errors="replace")
        error = standalone_event(
            shown, p.ERROR, f"{exc.code}/{name}", code=exc.code, message=str(exc)[:1000], fatal=True
        )
        here_keys = (sessions_key, self.keys.dead(partition), self.keys.results(partition))
        if not sid:
            await self.store.reject_session(*here_keys, Rejection(entry_id, sid_raw, reason, error))
            return
        sk = self.keys.session(sid)
        ended = standalone_event(
            sid,
            p.SESSION_ENDED,
            "end",
            reason=p.END_REJECTED,
            frames=0,
            audio_seconds=0.0,
            finals=0,
            detail=str(exc)[:1000],
        )
        message = (
            f"session {sid} already exists (or existed); entry {name} was not run (ids are never reused)"
        )
        reused = standalone_event(
            sid, p.ERROR, f"sid_reused/{name}", code="sid_reused", message=message, fatal=False
        )
        if sk.partition == partition:
            rejection = Rejection(
                entry_id, sid_raw, reason, error, sk.audio, sk, ended, reused, f"sid_reused: {message}"
            )
            await self.store.reject_session(*here_keys, rejection)
            return
        # wrong_partition: the session's side first, in its own partition (written only if no session
        # of that id exists), then the entry's side here; a crash between the two re-delivers the
        # entry, and the session's side then finds its state and writes nothing more.
        own = (sk.sessions, sk.dead, sk.partition_results)
        await self.store.reject_session(*own, Rejection(b"", sid_raw, reason, error, sk.audio, sk, ended))
        misplaced = self.keys.session_in(sid, partition).audio
        await self.store.reject_session(*here_keys, Rejection(entry_id, sid_raw, reason, error, misplaced))

    # ------------------------------------------------------------------------------ leases

    async def _renew_leases(self) -> None:
        backoff = Backoff(0.05, 1.0)
        while True:
            await asyncio.sleep(self.settings.renew_seconds)
            by_stream: dict[str, list[tuple[str, Owned]]] = {}
            for sid, owned in list(self.owned.items()):
                by_stream.setdefault(owned.sessions_key, []).append((sid, owned))
            for sessions_key, items in by_stream.items():
                leases = [(self.keys.session(sid).state, o.entry_id, o.runner.epoch) for sid, o in items]
                try:
                    lost = await self.store.renew(sessions_key, self.consumer, leases)
                except TRANSIENT_REDIS_ERRORS as exc:
                    await self._pause_after(backoff, exc)
                    continue
                backoff.reset()
                for index in lost:
                    sid, owned = items[index]
                    if self.owned.get(sid) is owned and not owned.task.done():
                        owned.task.cancel()
                        await self._lease_lost(sid)

    # ------------------------------------------------------------------------------ drain

    async def _drain(self) -> None:
        """Hands every session over on its own, in parallel: a session whose end marker arrived
        may finish within drain_seconds first; every other one is stopped and its lease released
        at once and announced on the hand-over channel, so another worker takes it over at once
        instead of after the lease.
        Every wait is bounded; a second signal (hard_stop) ends the drain at once."""
        # However the stop was asked for: a draining worker must not take back what it releases
        # (the hand-over notice wakes its own takeover scan too).
        self.claiming = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.drain_seconds
        hard = asyncio.create_task(self.hard_stop.wait())
        handlers: dict[str, asyncio.Task[str]] = {}
        try:
            while not self.hard_stop.is_set():
                # Also picks up a session the claim loop was still starting when the signal came.
                for sid, owned in list(self.owned.items()):
                    if sid not in handlers:
                        handlers[sid] = asyncio.create_task(
                            self._drain_one(sid, owned, deadline), name=f"drain:{sid}"
                        )
                active = [t for t in handlers.values() if not t.done()]
                if not active:
                    break
                await asyncio.wait(
                    [*active, hard], timeout=DRAIN_RESCAN_SECONDS, return_when=asyncio.FIRST_COMPLETED
                )
        finally:
            hard.cancel()
            await _stop(list(handlers.values()), SESSION_STOP_SECONDS)
        outcomes: dict[str, int] = {}
        for sid, task in handlers.items():
            if not task.done() or task.cancelled():
                outcome = "abandoned"  # a second signal: the lease will expire
            elif task.exception() is not None:
                outcome = "error"
                self.log.error("drain failed for a session", sid=sid, error=repr(task.exception()))
            else:
                outcome = task.result()
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
        self.log.info("drained", hard_stop=self.hard_stop.is_set(), **outcomes)

    async def _drain_one(self, sid: str, owned: Owned, deadline: float) -> str:
        """One session's way out: 'finished' (it ended by itself), 'handed' (lease released),
        'stuck' (did not stop when cancelled: lease left to expire), 'kept' (the release failed:
        lease left to expire) or 'gone' (the session was no longer ours to release)."""
        if owned.runner.end_seen:
            timeout = max(0.0, deadline - asyncio.get_running_loop().time())
            await asyncio.wait([owned.task], timeout=timeout)
            task = owned.task
            if task.done() and not task.cancelled() and task.exception() is None:
                return "finished"
            if not task.done():
                self.log.warning("drain deadline passed: handing the ending session over", sid=sid)
        return await self._hand_over(sid, owned)

    async def _hand_over(self, sid: str, owned: Owned) -> str:
        """Stops one session (closing its Deepgram link), then releases its lease, but only once
        its task has really stopped: a task still running might still write, and although fencing
        would stop those writes, releasing would let a new owner start while it runs."""
        # Never `await task` unbounded: a cancellation can be lost inside asyncio.wait_for
        # (CPython gh-86296), which redis-py puts around every command.
        if not await _stop([owned.task], SESSION_STOP_SECONDS):
            self.log.error(
                "session did not stop when cancelled: not releasing it; its lease will expire",
                sid=sid,
                lease_seconds=self.settings.lease_seconds,
                where=_where(owned.task),
            )
            return "stuck"
        release = asyncio.ensure_future(
            self.store.release(self.keys.session(sid), self.consumer, owned.entry_id, owned.runner.epoch)
        )
        if not await _settled([release], RELEASE_SECONDS):
            release.cancel()
            self.log.warning("lease release timed out; the lease will expire instead", sid=sid)
            return "kept"
        exc = release.exception()
        if exc is not None:
            self.log.warning(
                "lease release failed; the lease will expire instead", sid=sid, error=type(exc).__name__
            )
            return "kept"
        if not release.result():
            return "gone"
        with contextlib.suppress(*TRANSIENT_REDIS_ERRORS, TimeoutError):
            async with asyncio.timeout(RELEASE_SECONDS):
                await self.redis.publish(self.handover_channel, sid)  # wake the others' takeover scan
        return "handed"

    async def _pause_after(self, backoff: Backoff, exc: BaseException) -> None:
        delay = backoff.next_delay()
        self.log.warning("redis unavailable, retrying", error=type(exc).__name__, retry_in=round(delay, 2))
        await asyncio.sleep(delay)


async def _settled(tasks: Sequence[asyncio.Future[Any]], seconds: float) -> bool:
    """Waits at most `seconds` for the tasks to finish (without cancelling them); True if all did."""
    if not tasks:
        return True
    _, pending = await asyncio.wait(tasks, timeout=seconds)
    return not pending


async def _stop(tasks: Sequence[asyncio.Task[Any]], seconds: float) -> bool:
    """Cancels the tasks and waits at most `seconds` for them to finish; True if all did.

    A task still running after RECANCEL_SECONDS is cancelled again: a cancellation can be lost
    (CPython gh-86296: asyncio.wait_for returns the inner result when both arrive together, and
    redis-py waits that way), and the task then simply goes on. Re-cancelling only after a pause
    leaves a task that did see its cancellation the time to clean up undisturbed."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    pending = [t for t in tasks if not t.done()]
    for task in pending:
        task.cancel()
    while pending:
        left = deadline - loop.time()
        if left <= 0:
            return False
        _, still = await asyncio.wait(pending, timeout=min(RECANCEL_SECONDS, left))
        pending = list(still)
        for task in pending:
            task.cancel()
    return True


def _where(task: asyncio.Task[Any]) -> list[str]:
    """Where a task is suspended, innermost last (file:line function), for a stuck task's log."""
    return [
        f"{frame.f_code.co_filename.rsplit('/', 2)[-1]}:{frame.f_lineno} {frame.f_code.co_name}"
        for frame in task.get_stack(limit=None)
    ][-6:]
