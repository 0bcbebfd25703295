"""One session, owned by this worker: frames from Redis to Deepgram, results from Deepgram to Redis.

The runner is the asyncio shell around the pure rules (FrameLedger, CatchupPacer, LinkClock,
classify, EventFactory). Each Deepgram connection starts at the session's commit point: the runner
re-reads uncommitted frames from Redis (catch-up, paced), then follows live frames from its inbox.
A connection failure only costs a new connection and a replay of the uncommitted frames; a lost
lease (Fenced) stops the runner without writing anything more.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import structlog

from producer import protocol as p
from producer.options import validate_options
from worker import deepgram_messages as dm
from worker.audio_reader import AudioReader, Entry, Inbox
from worker.backoff import Backoff
from worker.config import Settings
from worker.deepgram_link import DeepgramLink, request_id_of
from worker.events import EventFactory
from worker.failures import Failure, StalledConnection, UnexpectedClose, classify
from worker.flow import CatchupPacer, LinkClock
from worker.ledger import Admission, Commit, FrameLedger
from worker.metrics import METRICS
from worker.store import TRANSIENT_REDIS_ERRORS, Acquired, Fenced, SessionStore

log = structlog.get_logger("voxqueue.session")

CATCHUP_BATCH = 256
MAX_GAP_FRAMES = 250  # a seq gap longer than this (5 s at 20 ms) is a broken producer, not a blip
INLINE_MAX_BUFFERED = 64 * 1024  # socket write buffer beyond which the reader stops sending inline


@dataclass(frozen=True, slots=True)
class Outcome:
    status: str  # ended | failed
    reason: str  # completed | abandoned | failed
    detail: str = ""
    dead_reason: str = ""


@dataclass(slots=True)
class WorkerContext:
    settings: Settings
    store: SessionStore
    reader: AudioReader
    link: DeepgramLink
    consumer: str


class SessionRunner:
    def __init__(
        self, ctx: WorkerContext, start: p.SessionStart, entry_id: bytes, acquired: Acquired
    ) -> None:
        self.ctx = ctx
        self.settings = ctx.settings
        self.start = start
        self.sid = start.sid
        self.entry_id = entry_id
        self.epoch = acquired.epoch
        self.keys = ctx.store.keys.session(start.sid)
        self.fmt = start.format
        self.frame_bytes = self.fmt.frame_bytes
        self.silence = bytes(self.frame_bytes)
        self.ledger = FrameLedger.resume(
            acquired.committed_seq, acquired.committed_id, self.fmt.frame_seconds
        )
        self.events = EventFactory(self.sid, self.epoch, self.ledger)
        self.inbox = Inbox(limit=max(500, self.settings.read_count * 8))
        self.finals = acquired.finals
        self.errors = 0
        self.end_seen = False
        self.request_id = ""
        self.last_input_at = time.monotonic()
        self.log = log.bind(sid=self.sid, epoch=self.epoch)
        self.options: dict[str, Any] = {}
        self.replies = 0
        self.closed_normally = False
        self.last_read_id = self.ledger.committed_id
        self.next_send_at = 0.0
        # Inline sending (send_inline): the connection the session is parked on, if it is.
        self.parked_conn: Any = None
        self.inline_busy = False
        self.inline_error: BaseException | None = None
        self.generation = 0  # one per Deepgram connection

    # ------------------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        structlog.contextvars.bind_contextvars(sid=self.sid)
        try:
            self.options = validate_options(self.start.options)
        except p.ProtocolError as exc:
            outcome = Outcome("failed", p.END_REJECTED, str(exc), dead_reason=f"{exc.code}: {exc}")
            await self._end(outcome, error_code=exc.code)
            return
        await self._publish(
            self.events.session_started(self.start, self.ctx.consumer), once="started_published"
        )
        try:
            try:
                outcome = await self._stream()
                error_code = None
            except _SessionBroken as exc:
                self.log.error("session failed: bad input", reason=str(exc))
                outcome = Outcome("failed", p.END_FAILED, str(exc), dead_reason=f"bad input: {exc}")
                error_code = "bad_input"
            await self._end(outcome, error_code=error_code)
        finally:
            self.ctx.reader.unfollow(self.keys.audio)

    async def _stream(self) -> Outcome:
        backoff = Backoff(self.settings.backoff_initial, self.settings.backoff_max)
        attempts = 0
        while True:
            # Redis is the authority on the commit point: a commit whose reply was lost (the
            # connection died, the receiver was cancelled) may have moved it past ours.
            seq, entry = await self._retry_redis(lambda: self.ctx.store.commit_point(self.keys, self.epoch))
            if seq > self.ledger.committed_seq:
                self.ledger.committed_seq, self.ledger.committed_id = seq, entry
            self.ledger.rewind()
            self.ctx.reader.unfollow(self.keys.audio)
            self.inbox.reset()
            self.last_read_id = self.ledger.committed_id
            self.generation += 1
            self.inline_error, self.parked_conn = None, None
            self.replies = 0
            try:
                async with self.ctx.link.connect(self.options, self.fmt) as conn:
                    self.request_id = request_id_of(conn)
                    METRICS.connections.inc()
                    return await self._converse(conn)
            except (asyncio.CancelledError, Fenced, _SessionBroken):
                raise
            except Exception as exc:
                failure = classify(exc)
            METRICS.link_failures.labels(failure.code).inc()
            if failure.fatal:
                self.log.error("deepgram refused the session", code=failure.code, reason=failure.reason)
                await self._error(failure, fatal=True)
                return Outcome("failed", p.END_FAILED, str(failure), dead_reason=f"deepgram {failure}")
            # A connection that got replies worked: count failures in a row, not in a lifetime.
            attempts = 1 if self.replies > 0 else attempts + 1
            if attempts > self.settings.max_retries:
                self.log.error("giving up on deepgram", code=failure.code, attempts=attempts)
                await self._error(failure, fatal=True)
                detail = f"gave up after {attempts} attempts: {failure}"
                return Outcome("failed", p.END_FAILED, detail, dead_reason=f"deepgram unavailable: {failure}")
            if attempts == 1:
                backoff.reset()
            delay = backoff.next_delay()
            self.log.warning(
                "deepgram connection failed, reconnecting",
                code=failure.code,
                reason=failure.reason,
                retry_in=round(delay, 3),
                resume_seq=self.ledger.committed_seq + 1,
            )
            METRICS.reconnects.inc()
            await asyncio.sleep(delay)

    # ------------------------------------------------------------------------------ one connection

    async def _converse(self, conn: Any) -> Outcome:
        loop = asyncio.get_running_loop()
        now = loop.time()
        self.pacer = CatchupPacer(self.settings.catchup_speed, self.settings.catchup_burst_seconds)
        self.pacer.start(now)
        self.clock = LinkClock(self.settings.keepalive_seconds, self.settings.stall_seconds)
        self.clock.start(now)
        receiver = asyncio.create_task(self._receive(conn))
        try:
            reason = await self._send_until_end(conn, receiver)
            await conn.send_finalize()
            await conn.send_close_stream()
            try:
                async with asyncio.timeout(self.settings.close_timeout):
                    await asyncio.shield(receiver)
            except TimeoutError:
                raise StalledConnection("Deepgram did not close after CloseStream") from None
            if not self.closed_normally:
                raise UnexpectedClose("connection ended without a normal close")
            return Outcome("ended", reason)
        finally:
            if not receiver.done():
                receiver.cancel()
            await asyncio.gather(receiver, return_exceptions=True)

    async def _send_until_end(self, conn: Any, receiver: asyncio.Task[None]) -> str:
        """Sends frames until the end marker (returns "completed") or idleness ("abandoned")."""
        loop = asyncio.get_running_loop()
        send_interval = self.settings.send_interval_ms / 1000
        self.next_send_at = 0.0
        if await self._catch_up(conn):
            return p.END_COMPLETED
        while True:
            if self.inline_error is not None:
                error, self.inline_error = self.inline_error, None
                raise error
            if receiver.done():
                exc = receiver.exception()
                raise exc if exc else UnexpectedClose("Deepgram closed the stream before it was asked to")
            if self.inbox.overflowed:
                if await self._catch_up(conn):
                    return p.END_COMPLETED
                continue
            if self.inbox.entries:
                if send_interval:
                    # Trade latency for fewer WebSocket messages: frames that arrive within the
                    # interval go out together as one message.
                    wait = self.next_send_at - loop.time()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    self.next_send_at = loop.time() + send_interval
                if await self._process(conn, self.inbox.take()):
                    return p.END_COMPLETED
                continue
            now = loop.time()
            idle_left = self.settings.idle_timeout - (time.monotonic() - self.last_input_at)
            # While parked here the reader may send this session's frames itself (send_inline).
            self.parked_conn = conn if not send_interval else None
            try:
                async with asyncio.timeout(min(self.clock.next_check_in(now), max(idle_left, 0.01))):
                    await self.inbox.event.wait()
            except TimeoutError:
                pass
            finally:
                self.parked_conn = None
            self.inbox.event.clear()
            now = loop.time()
            if self.clock.stalled(now):
                raise StalledConnection(f"no reply from Deepgram for {self.settings.stall_seconds:g} s")
            if self.clock.keepalive_due(now):
                await conn.send_keep_alive()
                self.clock.keepalive_sent(now)
            if time.monotonic() - self.last_input_at >= self.settings.idle_timeout and not self.inbox.entries:
                self.log.warning(
                    "session abandoned: no audio and no end marker", idle_s=self.settings.idle_timeout
                )
                return p.END_ABANDONED

    async def send_inline(self, entries: list[Entry]) -> bool:
        """Called by the audio reader with fresh entries: sends them from the reader's own task when
        this session is parked waiting for audio, so a live frame costs no task switch.

        Only the plain case is taken: well-formed frames continuing exactly where the ledger is,
        a socket with no backlog, no catch-up pacing due. Anything else (end marker, bad entry,
        gap, duplicate) is declined (False) and goes to the inbox for the session task. All
        bookkeeping happens before the one await (the send), so a reconnect of the session can
        never be overtaken by it; after the await only this connection's generation may be told
        about a failure.
        """
        conn = self.parked_conn
        if conn is None or self.inline_busy or self.inbox.entries or self.inbox.overflowed:
            return False
        transport = getattr(getattr(conn, "_websocket", None), "transport", None)
        if transport is None or transport.get_write_buffer_size() > INLINE_MAX_BUFFERED:
            return False
        frame_bytes = self.frame_bytes
        seq = self.ledger.next_seq
        frames: list[bytes] = []
        for _, fields in entries:
            pcm = fields.get(b"pcm")
            if (
                len(fields) != 2
                or pcm is None
                or len(pcm) != frame_bytes
                or fields.get(b"seq") != b"%d" % seq
            ):
                return False
            frames.append(pcm)
            seq += 1
        if seq * self.fmt.frame_seconds > self.settings.max_session_seconds:
            return False
        loop = asyncio.get_running_loop()
        if self.pacer.delay(len(frames) * self.fmt.frame_seconds, loop.time()) > 0:
            return False
        for (entry_id, _), _pcm in zip(entries, frames, strict=True):
            self.ledger.record_sent(self.ledger.next_seq, entry_id)
        self.last_read_id = entries[-1][0]
        self.last_input_at = time.monotonic()
        generation = self.generation
        self.inline_busy = True
        try:
            await self._flush(conn, frames)
        except Exception as exc:
            if generation == self.generation:
                self.inline_error = exc
                self.inbox.wake()
        finally:
            self.inline_busy = False
        return True

    async def _catch_up(self, conn: Any) -> bool:
        """Reads the stream from Redis after the last entry processed (after a rewind: the commit
        point), then hands the stream to the shared live reader. True when the end was reached."""
        self.ctx.reader.unfollow(self.keys.audio)
        self.inbox.reset()
        while True:
            entries = await self._retry_redis(
                lambda: self.ctx.store.read_range(self.keys.audio, self.last_read_id, CATCHUP_BATCH)
            )
            if entries and await self._process(conn, entries):
                return True
            if len(entries) < CATCHUP_BATCH:
                self.ctx.reader.follow(self.keys.audio, self.inbox, self.last_read_id, self.send_inline)
                return False

    async def _process(self, conn: Any, entries: list[Entry]) -> bool:
        """Decodes entries and sends their frames. True when the end marker was reached."""
        self.last_input_at = time.monotonic()
        ledger = self.ledger
        batch: list[bytes] = []
        end = False
        for entry_id, fields in entries:
            self.last_read_id = entry_id
            try:
                item = p.decode_audio_entry(fields, self.frame_bytes)
            except p.ProtocolError as exc:
                await self._reject(entry_id, exc)
                continue
            if isinstance(item, p.EndMarker):
                end = True
                self.end_seen = True
                if item.frames is not None and item.frames > ledger.next_seq:
                    await self._flush(conn, batch)
                    batch = []
                    if not await self._fill_gap(conn, item.frames - ledger.next_seq, item.frames, entry_id):
                        raise _SessionBroken("end marker says more frames were sent than arrived")
                break
            admission, missing = ledger.admit(item.seq)
            if admission is Admission.DUPLICATE:
                continue
            if admission is Admission.GAP:
                await self._flush(conn, batch)
                batch = []
                if not await self._fill_gap(conn, missing, item.seq, entry_id):
                    raise _SessionBroken(f"frames {ledger.next_seq}..{item.seq - 1} never arrived")
            if (item.seq + 1) * self.fmt.frame_seconds > self.settings.max_session_seconds:
                raise _SessionBroken(f"session is longer than {self.settings.max_session_seconds:g} s")
            ledger.record_sent(item.seq, entry_id)
            batch.append(item.pcm)
        await self._flush(conn, batch)
        return end

    async def _flush(self, conn: Any, frames: list[bytes]) -> None:
        if not frames:
            return
        loop = asyncio.get_running_loop()
        step = self.settings.max_frames_per_message
        frame_s = self.fmt.frame_seconds
        for i in range(0, len(frames), step):
            chunk = frames[i : i + step]
            seconds = len(chunk) * frame_s
            delay = self.pacer.delay(seconds, loop.time())
            if delay > 0:
                await asyncio.sleep(delay)
            await conn.send_media(chunk[0] if len(chunk) == 1 else b"".join(chunk))
            self.pacer.sent(seconds)
            now = loop.time()
            self.clock.audio_sent(now)
            if self.clock.stalled(now):  # a long catch-up into a half-open socket never parks
                raise StalledConnection(f"no reply from Deepgram for {self.settings.stall_seconds:g} s")
        METRICS.frames_sent.inc(len(frames))

    async def _fill_gap(self, conn: Any, missing: int, seq: int, entry_id: bytes) -> bool:
        """Missing frames become silence so later timestamps stay seq-exact; reported once."""
        if missing > MAX_GAP_FRAMES:
            return False
        event = self.events.error(
            "seq_gap",
            f"{missing} frame(s) before seq {seq} never arrived; sent silence in their place",
            False,
            self.ledger.next_seq,
        )
        await self._retry_redis(
            lambda: self.ctx.store.publish(self.keys, self.epoch, event, once=f"gap:{self.ledger.next_seq}")
        )
        fill = []
        for _ in range(missing):
            fill.append(self.silence)
            self.ledger.record_sent(self.ledger.next_seq, None)
        await self._flush(conn, fill)
        return True

    async def _reject(self, entry_id: bytes, exc: p.ProtocolError) -> None:
        self.errors += 1
        METRICS.bad_entries.labels(exc.code).inc()
        self.log.warning("bad audio entry", entry=entry_id.decode(), code=exc.code, reason=str(exc))
        event = self.events.error(exc.code, f"entry {entry_id.decode()}: {exc}", False, self.errors)
        event["id"] = p.event_id(self.sid, p.ERROR, f"{exc.code}/{entry_id.decode()}")
        await self._retry_redis(
            lambda: self.ctx.store.reject_entry(
                self.keys, self.epoch, self.keys.audio, entry_id, str(exc), event
            )
        )

    # ------------------------------------------------------------------------------ receiving

    async def _receive(self, conn: Any) -> None:
        self.closed_normally = False
        loop = asyncio.get_running_loop()
        try:
            async for raw in _raw_messages(conn):
                self.clock.reply_received(loop.time())
                self.replies += 1
                try:
                    message = dm.decode(raw)
                except dm.UnknownMessage as exc:
                    self.log.debug("skipped a message from deepgram", reason=str(exc))
                    continue
                await self._on_message(message)
            self.closed_normally = True
        finally:
            self.inbox.wake()

    async def _on_message(self, msg: dm.Message) -> None:
        if isinstance(msg, dm.Results):
            if msg.metadata is not None:
                self.request_id = msg.metadata.request_id
            alts = msg.channel.alternatives
            if msg.is_final:
                commit = self.ledger.coverage(msg.start, msg.duration)
                if commit is None:
                    return
                has_words = bool(alts and alts[0].transcript)
                event = self.events.transcript(msg, commit) if has_words else None
                await self._commit(commit, event)
            elif alts and alts[0].transcript:
                await self._publish(self.events.transcript(msg, None))
        elif isinstance(msg, dm.SpeechStarted):
            await self._publish(self.events.speech_started(msg, self.request_id))
        elif isinstance(msg, dm.UtteranceEnd):
            await self._publish(self.events.utterance_end(msg, self.request_id))
        elif isinstance(msg, dm.Metadata):
            self.log.debug("deepgram metadata", request_id=msg.request_id, duration=msg.duration)
        else:
            self.log.warning("deepgram error message", variant=msg.variant, description=msg.description)

    async def _commit(self, commit: Commit, event: dict[str, Any] | None) -> None:
        result = await self._retry_redis(lambda: self.ctx.store.commit(self.keys, self.epoch, commit, event))
        self.ledger.apply(commit)
        if event is not None and result == "ok":
            self.finals += 1
            METRICS.finals.inc()

    # ------------------------------------------------------------------------------ publishing

    async def _publish(self, event: dict[str, Any], once: str = "") -> None:
        await self._retry_redis(lambda: self.ctx.store.publish(self.keys, self.epoch, event, once=once))

    async def _error(self, failure: Failure, fatal: bool) -> None:
        self.errors += 1
        await self._publish(self.events.error(failure.code, failure.reason, fatal, self.errors))

    async def _end(self, outcome: Outcome, error_code: str | None = None) -> None:
        if error_code:
            self.errors += 1
            await self._publish(self.events.error(error_code, outcome.detail, True, self.errors))
        event = self.events.session_ended(outcome.reason, self.ledger.next_seq, self.finals, outcome.detail)
        await self._retry_redis(
            lambda: self.ctx.store.finish(
                self.keys,
                self.epoch,
                self.entry_id,
                status=outcome.status,
                reason=outcome.reason,
                event=event,
                frames=self.ledger.next_seq,
                dead_reason=outcome.dead_reason,
            )
        )
        METRICS.sessions_ended.labels(outcome.reason).inc()
        self.log.info(
            "session ended",
            reason=outcome.reason,
            frames=self.ledger.next_seq,
            finals=self.finals,
            detail=outcome.detail or None,
        )

    async def _retry_redis(self, call: Any) -> Any:
        """Redis outages are waited out (the lease protects the session meanwhile, and fencing keeps
        a late write harmless); every call made through here is idempotent or best-effort."""
        backoff = Backoff(0.05, 2.0)
        while True:
            try:
                return await call()
            except TRANSIENT_REDIS_ERRORS as exc:
                delay = backoff.next_delay()
                self.log.warning(
                    "redis unavailable, retrying", error=type(exc).__name__, retry_in=round(delay, 2)
                )
                await asyncio.sleep(delay)


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


class _SessionBroken(Exception):
    """The producer broke the contract in a way the session cannot recover from."""
