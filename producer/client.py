"""The producer library: what an AI backend uses to stream a session's audio into voxqueue.

    async with Producer("redis://...") as producer:
        session = await producer.open_session(options={"model": "nova-3"})
        session.send_nowait(pcm)         # any length, re-chunked into 640-byte frames; no await
        await session.send(pcm)          # the same, returning once Redis stored it
        await session.end()              # padded remainder + end marker
        async for event in session.events():
            ...

Batching design (measured in BENCHMARKS.md). The Redis hop is only cheap when it is batched: a process with
200 live sessions that awaits one XADD round trip per frame per session spends 2.7x the CPU of
talking to Deepgram directly and falls behind real time. So a `ProducerSession` never sends
anything itself. It cuts the audio into frames (`FrameChunker`), assigns their seq numbers, packs
each frame's XADD straight into RESP and appends it to the process-wide `Batcher` queue, which
sends everything queued as ONE pipeline as soon as the event loop is free, but at most once per
`flush_interval` (5 ms by default; 2 ms, `waited_flush_interval`, for a flush somebody awaits):
all sessions whose frames became ready in the meantime share one round trip, and frames that
arrive while a pipeline is in flight ride in the next one. An idle producer sends a lone frame at
once; a busy one trades at most 5 ms of latency for tens of frames per round trip.
`producer.stats` counts round trips (`flushes`) against `frames` so tests and benchmarks can check
the ratio.

Three ways to hand over audio, the same frames on the wire:

* `send_nowait(pcm)`: queues synchronously and returns the number of frames queued; no await, no
  task switch. For a backend that produces a frame every 20 ms per call this is the cheapest way
  (the benchmark's pipeline load uses it). Backpressure is an exception, `QueueFull`, raised when
  more than `max_pending_frames` frames wait for Redis; nothing of that call is queued. An
  exception rather than a False return because dropping audio must be a decision the caller makes,
  not a result it can ignore by accident. Errors of earlier flushes surface as exceptions of the
  next call: `SessionFailed` once Redis refused one of the session's commands, and `QueueFull`
  (with the connection error as `last_error`) when an outage lasts long enough to fill the queue.
* `await send(pcm)` (the default `wait=True`) returns once the flush carrying its frames is
  stored, so every error reaches the caller at once.
* `await send(pcm, wait=False)` only queues, but waits for its flush when more than
  `max_pending_frames` frames wait (instead of raising), counted as a backpressure wait.

Ordering: one queue, one pipeline at a time, commands in submission order. Hence the session's
`sessions` entry (queued by `open_session`) is stored before its first frame, as the worker
requires, frames are stored in seq order whichever way they were handed over, and the end marker
after the last frame. `end()` and `Producer.aclose()` flush what is queued.

Retries: the batcher keeps commands that were not acknowledged queued across a lost connection and
sends them again once it reconnects (bounded exponential backoff). A retried pipeline can store a
frame (or the session entry) twice; the worker drops frames whose seq it has already seen. Audio
streams are never trimmed here (no MAXLEN): the worker needs every unacknowledged frame, and it
applies the retention TTL when the session ends.

Audio TTL: a session's audio stream must expire even if no worker ever ends the session (Redis lost
it in an empty restart or an eviction, or no worker ran). So a session's first frames carry an
`EXPIRE audio audio_ttl` in the same pipeline, refreshed with later frames at most once per
`AUDIO_TTL_REFRESH_SECONDS` (and with the end marker): one extra command per session every few
seconds, nothing per frame but a clock read per call. The worker's retention TTL replaces it
when the session ends.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Self

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from producer import transcripts
from producer.audio import FrameChunker
from producer.batcher import (
    DEFAULT_FLUSH_INTERVAL,
    DEFAULT_WAITED_FLUSH_INTERVAL,
    Batcher,
    BatcherStats,
    Entry,
    ProducerConnectionError,
    ProducerError,
    QueueFull,
    SessionFailed,
    expire_entry,
    wait,
    xadd_entry,
)
from producer.cluster import cluster_client, split_url
from producer.options import is_flux, validate_options, validate_thresholds
from producer.protocol import (
    DEFAULT_NAMESPACE,
    F_PCM,
    F_SEQ,
    AudioFormat,
    Frame,
    Keys,
    SessionKeys,
    SessionStart,
    check_deployment,
    configure_fields,
    end_fields,
    finalize_fields,
    force_end_turn_fields,
    validate_sid,
)
from producer.protocol import DeploymentMismatch as WireDeploymentMismatch
from producer.resp import bulk
from producer.secrets import redact_url, url_password
from producer.transcripts import SessionLost

_monotonic = time.monotonic  # read once per send_nowait: bound here, not looked up each time

__all__ = [
    "DEFAULT_AUDIO_TTL",
    "DeploymentMismatch",
    "Producer",
    "ProducerConnectionError",
    "ProducerError",
    "ProducerSession",
    "QueueFull",
    "SessionExists",
    "SessionFailed",
    "SessionLost",
    "connect",
    "redact_url",
    "url_password",
]

# TTL of a session's audio stream while the producer writes it: as long as the worker's default
# retention, so it outlives any session and any wait for a worker; the worker sets the retention
# TTL itself when the session ends.
DEFAULT_AUDIO_TTL = 86_400
# How often a sending session refreshes that TTL at most: it also bounds how long a stream
# re-created by a frame after Redis lost it (XADD makes a key with no TTL) stays without one.
AUDIO_TTL_REFRESH_SECONDS = 5.0


class SessionExists(ProducerError):
    """open_session() was given the id of a session that exists or existed (its state, audio or
    results are still in Redis). Session ids are never reused: a second session under the same id
    would be refused by the workers (`sid_reused`) and its audio never transcribed."""


class DeploymentMismatch(ProducerError, WireDeploymentMismatch):
    """The Producer's namespace settings (partition count, protocol version) disagree with the
    deployment's, as its workers stored them in `NS:deployment`: sessions would land in
    partitions no worker reads, or in the wrong one."""


def connect(url: str, *, retries: int = 3, cluster: bool | None = None, **kwargs: Any) -> aioredis.Redis:
    """A client for `url` that retries connection loss with bounded exponential backoff
    (0.1, 0.2, 0.4 s by default, capped at 1 s). Extra keyword arguments go to `Redis.from_url`.

    A Redis Cluster client (redis-py's asyncio `RedisCluster`) for `redis+cluster://` or
    `rediss+cluster://` URLs, or with `cluster=True`, or when `cluster` is None and
    VOXQUEUE_REDIS_CLUSTER=1 (producer.cluster).

    The retries are short on purpose: they bridge a dropped connection, not an outage. Queued
    frames outlive an outage anyway, because the batcher keeps retrying them itself.
    """
    use_cluster, url = split_url(url, cluster)
    kwargs.setdefault("retry", Retry(ExponentialBackoff(cap=1.0, base=0.05), retries))
    kwargs.setdefault("socket_connect_timeout", 5)
    if use_cluster:
        return cluster_client(url, **kwargs)
    kwargs.setdefault("retry_on_error", [RedisConnectionError, RedisTimeoutError])
    return aioredis.Redis.from_url(url, **kwargs)


class Producer:
    """Opens sessions and batches every session's appends into one pipeline per tick.

    `redis` is a `redis.asyncio.Redis` (used as configured, not closed by us) or a URL (a client
    from `connect()`, closed by `aclose()`). One Producer per process and event loop is the
    intended use: batching only helps across the sessions that share it.

    `audio_ttl` (seconds) is the TTL each session's audio stream gets with its first frames and
    keeps while frames arrive (refreshed at most every 5 s, or a third of the TTL if shorter).

    `max_pending_frames` bounds the frames queued or in flight, all sessions together (50,000 =
    1,000 session-seconds of audio, 32 MB of 16 kHz PCM, by default): past it `send_nowait`
    raises `QueueFull` and `send(wait=False)` waits. `flush_interval` (seconds) is the least
    time between two round trips, `waited_flush_interval` the same when somebody awaits the next
    one (an awaited send, `end()`, `flush()`); `max_batch` the most commands in one.
    """

    def __init__(
        self,
        redis: aioredis.Redis | str,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        partitions: int = 1,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
        waited_flush_interval: float = DEFAULT_WAITED_FLUSH_INTERVAL,
        max_batch: int = 1000,
        max_pending_frames: int = 50_000,
        audio_ttl: int = DEFAULT_AUDIO_TTL,
    ) -> None:
        if partitions < 1:
            raise ValueError("partitions must be >= 1")
        if audio_ttl < 1:
            raise ValueError("audio_ttl must be >= 1 second")
        self.audio_ttl = audio_ttl
        self.audio_ttl_refresh = min(AUDIO_TTL_REFRESH_SECONDS, audio_ttl / 3)
        if isinstance(redis, str):
            self.url: str | None = redis
            self.redis = connect(redis)
            self._owns_redis = True
        else:
            self.url = None
            self.redis = redis
            self._owns_redis = False
        self.keys = Keys(namespace=namespace, partitions=partitions)
        self._deployment_checked = False  # NS:deployment read once it exists (workers write it)
        self._batcher = Batcher(
            self.redis,
            flush_interval=flush_interval,
            waited_flush_interval=waited_flush_interval,
            max_batch=max_batch,
            max_pending_frames=max_pending_frames,
        )

    @property
    def stats(self) -> BatcherStats:
        """Round trips (`flushes`), `frames`, `commands`, `bytes`, `max_batch`, `errors`,
        `retries`, `backpressure_waits`, `queue_full`."""
        return self._batcher.stats

    @property
    def outstanding_frames(self) -> int:
        """Frames queued or sent but not yet acknowledged by Redis (what `max_pending_frames`
        bounds)."""
        return self._batcher.outstanding_frames

    async def open_session(
        self,
        sid: str | None = None,
        *,
        options: Mapping[str, Any] | None = None,
        labels: Mapping[str, str] | None = None,
        format: AudioFormat | None = None,
    ) -> ProducerSession:
        """Announce a session (its `sessions` stream entry) and return it once that is stored.

        Options are checked against the allow-list here so a bad one fails in the backend, with a
        clear message, instead of as an error event later. Raises `ProtocolError` (a ValueError).

        Also checked before anything is written: the deployment's settings (`NS:deployment`, once
        a worker has stored them) against this Producer's partition count and protocol version
        (`DeploymentMismatch`), and, for an explicit `sid`, that no session of that id exists or
        existed (`SessionExists`: ids are never reused). Two producers opening the same new id at
        the same moment both pass this check; the workers then refuse the second entry
        (`sid_reused`, docs/protocol.md §2).
        """
        explicit = sid is not None
        sid = sid if sid is not None else uuid.uuid4().hex
        validate_sid(sid)
        fmt = format or AudioFormat()
        fmt.validate()
        checked = validate_options(dict(options or {}), fmt)
        label_map = dict(labels or {})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in label_map.items()):
            raise ValueError("labels must map strings to strings")
        await self._check_before_open(self.keys.session(sid) if explicit else None)
        session = ProducerSession(self, self.keys.session(sid), fmt, checked, label_map)
        start = SessionStart(sid=sid, format=fmt, options=checked, labels=label_map)
        entry = xadd_entry(session.keys.sessions, dict(start.to_fields()), session)
        await wait(self._batcher.submit([entry]))
        session.raise_if_failed()
        return session

    async def _check_before_open(self, keys: SessionKeys | None) -> None:
        """One round trip, and only when there is something to check: the deployment settings until
        they were found once, the session's keys for an explicit id (a fresh uuid cannot collide)."""
        # Decided once, before the await: concurrent open_session calls share the flag, and one of
        # them may set it while this one's round trip is in flight.
        deployment = not self._deployment_checked
        if not deployment and keys is None:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            if deployment:
                pipe.hgetall(self.keys.deployment())
            if keys is not None:
                pipe.exists(keys.state, keys.audio, keys.results)
            replies = await pipe.execute()
        if deployment:
            stored = replies.pop(0)
            if stored:
                try:
                    check_deployment(stored, self.keys)
                except WireDeploymentMismatch as exc:
                    raise DeploymentMismatch(str(exc)) from None
                self._deployment_checked = True
        if keys is not None and replies[0]:
            raise SessionExists(
                f"session {keys.sid} already exists (or existed): session ids are never reused; "
                "choose another id"
            )

    def transcripts(
        self, sid: str | None = None, *, from_id: str | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """Decoded events: of one session (from its first event, until `session_ended`), or of
        every session in all partitions (from now on, forever)."""
        if sid is not None:
            return transcripts.follow_session(self.redis, self.keys, sid, from_id=from_id or "0")
        return transcripts.follow_all(self.redis, self.keys, from_id=from_id or "$")

    async def flush(self) -> None:
        """Wait until everything sent so far is stored."""
        await self._batcher.flush()

    async def aclose(self) -> None:
        """Store what is still queued, stop the flusher, close the client if we created it."""
        try:
            await self._batcher.aclose()
        finally:
            if self._owns_redis:
                await self.redis.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class ProducerSession:
    """One session's audio. Not a Redis user itself: it hands packed commands to the producer's
    batcher."""

    def __init__(
        self,
        producer: Producer,
        keys: SessionKeys,
        format: AudioFormat,
        options: dict[str, Any],
        labels: dict[str, str],
    ) -> None:
        self.producer = producer
        self.keys = keys
        self.format = format
        self.options = options
        self.labels = labels
        self.failure: BaseException | None = None
        self.ended = False
        self._chunker = FrameChunker(format.frame_bytes, silence=format.silence_byte)
        self._batcher = producer._batcher
        self._frame_bytes = format.frame_bytes
        self._audio_key = keys.audio
        self._pack = _frame_packer(keys.audio)
        self._pack_whole = _frame_packer(keys.audio, format.frame_bytes)
        self._expire = expire_entry(keys.audio, producer.audio_ttl, self)
        self._expire_every = producer.audio_ttl_refresh
        self._expire_due = 0.0  # the first frames set the TTL (the stream exists only then)

    @property
    def sid(self) -> str:
        return self.keys.sid

    @property
    def frames_sent(self) -> int:
        """Frames handed over so far (seq numbers assigned); stored once their flush completes."""
        return self._chunker.next_seq

    def fail(self, exc: BaseException) -> None:
        self.failure = exc

    def raise_if_failed(self) -> None:
        if self.failure is not None:
            raise SessionFailed(f"session {self.sid} failed: {self.failure}") from self.failure

    def send_nowait(self, pcm: bytes | bytearray | memoryview) -> int:
        """Queue PCM of any length without waiting; return the number of whole frames queued
        (the remainder of a partial frame waits for more audio, as with `send`).

        Synchronous: the frames join the producer's next pipeline, and nothing here awaits or
        switches tasks. Raises `QueueFull` when the frames would pass the producer's
        `max_pending_frames` (queued or not yet acknowledged by Redis), and then queues nothing of
        this call: retry it, `await send(pcm)` (which waits for room), or drop it. Raises
        `SessionFailed` once Redis refused one of this session's commands, `ProducerError` after
        `end()` or once the producer is closed. Frames are stored in seq order with those of
        `send`/`send_frame`, whichever way each was handed over.
        """
        if self.ended or self.failure is not None:
            self._check_open()
        if type(pcm) is not bytes:
            # len() of a memoryview counts items, not bytes (an int16 view of 640 samples is 1280
            # bytes): packed as is, its RESP length would not match its payload. Converted before
            # any seq is taken, so a buffer that cannot be read raises with nothing queued.
            pcm = bytes(pcm)
        batcher = self._batcher
        chunker = self._chunker
        if len(pcm) == self._frame_bytes and not chunker.pending_bytes:
            # One whole frame, the common case: packed and queued with no intermediate objects.
            if batcher.outstanding_frames >= batcher.max_pending_frames:
                raise batcher.queue_full(1)
            seq = chunker.next_seq
            chunker.next_seq = seq + 1
            batcher.add_frame(self._pack_whole(seq, pcm), self, self._audio_key, self._frame_bytes)
            if _monotonic() >= self._expire_due:
                self._queue_expire()
            return 1
        whole = (chunker.pending_bytes + len(pcm)) // self._frame_bytes
        if not batcher.room(whole):
            raise batcher.queue_full(whole)
        entries = self._frame_entries(chunker.push(pcm))
        if entries:
            batcher.add(entries)
            if _monotonic() >= self._expire_due:
                self._queue_expire()
        return len(entries)

    async def send(self, pcm: bytes | bytearray | memoryview, *, wait: bool = True) -> int:
        """Append PCM of any length; whole frames are queued, the remainder waits for more.

        Returns the number of frames queued. With `wait` (default) returns once they are stored;
        `wait=False` returns at once unless more than `max_pending_frames` frames wait for Redis,
        and then waits for its flush (backpressure; `send_nowait` raises instead).
        """
        self._check_open()
        frames = self._chunker.push(pcm)
        await self._submit(self._frame_entries(frames), wait)
        return len(frames)

    async def send_frame(self, frame: bytes, *, wait: bool = True) -> int:
        """Append exactly one frame (`format.frame_bytes` bytes); returns its seq."""
        self._check_open()
        if len(frame) != self.format.frame_bytes:
            # A wrong-size frame is bad input to the worker (docs/protocol.md §3): refuse it here.
            raise ValueError(f"frame has {len(frame)} bytes, expected {self.format.frame_bytes}")
        if self._chunker.pending_bytes:
            raise ProducerError("send_frame() after a send() that left a partial frame would misalign audio")
        (frame_obj,) = self._chunker.push(frame)
        await self._submit(self._frame_entries([frame_obj]), wait)
        return frame_obj.seq

    async def finalize(self) -> None:
        """Ask for the finals of everything sent so far now (Deepgram's Finalize), e.g. when a voice
        agent decides the user stopped talking; the session goes on. The finals that answer carry
        `from_finalize: true`. Audio held back as a partial frame (< one frame) is not included."""
        self.raise_if_failed()
        if self.ended:
            raise ValueError("session already ended")
        await self._submit([xadd_entry(self.keys.audio, dict(finalize_fields()), self)], True)

    async def force_end_turn(self) -> None:
        """Flux sessions (model `flux-…`): end the user's turn now (Deepgram's ForceEndTurn), e.g.
        on a push-to-talk release or a DTMF key. Its `turn` event (EndOfTurn) carries trigger
        `manual`; with no turn in progress nothing happens. After the frames sent so far."""
        self.raise_if_failed()
        if self.ended:
            raise ValueError("session already ended")
        if not is_flux(self.options):
            raise ValueError("force_end_turn() is for Flux sessions (model flux-…); use finalize()")
        await self._submit([xadd_entry(self.keys.audio, dict(force_end_turn_fields()), self)], True)

    async def configure(self, **thresholds: float) -> None:
        """Flux sessions: change end-of-turn thresholds from here on (Deepgram's Configure):
        `eager_eot_threshold`, `eot_threshold`, `eot_timeout_ms`. Checked here (ValueError); they
        also apply to any later connection of the session (a reconnect, another worker)."""
        self.raise_if_failed()
        if self.ended:
            raise ValueError("session already ended")
        if not is_flux(self.options):
            raise ValueError("configure() is for Flux sessions (model flux-…)")
        validate_thresholds(thresholds)
        await self._submit([xadd_entry(self.keys.audio, dict(configure_fields(thresholds)), self)], True)

    async def end(self) -> int:
        """Send the padded remainder and the end marker; return once stored. Returns frames sent.

        Also what flushes this session's `send_nowait` frames: the end marker goes in the same
        queue behind them, so once it is stored they are too. Calling it again is a no-op, so
        `async with` and an explicit end() can coexist.
        """
        if self.ended:
            return self.frames_sent
        self.raise_if_failed()
        entries = []
        last = self._chunker.flush()
        if last is not None:
            entries.extend(self._frame_entries([last]))
        self.ended = True
        entries.append(xadd_entry(self.keys.audio, dict(end_fields(self.frames_sent)), self))
        self._expire_due = 0.0  # a full TTL from the end, in case no worker ever finishes it
        await self._submit(entries, True)
        return self.frames_sent

    def events(
        self, from_start: bool = True, *, unclaimed_timeout: float | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """This session's decoded events, ending after `session_ended`. Logs a warning when no
        worker has claimed the session after a few seconds; with `unclaimed_timeout`, raises
        `SessionUnclaimed` after that long instead of waiting on (see `follow_session`)."""
        return transcripts.follow_session(
            self.producer.redis,
            self.producer.keys,
            self.sid,
            from_id="0" if from_start else "$",
            unclaimed_timeout=unclaimed_timeout,
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        # End even on error: the worker then finishes the audio it has instead of waiting for the
        # abandonment timeout.
        if not self.ended and self.failure is None:
            await self.end()

    def _check_open(self) -> None:
        if self.ended:
            raise ProducerError(f"session {self.sid} has ended")
        self.raise_if_failed()

    def _frame_entries(self, frames: list[Frame]) -> list[Entry]:
        key, pack = self._audio_key, self._pack
        return [(pack(f.seq, f.pcm), self, key, len(f.pcm)) for f in frames]

    def _queue_expire(self) -> None:
        # After the frames: EXPIRE on a key that does not exist yet would do nothing.
        self._batcher.add([self._expire])
        self._expire_due = time.monotonic() + self._expire_every

    async def _submit(self, entries: list[Entry], wait_for_flush: bool) -> None:
        if not entries:
            return
        if time.monotonic() >= self._expire_due:
            entries.append(self._expire)
            self._expire_due = time.monotonic() + self._expire_every
        done = self._batcher.submit(entries)
        if wait_for_flush or self._batcher.over_limit:
            if not wait_for_flush:  # a send that wanted to return at once, held back: backpressure
                self._batcher.stats.backpressure_waits += 1
            await wait(done)
            self.raise_if_failed()


def _frame_packer(
    key: str, size: int | None = None
) -> Callable[[int, bytes | bytearray | memoryview], bytes]:
    """`pack(seq, pcm)`: the RESP of `XADD key * seq <seq> pcm <pcm>`, what producer.resp.pack_xadd
    makes of `frame_fields(seq, pcm)`, from one format string per session (the key and the field
    names never change; the seq and the PCM are the only parts that do). With `size`, for PCM of
    exactly that many bytes (the length is then part of the format). The PCM is copied into the
    command, so a caller may reuse its buffer."""
    head = b"*7\r\n$4\r\nXADD\r\n" + bulk(key.encode()) + b"$1\r\n*\r\n" + bulk(F_SEQ.encode())
    # "%" in a key (a session id may hold one) is literal text here, not a placeholder.
    head = head.replace(b"%", b"%%") + b"$%d\r\n%d\r\n" + bulk(F_PCM.encode())
    if size is not None:
        whole = head + b"$%d\r\n" % size + b"%s\r\n"

        def pack_whole(seq: int, pcm: bytes | bytearray | memoryview) -> bytes:
            return whole % (len(str(seq)), seq, pcm)

        return pack_whole
    template = head + b"$%d\r\n%s\r\n"

    def pack(seq: int, pcm: bytes | bytearray | memoryview) -> bytes:
        return template % (len(str(seq)), seq, len(pcm), pcm)

    return pack
