"""One blocking XREADGROUP over the audio streams of every session this worker owns.

Reading many streams per call is what makes the Redis hop cheap (ARCHITECTURE §9): one round trip
brings frames for hundreds of sessions. Each session gets an `Inbox`; the reader only appends to it
and wakes the session's sender. Frames are never acked here: a frame is acked when a final covers it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

import redis.asyncio as aioredis
import structlog
from redis.exceptions import ResponseError

from producer import protocol as p
from worker.backoff import Backoff
from worker.store import TRANSIENT_REDIS_ERRORS

log = structlog.get_logger("voxqueue.reader")

Entry = tuple[bytes, dict[bytes, bytes]]


class Inbox:
    """Entries read for one session, waiting for its sender. Bounded: on overflow the sender goes
    back to reading from Redis (everything is still there), so a stuck Deepgram link cannot make
    the worker buffer a session's audio without limit."""

    __slots__ = ("entries", "event", "limit", "overflowed")

    def __init__(self, limit: int) -> None:
        self.entries: deque[Entry] = deque()
        self.event = asyncio.Event()
        self.limit = limit
        self.overflowed = False

    def deliver(self, entries: list[Entry]) -> None:
        if self.overflowed:
            return
        self.entries.extend(entries)
        if len(self.entries) > self.limit:
            self.entries.clear()
            self.overflowed = True
        self.event.set()

    def take(self) -> list[Entry]:
        items = list(self.entries)
        self.entries.clear()
        self.event.clear()
        return items

    def reset(self) -> None:
        self.entries.clear()
        self.overflowed = False

    def wake(self) -> None:
        self.event.set()


class AudioReader:
    def __init__(self, redis: aioredis.Redis, consumer: str, *, count: int, block_ms: int = 100) -> None:
        self.redis = redis
        self.consumer = consumer
        self.count = count
        self.block_ms = block_ms
        self.inboxes: dict[bytes, Inbox] = {}
        self._changed = asyncio.Event()
        self.reads = 0
        self.entries_read = 0

    def add(self, audio_key: str, inbox: Inbox) -> None:
        self.inboxes[audio_key.encode()] = inbox
        self._changed.set()

    def remove(self, audio_key: str) -> None:
        self.inboxes.pop(audio_key.encode(), None)

    async def run(self) -> None:
        backoff = Backoff(0.05, 2.0)
        while True:
            if not self.inboxes:
                self._changed.clear()
                await self._changed.wait()
                continue
            streams = dict.fromkeys(self.inboxes, ">")
            try:
                reply = await self.redis.xreadgroup(
                    p.WORKERS_GROUP, self.consumer, streams, count=self.count, block=self.block_ms
                )
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                # A stream lost its group (Redis restarted without persistence, or keys expired):
                # recreate it; the session's sender re-reads from its commit point anyway.
                await self._recreate_groups(list(streams))
                continue
            except TRANSIENT_REDIS_ERRORS as exc:
                delay = backoff.next_delay()
                log.warning("redis read failed, retrying", error=type(exc).__name__, retry_in=round(delay, 2))
                await asyncio.sleep(delay)
                continue
            backoff.reset()
            self.reads += 1
            if not reply:
                continue
            orphans: list[tuple[bytes, list[bytes]]] = []
            for key, entries in reply:
                inbox = self.inboxes.get(key)
                if not entries:
                    continue
                if inbox is None:
                    orphans.append((key, [entry_id for entry_id, _ in entries]))
                    continue
                self.entries_read += len(entries)
                inbox.deliver(entries)
            if orphans:
                await self._ack_orphans(orphans)

    async def _ack_orphans(self, orphans: list[tuple[bytes, list[bytes]]]) -> None:
        """Entries of a session that ended or moved while the read was in flight. Acking them is
        only bookkeeping: whoever runs the session replays from its commit point, not from the
        pending list, so nothing is lost; leaving them would show as never-acked frames."""
        pipe = self.redis.pipeline(transaction=False)
        for key, ids in orphans:
            pipe.xack(key, p.WORKERS_GROUP, *ids)
        with contextlib.suppress(TRANSIENT_REDIS_ERRORS):
            await pipe.execute()

    async def _recreate_groups(self, keys: list[bytes]) -> None:
        for key in keys:
            try:
                await self.redis.xgroup_create(key, p.WORKERS_GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
