"""One Redis round trip for everything a process has to append, instead of one per frame.

Measured: 200 sessions that each await their own XADD cost 2.7x the direct SDK and cannot
keep up; the same frames sent as one pipeline per tick cost 0.67x. So sessions never talk to Redis:
they hand commands to the `Batcher`, and its single flusher task sends whatever accumulated as one
non-transactional pipeline. Callers that want to know their frames are stored await the future of
the flush that carries them; every caller of the same flush shares that one future.

Ordering: there is exactly one flusher and it sends one pipeline at a time, and a pipeline runs its
commands in order on one connection. Commands therefore reach Redis in the order they were
submitted, which is what makes "session entry before the first frame" and "frames in seq order"
hold without any per-session coordination.

Failures:
- Connection loss is first retried by redis-py itself (the client's `Retry`). If that gives up, the
  unsent commands go back to the front of the queue, the waiters of that flush get a
  `ProducerConnectionError`, and the flusher keeps retrying with bounded exponential backoff.
  Nothing is dropped; a retried pipeline may store a frame twice, which is harmless because the
  worker drops frames whose seq it has already seen.
- A command Redis refuses (OOM, WRONGTYPE, NOPERM ...) fails only the session it belongs to: its
  remaining queued commands are dropped and its next call raises `SessionFailed`.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from producer.aio import cancel_and_wait, raise_if_cancelling
from producer.cluster import (
    REDIRECTS,
    ClusterNode,
    group_by_node,
    is_cluster,
    private_connection,
    ready,
    refresh,
)
from producer.resp import bulk, pack_xadd

# Plain stdlib logging, not structlog: this is a library embedded in other people's backends, and
# unconfigured structlog prints to stdout (which `voxqueue produce` reserves for the session id).
log = logging.getLogger("voxqueue.producer")

_CONNECTION_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)
DEFAULT_FLUSH_INTERVAL = 0.002  # seconds; see Batcher


class ProducerError(Exception):
    """Base of the producer library's errors."""


class ProducerConnectionError(ProducerError):
    """Redis could not be reached; the affected commands stay queued and are retried."""


class SessionFailed(ProducerError):
    """Redis refused a command of this session; the session cannot continue."""


class CommandOwner(Protocol):
    """What the batcher needs from a session: whether it failed, and how to fail it."""

    @property
    def failure(self) -> BaseException | None: ...

    def fail(self, exc: BaseException) -> None: ...


@dataclass(slots=True)
class Command:
    """One XADD: stream key and flat field/value list, plus who to blame if Redis refuses it.
    With `packed` set, that RESP command is sent instead (the audio TTL's EXPIRE)."""

    key: str
    fields: dict[str, bytes | str]
    owner: CommandOwner | None = None
    frames: int = 0  # 1 for an audio frame; counts toward backpressure and stats
    size: int = 0  # payload bytes, for stats
    packed: bytes = b""


def expire_command(key: str, seconds: int, owner: CommandOwner | None = None) -> Command:
    """`EXPIRE key seconds`, packed once: a session re-queues the same command to refresh its TTL."""
    packed = b"*3\r\n$6\r\nEXPIRE\r\n" + bulk(key.encode()) + bulk(b"%d" % seconds)
    return Command(key, {}, owner, packed=packed)


@dataclass
class BatcherStats:
    """Counters a benchmark or test reads to prove batching works (round trips << frames)."""

    flushes: int = 0  # pipeline executions = Redis round trips
    commands: int = 0  # XADDs stored
    expires: int = 0  # audio TTLs set or refreshed (EXPIRE, in the same pipelines)
    frames: int = 0  # audio frames stored
    bytes: int = 0  # audio payload stored
    max_batch: int = 0  # most commands in one pipeline
    errors: int = 0  # flushes that failed (connection) or commands Redis refused
    retries: int = 0  # flushes re-attempted after a connection failure
    backpressure_waits: int = 0  # sends that had to wait because Redis fell behind (over the limit)


@dataclass
class _Flush:
    """Commands waiting for the same pipeline and the future their senders await."""

    commands: list[Command] = field(default_factory=list)
    frames: int = 0
    done: asyncio.Future[None] | None = None


class Batcher:
    """Queue of XADDs for one Redis client, drained by one flusher task (started lazily).

    A flush starts as soon as the event loop is free, but at most once per `flush_interval`
    (measured from the start of the previous flush). Sessions whose frames became ready in the
    same loop iteration share a pipeline, and frames that arrive while a pipeline is in flight or
    within the interval go in the next one. An idle producer therefore adds no latency to a lone
    frame, and a busy one caps its round trips at 1/flush_interval per second. `flush_interval` 0
    removes the cap (flush whenever the loop is free).

    Why the default is 2 ms (measured, 200 real-time sessions with start times spread over the
    20 ms frame period, 2-core machine, redis-py 8.1 + hiredis): interval 0 sent ~2 frames per
    round trip at ~75-85 us CPU per frame; 2 ms sent 25-50 per round trip at ~30 us per frame
    (send latency p50 2 ms, p99 4 ms), for at most 2 ms of added latency on a 20 ms frame.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
        max_batch: int = 1000,
        max_pending_frames: int = 50_000,
        retry_backoff: ExponentialBackoff | None = None,
    ) -> None:
        if flush_interval < 0 or max_batch < 1 or max_pending_frames < 1:
            raise ValueError("flush_interval must be >= 0, max_batch and max_pending_frames >= 1")
        self.redis = redis
        self.flush_interval = flush_interval
        self.max_batch = max_batch
        self.max_pending_frames = max_pending_frames
        self.stats = BatcherStats()
        self._backoff = retry_backoff or ExponentialBackoff(cap=5.0, base=0.05)
        self._pending = _Flush()
        self._inflight: asyncio.Future[None] | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._failures = 0
        self._last_flush = float("-inf")
        self._node_conns: dict[str, Any] = {}  # Redis Cluster: node name -> our own connection

    @property
    def pending_frames(self) -> int:
        return self._pending.frames

    def submit(self, commands: list[Command]) -> asyncio.Future[None]:
        """Queue commands; return the future of the flush that will carry them.

        Await it through `asyncio.shield` (see `wait`): it is shared by every sender of the flush.
        """
        if self._closed:
            raise ProducerError("the producer is closed")
        self._start()
        pending = self._pending
        pending.commands.extend(commands)
        pending.frames += sum(c.frames for c in commands)
        if pending.done is None:
            pending.done = _shared_future()
        assert self._wake is not None
        self._wake.set()
        return pending.done

    @property
    def over_limit(self) -> bool:
        """True when senders should wait for their flush even if they asked not to (backpressure)."""
        return self._pending.frames >= self.max_pending_frames

    async def flush(self) -> None:
        """Wait until everything submitted so far is stored (raises if that flush failed)."""
        target = self._pending.done or self._inflight
        if target is not None:
            await wait(target)

    async def aclose(self) -> None:
        """Flush what is queued, then stop the flusher. Raises if the final flush failed."""
        if self._closed:
            return
        try:
            await self.flush()
        finally:
            self._closed = True
            if self._task is not None:
                await cancel_and_wait(self._task)
            conns, self._node_conns = list(self._node_conns.values()), {}
            for conn in conns:
                await conn.disconnect()
            lost = self._pending.frames
            if self._pending.done is not None and not self._pending.done.done():
                self._pending.done.set_exception(ProducerError(f"producer closed with {lost} frames unsent"))
            if lost:
                log.warning("producer closed with %d frames unsent", lost)

    # ------------------------------------------------------------------------------ flusher

    def _start(self) -> None:
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="voxqueue-producer-flusher")

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            raise_if_cancelling()
            await self._wake.wait()
            self._wake.clear()
            # Yield at least once, so every session that became ready in this loop iteration adds
            # its frames first; when the last flush was less than an interval ago, wait out the
            # rest of it to collect more frames per round trip.
            loop = asyncio.get_running_loop()
            await asyncio.sleep(max(0.0, self._last_flush + self.flush_interval - loop.time()))
            self._last_flush = loop.time()
            if not self._pending.commands:
                self._resolve(self._pending)
                continue
            if await self._flush_once():
                self._failures = 0
            else:
                self._failures += 1
                self.stats.retries += 1
                await asyncio.sleep(self._backoff.compute(self._failures))
                self._wake.set()

    async def _flush_once(self) -> bool:
        """Send everything queued. False if Redis was unreachable (commands re-queued)."""
        batch, self._pending = self._pending, _Flush()
        self._inflight = batch.done
        commands = [c for c in batch.commands if c.owner is None or c.owner.failure is None]
        try:
            sent = 0
            while sent < len(commands):
                chunk = commands[sent : sent + self.max_batch]
                await self._send(chunk)
                sent += len(chunk)
        except _CONNECTION_ERRORS as exc:
            self.stats.errors += 1
            # A cluster flush that failed on some nodes only: their commands, then the unsent ones
            # (the other nodes' commands of that chunk are stored).
            rest = exc.commands + commands[sent + exc.sent :] if isinstance(exc, _Unsent) else commands[sent:]
            # Back to the front: newer commands of the same sessions must stay behind these.
            self._pending.commands[:0] = rest
            self._pending.frames += sum(c.frames for c in rest)
            if rest and self._pending.done is None:
                self._pending.done = _shared_future()
            log.warning(
                "Redis unreachable, %d commands queued for retry: %s", len(self._pending.commands), exc
            )
            self._fail(
                batch,
                ProducerConnectionError(
                    f"Redis unreachable ({exc}); {len(rest)} commands stay queued and are retried"
                ),
            )
            return False
        except Exception as exc:  # a bug or unexpected reply: fail the senders, never hang them
            self.stats.errors += 1
            log.exception("producer flush failed unexpectedly")
            for command in commands[sent:]:
                if command.owner is not None:
                    command.owner.fail(exc)
            self._fail(batch, ProducerError(f"flush failed: {exc!r}"))
            return True
        finally:
            self._inflight = None
        self._resolve(batch)
        return True

    async def _send(self, commands: list[Command]) -> None:
        """One write with every XADD, then their replies in order: a hand-built pipeline.

        redis-py's Pipeline costs about 15 µs per command in argument packing, per-reply timeout
        contexts and callbacks, more than everything else the producer does per frame; an XADD of
        a frame has a fixed shape, so it is packed straight into RESP here (see pack_xadd).
        """
        if is_cluster(self.redis):
            await self._send_cluster(commands)
            return
        pool = self.redis.connection_pool
        conn = await pool.get_connection()
        try:
            replies = await _pipeline(conn, commands)
        finally:
            await pool.release(conn)
        self.stats.flushes += 1
        self._account(commands, replies)

    async def _send_cluster(self, commands: list[Command]) -> None:
        """Redis Cluster: one hand-packed pipeline per node, all nodes at once, each with the
        commands whose keys that node serves, in submission order (a partition is one slot, so
        a session's entry and frames all go to one node, in order). Commands that a node
        redirected (MOVED, ASK, TRYAGAIN, CLUSTERDOWN) or that went to an unreachable node are
        sent again after a slot-map refresh, a few times; then `_Unsent` re-queues them."""
        todo = commands
        failure: BaseException | None = None
        for attempt in range(CLUSTER_ATTEMPTS):
            try:
                cluster = await ready(self.redis)
                by_node = group_by_node(cluster, todo, lambda c: c.key)
            except (RedisClusterException, *_CONNECTION_ERRORS) as exc:  # no slot map (yet)
                failure = exc
                await asyncio.sleep(0.05 * (attempt + 1))
                continue
            results = await asyncio.gather(
                *(self._send_node(node, cmds) for node, cmds in by_node.items()), return_exceptions=True
            )
            retry: list[Command] = []
            for cmds, result in zip(by_node.values(), results, strict=True):
                if isinstance(result, BaseException):
                    if not isinstance(result, _CONNECTION_ERRORS):
                        raise result
                    failure = result
                    retry += cmds
                else:
                    retry += result
            if not retry:
                return
            # Back in submission order: a retried command must not overtake an older one.
            position = {id(c): i for i, c in enumerate(todo)}
            todo = sorted(retry, key=lambda c: position[id(c)])
            await refresh(cluster)
            if attempt + 1 < CLUSTER_ATTEMPTS:
                await asyncio.sleep(0.05 * (attempt + 1))
        raise _Unsent(todo, len(commands), failure)

    async def _send_node(self, node: ClusterNode, commands: list[Command]) -> list[Command]:
        """One pipeline to one cluster node; returns the commands it redirected."""
        conn = self._node_conns.pop(node.name, None) or private_connection(node)
        replies = await _pipeline(conn, commands)  # disconnects it on any failure
        self._node_conns[node.name] = conn
        self.stats.flushes += 1
        redirected = [c for c, r in zip(commands, replies, strict=True) if isinstance(r, REDIRECTS)]
        if redirected:
            done = [(c, r) for c, r in zip(commands, replies, strict=True) if not isinstance(r, REDIRECTS)]
            self._account([c for c, _ in done], [r for _, r in done])
        else:
            self._account(commands, replies)
        return redirected

    def _account(self, commands: list[Command], replies: list[object]) -> None:
        self.stats.max_batch = max(self.stats.max_batch, len(commands))
        for command, reply in zip(commands, replies, strict=True):
            if isinstance(reply, Exception):
                self.stats.errors += 1
                what = "EXPIRE of" if command.packed else "XADD to"
                log.error("Redis refused %s %s: %s", what, command.key, reply)
                if command.owner is not None and command.owner.failure is None:
                    command.owner.fail(SessionFailed(f"Redis refused {what} {command.key}: {reply}"))
                continue
            if command.packed:
                self.stats.expires += 1
                continue
            self.stats.commands += 1
            self.stats.frames += command.frames
            self.stats.bytes += command.size

    @staticmethod
    def _resolve(batch: _Flush) -> None:
        if batch.done is not None and not batch.done.done():
            batch.done.set_result(None)

    @staticmethod
    def _fail(batch: _Flush, exc: BaseException) -> None:
        if batch.done is not None and not batch.done.done():
            batch.done.set_exception(exc)


CLUSTER_ATTEMPTS = 4  # sends of a cluster flush's redirected commands before re-queueing them


class _Unsent(RedisConnectionError):
    """Part of a cluster flush could not be stored (nodes unreachable or slots moving): these
    commands, in order, go back to the front of the queue; `sent` commands of the chunk were
    handled (stored, or refused for their session)."""

    def __init__(self, commands: list[Command], sent: int, cause: BaseException | None) -> None:
        super().__init__(f"{len(commands)} commands not stored yet: {cause or 'slots moving'}")
        self.commands = commands
        self.sent = sent


async def _pipeline(conn: Any, commands: list[Command]) -> list[object]:
    """One write with every command, then their replies in order (a refused command's reply is its
    exception). A connection that may hold unread replies is disconnected, never reused."""
    payload = b"".join([c.packed or pack_xadd(c.key, c.fields) for c in commands])
    replies: list[object] = []
    try:
        await conn.send_packed_command(payload, check_health=False)
        for _ in commands:
            try:
                replies.append(await conn.read_response(disable_decoding=True))
            except ResponseError as exc:  # this command only: the rest of the replies follow
                replies.append(exc)
    except BaseException:
        await conn.disconnect()
        raise
    return replies


def _shared_future() -> asyncio.Future[None]:
    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    # Fire-and-forget senders may never look at it: retrieve the exception so asyncio does not
    # log "Future exception was never retrieved" (the error also reaches whoever waits later).
    fut.add_done_callback(lambda f: f.cancelled() or f.exception())
    return fut


async def wait(fut: asyncio.Future[None]) -> None:
    """Await a shared flush future without letting one cancelled caller cancel it for all."""
    await asyncio.shield(fut)
