"""One blocking XREAD over the audio streams of every session this worker owns.

Reading many streams per call is what makes the Redis hop cheap (BENCHMARKS.md): one round trip
brings frames for hundreds of sessions. Each session gets an `Inbox`; the reader only appends to it
and wakes the session's sender.

Why XREAD from the owner's own position and not XREADGROUP `>`: a consumer group keeps ONE cursor
per stream for all its consumers. A former owner that was frozen past its lease still has a read in
flight when it wakes, and that read moves the shared cursor past frames the new owner then never
sees (the SIGSTOP chaos test caught exactly this). The lease on the session's `sessions` entry
already makes ownership exclusive; the audio position belongs to the owner alone.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
import structlog

from producer.resp import bulk, pack_xread
from worker.backoff import Backoff
from worker.store import TRANSIENT_REDIS_ERRORS

log = structlog.get_logger("voxqueue.reader")

Entry = tuple[bytes, dict[bytes, bytes]]
YIELD_EVERY = 16  # inline sends between two yields to the event loop


def _entries_by_stream(raw: Any) -> list[tuple[bytes, list[Entry]]]:
    """XREAD's reply, RESP2 (a list of [key, entries]) or RESP3 (a map), as (key, [(id, fields)])."""
    if not raw:
        return []
    streams = raw.items() if isinstance(raw, dict) else raw
    out = []
    for key, entries in streams:
        parsed = []
        for entry_id, flat in entries:
            it = iter(flat)
            parsed.append((entry_id, dict(zip(it, it, strict=True))))
        out.append((key, parsed))
    return out


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


InlineSender = Callable[[list[Entry]], Awaitable[bool]]


class _Follower:
    __slots__ = ("inbox", "inline", "position")

    def __init__(self, inbox: Inbox, position: bytes, inline: InlineSender | None) -> None:
        self.inbox = inbox
        self.position = position
        self.inline = inline


class AudioReader:
    def __init__(
        self, redis: aioredis.Redis, *, count: int, block_ms: int = 100, read_interval_ms: float = 0.0
    ) -> None:
        self.redis = redis
        self.count = count
        self.block_ms = block_ms
        self.read_interval = read_interval_ms / 1000
        self.followers: dict[bytes, _Follower] = {}
        self._changed = asyncio.Event()
        self._conn: Any = None  # the reader's own connection, held for good
        self._packed_for: tuple[bytes, ...] = ()
        self._packed_keys = b""

    def follow(self, audio_key: str, inbox: Inbox, after: bytes, inline: InlineSender | None = None) -> None:
        """Deliver entries after `after` from the next read on: to `inline` when it accepts them
        (it sends them at once, from this task), else to `inbox`. Replaces any earlier follow of
        the same stream: a read in flight for the old one is then discarded."""
        self.followers[audio_key.encode()] = _Follower(inbox, after, inline)
        self._changed.set()

    def unfollow(self, audio_key: str) -> None:
        self.followers.pop(audio_key.encode(), None)

    async def _xread(self, snapshot: dict[bytes, _Follower]) -> list[tuple[bytes, list[Entry]]]:
        """XREAD packed by hand (producer.resp): redis-py's generic packing and chunked writes of a
        command naming hundreds of streams cost more than reading them. The keys are packed once
        per change of the followed set; only the positions are packed per read."""
        keys = tuple(snapshot)
        if keys != self._packed_for:
            self._packed_for, self._packed_keys = keys, b"".join([bulk(k) for k in keys])
        payload = pack_xread(
            self.count, self.block_ms, self._packed_keys, len(keys), [f.position for f in snapshot.values()]
        )
        pool = self.redis.connection_pool
        if self._conn is None:
            self._conn = await pool.get_connection()
        conn = self._conn
        try:
            await conn.send_packed_command(payload, check_health=False)
            raw = await conn.read_response(disable_decoding=True)
        except BaseException:
            # Unread replies may be on it: never reuse this connection.
            self._conn = None
            await conn.disconnect()
            await pool.release(conn)
            raise
        return _entries_by_stream(raw)

    async def run(self) -> None:
        backoff = Backoff(0.05, 2.0)
        loop = asyncio.get_running_loop()
        while True:
            if not self.followers:
                self._changed.clear()
                await self._changed.wait()
                continue
            snapshot = dict(self.followers)
            started = loop.time()
            try:
                reply = await self._xread(snapshot)
            except TRANSIENT_REDIS_ERRORS as exc:
                delay = backoff.next_delay()
                log.warning("redis read failed, retrying", error=type(exc).__name__, retry_in=round(delay, 2))
                await asyncio.sleep(delay)
                continue
            backoff.reset()
            inline_sends = 0
            for key, entries in reply:
                follower = snapshot.get(key)
                # Deliver only to the follower the read was made for: a session that stopped or
                # re-positioned while the read was in flight has moved on.
                if not entries or follower is None or self.followers.get(key) is not follower:
                    continue
                follower.position = entries[-1][0]
                if follower.inline is not None and await follower.inline(entries):
                    inline_sends += 1
                    if inline_sends % YIELD_EVERY == 0:
                        # Let transcripts coming back (and anything else ready) through between
                        # slices of a big read, so they never wait for the whole read to go out.
                        await asyncio.sleep(0)
                    continue
                follower.inbox.deliver(entries)
            # Every XREAD names every followed stream, so its cost grows with the session count;
            # when frames trickle in, reading at most once per interval lets each read carry many
            # sessions' frames (a bounded latency cost, measured in BENCHMARKS.md).
            if reply and self.read_interval > 0:
                rest = self.read_interval - (loop.time() - started)
                if rest > 0:
                    await asyncio.sleep(rest)
