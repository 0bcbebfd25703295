"""The worker's commit path to Redis: every session's fenced COMMIT and PUBLISH calls, pipelined
on one connection of the worker's own.

Why not redis-py for these: a script call through redis-py borrows a pool connection, packs its
arguments generically, writes them in a syscall of its own and awaits its reply through a
coroutine and a timeout context: about 45 µs of the worker's CPU per call, for a few µs of Redis
work, once per final of every session (BENCHMARKS.md, "Latest results": the worker 10 % cheaper
per frame with this module). Finals of different sessions also tend to arrive together (the
reader sends every session's frames in one pass, so Deepgram answers them close together), so the
calls made while the event loop runs one batch of ready callbacks go out in one write, and their
replies, read with hiredis, come back in one read.

What stays the same: the scripts, their keys and arguments, so the fencing of every call (each
script compares the session's epoch itself), and the errors callers see: redis-py's
ConnectionError for a lost connection (the callers' retry loops wait it out, as they do for
redis-py's), its TimeoutError for a reply that takes longer than the client's socket_timeout (none
by default), ResponseError (NoScriptError, ...) for a refused call. A connection redis-py cannot
hand over (Redis Cluster, a socket that is not an asyncio stream) leaves the calls to redis-py.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import Any

import hiredis
import redis.asyncio as aioredis
import structlog
from redis._parsers.base import BaseParser
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

from producer.batcher import CannotTakeOver, take_over
from producer.resp import pack, pack_evalsha

log = structlog.get_logger("voxqueue.redis")

_NOT_ENOUGH = object()  # hiredis: no complete reply buffered yet


class ScriptChannel(asyncio.Protocol):
    """Pipelined EVALSHA calls on one connection taken over from `client` (redis-py connects,
    authenticates and selects the database; this protocol then owns the socket)."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self.usable = True  # False once the client's connections turned out not to be takeable
        self.transport: asyncio.Transport | None = None
        self._conn: Any = None  # keeps redis-py's connection and stream writer referenced
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connecting: asyncio.Future[None] | None = None
        self._open_task: asyncio.Task[None] | None = None
        self._reader = _reader()
        self._pending: list[bytes] = []  # packed calls of this loop iteration, not written yet
        self._pending_futures: list[asyncio.Future[Any]] = []
        self._inflight: deque[asyncio.Future[Any]] = deque()  # written, in reply order
        self._flush_handle: asyncio.Handle | None = None
        self._closes = 0  # close() calls so far: a connect that spans one hands its socket back
        # The client's socket_timeout: how long redis-py waits for a reply before TimeoutError
        self._reply_timeout: float | None = None
        self._overdue: asyncio.TimerHandle | None = None
        self._reads = 0  # data_received calls: progress, for the reply timeout

    async def call(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        """The script's reply, as redis-py's `script(keys=..., args=...)` would return it (bytes
        undecoded). Loads the script once if Redis does not know it (NOSCRIPT)."""
        packed = pack_evalsha(script.sha, keys, args)
        try:
            return await self._send(packed)
        except NoScriptError:
            # A restarted or flushed Redis forgot the script: load it, then call it again (the
            # refused call ran nothing, so calling again is no repetition). On this connection:
            # redis-py's pool may still hold connections to the Redis that went away.
            source = script.script.encode() if isinstance(script.script, str) else bytes(script.script)
            await self._send(pack(b"SCRIPT", b"LOAD", source))
            return await self._send(packed)

    async def _send(self, packed: bytes) -> Any:
        loop = asyncio.get_running_loop()
        if self.transport is None or self._loop is not loop:
            await self._connect(loop)
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append(packed)
        self._pending_futures.append(future)
        if self._flush_handle is None:
            # After every callback that is ready now: the calls of the other sessions woken by
            # the same poll go in the same write.
            self._flush_handle = loop.call_soon(self._flush)
        return await future

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is not loop:  # a new event loop (tests): the old connection is unusable there
            self._forget()
            self._loop = loop
        connecting = self._connecting
        if connecting is None:
            connecting = self._connecting = loop.create_future()
            self._open_task = loop.create_task(self._open(connecting, self._closes))
        # Shielded: one caller's cancellation must not cancel the connect the others wait for.
        await asyncio.shield(connecting)

    async def _open(self, done: asyncio.Future[None], closes: int) -> None:
        try:
            conn, transport = await take_over(self.client, self)
            if self._closes != closes:  # closed meanwhile: this connection is nobody's
                transport.set_protocol(asyncio.Protocol())  # its connection_lost is not ours
                transport.abort()
                raise RedisConnectionError("the commit path was closed while connecting")
            self._conn, self.transport = conn, transport
            self._reader = _reader()
            self._reply_timeout = getattr(conn[0], "socket_timeout", None) or None
        except CannotTakeOver as exc:
            self.usable = False
            log.info("commit path: using redis-py", reason=str(exc))
            done.set_exception(Unusable(str(exc)))
        except asyncio.CancelledError:
            done.set_exception(RedisConnectionError("connecting to Redis was cancelled"))
            raise
        except Exception as exc:  # a connection error: the caller's retry loop waits it out
            done.set_exception(exc)
        else:
            done.set_result(None)
        finally:
            done.add_done_callback(_retrieve)
            self._connecting = None

    def _flush(self) -> None:
        self._flush_handle = None
        packed, futures = self._pending, self._pending_futures
        self._pending, self._pending_futures = [], []
        if self.transport is None or self.transport.is_closing():
            _fail(futures, RedisConnectionError("connection to Redis lost before the call was sent"))
            return
        self._inflight.extend(futures)
        self.transport.write(b"".join(packed))
        if self._reply_timeout is not None and self._overdue is None:
            self._arm_overdue(self._reply_timeout)

    def _arm_overdue(self, timeout: float) -> None:
        self._overdue = asyncio.get_running_loop().call_later(timeout, self._check_overdue, self._reads)

    def _check_overdue(self, reads: int) -> None:
        """No reply for socket_timeout with calls in flight: what redis-py raises TimeoutError for.
        The calls in flight fail so, and the connection is dropped (a late reply would be the
        wrong caller's)."""
        self._overdue = None
        if self.transport is None or not self._inflight or self._reply_timeout is None:
            return
        if self._reads != reads:  # replies came meanwhile: the calls still in flight get their time
            self._arm_overdue(self._reply_timeout)
            return
        log.warning("commit path: no reply from Redis in time: reconnecting", timeout=self._reply_timeout)
        overdue = list(self._inflight)
        self._inflight.clear()
        _fail(overdue, RedisTimeoutError(f"no reply from Redis within {self._reply_timeout} s"))
        self.transport.abort()

    # ------------------------------------------------------------------------ asyncio.Protocol

    def data_received(self, data: bytes) -> None:
        self._reads += 1
        reader = self._reader
        reader.feed(data)
        inflight = self._inflight
        try:
            while True:
                reply = reader.gets()
                if reply is _NOT_ENOUGH:
                    return
                if not inflight:
                    self._abort("a reply with no call in flight")
                    return
                future = inflight.popleft()
                if future.done():  # its caller was cancelled: the reply is not news to anyone
                    continue
                if isinstance(reply, hiredis.ReplyError):
                    future.set_exception(BaseParser.parse_error(str(reply)))
                else:
                    future.set_result(reply)
        # TypeError: a RESP3 map keyed by an array, which hiredis cannot make a dict of. Left to
        # the event loop, it would drop the connection too, but as a fatal error with a traceback.
        except (hiredis.ProtocolError, TypeError, ValueError) as exc:
            self._abort(f"unreadable reply: {exc}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._conn = None
        if self._overdue is not None:
            self._overdue.cancel()
            self._overdue = None
        failed = list(self._inflight) + self._pending_futures
        self._inflight.clear()
        self._pending, self._pending_futures = [], []
        _fail(failed, RedisConnectionError(f"connection to Redis lost ({exc or 'closed'})"))

    def _abort(self, why: str) -> None:
        log.warning("commit path: dropping the connection", reason=why)
        if self.transport is not None:
            self.transport.abort()

    def _forget(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            with contextlib.suppress(RuntimeError):  # its loop is closed
                self.transport.abort()
        self.transport, self._conn, self._connecting = None, None, None
        if self._overdue is not None:
            self._overdue.cancel()
            self._overdue = None
        self._inflight.clear()
        self._pending, self._pending_futures, self._flush_handle = [], [], None

    def close(self) -> None:
        """Closes the connection (and the one being made); calls in flight fail with
        ConnectionError."""
        self._closes += 1
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        # Queued, now never to be written: fail them here, as with no transport no connection_lost
        # will (a connection lost just before their flush). Their loop may be closed (tests).
        queued, self._pending, self._pending_futures = self._pending_futures, [], []
        with contextlib.suppress(RuntimeError):
            _fail(queued, RedisConnectionError("the commit path was closed before the call was sent"))
        if self.transport is not None:
            # In flight or not, nothing here waits for a graceful close. A transport whose loop
            # has closed is gone with it.
            with contextlib.suppress(RuntimeError):
                self.transport.abort()


class Unusable(Exception):
    """The channel cannot take the client's connections over: the caller uses redis-py."""


def _reader() -> hiredis.Reader:
    return hiredis.Reader(notEnoughData=_NOT_ENOUGH)


def _fail(futures: list[asyncio.Future[Any]], exc: Exception) -> None:
    for future in futures:
        if not future.done():
            future.set_exception(exc)
            future.add_done_callback(_retrieve)


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
