"""Read transcript events back: one session's results stream, or every partition's.

Plain XREAD (no consumer group): these readers are for the backend that made the audio, for
`voxqueue tail` and for tests, which each want to see every event, not share them out. Fleet-wide
consumers that need at-least-once processing use their own consumer group on `vq:{pN}:results`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis

from producer.aio import raise_if_cancelling
from producer.batcher import ProducerError
from producer.cluster import is_cluster
from producer.protocol import SESSION_ENDED, Keys, ProtocolError, decode_event

# Plain stdlib logging, not structlog: this is a library embedded in other people's backends, and
# unconfigured structlog prints to stdout (which `voxqueue produce` reserves for the session id).
log = logging.getLogger("voxqueue.producer")

# Shorter than redis-py's default socket timeout (5 s) so a blocking read never looks like a
# dead connection; an idle reader costs one round trip per block.
DEFAULT_BLOCK_MS = 2000
# How often an idle session reader looks at the session's state hash (one HMGET), to notice a
# session Redis lost instead of waiting for its events forever.
DEFAULT_STATE_CHECK_SECONDS = 2.0
# After this long with no worker on the session (no state hash, no event), a reader says so once:
# otherwise a producer and a worker that disagree on the Redis database, the namespace or the
# partition count (or no worker at all) just wait, silently, forever. A session is normally claimed
# within milliseconds; 5 s leaves room for a busy fleet without leaving a new user staring at nothing.
DEFAULT_UNCLAIMED_WARNING_SECONDS = 5.0


class SessionLost(ProducerError):
    """The session vanished from Redis before it ended: what it published is no longer complete.

    Redis restarted without persistence or evicted the session's keys (a `maxmemory-policy` other
    than `noeviction`). Run Redis with persistence (AOF) and `maxmemory-policy noeviction`.
    """


class SessionUnclaimed(ProducerError):
    """No worker claimed the session within the reader's `unclaimed_timeout`."""


def unclaimed_message(redis: aioredis.Redis, keys: Keys, sid: str, waited: float) -> str:
    """What a user should check when no worker has claimed a session (no secrets: no URL)."""
    pool = getattr(redis, "connection_pool", None)  # a cluster client has none, and only db 0
    db = pool.connection_kwargs.get("db", 0) if pool is not None else 0
    return (
        f"no worker has claimed session {sid} after {waited:.0f} s (no state hash "
        f"{keys.session(sid).state}). Check that a worker is running and uses the same Redis "
        f"server and database (db {db}), namespace ({keys.namespace!r}) and partition count "
        f"({keys.partitions}) as this producer (VOXQUEUE_REDIS_URL, VOXQUEUE_NAMESPACE, "
        "VOXQUEUE_PARTITIONS)."
    )


class _LossWatch:
    """Decides, from the state hash, whether a session a reader follows is lost or not there yet.

    Lost: the state hash is missing although the session was seen (its state, or any of its
    events: a worker only publishes for a session whose state exists, and the one exception, a
    rejected session entry, ends at once with `session_ended`), or the state was re-created (another
    `started_at`: a worker took over an entry whose state had been evicted). A session nobody has
    claimed yet has no state hash either: that is waiting, so a reader may start before the
    producer does.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        sid: str,
        every: float,
        *,
        warn_after: float | None = None,
        on_unclaimed: Callable[[str], None] | None = None,
        give_up_after: float | None = None,
    ) -> None:
        self.redis, self.keys, self.sid, self.state = redis, keys, sid, keys.session(sid).state
        self.every = every
        self.started_at: Any = None  # bytes, or str from a client with decode_responses
        self.state_seen = False
        self.events_read = False
        self.next_check = 0.0
        self.since = time.monotonic()
        self.warn_after, self.give_up_after = warn_after, give_up_after
        self.on_unclaimed = on_unclaimed
        self.warned = False

    async def check(self) -> None:
        """Called before the first read, then only when the reader is idle (no unread events), at
        most once per `every`: a session_ended still to be read can never be taken for a loss."""
        now = time.monotonic()
        if now < self.next_check:
            return
        self.next_check = now + self.every
        epoch, started_at = await self.redis.hmget(self.state, ["epoch", "started_at"])
        if epoch is not None:  # every worker-written state has an epoch
            if self.started_at is not None and started_at is not None and started_at != self.started_at:
                raise self._lost("its state was deleted and re-created")
            self.started_at = started_at or self.started_at
            self.state_seen = True
            return
        if self.state_seen or self.events_read:
            raise self._lost("its state vanished")
        self._check_unclaimed(now)

    def _check_unclaimed(self, now: float) -> None:
        waited = now - self.since
        if self.give_up_after is not None and waited >= self.give_up_after:
            raise SessionUnclaimed(unclaimed_message(self.redis, self.keys, self.sid, waited))
        if self.warned or self.warn_after is None or waited < self.warn_after:
            return
        self.warned = True
        message = unclaimed_message(self.redis, self.keys, self.sid, waited)
        if self.on_unclaimed is not None:
            self.on_unclaimed(message)
        else:
            log.warning("%s", message)

    def _lost(self, what: str) -> SessionLost:
        return SessionLost(
            f"session {self.sid} was lost by Redis before it ended: {what} (Redis restarted "
            "without persistence, or evicted the key). Check that Redis runs with persistence "
            "(appendonly yes) and maxmemory-policy noeviction."
        )


async def follow_session(
    redis: aioredis.Redis,
    keys: Keys,
    sid: str,
    from_id: str = "0",
    *,
    block_ms: int = DEFAULT_BLOCK_MS,
    state_check_seconds: float = DEFAULT_STATE_CHECK_SECONDS,
    unclaimed_warning: float | None = DEFAULT_UNCLAIMED_WARNING_SECONDS,
    on_unclaimed: Callable[[str], None] | None = None,
    unclaimed_timeout: float | None = None,
) -> AsyncIterator[dict[str, Any]]:
    """Events of session `sid` after stream id `from_id` ("0" = from its first event, "$" = from
    now), ending after its `session_ended` event.

    Raises `SessionLost` when Redis loses the session before it ended (see `_LossWatch`); while
    idle it checks the session's state hash at most every `state_check_seconds`.

    A session no worker has claimed (no state hash, no event) after `unclaimed_warning` seconds
    gets one warning: passed to `on_unclaimed` if given, else logged on the "voxqueue.producer"
    logger (None: no warning). It names what to check (Redis database, namespace, partition
    count). With `unclaimed_timeout`, the reader gives up after that long unclaimed and raises
    `SessionUnclaimed`; by default it goes on waiting, since a reader may start long before the
    producer does. Both are checked with the state hash, so with the granularity of
    `state_check_seconds`."""
    watch = _LossWatch(
        redis,
        keys,
        sid,
        state_check_seconds,
        warn_after=unclaimed_warning,
        on_unclaimed=on_unclaimed,
        give_up_after=unclaimed_timeout,
    )
    stream = keys.session(sid).results
    async for _, event in read_events(redis, [stream], from_id, block_ms=block_ms, on_idle=watch.check):
        watch.events_read = True
        yield event
        if event.get("type") == SESSION_ENDED and event.get("sid") == sid:
            return


async def follow_all(
    redis: aioredis.Redis,
    keys: Keys,
    from_id: str = "$",
    *,
    block_ms: int = DEFAULT_BLOCK_MS,
) -> AsyncIterator[dict[str, Any]]:
    """Events of every session in every partition after `from_id` ("$" = from now on), forever."""
    async for _, event in read_events(redis, keys.all_results(), from_id, block_ms=block_ms):
        yield event


async def read_events(
    redis: aioredis.Redis,
    streams: list[str],
    from_id: str = "$",
    *,
    block_ms: int = DEFAULT_BLOCK_MS,
    count: int = 200,
    on_idle: Callable[[], Awaitable[None]] | None = None,
) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """(stream, event) for every decodable entry of `streams` after `from_id`, in one blocking
    XREAD over all of them. Entries that are not valid events are logged and skipped: one bad
    writer must not stop a reader. `on_idle` is awaited before each read, and after every read that
    found nothing new (so it may raise to end the reader)."""
    cursors = {stream: await _resolve(redis, stream, from_id) for stream in streams}
    reply: Any = None
    while True:
        if on_idle is not None and not reply:
            await on_idle()
        reply = await _xread(redis, cursors, count, block_ms)
        raise_if_cancelling()  # see producer.aio: redis-py on 3.11 can swallow a cancellation
        for raw_stream, entries in reply or []:
            stream = raw_stream.decode() if isinstance(raw_stream, bytes) else raw_stream
            for entry_id, fields in entries:
                cursors[stream] = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                try:
                    event = decode_event(fields)
                except (ProtocolError, ValueError, TypeError) as exc:
                    log.warning("skipping bad results entry %s %s: %s", stream, cursors[stream], exc)
                    continue
                yield stream, event


CLUSTER_POLL_SECONDS = 0.1  # a reader of several partitions on a cluster: pause after an empty pass


async def _xread(redis: aioredis.Redis, cursors: dict[str, str], count: int, block_ms: int) -> Any:
    """One XREAD over `cursors`; on Redis Cluster, where one XREAD cannot span slots (partitions),
    one per slot, all at once and not blocking, with a short pause when none found anything."""
    if not is_cluster(redis) or len(cursors) == 1:
        return await redis.xread(cursors, count=count, block=block_ms)  # type: ignore[arg-type]
    by_slot: dict[int, dict[str, str]] = {}
    for stream, cursor in cursors.items():
        by_slot.setdefault(redis.keyslot(stream), {})[stream] = cursor  # type: ignore[attr-defined]
    if len(by_slot) == 1:
        return await redis.xread(cursors, count=count, block=block_ms)  # type: ignore[arg-type]
    replies = await asyncio.gather(*(redis.xread(group, count=count) for group in by_slot.values()))  # type: ignore[arg-type]
    merged = [
        item for reply in replies for item in (reply.items() if isinstance(reply, dict) else reply or [])
    ]
    if not merged:
        await asyncio.sleep(min(CLUSTER_POLL_SECONDS, block_ms / 1000))
    return merged


async def _resolve(redis: aioredis.Redis, stream: str, from_id: str) -> str:
    """Turn "$" into the stream's current last id once: XREAD with "$" on every call would miss
    whatever arrives between two calls."""
    if from_id != "$":
        return from_id
    last = await redis.xrevrange(stream, count=1)
    if not last:
        return "0-0"  # no stream yet: everything that appears later is new
    entry_id = last[0][0]
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
