"""One accepted connection: audio in, engine events out, faults applied.

`BaseSession` is what `/v1/listen` and `/v2/listen` (Flux, flux_session.py) share: the receive
loop, the faults, the silence timeout and the ordered, possibly delayed, output. `Session` is the
`/v1/listen` protocol on top of it.

The receive loop is the emulator's hot path (hundreds of connections at 50 messages/s each): per
audio message it does a few integer updates and one engine call, and builds no JSON unless the
engine produced an event. Everything sent goes through `_send`, which drops output on a stalled
connection and delays it (in order) under the slow-results fault.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any, Final, Generic, Protocol, TypeVar

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from .events import BadAudio, ChannelTagged, Engine, Event, SpeechStarted, Transcript, UtteranceEnd
from .faults import DROP_REASON, FAIL_REASON, ConnectionFaults, FaultInjector
from .messages import Renderer
from .stats import EmulatorStats

log = logging.getLogger(__name__)

NEVER: Final = 1 << 62
LAG_BATCH: Final = 256  # lag samples kept per connection before they go to the shared reservoir
TIMEOUT_REASON: Final = (
    "NET-0001: Deepgram did not receive audio data or a text message within the timeout window. "
    "See https://dpgr.am/net0001"
)
UNSUPPORTED_ENCODING: Final = (
    "DATA-0000: could not process audio: only encoding=linear16, mulaw and alaw are decoded"
)
INTERNAL_REASON: Final = "NET-0000: The service has encountered an internal error."
# Codes of Flux's fatal `Error` message (Deepgram documents the shape, not a list of codes).
TIMEOUT_CODE: Final = "TIMEOUT"
BAD_AUDIO_CODE: Final = "UNPARSABLE_AUDIO"
_CLOSE: Final = object()  # outbox sentinel: close after everything queued before it


class Feeds(Protocol):
    """What the receive loop needs of an engine, whichever protocol it speaks."""

    blocking: bool
    lag_ns: list[int]

    def feed(self, data: bytes, now_ns: int = 0) -> list[Any]: ...

    def release(self) -> None: ...


EngineT = TypeVar("EngineT", bound=Feeds)
EventT = TypeVar("EventT")


class BaseSession(Generic[EngineT, EventT]):
    def __init__(
        self,
        connection: ServerConnection,
        *,
        engine: EngineT,
        frame_bytes: int,
        decodable: bool,
        faults: ConnectionFaults,
        injector: FaultInjector,
        stats: EmulatorStats,
        clock: Callable[[], float],
    ) -> None:
        self._conn = connection
        self._engine = engine
        self._frame_bytes = frame_bytes
        self._decodable = decodable
        self._injector = injector
        self._stats = stats
        self._clock = clock
        first = faults.first()
        self._fault_kind = first[1] if first else ""
        self._fault_at = first[0] * frame_bytes if first else NEVER  # in bytes: one compare per message
        self._bytes = 0
        self.stalled = False
        self.closing = False
        self.last_activity = clock()
        self._outbox: asyncio.Queue[tuple[float, Any, int, str]] | None = None
        self._sender: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------------------ receiving

    async def run(self) -> None:
        try:
            await self._opened()
            await self._receive()
        except ConnectionClosed:
            pass  # the client went away; nothing to answer
        except Exception:
            # An engine bug must fail its own connection, as a Deepgram internal error would.
            log.exception("emulator session failed")
            with contextlib.suppress(ConnectionClosed):
                await self._fail(1011, INTERNAL_REASON, "INTERNAL_SERVER_ERROR", drain=False)
        finally:
            if self._sender is not None and not self._sender.done():
                self._sender.cancel()
            self._engine.release()
            self.flush_lags()

    def flush_lags(self) -> None:
        """Move the engine's lag samples into the stats (batched: the stats endpoint flushes too)."""
        lags = self._engine.lag_ns
        if lags:
            self._stats.lag.add(lags)
            lags.clear()

    async def _receive(self) -> None:
        engine = self._engine
        stats = self._stats
        fb = self._frame_bytes
        clock = self._clock
        blocking = engine.blocking
        async for message in self._conn:
            self.last_activity = clock()
            stats.messages_received += 1
            if isinstance(message, str):
                if self.stalled:
                    continue  # a half-open stream answers nothing, not even CloseStream
                if await self._on_text(_control_message(message), message):
                    return
                continue
            n = len(message)
            if not n:
                # Deepgram's legacy end-of-stream signal: an empty binary message means CloseStream.
                if not self.stalled:
                    await self._close_stream()
                    return
                continue
            before = self._bytes
            self._bytes = total = before + n
            stats.bytes_received += n
            stats.frames_received += total // fb - before // fb
            if total >= self._fault_at:
                if await self._fault():
                    return
                continue
            if self.stalled:
                continue
            if not self._decodable:
                await self._fail(1008, UNSUPPORTED_ENCODING, BAD_AUDIO_CODE)
                return
            try:
                if blocking:
                    events = await asyncio.to_thread(engine.feed, message)
                else:
                    events = engine.feed(message, time.time_ns())
            except BadAudio as exc:
                await self._fail(1008, str(exc), BAD_AUDIO_CODE)
                return
            if len(engine.lag_ns) >= LAG_BATCH:
                self.flush_lags()
            if events:
                await self._send_events(events)

    async def _opened(self) -> None:
        """Called once the connection is accepted, before any message is read."""

    async def _on_text(self, msg: dict[str, Any], text: str) -> bool:
        """Handle a control message (`msg`: the parsed JSON object, {} when `text` is not one);
        True when the connection is done."""
        raise NotImplementedError

    async def _close_stream(self) -> None:
        raise NotImplementedError

    async def _send_events(self, events: list[EventT]) -> None:
        raise NotImplementedError

    async def _call(self, fn: Callable[[], list[EventT]]) -> list[EventT]:
        """Run an engine call off the event loop when the engine does CPU-heavy work."""
        if self._engine.blocking:
            return await asyncio.to_thread(fn)
        return fn()

    async def _fail(self, code: int, reason: str, error_code: str, *, drain: bool = True) -> None:
        """End the connection for an error: `code` and `reason` go in the close frame; `error_code`
        names the error where the protocol has an error message for it (Flux's `Error`)."""
        await self._close(code, reason, drain=drain)

    # ------------------------------------------------------------------------------ faults

    async def _fault(self) -> bool:
        """Apply this connection's due fault; True when the connection is gone."""
        kind = self._fault_kind
        self._fault_at = NEVER  # one fault per connection
        stats = self._stats
        if kind == "stall":
            self.stalled = True
            stats.stalls += 1
            return False
        stats.drops[kind] += 1
        if kind == "abrupt":
            # No close frame, no FIN handshake: the client sees 1006, as when a load balancer dies.
            self.closing = True
            transport = self._conn.transport
            if transport is not None:
                transport.abort()
            return True
        await self._close(1011, DROP_REASON if kind == "close" else FAIL_REASON, drain=False)
        return True

    def expire(self) -> asyncio.Task[None] | None:
        """The silence timeout elapsed: close 1011 NET-0001 as Deepgram does."""
        if self.closing or self.stalled:
            return None
        return asyncio.ensure_future(self._fail(1011, TIMEOUT_REASON, TIMEOUT_CODE, drain=False))

    # ------------------------------------------------------------------------------ sending

    async def _send(self, text: str, kind: str) -> None:
        if self.stalled or self.closing:
            return
        self._stats.messages_sent[kind] += 1
        delay = self._injector.slow_results_s
        if delay > 0 or self._outbox is not None:
            # Once anything was delayed, everything after it queues too, so order is kept.
            self._queue((self._clock() + delay, text, 0, ""))
        else:
            await self._conn.send(text)

    def _queue(self, item: tuple[float, Any, int, str]) -> None:
        if self._outbox is None:
            self._outbox = asyncio.Queue()
            self._sender = asyncio.ensure_future(self._drain(self._outbox))
        self._outbox.put_nowait(item)

    async def _drain(self, outbox: asyncio.Queue[tuple[float, Any, int, str]]) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                due, payload, code, reason = await outbox.get()
                wait = due - self._clock()
                if wait > 0:
                    await asyncio.sleep(wait)
                if payload is _CLOSE:
                    await _send_close(self._conn, code, reason)
                    return
                await self._conn.send(payload)

    async def _close(self, code: int, reason: str, *, drain: bool = True) -> None:
        if self.closing:
            return
        self.closing = True
        self._stats.close_codes[code] += 1
        if drain and self._outbox is not None and self._sender is not None and not self._sender.done():
            # Close behind the delayed messages, at the time the last of them is due.
            self._outbox.put_nowait((0.0, _CLOSE, code, reason))
            await self._sender
            return
        if self._sender is not None:
            self._sender.cancel()
        await _send_close(self._conn, code, reason)


def _control_message(text: str) -> dict[str, Any]:
    """A client's text message as a JSON object; {} for anything else (not JSON, hostile nesting
    such as [[[[...]]]], which raises RecursionError, or JSON that is not an object)."""
    try:
        msg = json.loads(text)
    except (ValueError, RecursionError):
        return {}
    return msg if isinstance(msg, dict) else {}


NO_STATUS: Final = 1005  # "close without a status code": an empty close frame (Flux after CloseStream)


async def _send_close(conn: ServerConnection, code: int, reason: str) -> None:
    if code == NO_STATUS:
        await conn.close(None, "")  # type: ignore[arg-type]  # websockets sends an empty close frame
    else:
        await conn.close(code, reason)


class Session(BaseSession[Engine, Event]):
    """A `/v1/listen` connection: Results, Metadata, SpeechStarted, UtteranceEnd."""

    def __init__(self, connection: ServerConnection, *, renderer: Renderer, **kwargs: Any) -> None:
        super().__init__(connection, **kwargs)
        self._renderer = renderer

    async def _on_text(self, msg: dict[str, Any], text: str) -> bool:
        kind = msg.get("type")
        if kind == "KeepAlive":
            return False
        if kind == "Finalize":
            await self._send_events(await self._call(self._engine.finalize))
            return False
        if kind == "CloseStream":
            await self._close_stream()
            return True
        if kind == "Configure":
            keyterms = msg.get("keyterms")
            await self._send(self._renderer.configure_success(keyterms), "ConfigureSuccess")
            return False
        await self._send(self._renderer.error("could not parse the control message", text), "Error")
        return False

    async def _close_stream(self) -> None:
        await self._send_events(await self._call(self._engine.close_stream))
        await self._send(self._renderer.metadata(self._engine.audio_seconds()), "Metadata")
        await self._close(1000, "")

    async def _send_events(self, events: list[Event]) -> None:
        r = self._renderer
        stats = self._stats
        for tagged in events:
            channel = 0
            e = tagged
            if isinstance(tagged, ChannelTagged):
                channel, e = tagged.channel, tagged.event
            if isinstance(e, Transcript):
                if e.is_final:
                    stats.finals_sent += 1
                else:
                    stats.interims_sent += 1
                await self._send(r.results(e, channel), "Results")
                if e.is_final and channel == 0:
                    stats.record_final(r.request_id, e.start + e.duration)
            elif isinstance(e, SpeechStarted):
                await self._send(r.speech_started(e, channel), "SpeechStarted")
            elif isinstance(e, UtteranceEnd):
                await self._send(r.utterance_end(e, channel), "UtteranceEnd")
