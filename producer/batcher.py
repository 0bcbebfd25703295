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
from typing import Protocol

import redis.asyncio as aioredis
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from producer.aio import cancel_and_wait, raise_if_cancelling
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
            rest = commands[sent:]
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
        payload = b"".join([c.packed or pack_xadd(c.key, c.fields) for c in commands])
        pool = self.redis.connection_pool
        conn = await pool.get_connection()
        replies: list[object] = []
        try:
            await conn.send_packed_command(payload, check_health=False)
            for _ in commands:
                try:
                    replies.append(await conn.read_response(disable_decoding=True))
                except ResponseError as exc:  # this command only: the rest of the replies follow
                    replies.append(exc)
        except BaseException:
            # A connection that may hold unread replies must never be reused.
            await conn.disconnect()
            raise
        finally:
            await pool.release(conn)
        self.stats.flushes += 1
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


def _shared_future() -> asyncio.Future[None]:
    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    # Fire-and-forget senders may never look at it: retrieve the exception so asyncio does not
    # log "Future exception was never retrieved" (the error also reaches whoever waits later).
    fut.add_done_callback(lambda f: f.cancelled() or f.exception())
    return fut


async def wait(fut: asyncio.Future[None]) -> None:
    """Await a shared flush future without letting one cancelled caller cancel it for all."""
    await asyncio.shield(fut)
