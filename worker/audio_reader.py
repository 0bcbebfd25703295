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
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
import structlog
from redis.exceptions import ResponseError

from producer.cluster import REDIRECTS, ClusterNode, is_cluster, private_connection
from producer.cluster import ready as cluster_ready
from producer.cluster import refresh as cluster_refresh
from producer.resp import bulk, pack_xread
from worker.backoff import Backoff
from worker.store import TRANSIENT_REDIS_ERRORS

log = structlog.get_logger("voxqueue.reader")

Entry = tuple[bytes, dict[bytes, bytes]]
YIELD_EVERY = 16  # inline sends between two yields to the event loop
# Bound on handing one read's entries out (one timer per read, not per frame: see run).
DELIVERY_SECONDS = 0.2
CLUSTER_POLL_SECONDS = 0.01  # Redis Cluster, several partitions: pause after a read that found nothing


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

    __slots__ = ("broken", "entries", "event", "limit", "overflowed")

    def __init__(self, limit: int) -> None:
        self.entries: deque[Entry] = deque()
        self.event = asyncio.Event()
        self.limit = limit
        self.overflowed = False
        self.broken = ""  # why the stream cannot be read at all (its key holds another type)

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

    def fail(self, reason: str) -> None:
        self.broken = reason
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
        # Redis Cluster: the reader's own connection to each node (node name -> connection).
        self._node_conns: dict[str, Any] = {}

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
        if is_cluster(self.redis):
            return await self._xread_cluster(snapshot)
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

    async def _xread_cluster(self, snapshot: dict[bytes, _Follower]) -> list[tuple[bytes, list[Entry]]]:
        """Redis Cluster: one XREAD cannot name streams of several slots, and each partition is a
        slot. So one XREAD per partition, packed by hand into one pipeline per node, every node
        at once: a read costs one round trip per node, whatever the number of partitions. With
        one node and one partition the XREAD blocks as on a single Redis; otherwise none can
        (a blocked read would hold back the rest of its node's pipeline), so an empty read
        waits CLUSTER_POLL_SECONDS, or less if the followed set changes, before the next."""
        cluster = await cluster_ready(self.redis)
        by_node: dict[ClusterNode, dict[int, list[bytes]]] = {}  # node -> slot -> keys
        for key in snapshot:
            slot = cluster.keyslot(key)
            node = cluster.nodes_manager.get_node_from_slot(slot)
            by_node.setdefault(node, {}).setdefault(slot, []).append(key)
        single = len(by_node) == 1 and len(next(iter(by_node.values()))) == 1
        block = self.block_ms if single else None
        self._changed.clear()
        results = await asyncio.gather(
            *(
                self._read_node(node, list(by_slot.values()), snapshot, block)
                for node, by_slot in by_node.items()
            ),
            return_exceptions=True,
        )
        out: list[tuple[bytes, list[Entry]]] = []
        failure: BaseException | None = None
        for result in results:
            if isinstance(result, BaseException):
                failure = result
            else:
                out += result
        if failure is not None:
            await cluster_refresh(cluster)
            if not out:
                raise failure
        if block is None and not any(entries for _, entries in out):
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLUSTER_POLL_SECONDS):
                    await self._changed.wait()
        return out

    async def _read_node(
        self,
        node: ClusterNode,
        groups: list[list[bytes]],
        snapshot: dict[bytes, _Follower],
        block: int | None,
    ) -> list[tuple[bytes, list[Entry]]]:
        payload = b"".join(
            [
                pack_xread(
                    self.count,
                    block,
                    b"".join([bulk(k) for k in keys]),
                    len(keys),
                    [snapshot[k].position for k in keys],
                )
                for keys in groups
            ]
        )
        conn = self._node_conns.pop(node.name, None) or private_connection(node)
        replies: list[Any] = []
        try:
            await conn.send_packed_command(payload, check_health=False)
            for _ in groups:
                try:
                    replies.append(await conn.read_response(disable_decoding=True))
                except REDIRECTS as exc:  # this slot moved (reshard, failover): next read re-routes
                    replies.append(exc)
        except BaseException:
            # Unread replies may be on it: never reuse this connection.
            await conn.disconnect()
            raise
        self._node_conns[node.name] = conn  # kept for this reader alone, as on a single Redis
        out: list[tuple[bytes, list[Entry]]] = []
        redirected: BaseException | None = None
        for reply in replies:
            if isinstance(reply, BaseException):
                redirected = reply
                continue
            out += _entries_by_stream(reply)
        if redirected is not None and not out:
            raise redirected
        if redirected is not None:
            await cluster_refresh(self.redis)
        return out

    async def _deliver(
        self, reply: list[tuple[bytes, list[Entry]]], snapshot: dict[bytes, _Follower]
    ) -> None:
        """Hands one read's entries to their sessions: sent inline when the session takes them,
        else into its inbox. A follower's position moves only when it is reached, so a delivery
        cut short (see run) leaves the rest to be read again."""
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

    async def _drop_unreadable(self, snapshot: dict[bytes, _Follower]) -> None:
        """Unfollows the followed keys that are not streams and fails their sessions' input."""
        keys = list(snapshot)
        try:
            types = [await self.redis.type(key) for key in keys]
        except TRANSIENT_REDIS_ERRORS:
            return  # the next read finds out again
        for key, kind in zip(keys, types, strict=True):
            if kind in (b"stream", b"none", "stream", "none"):
                continue
            follower = snapshot[key]
            if self.followers.get(key) is follower:
                del self.followers[key]
            name = kind.decode() if isinstance(kind, bytes) else str(kind)
            log.error(
                "an audio key is not a stream: its session fails", key=key.decode(errors="replace"), type=name
            )
            follower.inbox.fail(f"the audio key holds a {name}, not a stream")

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
            except ResponseError as exc:
                if "WRONGTYPE" not in str(exc):
                    raise
                # One read names every followed stream: one key a producer turned into another
                # type fails them all. Find it, tell its session, read the others on.
                await self._drop_unreadable(snapshot)
                continue
            backoff.reset()
            try:
                async with asyncio.timeout(DELIVERY_SECONDS):
                    await self._deliver(reply, snapshot)
            except TimeoutError:
                # An inline send waited on a socket that does not drain (send_inline only writes
                # below the transport's low-water mark, so this is a backstop): the followers not
                # reached yet keep their positions and are read again at once.
                log.warning("delivering a read took too long; reading again", seconds=DELIVERY_SECONDS)
                continue
            # Every XREAD names every followed stream, so its cost grows with the session count;
            # when frames trickle in, reading at most once per interval lets each read carry many
            # sessions' frames (a bounded latency cost, measured in BENCHMARKS.md).
            if reply and self.read_interval > 0:
                rest = self.read_interval - (loop.time() - started)
                if rest > 0:
                    await asyncio.sleep(rest)
