"""One session, owned by this worker: the asyncio shell around its SessionMachine.

Every decision (what to send, commit, publish or reject; when to reconnect, fail or end) is made by
worker/session_machine.py, which has no I/O. This module only performs the actions it returns: Redis
calls through the fenced SessionStore, WebSocket calls through the SDK connection, and waiting. A
connection is two tasks: this one (reads audio, sends it, watches the clock) and a receiver (reads
Deepgram's messages, commits and publishes what they yield). A lost lease (Fenced) stops the runner
without writing anything more.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog
from redis.exceptions import ResponseError
from websockets.exceptions import ConnectionClosed

from producer import protocol as p
from producer.options import V2_RANGES, is_flux, validate_options
from worker import deepgram_messages as dm
from worker import session_machine as sm
from worker.audio_reader import AudioReader, Entry, Inbox
from worker.backoff import Backoff
from worker.config import Settings
from worker.deepgram_link import DeepgramLink, request_id_of
from worker.failures import Failure, classify
from worker.metrics import METRICS, entry_age
from worker.store import TRANSIENT_REDIS_ERRORS, Acquired, Fenced, SessionStore
from worker.ws_send import write_binary

log = structlog.get_logger("voxqueue.session")

INLINE_MAX_BUFFERED = 64 * 1024  # socket write buffer beyond which the reader stops sending inline
RECEIVER_STOP_SECONDS = 5.0  # bound on waiting for a cancelled receiver (a cancel can be lost)
LAG_SAMPLE_EVERY = 8  # frame lag is observed on one message in 8: a histogram needs samples, not all
RECANCEL_SECONDS = 0.05  # a receiver still running this long after cancel() is cancelled again
HOLD_WAKE_SLACK_SECONDS = 0.001  # past the hold's deadline, so that the woken task finds it due

T = TypeVar("T")


@dataclass(slots=True)
class WorkerContext:
    settings: Settings
    store: SessionStore
    reader: AudioReader
    link: DeepgramLink
    consumer: str


class _Aborted(Exception):
    """The machine asked to drop the connection (stalled, stale commit point, closed early)."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(str(failure))
        self.failure = failure


class SessionRunner:
    def __init__(
        self, ctx: WorkerContext, start: p.SessionStart, entry_id: bytes, acquired: Acquired
    ) -> None:
        self.ctx = ctx
        self.settings = ctx.settings
        self.start = start
        self.sid = start.sid
        self.entry_id = entry_id
        self.keys = ctx.store.keys.session(start.sid)
        self.flux = is_flux(start.options)
        self.machine = sm.SessionMachine(
            start.sid,
            sm.Rules.from_settings(ctx.settings, start.format, self.flux),
            sm.Resume(acquired.epoch, acquired.committed_seq, acquired.committed_id, acquired.finals),
        )
        self.inbox = Inbox(limit=max(500, self.settings.read_count * 8))
        self.log = log.bind(sid=self.sid, epoch=acquired.epoch)
        self.options: dict[str, Any] = {}
        # Inline sending (send_inline): the connection the session is parked on, if it is.
        self.parked_conn: Any = None
        self.inline_busy = False
        self.inline_error: BaseException | None = None
        self.generation = 0  # one per Deepgram connection
        self._sends = 0
        # The event loop, kept: asyncio.get_running_loop() checks os.getpid() on every call, and
        # glibc no longer caches getpid, so on the per-frame path it is a syscall each time.
        self.loop: asyncio.AbstractEventLoop | None = None
        self._hold_timer: asyncio.TimerHandle | None = None  # wakes the task for held frames

    @property
    def epoch(self) -> int:
        return self.machine.epoch

    @property
    def end_seen(self) -> bool:
        """Input has ended (end marker read, or input the session cannot survive): draining lets
        such a session finish rather than hand it over."""
        return self.machine.end_seen

    # ------------------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        self.loop = asyncio.get_running_loop()
        structlog.contextvars.bind_contextvars(sid=self.sid)
        error: p.ProtocolError | None = None
        try:
            self.options = validate_options(self.start.options, self.start.format)
        except p.ProtocolError as exc:
            error = exc
        started = self.machine.events.session_started(self.start, self.ctx.consumer)
        await self._observe_claim()
        try:
            now = asyncio.get_running_loop().time()
            await self._drive(self.machine.begin(now, started, error))
        finally:
            self.ctx.reader.unfollow(self.keys.audio)
            self._cancel_hold_timer()

    async def _observe_claim(self) -> None:
        """Claim delay (a new session: epoch 1) or takeover gap (any later owner), for the metrics.
        The gap costs one XRANGE of one entry per takeover; failing to read it only skips it."""
        if self.epoch <= 1:
            age = entry_age(self.entry_id, time.time())
            if age is not None:
                METRICS.claim_delay.observe(max(0.0, age))
            return
        try:
            first = await self.ctx.store.read_range(self.keys.audio, self.machine.ledger.committed_id, 1)
        except Exception:  # a measurement must never cost the session
            return
        age = entry_age(first[0][0], time.time()) if first else None
        if age is not None:
            METRICS.takeover_gap.observe(max(0.0, age))

    async def fail_crash_loop(self, takeovers: int) -> None:
        await self._drive(self.machine.fail_crash_loop(takeovers))

    async def _drive(self, actions: list[sm.Action]) -> None:
        """Performs session-level actions until End: connections, waits between them, events."""
        queue = deque(actions)
        while queue:
            action = queue.popleft()
            if isinstance(action, sm.Connect):
                queue.extend(await self._connection())
            elif isinstance(action, sm.Reconnect):
                METRICS.reconnects.inc()
                self.log.warning(
                    "deepgram connection failed, reconnecting",
                    code=action.failure.code,
                    reason=action.failure.reason,
                    retry_in=round(action.delay, 3),
                    resume_seq=self.machine.ledger.committed_seq + 1,
                )
                await asyncio.sleep(action.delay)
                queue.extend(self.machine.reconnecting())
            elif isinstance(action, sm.End):
                if await self._end(action):
                    return
                queue.extend(self.machine.end_refused())
            else:
                await self._perform_redis(action)

    # ------------------------------------------------------------------------------ one connection

    async def _connection(self) -> list[sm.Action]:
        """One Deepgram connection, from the commit point to its end. Returns what comes after it
        (End, or Reconnect)."""
        machine = self.machine
        # Redis is the authority on the commit point, whether it is ahead of ours (a commit whose
        # reply was lost) or behind (Redis lost its last writes): the machine adopts it.
        seq, entry, finals = await self._retry_redis(
            lambda: self.ctx.store.commit_point(self.keys, self.epoch)
        )
        channels = machine.rules.channels
        marks: list[int] | None = None
        if channels > 1:
            marks = await self._retry_redis(
                lambda: self.ctx.store.channel_marks(self.keys, self.epoch, channels)
            )
        configure: dict[str, str] | None = None
        if self.flux:
            configure = await self._retry_redis(lambda: self.ctx.store.saved_configure(self.keys))
        for note in machine.commit_point(seq, entry, finals, marks, configure):
            self._note(note)
        self.ctx.reader.unfollow(self.keys.audio)
        self.inbox.reset()
        self.generation += 1
        self.inline_error, self.parked_conn = None, None
        try:
            async with self.ctx.link.connect(self.options, self.start.format) as conn:
                METRICS.connections.inc()
                return await self._converse(conn)
        except (asyncio.CancelledError, Fenced):
            raise
        except Exception as exc:
            failure = exc.failure if isinstance(exc, _Aborted) else classify(exc)
        finally:
            self.ctx.reader.unfollow(self.keys.audio)
            self.parked_conn = None
        METRICS.link_failures.labels(failure.code).inc()
        actions = machine.failed(failure, asyncio.get_running_loop().time())
        if any(isinstance(a, sm.End) for a in actions):
            self.log.error("deepgram session failed", code=failure.code, reason=failure.reason)
        return actions

    async def _converse(self, conn: Any) -> list[sm.Action]:
        loop = asyncio.get_running_loop()
        machine = self.machine
        queue: deque[sm.Action] = deque(machine.connected(loop.time(), request_id_of(conn)))
        receiver = asyncio.create_task(self._receive(conn))
        try:
            while True:
                while queue:
                    action = queue.popleft()
                    if isinstance(action, sm.Send):
                        await self._send(conn, action)
                    elif isinstance(action, sm.ReadAudio):
                        read = functools.partial(
                            self.ctx.store.read_range, self.keys.audio, action.after, action.count
                        )
                        try:
                            entries = await self._retry_redis(read)
                        except ResponseError as wrong:
                            if "WRONGTYPE" not in str(wrong):
                                raise
                            queue.extend(machine.input_broken("the audio key is not a stream", loop.time()))
                            continue
                        queue.extend(machine.caught_up(entries, loop.time(), action.count))
                        # A long catch-up into a half-open socket never parks: check here too.
                        queue.extend(machine.tick(loop.time()))
                    elif isinstance(action, sm.Follow):
                        self.inbox.reset()
                        self.ctx.reader.follow(self.keys.audio, self.inbox, action.after, self.send_inline)
                    elif isinstance(action, sm.KeepAlive):
                        await conn.send_keep_alive()
                    elif isinstance(action, sm.Finalize):
                        await conn.send_finalize()
                    elif isinstance(action, sm.ForceEndTurn):
                        await conn.send_force_end_turn()
                    elif isinstance(action, sm.Configure):
                        await conn.send_configure(configure_message(action.thresholds))
                    elif isinstance(action, sm.CloseInput):
                        self.ctx.reader.unfollow(self.keys.audio)
                        if self.flux:
                            # Flux's CloseStream does not end the turn in progress: end it first, so
                            # its EndOfTurn (and the commit of its frames) comes before the close.
                            await conn.send_force_end_turn()
                        else:
                            await conn.send_finalize()
                        await conn.send_close_stream()
                    elif isinstance(action, sm.Abort):
                        raise _Aborted(action.failure)
                    else:
                        await self._perform_redis(action)
                # Nothing to do: wait for audio, the receiver's end, or the next timer.
                if self.inline_error is not None:
                    error, self.inline_error = self.inline_error, None
                    raise error
                if receiver.done():
                    exc = receiver.exception()
                    if exc is not None and not self._closed_by_server(exc):
                        raise exc
                    after = machine.closed(loop.time())
                    if any(isinstance(a, sm.End) for a in after):
                        return after
                    queue.extend(after)
                    continue
                if self.inbox.broken:
                    reason, self.inbox.broken = self.inbox.broken, ""
                    queue.extend(machine.input_broken(reason, loop.time()))
                    continue
                if self.inbox.overflowed:
                    queue.extend(machine.inbox_overflowed(loop.time()))
                    continue
                if self.inbox.entries:
                    wait = machine.live_wait(loop.time())
                    if wait > 0:  # let more frames arrive, to send them as one message
                        await asyncio.sleep(wait)
                    queue.extend(machine.live(self.inbox.take(), loop.time()))
                    continue
                # While parked here the reader may send this session's frames itself (send_inline).
                self.parked_conn = conn if machine.phase is sm.Phase.LIVE else None
                try:
                    async with asyncio.timeout(machine.next_tick_in(loop.time())):
                        await self.inbox.event.wait()
                except TimeoutError:
                    pass
                finally:
                    self.parked_conn = None
                self.inbox.event.clear()
                queue.extend(machine.tick(loop.time()))
        finally:
            await _reap(receiver)

    def _closed_by_server(self, exc: BaseException) -> bool:
        """A close frame the machine counts as the server's normal end (Flux ends without a status
        code), rather than a failure to classify."""
        if not isinstance(exc, ConnectionClosed) or exc.rcvd is None:
            return False
        return self.machine.clean_close(exc.rcvd.code)

    async def _send(self, conn: Any, action: sm.Send) -> None:
        delay = action.not_before - (self.loop or asyncio.get_running_loop()).time()
        if delay > 0:
            await asyncio.sleep(delay)
        # Written directly while the socket drains (the SDK's send would not wait either); past the
        # low-water mark, through the SDK, whose send waits for the buffer to drain.
        if not (_below_low_water(conn, len(action.payload)) and write_binary(conn, action.payload)):
            await conn.send_media(action.payload)
        self.machine.written(action.last_seq)
        unacked = self.machine.ledger.unacked
        self._count_sent(action.frames, unacked[-1][1] if unacked else None)

    def _hold_due(self) -> None:
        self._hold_timer = None
        if self.machine.held:
            self.inbox.wake()

    def _cancel_hold_timer(self) -> None:
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None

    def _count_sent(self, frames: int, last_entry_id: bytes | None) -> None:
        METRICS.frames_sent.inc(frames)
        self._sends += 1
        if last_entry_id is not None and not self._sends % LAG_SAMPLE_EVERY:
            lag = entry_age(last_entry_id, time.time())
            if lag is not None:
                METRICS.frame_lag.observe(max(0.0, lag))

    async def send_inline(self, entries: list[Entry]) -> bool:
        """Called by the audio reader with fresh entries: sends them from the reader's own task when
        this session is parked waiting for audio, so a live frame costs no task switch.

        The machine takes only the plain case (the next well-formed frames, no pacing due) and
        records them as sent before the one await (the send), so a reconnect of the session can
        never be overtaken by it; after the await only this connection's generation may be told
        about a failure. Anything else is declined (False) and goes to the inbox.
        """
        conn = self.parked_conn
        if conn is None or self.inline_busy or self.inbox.entries or self.inbox.overflowed:
            return False
        # Only when the write cannot pause the transport: the send then never waits in drain, so
        # a socket that stopped draining can never hold the shared reader (the slow path sends it
        # from this session's own task). Below the low-water mark the transport is never paused.
        frame_bytes = self.machine.rules.frame_bytes
        if not _below_low_water(conn, (len(entries) + len(self.machine.held)) * frame_bytes):
            return False
        payload = self.machine.live_inline(entries, (self.loop or asyncio.get_running_loop()).time())
        if payload is None:
            return False
        if not payload:
            # Held back for the send interval: more frames normally make a message first; if not,
            # the session's own task sends what is held when the interval is over (tick). A timer
            # wakes it then, only if frames are still held: waking it at every hold would cost a
            # task switch per message, more than the fewer messages save.
            if len(self.machine.held) == len(entries):
                machine = self.machine
                due = machine.held_since + machine.rules.send_interval + HOLD_WAKE_SLACK_SECONDS
                self._cancel_hold_timer()
                self._hold_timer = (self.loop or asyncio.get_running_loop()).call_at(due, self._hold_due)
            return True
        self._cancel_hold_timer()
        frames = len(payload) // frame_bytes  # with frames held before, more than these entries
        if write_binary(conn, payload):  # the common case: written now, no await, no task switch
            self._count_sent(frames, entries[-1][0])
            return True
        generation = self.generation
        self.inline_busy = True
        try:
            await conn.send_media(payload)
            self._count_sent(frames, entries[-1][0])
        except Exception as exc:
            if generation == self.generation:
                self.inline_error = exc
                self.inbox.wake()
        finally:
            self.inline_busy = False
        return True

    # ------------------------------------------------------------------------------ receiving

    async def _receive(self, conn: Any) -> None:
        loop = asyncio.get_running_loop()
        machine = self.machine
        decode = dm.decode_v2 if self.flux else dm.decode
        try:
            async for raw in _raw_messages(conn):
                received = loop.time()
                try:
                    message = decode(raw)
                except dm.UnknownMessage as exc:
                    machine.unreadable_message(loop.time())
                    self.log.debug("skipped a message from deepgram", reason=str(exc))
                    continue
                for action in machine.message(message, loop.time()):
                    if isinstance(action, sm.CommitFinal):
                        await self._commit(action)
                        METRICS.transcript_latency.labels("final").observe(loop.time() - received)
                    else:
                        await self._perform_redis(action)
                        if isinstance(action, sm.Publish):
                            kind = str(action.event.get("type", "other"))
                            METRICS.transcript_latency.labels(kind).observe(loop.time() - received)
        finally:
            self.inbox.wake()

    async def _commit(self, action: sm.CommitFinal) -> None:
        channels = self.machine.rules.channels
        if channels > 1:
            result = await self._retry_redis(
                lambda: self.ctx.store.commit_channel(
                    self.keys, self.epoch, action.commit, action.event, channels
                )
            )
        else:
            result = await self._retry_redis(
                lambda: self.ctx.store.commit(self.keys, self.epoch, action.commit, action.event)
            )
        finals_before = self.machine.finals
        for after in self.machine.commit_result(action, result):
            if isinstance(after, sm.Abort):
                raise _Aborted(after.failure)
        if self.machine.finals > finals_before:
            METRICS.finals.inc()

    # ------------------------------------------------------------------------------ Redis actions

    async def _perform_redis(self, action: sm.Action) -> None:
        store, keys, epoch = self.ctx.store, self.keys, self.epoch
        if isinstance(action, sm.Publish):
            await self._retry_redis(lambda: store.publish(keys, epoch, action.event, once=action.once))
        elif isinstance(action, sm.RejectEntry):
            code = action.reason.partition(":")[0]
            METRICS.bad_entries.labels(code).inc()
            self.log.warning(
                "bad audio entry", entry=action.entry_id.decode(errors="replace"), reason=action.reason
            )
            await self._retry_redis(
                lambda: store.reject_entry(
                    keys, epoch, keys.audio, action.entry_id, action.reason, action.event
                )
            )
        elif isinstance(action, sm.SaveConfigure):
            await self._retry_redis(lambda: store.save_configure(keys, epoch, action.thresholds))
        elif isinstance(action, sm.Note):
            self._note(action)
        else:
            raise sm.MachineError(f"action {type(action).__name__} cannot be performed here")

    def _note(self, note: sm.Note) -> None:
        if note.what == "commit_point_regressed":
            METRICS.commit_point_regressions.inc()
            self.log.warning(
                "commit point went backwards in Redis (lost writes: persistence or failover); "
                "replaying from Redis's",
                **note.fields,
            )
        elif note.what == "abandoned":
            self.log.warning("session abandoned: no audio and no end marker", **note.fields)
        else:
            getattr(self.log, note.level)(note.what.replace("_", " "), **note.fields)

    async def _end(self, end: sm.End) -> bool:
        """Performs End; False when Redis refused it because its commit point is behind ours."""
        result = await self._retry_redis(
            lambda: self.ctx.store.finish(
                self.keys,
                self.epoch,
                self.entry_id,
                status=end.status,
                reason=end.reason,
                event=end.event,
                frames=end.frames,
                dead_reason=end.dead_reason,
                expect_committed=end.expect_committed,
            )
        )
        if result == "stale":
            METRICS.commit_point_regressions.inc()
            self.log.warning(
                "commit point went backwards in Redis before the end (lost writes): replaying",
                ours=end.expect_committed,
            )
            return False
        METRICS.sessions_ended.labels(end.reason).inc()
        self.log.info(
            "session ended",
            reason=end.reason,
            frames=end.frames,
            finals=end.finals,
            detail=end.detail or None,
        )
        return True

    async def _retry_redis(self, call: Callable[[], Awaitable[T]]) -> T:
        """Redis outages are waited out (the lease protects the session meanwhile, and fencing keeps
        a late write harmless); every call made through here is idempotent or best-effort."""
        backoff: Backoff | None = None  # made only when a call fails: this is the hot path
        while True:
            try:
                return await call()
            except TRANSIENT_REDIS_ERRORS as exc:
                backoff = backoff or Backoff(0.05, 2.0)
                delay = backoff.next_delay()
                self.log.warning(
                    "redis unavailable, retrying", error=type(exc).__name__, retry_in=round(delay, 2)
                )
                await asyncio.sleep(delay)


def _below_low_water(conn: Any, incoming: int) -> bool:
    """Whether `incoming` more bytes keep the connection's write buffer below its low-water mark
    (below it the transport is never paused, so a write never has to wait for a drain)."""
    transport = getattr(getattr(conn, "_websocket", None), "transport", None)
    if transport is None:
        return False
    low_water = transport.get_write_buffer_limits()[0] or INLINE_MAX_BUFFERED
    return transport.get_write_buffer_size() + incoming + 64 <= min(low_water, INLINE_MAX_BUFFERED)


def configure_message(thresholds: dict[str, str]) -> dict[str, Any]:
    """Flux's Configure message: the thresholds as JSON numbers (they are kept as query strings)."""
    values: dict[str, Any] = {}
    for name, text in thresholds.items():
        if name in V2_RANGES:
            values[name] = int(float(text)) if name == "eot_timeout_ms" else float(text)
    return {"type": "Configure", "thresholds": values}


async def _reap(task: asyncio.Task[None]) -> None:
    """Stops the receiver, bounded. A cancellation can be lost (CPython gh-86296: wait_for, which
    redis-py and the SDK use, can swallow one that lands as the inner call completes), so it is
    repeated every RECANCEL_SECONDS until the task ends or RECEIVER_STOP_SECONDS pass; the
    connection is being torn down anyway. A drain measured 60-87 of 100 sessions waiting here a
    full second when the receiver was cancelled only once."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + RECEIVER_STOP_SECONDS
    while not task.done():
        task.cancel()
        left = deadline - loop.time()
        if left <= 0:
            return
        await asyncio.wait([task], timeout=min(RECANCEL_SECONDS, left))
    if not task.cancelled():
        task.exception()  # retrieved: an error after an abort is not news


async def _raw_messages(conn: Any) -> AsyncIterator[str | bytes]:
    """The connection's text messages, undecoded: deepgram_messages decodes them ~10x cheaper
    than the SDK's union parsing. Falls back to the SDK's own iteration (re-serialised) should
    its socket attribute ever move."""
    websocket = getattr(conn, "_websocket", None)
    if websocket is not None:
        async for raw in websocket:
            if isinstance(raw, str):
                yield raw
        return
    async for message in conn:
        if not isinstance(message, bytes | dict):
            yield message.json()
