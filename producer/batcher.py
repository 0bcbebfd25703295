"""One Redis round trip for everything a process has to append, instead of one per frame.

Measured: 200 sessions that each await their own XADD cost 2.7x the direct SDK and cannot
keep up; the same frames sent as one pipeline per tick cost a fraction of it (BENCHMARKS.md). So
sessions never talk to Redis: they append ready-packed commands to the `Batcher`'s queue, a plain
list append with no await, and the batcher sends whatever accumulated as one non-transactional
pipeline at most once per `flush_interval`. Callers that want to know their frames are stored
await the future of the flush that carries them; every caller of the same flush shares that one
future, created only when somebody asks for it.

Two ways of sending, the same queue and the same rules:

* **One Redis** (the common case): the batcher takes over the socket of one redis-py connection
  (connected, authenticated and set up by redis-py, so TLS, ACL users and database numbers work as
  configured) and drives it with callbacks, as an asyncio Protocol: a timer callback writes the
  queued commands in one `write`, and `data_received` parses the replies with hiredis as they
  come. A flush costs no task switch and no await: at 50 frames per second per session, the task
  switches and per-reply coroutines of an awaited pipeline cost more than the frames themselves.
* **Redis Cluster**, or a connection whose socket cannot be taken over: a flusher task sends one
  hand-packed pipeline per node and reads the replies with redis-py (`_TaskEngine` below).

Ordering: commands are written in the order they were queued, one pipeline at a time, on one
connection per node; a partition is one slot. Hence a session's `sessions` entry is stored before
its first frame, as the worker requires, its frames in seq order, and its end marker last.

Backpressure: frames queued or written but not yet acknowledged by Redis are counted
(`outstanding_frames`); past `max_pending_frames` the non-blocking `send_nowait` raises
`QueueFull` and queues nothing, and an awaited send waits for its flush instead of returning at
once. That bounds the memory a producer uses when Redis is slower than the audio, or away.

Failures:
- Connection loss: the commands not acknowledged go back to the front of the queue and the
  batcher reconnects with bounded exponential backoff (redis-py's own `Retry` first retries each
  connect). A connection lost once is not reported to whoever waits (their commands go out again
  on the next one); a connect or flush that fails while commands wait is, as a
  `ProducerConnectionError` to the waiters of everything queued. Nothing is dropped; a retried
  pipeline may store a frame twice, which is harmless because the worker drops frames whose seq
  it has already seen.
- A command Redis refuses (OOM, WRONGTYPE, NOPERM ...) fails only the session it belongs to: its
  remaining queued commands are dropped and its next call raises `SessionFailed`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol, TypeAlias

import hiredis
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
DEFAULT_FLUSH_INTERVAL = 0.005  # seconds; see Batcher
DEFAULT_WAITED_FLUSH_INTERVAL = 0.002  # seconds: a flush somebody awaits; see Batcher


class ProducerError(Exception):
    """Base of the producer library's errors."""


class ProducerConnectionError(ProducerError):
    """Redis could not be reached; the affected commands stay queued and are retried."""


class SessionFailed(ProducerError):
    """Redis refused a command of this session; the session cannot continue."""


class QueueFull(ProducerError):
    """`send_nowait` refused audio because more than `max_pending_frames` frames are queued or
    waiting for Redis to acknowledge them (Redis is slower than the audio, or unreachable).

    Nothing of the refused call was queued: the session's audio goes on from where it was, so the
    caller may retry the same audio later, `await session.send(...)` it (which waits for room), or
    drop it. `last_error` is the connection error of the last failed flush, if any."""

    def __init__(self, message: str, *, outstanding: int, limit: int, last_error: BaseException | None):
        super().__init__(message)
        self.outstanding = outstanding
        self.limit = limit
        self.last_error = last_error


class CommandOwner(Protocol):
    """What the batcher needs from a session: whether it failed, and how to fail it."""

    @property
    def failure(self) -> BaseException | None: ...

    def fail(self, exc: BaseException) -> None: ...


# One queued command: (RESP bytes, owner, key, size). `size` > 0: an audio frame's XADD with that
# many payload bytes; 0: another XADD (session entry, end or finalize marker); NOT_XADD: any other
# command (the audio TTL's EXPIRE). A plain tuple: it is built once per frame on the hot path.
Entry: TypeAlias = tuple[bytes, "CommandOwner | None", str, int]
NOT_XADD = -1


def xadd_entry(key: str, fields: dict[str, bytes | str], owner: CommandOwner | None = None) -> Entry:
    """`XADD key * field value ...` of anything but an audio frame (frames are packed by the
    session, producer.client._frame_packer, and queued with `Batcher.add_frame`)."""
    return (pack_xadd(key, fields), owner, key, 0)


def expire_entry(key: str, seconds: int, owner: CommandOwner | None = None) -> Entry:
    """`EXPIRE key seconds`, packed once: a session re-queues the same entry to refresh its TTL."""
    packed = b"*3\r\n$6\r\nEXPIRE\r\n" + bulk(key.encode()) + bulk(b"%d" % seconds)
    return (packed, owner, key, NOT_XADD)


class BatcherStats:
    """Counters a benchmark or test reads to prove batching works (round trips << frames)."""

    __slots__ = (
        "backpressure_waits",
        "bytes",
        "commands",
        "errors",
        "expires",
        "flushes",
        "frames",
        "max_batch",
        "queue_full",
        "retries",
    )

    def __init__(self) -> None:
        self.flushes = 0  # pipeline executions = Redis round trips
        self.commands = 0  # XADDs stored
        self.expires = 0  # audio TTLs set or refreshed (EXPIRE, in the same pipelines)
        self.frames = 0  # audio frames stored
        self.bytes = 0  # audio payload stored
        self.max_batch = 0  # most commands in one pipeline
        self.errors = 0  # failed flushes or connects, and commands Redis refused
        self.retries = 0  # flushes or connects re-attempted after a connection failure
        self.backpressure_waits = 0  # send(wait=False) calls that waited: over max_pending_frames
        self.queue_full = 0  # send_nowait calls refused (QueueFull): over max_pending_frames

    def __repr__(self) -> str:
        return "BatcherStats(" + ", ".join(f"{k}={getattr(self, k)}" for k in self.__slots__) + ")"


class _Batch:
    """Commands sent (or to be sent) as one pipeline, and the future their waiters share."""

    __slots__ = ("bytes", "done", "entries", "expires", "frames")

    def __init__(self, entries: list[Entry] | None = None) -> None:
        self.entries: list[Entry] = entries if entries is not None else []
        self.frames = 0
        self.bytes = 0
        self.expires = 0
        self.done: asyncio.Future[None] | None = None
        if entries:
            self._count(entries, 1)

    def _count(self, entries: list[Entry], sign: int) -> None:
        for entry in entries:
            size = entry[3]
            if size > 0:
                self.frames += sign
                self.bytes += sign * size
            elif size < 0:
                self.expires += sign

    def add(self, entry: Entry) -> None:
        self.entries.append(entry)
        size = entry[3]
        if size > 0:
            self.frames += 1
            self.bytes += size
        elif size < 0:
            self.expires += 1

    def prepend(self, entries: list[Entry]) -> None:
        """Back to the front: newer commands of the same sessions must stay behind these."""
        self.entries[:0] = entries
        self._count(entries, 1)

    def split(self, n: int) -> _Batch:
        """Remove and return the first n entries as a batch of their own (no future: whoever
        waits for this batch also waits for its tail, which is sent after it)."""
        head = _Batch(self.entries[:n])
        del self.entries[:n]
        self._count(head.entries, -1)
        return head

    def future(self) -> asyncio.Future[None]:
        if self.done is None:
            self.done = _shared_future()
        return self.done

    def adopt(self, fut: asyncio.Future[None]) -> None:
        """Whoever waits on `fut` (a batch whose commands moved into this one) now waits for this
        batch: `fut` gets this batch's outcome."""
        if self.done is None:
            self.done = fut
        elif fut is not self.done:
            self.done.add_done_callback(lambda done: _copy_outcome(done, fut))

    def resolve(self) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_result(None)

    def fail(self, exc: BaseException) -> None:
        """Fail whoever waits; later waiters get a fresh future (the commands may stay queued)."""
        if self.done is not None and not self.done.done():
            self.done.set_exception(exc)
        self.done = None


class Batcher:
    """The process-wide queue of commands for one Redis client, and its sending.

    A flush starts as soon as the event loop is free, but at most once per `flush_interval`
    (measured from the start of the previous flush), and only after the previous pipeline's
    replies are in. Sessions whose frames became ready in the same loop iteration share a
    pipeline, and frames that arrive while a pipeline is in flight or within the interval go in
    the next one. An idle producer therefore adds no latency to a lone frame, and a busy one caps
    its round trips at 1/flush_interval per second. `flush_interval` 0 removes the cap (flush
    whenever the loop is free).

    Why the default is 5 ms (measured with `make bench`, real-time sessions with start times
    spread over the 20 ms frame period, 2-core VM, redis-py 8.1 + hiredis): a round trip costs
    the producer a socket write, a wakeup for the replies and a read, tens of microseconds on a
    VM, whatever it carries. Interval 0 sent ~2 frames per round trip (~75-85 us CPU per frame
    with the old task-based sender); 2 ms sent ~5 per round trip at 50 sessions, 5 ms ~12 (and
    ~50 at 200 sessions), which took the producer's CPU per frame net of the backend's own pacing
    from 0.35-0.60 to ~0.26 of the direct pattern's at 50 sessions (noisy machine, BENCHMARKS.md).
    The price is latency: at most 5 ms more per frame, 2-3 ms more frame lag p99 end to end
    (the worker reads every 10 ms anyway). Latency-bound deployments with few sessions per
    process can pass a smaller `flush_interval`.

    A flush somebody awaits (an awaited send, `flush()`, `end()`) follows the previous one after
    `waited_flush_interval` (2 ms) instead: its caller is blocked on it, and a backend that awaits
    each send (one frame at a time) would otherwise be held to one frame per `flush_interval`.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
        waited_flush_interval: float = DEFAULT_WAITED_FLUSH_INTERVAL,
        max_batch: int = 1000,
        max_pending_frames: int = 50_000,
        retry_backoff: ExponentialBackoff | None = None,
    ) -> None:
        if flush_interval < 0 or waited_flush_interval < 0 or max_batch < 1 or max_pending_frames < 1:
            raise ValueError("flush intervals must be >= 0, max_batch and max_pending_frames >= 1")
        self.redis = redis
        self.flush_interval = flush_interval
        self.waited_flush_interval = min(waited_flush_interval, flush_interval)
        self.max_batch = max_batch
        self.max_pending_frames = max_pending_frames
        self.stats = BatcherStats()
        # Frames queued or written but not yet acknowledged: what backpressure bounds. Read-only.
        self.outstanding_frames = 0
        self.last_error: BaseException | None = None  # of the last failed flush or connect
        self._backoff = retry_backoff or ExponentialBackoff(cap=5.0, base=0.05)
        self._pending = _Batch()
        self._idle = True  # nothing scheduled: the next queued command arranges a flush
        self._purge = False  # a session failed: drop its queued commands before the next flush
        self._closed = False
        self._failures = 0  # consecutive failed flushes or connects (backoff)
        self._engine: _WireEngine | _TaskEngine | None = _TaskEngine(self) if is_cluster(redis) else None

    @property
    def engine(self) -> str:
        """How flushes are sent: "wire" (one Redis, callbacks on its socket), "task" (Redis Cluster,
        or a connection that could not be taken over), or "" before the first flush."""
        return self._engine.name if self._engine is not None else ""

    @property
    def pending_frames(self) -> int:
        """Frames queued and not written yet."""
        return self._pending.frames

    @property
    def over_limit(self) -> bool:
        """True when senders should wait for their flush even if they asked not to (backpressure)."""
        return self.outstanding_frames >= self.max_pending_frames

    def room(self, frames: int) -> bool:
        """Whether `frames` more frames fit under `max_pending_frames`."""
        return self.outstanding_frames + frames <= self.max_pending_frames

    def queue_full(self, frames: int) -> QueueFull:
        """The error `send_nowait` raises when `frames` do not fit, counted in the stats."""
        self.stats.queue_full += 1
        cause = f"; last error: {self.last_error}" if self.last_error is not None else ""
        return QueueFull(
            f"{self.outstanding_frames} frames wait for Redis, {frames} more would pass max_pending_frames="
            f"{self.max_pending_frames}{cause}",
            outstanding=self.outstanding_frames,
            limit=self.max_pending_frames,
            last_error=self.last_error,
        )

    def add_frame(self, packed: bytes, owner: CommandOwner, key: str, size: int) -> None:
        """Queue one audio frame's packed XADD (the hot path: no await, no future)."""
        if self._closed:
            raise ProducerError("the producer is closed")
        pending = self._pending
        pending.entries.append((packed, owner, key, size))
        pending.frames += 1
        pending.bytes += size
        self.outstanding_frames += 1
        if self._idle:
            self._schedule()

    def add(self, entries: list[Entry]) -> None:
        """Queue commands, in order."""
        if self._closed:
            raise ProducerError("the producer is closed")
        pending = self._pending
        for entry in entries:
            pending.add(entry)
            if entry[3] > 0:
                self.outstanding_frames += 1
        if self._idle and entries:
            self._schedule()

    def submit(self, entries: list[Entry]) -> asyncio.Future[None]:
        """Queue commands; return the future of the flush that will carry them (which then goes
        out `waited_flush_interval` after the previous one, not `flush_interval`).

        Await it through `asyncio.shield` (see `wait`): it is shared by every sender of the flush.
        """
        done = self._pending.future()  # first: the flush this schedules is one somebody awaits
        self.add(entries)
        self._hurry()
        return done

    def waiter(self) -> asyncio.Future[None] | None:
        """The future of the flush that carries the last command queued so far (None: nothing
        is queued or in flight)."""
        if self._pending.entries:
            done = self._pending.future()
            self._hurry()
            return done
        if self._engine is not None:
            return self._engine.inflight_future()
        return None

    @property
    def interval(self) -> float:
        """Least time between the previous flush and the next one: shorter when somebody waits."""
        return self.flush_interval if self._pending.done is None else self.waited_flush_interval

    def _hurry(self) -> None:
        if self._engine is not None and not self._idle:
            self._engine.hurry()

    async def flush(self) -> None:
        """Wait until everything submitted so far is stored (raises if that flush failed)."""
        target = self.waiter()
        if target is not None:
            await wait(target)

    async def aclose(self) -> None:
        """Flush what is queued, then stop sending. Raises if the final flush failed."""
        if self._closed:
            return
        try:
            await self.flush()
        finally:
            self._closed = True
            if self._engine is not None:
                await self._engine.close()
            lost = self._pending.frames
            self._pending.fail(ProducerError(f"producer closed with {lost} frames unsent"))
            if lost:
                log.warning("producer closed with %d frames unsent", lost)

    # ------------------------------------------------------------------------- shared by engines

    def _schedule(self) -> None:
        """Something was queued while nothing was scheduled: arrange a flush."""
        self._idle = False
        if self._engine is None:
            self._engine = _WireEngine(self)
        self._engine.schedule()

    def _take(self) -> _Batch | None:
        """The next batch to send (at most max_batch commands), or None if nothing is queued."""
        if self._purge:
            self._drop_failed()
        pending = self._pending
        if not pending.entries:
            pending.resolve()
            return None
        if len(pending.entries) <= self.max_batch:
            self._pending = _Batch()
            return pending
        return pending.split(self.max_batch)

    def _drop_failed(self) -> None:
        """Drop the queued commands of sessions that failed (Redis refused one of theirs)."""
        self._purge = False
        pending = self._pending
        keep = [e for e in pending.entries if e[1] is None or e[1].failure is None]
        if len(keep) == len(pending.entries):
            return
        dropped = _Batch([e for e in pending.entries if not (e[1] is None or e[1].failure is None)])
        self.outstanding_frames -= dropped.frames
        pending.entries = []
        pending.frames = pending.bytes = pending.expires = 0
        for entry in keep:
            pending.add(entry)

    def _account(self, batch: _Batch) -> None:
        """Stats of a batch whose replies all came in, none of them refused."""
        stats = self.stats
        stats.flushes += 1
        stats.commands += len(batch.entries) - batch.expires
        stats.expires += batch.expires
        stats.frames += batch.frames
        stats.bytes += batch.bytes
        if len(batch.entries) > stats.max_batch:
            stats.max_batch = len(batch.entries)

    def _account_replies(self, entries: list[Entry], replies: list[object]) -> None:
        """Stats and outstanding frames of commands whose replies came in, one by one (any of
        them may be refused)."""
        stats = self.stats
        for entry, reply in zip(entries, replies, strict=True):
            size = entry[3]
            if size > 0:
                self.outstanding_frames -= 1
            if isinstance(reply, Exception):
                self._refused(entry, reply)
                continue
            if size < 0:
                stats.expires += 1
                continue
            stats.commands += 1
            if size > 0:
                stats.frames += 1
                stats.bytes += size

    def _refused(self, entry: Entry, reply: Exception) -> None:
        self.stats.errors += 1
        _, owner, key, size = entry
        what = "EXPIRE of" if size < 0 else "XADD to"
        log.error("Redis refused %s %s: %s", what, key, reply)
        if owner is not None and owner.failure is None:
            owner.fail(SessionFailed(f"Redis refused {what} {key}: {reply}"))
        self._purge = True

    def _requeue(self, entries: list[Entry]) -> None:
        """Unacknowledged commands back to the front of the queue (still outstanding)."""
        self._pending.prepend(entries)

    def _connection_failed(self, exc: BaseException, waiting: list[_Batch], *, tell: bool = True) -> None:
        """A flush or connect failed for want of Redis: everything stays queued. Whoever waits
        hears about it, unless `tell` is False: then the waiters of `waiting` wait on for the
        commands that were re-queued (a connection dropped once, the next one may well work)."""
        self.stats.errors += 1
        self._failures += 1
        self.last_error = exc
        queued = len(self._pending.entries)
        log.warning("Redis unreachable, %d commands queued for retry: %s", queued, exc)
        if not tell:
            for batch in waiting:
                if batch.done is not None:
                    self._pending.adopt(batch.done)
            return
        error = ProducerConnectionError(
            f"Redis unreachable ({exc}); {queued} commands stay queued and are retried"
        )
        for batch in [*waiting, self._pending]:
            batch.fail(error)

    def _broken(self, exc: BaseException, batches: list[_Batch]) -> None:
        """A bug or an unexpected reply: fail the sessions of these commands and their waiters
        rather than hang them; the commands are dropped."""
        self.stats.errors += 1
        self.last_error = exc
        log.error("producer flush failed unexpectedly", exc_info=exc)
        error = ProducerError(f"flush failed: {exc!r}")
        for batch in batches:
            for entry in batch.entries:
                owner = entry[1]
                if owner is not None and owner.failure is None:
                    owner.fail(exc)
            # Clamped: commands of the batch that were stored before the failure were counted off.
            self.outstanding_frames = max(0, self.outstanding_frames - batch.frames)
            batch.fail(error)


class _WireEngine(asyncio.Protocol):
    """One Redis: the socket of one redis-py connection, driven by callbacks.

    States: not connected (a connect task runs while something is queued), connected and idle,
    a flush timer armed, or one pipeline in flight (its replies counted as `data_received` parses
    them). A new pipeline is written only once the previous one's replies are all in.
    """

    name = "wire"

    def __init__(self, batcher: Batcher) -> None:
        self.b = batcher
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.reader = _reader()
        self.inflight: _Batch | None = None
        self.replies = 0  # of the in-flight batch, handled so far
        self.refused: list[tuple[int, Exception]] | None = None  # in the in-flight batch
        self.timer: asyncio.Handle | None = None
        self.timer_due = 0.0  # loop time the timer fires at
        self.overdue: asyncio.TimerHandle | None = None
        self.connecting: asyncio.Task[None] | None = None
        self.last_flush = float("-inf")
        self.reply_timeout: float | None = None
        # The redis-py connection whose socket we drive and its StreamWriter: referenced as long as
        # the socket is in use (the writer closes it when collected).
        self._conn: Any = None

    def inflight_future(self) -> asyncio.Future[None] | None:
        return self.inflight.future() if self.inflight is not None else None

    def schedule(self) -> None:
        if self.transport is None:
            if self.connecting is None:
                self.connecting = self.loop.create_task(self._connect(), name="voxqueue-producer-connect")
            return
        if self.inflight is not None or self.timer is not None:
            return  # the reply handler or the timer schedules the next flush
        self._arm(self.last_flush + self.b.interval)

    def hurry(self) -> None:
        """Somebody now waits for what is queued: a timer armed for `flush_interval` comes forward."""
        if self.timer is not None and self.inflight is None:
            due = self.last_flush + self.b.waited_flush_interval
            if due < self.timer_due:
                self.timer.cancel()
                self._arm(due)

    def _arm(self, due: float) -> None:
        now = self.loop.time()
        # call_soon even with no delay: every session that became ready in this loop iteration
        # adds its frames first.
        self.timer = (
            self.loop.call_later(due - now, self.flush) if due > now else self.loop.call_soon(self.flush)
        )
        self.timer_due = max(due, now)

    def flush(self) -> None:
        """Write the queued commands as one pipeline (a timer callback)."""
        self.timer = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return  # connection_lost reconnects
        b = self.b
        batch = b._take()
        if batch is None:
            b._idle = True
            return
        self.inflight, self.replies, self.refused = batch, 0, None
        self.last_flush = self.loop.time()
        transport.write(b"".join([entry[0] for entry in batch.entries]))
        if self.reply_timeout is not None:
            self.overdue = self.loop.call_later(self.reply_timeout, self._overdue, batch)

    # -------------------------------------------------------------------- asyncio.Protocol

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        batch = self.inflight
        if batch is None:
            self._abort("a reply with no command in flight")
            return
        entries = batch.entries
        total = len(entries)
        n = self.replies
        try:
            while n < total:
                reply = reader.gets()
                if reply is _NOT_ENOUGH:
                    break
                if isinstance(reply, Exception):
                    if self.refused is None:
                        self.refused = []
                    self.refused.append((n, reply))
                n += 1
            if n == total and reader.gets() is not _NOT_ENOUGH:
                self.replies = n
                self._abort("more replies than commands")
                return
        except hiredis.ProtocolError as exc:
            self.replies = n
            self._abort(f"unreadable reply: {exc}")
            return
        self.replies = n
        if n == total:
            self._completed(batch)

    def connection_lost(self, exc: Exception | None) -> None:
        b = self.b
        self.transport = None
        self._conn = None
        self.reader = _reader()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.overdue is not None:
            self.overdue.cancel()
            self.overdue = None
        batch, self.inflight = self.inflight, None
        if b._closed:
            return
        if batch is not None:
            # The first `replies` commands were handled (stored or refused); the rest may or may
            # not be stored, so they are sent again (a repeated frame is dropped by the worker).
            handled, rest = batch.entries[: self.replies], batch.entries[self.replies :]
            self._account_handled(handled)
            if not rest:  # every reply was in: dropped after (an unreadable extra reply)
                batch.resolve()
            else:
                b._requeue(rest)
                # A first loss is not reported to whoever waits: the commands go out again on the
                # next connection, and a waiter hears of it only if that fails too.
                b._connection_failed(
                    exc or RedisConnectionError("connection closed by Redis"), [batch], tell=b._failures > 0
                )
        elif b._pending.entries:
            # Lost before the queued commands went out: reconnect after a backoff too, so a
            # server that accepts connections and drops them cannot make this a busy loop.
            b._failures += 1
        if b._pending.entries:
            self.schedule()  # reconnects
        else:
            b._idle = True

    # -------------------------------------------------------------------- internals

    def _completed(self, batch: _Batch) -> None:
        b = self.b
        self.inflight = None
        if self.overdue is not None:
            self.overdue.cancel()
            self.overdue = None
        b._failures = 0
        if self.refused is None:
            b._account(batch)
            b.outstanding_frames -= batch.frames
        else:
            self._account_handled(batch.entries)
        batch.resolve()
        if b._pending.entries:
            self.schedule()
        else:
            b._idle = True

    def _account_handled(self, entries: list[Entry]) -> None:
        """Stats of handled commands, reply by reply (some refused, or a partial batch)."""
        if not entries:
            return
        replies: list[object] = [None] * len(entries)
        for index, error in self.refused or ():
            if index < len(entries):
                replies[index] = error
        self.refused = None
        stats = self.b.stats
        stats.flushes += 1
        stats.max_batch = max(stats.max_batch, len(entries))
        self.b._account_replies(entries, replies)

    def _abort(self, why: str) -> None:
        log.error("Redis connection of the producer dropped: %s", why)
        self.b._failures += 1  # reconnect after a backoff: a server that misbehaves once may again
        if self.transport is not None:
            self.transport.abort()  # connection_lost follows: unacknowledged commands are re-sent

    def _overdue(self, batch: _Batch) -> None:
        self.overdue = None
        if self.inflight is batch and self.transport is not None:
            log.warning("no reply from Redis within %.1f s: reconnecting", self.reply_timeout)
            self.transport.abort()

    async def _connect(self) -> None:
        b = self.b
        try:
            while not b._closed and b._pending.entries:
                if b._failures:
                    b.stats.retries += 1
                    await asyncio.sleep(b._backoff.compute(b._failures))
                    raise_if_cancelling()
                try:
                    conn, transport = await take_over(b.redis, self)
                except CannotTakeOver as exc:
                    log.info("producer: sending through redis-py (%s)", exc)
                    engine = _TaskEngine(b)
                    b._engine = engine
                    engine.schedule()
                    return
                except _CONNECTION_ERRORS as exc:
                    b._connection_failed(exc, [])
                    continue
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # e.g. a refused handshake: fail the senders, never hang them
                    b._failures += 1
                    dropped, b._pending = b._pending, _Batch()
                    b._broken(exc, [dropped])
                    continue
                if b._closed:
                    transport.close()
                    return
                self._conn, self.transport = conn, transport
                self.reply_timeout = getattr(conn[0], "socket_timeout", None) or None
                self.connecting = None
                self.flush()  # at once: these commands waited for the connection
                return
            b._idle = True  # nothing left to send (or closed): the next command connects again
        finally:
            self.connecting = None

    async def close(self) -> None:
        if self.connecting is not None:
            await cancel_and_wait(self.connecting)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.transport is not None:
            # With a flush in flight Redis may have stopped reading: a graceful close could then
            # wait for a connection_lost that never comes and keep the socket open.
            if self.inflight is not None:
                self.transport.abort()
            else:
                self.transport.close()
            self.transport = None
        if self.inflight is not None:
            self.inflight.fail(ProducerError("producer closed before Redis acknowledged a flush"))
            self.inflight = None


class CannotTakeOver(Exception):
    """The client's connections are not plain asyncio streams: use redis-py to send."""


async def take_over(client: aioredis.Redis, protocol: asyncio.Protocol) -> tuple[Any, asyncio.Transport]:
    """A new connection of the client's pool settings (redis-py connects, authenticates, selects
    the database), whose socket `protocol` then reads and writes instead of redis-py.

    The connection object is kept out of the pool and stripped of its streams, so neither the pool
    nor its finaliser closes the socket underneath us."""
    pool = getattr(client, "connection_pool", None)
    if pool is None:
        raise CannotTakeOver("the client has no connection pool")
    conn = pool.make_connection()  # not taken from the pool: this one is ours for good
    await conn.connect()
    writer = getattr(conn, "_writer", None)
    transport = getattr(writer, "transport", None)
    if transport is None or not hasattr(transport, "set_protocol"):
        await conn.disconnect()
        raise CannotTakeOver(f"{type(conn).__name__} has no asyncio stream")
    transport.set_protocol(protocol)
    # Ours now: redis-py must not read it or close it. The StreamWriter closes its transport when
    # it is garbage-collected, so the caller keeps it referenced as long as it uses the socket.
    conn._reader = conn._writer = None
    return (conn, writer), transport


class _TaskEngine:
    """Redis Cluster (one hand-packed pipeline per node), or a connection that could not be taken
    over: a flusher task sends what is queued and awaits the replies through redis-py."""

    name = "task"

    def __init__(self, batcher: Batcher) -> None:
        self.b = batcher
        self.wake: asyncio.Event | None = None
        self.task: asyncio.Task[None] | None = None
        self.inflight: _Batch | None = None
        self.last_flush = float("-inf")
        self.node_conns: dict[str, Any] = {}  # Redis Cluster: node name -> our own connection

    def inflight_future(self) -> asyncio.Future[None] | None:
        return self.inflight.future() if self.inflight is not None else None

    def hurry(self) -> None:
        pass  # the flusher picks the interval when it goes to sleep, after the waiter exists

    def schedule(self) -> None:
        if self.task is None or self.task.done():
            self.wake = asyncio.Event()
            self.task = asyncio.get_running_loop().create_task(self._run(), name="voxqueue-producer-flusher")
        assert self.wake is not None
        self.wake.set()

    async def close(self) -> None:
        inflight = self.inflight  # _flush_once forgets it when cancelled: fail its waiters here
        if self.task is not None:
            await cancel_and_wait(self.task)
        if inflight is not None:
            inflight.fail(ProducerError("producer closed before Redis acknowledged a flush"))
        conns, self.node_conns = list(self.node_conns.values()), {}
        for conn in conns:
            await conn.disconnect()

    async def _run(self) -> None:
        assert self.wake is not None
        b = self.b
        while True:
            raise_if_cancelling()
            await self.wake.wait()
            self.wake.clear()
            b._idle = True  # from now on a queued command sets the event again
            # Yield at least once, so every session that became ready in this loop iteration adds
            # its frames first; when the last flush was less than an interval ago, wait out the
            # rest of it to collect more frames per round trip.
            loop = asyncio.get_running_loop()
            await asyncio.sleep(max(0.0, self.last_flush + b.interval - loop.time()))
            self.last_flush = loop.time()
            batch = b._take()
            if batch is None:
                continue
            if await self._flush_once(batch):
                b._failures = 0
                if b._pending.entries:  # more than max_batch were queued: the rest next
                    self.wake.set()
            else:
                b.stats.retries += 1
                await asyncio.sleep(b._backoff.compute(b._failures))
                self.wake.set()

    async def _flush_once(self, batch: _Batch) -> bool:
        """Send one batch. False if Redis was unreachable (commands re-queued)."""
        b = self.b
        self.inflight = batch
        try:
            await self._send(batch.entries)
        except _CONNECTION_ERRORS as exc:
            # A cluster flush that failed on some nodes only: their commands go back (the other
            # nodes' commands are stored).
            b._requeue(exc.entries if isinstance(exc, _Unsent) else batch.entries)
            b._connection_failed(exc, [batch])
            return False
        except Exception as exc:  # a bug or unexpected reply: fail the senders, never hang them
            b._broken(exc, [batch])
            return True
        finally:
            self.inflight = None
        batch.resolve()
        return True

    async def _send(self, entries: list[Entry]) -> None:
        """One write with every command, then their replies in order: a hand-built pipeline
        (redis-py's Pipeline costs about 15 µs per command in argument packing, per-reply timeout
        contexts and callbacks, more than everything else the producer does per frame)."""
        if is_cluster(self.b.redis):
            await self._send_cluster(entries)
            return
        pool = self.b.redis.connection_pool
        conn = await pool.get_connection()
        try:
            replies = await _pipeline(conn, entries)
        finally:
            await pool.release(conn)
        self._handled(entries, replies)

    async def _send_cluster(self, entries: list[Entry]) -> None:
        """Redis Cluster: one hand-packed pipeline per node, all nodes at once, each with the
        commands whose keys that node serves, in submission order (a partition is one slot, so
        a session's entry and frames all go to one node, in order). Commands that a node
        redirected (MOVED, ASK, TRYAGAIN, CLUSTERDOWN) or that went to an unreachable node are
        sent again after a slot-map refresh, a few times; then `_Unsent` re-queues them."""
        todo = entries
        failure: BaseException | None = None
        for attempt in range(CLUSTER_ATTEMPTS):
            try:
                cluster = await ready(self.b.redis)
                by_node = group_by_node(cluster, todo, lambda e: e[2])
            except (RedisClusterException, *_CONNECTION_ERRORS) as exc:  # no slot map (yet)
                failure = exc
                await asyncio.sleep(0.05 * (attempt + 1))
                continue
            results = await asyncio.gather(
                *(self._send_node(node, cmds) for node, cmds in by_node.items()), return_exceptions=True
            )
            retry: list[Entry] = []
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
            position = {id(e): i for i, e in enumerate(todo)}
            todo = sorted(retry, key=lambda e: position[id(e)])
            await refresh(cluster)
            if attempt + 1 < CLUSTER_ATTEMPTS:
                await asyncio.sleep(0.05 * (attempt + 1))
        raise _Unsent(todo, failure)

    async def _send_node(self, node: ClusterNode, entries: list[Entry]) -> list[Entry]:
        """One pipeline to one cluster node; returns the commands it redirected."""
        conn = self.node_conns.pop(node.name, None) or private_connection(node)
        replies = await _pipeline(conn, entries)  # disconnects it on any failure
        self.node_conns[node.name] = conn
        redirected = [e for e, r in zip(entries, replies, strict=True) if isinstance(r, REDIRECTS)]
        if redirected:
            done = [(e, r) for e, r in zip(entries, replies, strict=True) if not isinstance(r, REDIRECTS)]
            self._handled([e for e, _ in done], [r for _, r in done])
        else:
            self._handled(entries, replies)
        return redirected

    def _handled(self, entries: list[Entry], replies: list[object]) -> None:
        stats = self.b.stats
        stats.flushes += 1
        stats.max_batch = max(stats.max_batch, len(entries))
        self.b._account_replies(entries, replies)


CLUSTER_ATTEMPTS = 4  # sends of a cluster flush's redirected commands before re-queueing them


class _Unsent(RedisConnectionError):
    """Part of a cluster flush could not be stored (nodes unreachable or slots moving): these
    commands, in order, go back to the front of the queue; the others were handled (stored, or
    refused for their session)."""

    def __init__(self, entries: list[Entry], cause: BaseException | None) -> None:
        super().__init__(f"{len(entries)} commands not stored yet: {cause or 'slots moving'}")
        self.entries = entries


async def _pipeline(conn: Any, entries: list[Entry]) -> list[object]:
    """One write with every command, then their replies in order (a refused command's reply is its
    exception). A connection that may hold unread replies is disconnected, never reused."""
    payload = b"".join([e[0] for e in entries])
    replies: list[object] = []
    try:
        await conn.send_packed_command(payload, check_health=False)
        for _ in entries:
            try:
                replies.append(await conn.read_response(disable_decoding=True))
            except ResponseError as exc:  # this command only: the rest of the replies follow
                replies.append(exc)
    except BaseException:
        await conn.disconnect()
        raise
    return replies


_NOT_ENOUGH = object()  # hiredis: no complete reply buffered yet


def _reader() -> hiredis.Reader:
    return hiredis.Reader(replyError=ResponseError, notEnoughData=_NOT_ENOUGH)


def _copy_outcome(source: asyncio.Future[None], target: asyncio.Future[None]) -> None:
    if target.done():
        return
    if source.cancelled():
        target.cancel()
    elif source.exception() is not None:
        target.set_exception(source.exception())  # type: ignore[arg-type]
    else:
        target.set_result(None)


def _shared_future() -> asyncio.Future[None]:
    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    # Fire-and-forget senders may never look at it: retrieve the exception so asyncio does not
    # log "Future exception was never retrieved" (the error also reaches whoever waits later).
    fut.add_done_callback(lambda f: f.cancelled() or f.exception())
    return fut


async def wait(fut: asyncio.Future[None]) -> None:
    """Await a shared flush future without letting one cancelled caller cancel it for all."""
    await asyncio.shield(fut)
