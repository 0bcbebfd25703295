"""Read transcript events back: one session's results stream, or every partition's.

Plain XREAD (no consumer group): these readers are for the backend that made the audio, for
`voxqueue tail` and for tests, which each want to see every event, not share them out. Fleet-wide
consumers that need at-least-once processing use their own consumer group on `vq:{pN}:results`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis

from producer.aio import raise_if_cancelling
from producer.protocol import SESSION_ENDED, Keys, ProtocolError, decode_event

# Plain stdlib logging, not structlog: this is a library embedded in other people's backends, and
# unconfigured structlog prints to stdout (which `voxqueue produce` reserves for the session id).
log = logging.getLogger("voxqueue.producer")

# Shorter than redis-py's default socket timeout (5 s) so a blocking read never looks like a
# dead connection; an idle reader costs one round trip per block.
DEFAULT_BLOCK_MS = 2000


async def follow_session(
    redis: aioredis.Redis,
    keys: Keys,
    sid: str,
    from_id: str = "0",
    *,
    block_ms: int = DEFAULT_BLOCK_MS,
) -> AsyncIterator[dict[str, Any]]:
    """Events of session `sid` after stream id `from_id` ("0" = from its first event, "$" = from
    now), ending after its `session_ended` event."""
    async for _, event in read_events(redis, [keys.session(sid).results], from_id, block_ms=block_ms):
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
) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """(stream, event) for every decodable entry of `streams` after `from_id`, in one blocking
    XREAD over all of them. Entries that are not valid events are logged and skipped: one bad
    writer must not stop a reader."""
    cursors = {stream: await _resolve(redis, stream, from_id) for stream in streams}
    while True:
        reply = await redis.xread(cursors, count=count, block=block_ms)  # type: ignore[arg-type]
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
