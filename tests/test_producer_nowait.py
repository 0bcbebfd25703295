"""ProducerSession.send_nowait and the callback-driven sender behind it, against a real redis-server.

What a backend relies on: frames are queued synchronously (nothing reaches Redis before the event
loop runs), stored in seq order with the end marker last whichever way each was handed over,
backpressure is a `QueueFull` that queues nothing (so no seq is skipped), errors of earlier flushes
come back as exceptions, closing flushes, and a connection lost mid-stream costs no frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

import pytest
import redis.asyncio as aioredis

from producer import batcher
from producer.audio import marker_frame, parse_marker_frame
from producer.batcher import ProducerConnectionError, ProducerError, QueueFull, SessionFailed
from producer.client import Producer, ProducerSession, _frame_packer, connect
from producer.protocol import frame_fields
from producer.resp import pack_xadd
from worker.redis_server import RedisCluster, RedisServer

FB = 640


async def _audio(client: aioredis.Redis, session: ProducerSession) -> list[dict[bytes, bytes]]:
    return [fields for _, fields in await client.xrange(session.keys.audio)]


def _seqs(entries: list[dict[bytes, bytes]]) -> list[int]:
    return [int(f[b"seq"]) for f in entries if b"seq" in f]


async def _flushed(producer: Producer) -> None:
    """Until everything queued is stored (each attempt that fails for want of Redis raises)."""
    while True:
        try:
            await producer.flush()
            return
        except ProducerConnectionError:
            await asyncio.sleep(0.05)


def _as_the_worker_reads(seqs: list[int]) -> list[int]:
    """The frames a worker uses: a frame whose seq was already seen is a duplicate and dropped
    (docs/protocol.md). After a lost connection the sender re-sends what Redis did not
    acknowledge, some of which Redis may have stored: repeats, never a frame missing or reordered."""
    kept: list[int] = []
    for seq in seqs:
        if not kept or seq > kept[-1]:
            kept.append(seq)
    return kept


def test_frame_packer_writes_what_pack_xadd_writes() -> None:
    for key in ("vq:{p0}:audio:call-1", "vq:{p3}:audio:odd%d%s%%id"):
        pack = _frame_packer(key)
        for seq, pcm in ((0, bytes(FB)), (9, b"\x01" * 3), (10, marker_frame(10)), (123456789, b"%s%d")):
            assert pack(seq, pcm) == pack_xadd(key, frame_fields(seq, pcm))
        assert pack(7, memoryview(bytearray(b"abc"))) == pack_xadd(key, frame_fields(7, b"abc"))
        whole = _frame_packer(key, FB)
        for seq in (0, 9, 10, 99, 100, 10**17):
            assert whole(seq, marker_frame(seq % 1000)) == pack_xadd(
                key, frame_fields(seq, marker_frame(seq % 1000))
            )


async def test_send_nowait_is_synchronous_and_keeps_seq_order(redis_client: aioredis.Redis) -> None:
    async with Producer(redis_client) as producer:
        session = await producer.open_session("nowait-order")
        stored_before = producer.stats.frames
        # Whole frames, a partial piece, and the rest of it: all queued before any await.
        counts = [session.send_nowait(marker_frame(n)) for n in range(10)]
        counts.append(session.send_nowait(marker_frame(10)[:100]))
        counts.append(session.send_nowait(marker_frame(10)[100:] + marker_frame(11)))
        assert counts == [1] * 10 + [0, 2]
        assert session.frames_sent == 12 and producer.outstanding_frames == 12
        # Nothing went out yet: the sends only queued, the loop has not run.
        assert producer.stats.frames == stored_before
        assert await redis_client.exists(session.keys.audio) == 0
        assert await session.end() == 12
        assert producer.outstanding_frames == 0
        assert producer._batcher.engine == "wire"  # the callback-driven sender, not the fallback
    audio = await _audio(redis_client, session)
    assert _seqs(audio) == list(range(12))
    assert [parse_marker_frame(f[b"pcm"])[0] for f in audio[:-1]] == list(range(12))
    assert audio[-1] == {b"end": b"1", b"frames": b"12"}


async def test_nowait_and_awaited_sends_interleave_in_order(redis_client: aioredis.Redis) -> None:
    async with Producer(redis_client) as producer:
        session = await producer.open_session("nowait-mixed")
        session.send_nowait(marker_frame(0))
        await session.send_frame(marker_frame(1), wait=False)
        session.send_nowait(marker_frame(2))
        await session.send(marker_frame(3))  # waits until stored: everything before it is too
        assert _seqs(await _audio(redis_client, session)) == [0, 1, 2, 3]
        session.send_nowait(marker_frame(4))
        await session.finalize()
        session.send_nowait(marker_frame(5))
        await session.end()
    audio = await _audio(redis_client, session)
    assert _seqs(audio) == list(range(6))
    assert audio[5] == {b"finalize": b"1"}  # between frames 4 and 5, where it was asked for
    assert audio[-1] == {b"end": b"1", b"frames": b"6"}


async def test_queue_full_queues_nothing_and_counts(redis_client: aioredis.Redis) -> None:
    async with Producer(redis_client, max_pending_frames=5) as producer:
        session = await producer.open_session("nowait-full")
        for n in range(5):
            session.send_nowait(marker_frame(n))
        with pytest.raises(QueueFull) as info:
            session.send_nowait(marker_frame(5))
        assert info.value.outstanding == 5 and info.value.limit == 5 and info.value.last_error is None
        # Part of a frame fits no better than a whole one: the chunker is left as it was.
        with pytest.raises(QueueFull):
            session.send_nowait(marker_frame(5) + marker_frame(6)[:10])
        assert producer.stats.queue_full == 2
        assert session.frames_sent == 5 and session._chunker.pending_bytes == 0
        await producer.flush()
        assert producer.outstanding_frames == 0
        # Room again: the refused frame is sent now, with the next seq (none was skipped).
        assert session.send_nowait(marker_frame(5)) == 1
        await session.end()
    assert _seqs(await _audio(redis_client, session)) == list(range(6))


async def test_refused_command_fails_the_session_on_its_next_call(redis_client: aioredis.Redis) -> None:
    async with Producer(redis_client) as producer:
        good = await producer.open_session("nowait-good")
        bad = await producer.open_session("nowait-bad")
        await redis_client.set(bad.keys.audio, "not a stream")
        bad.send_nowait(marker_frame(0))
        good.send_nowait(marker_frame(0))
        await producer.flush()
        with pytest.raises(SessionFailed, match="WRONGTYPE"):
            bad.send_nowait(marker_frame(1))
        assert good.send_nowait(marker_frame(1)) == 1
        assert producer.stats.errors == 1
        await good.end()
        assert producer.outstanding_frames == 0
    assert _seqs(await _audio(redis_client, good)) == [0, 1]


async def test_close_flushes_and_later_sends_raise(redis_client: aioredis.Redis) -> None:
    producer = Producer(redis_client)
    session = await producer.open_session("nowait-close")
    for n in range(30):
        session.send_nowait(marker_frame(n))
    await producer.aclose()  # no end(): closing alone stores what was queued
    assert _seqs(await _audio(redis_client, session)) == list(range(30))
    with pytest.raises(ProducerError, match="closed"):
        session.send_nowait(marker_frame(30))
    ended = Producer(redis_client)
    try:
        other = await ended.open_session("nowait-ended")
        await other.end()
        with pytest.raises(ProducerError, match="has ended"):
            other.send_nowait(marker_frame(0))
    finally:
        await ended.aclose()


async def test_outage_fills_the_queue_then_everything_is_stored(redis_server: RedisServer) -> None:
    client = connect(redis_server.url, retries=1)
    producer = Producer(client, max_pending_frames=40)
    try:
        session = await producer.open_session("nowait-outage")
        session.send_nowait(marker_frame(0))
        await producer.flush()
        redis_server.stop()
        sent = 1
        with pytest.raises(QueueFull) as info:
            async with asyncio.timeout(20):
                while True:
                    session.send_nowait(marker_frame(sent))
                    sent += 1
                    await asyncio.sleep(0.005)  # let the batcher try, and fail, to reach Redis
        assert sent == 41  # frame 0 was stored: 40 more fill the queue
        assert info.value.last_error is not None  # the outage is named in the refusal
        assert producer.stats.errors >= 1
        redis_server.start()
        # A connect attempt that failed just before the restart may still be reported to the
        # first waiter; what was queued stays queued, so waiting again is all a caller does.
        async with asyncio.timeout(20):
            with contextlib.suppress(ProducerConnectionError):
                await session.end()
            await _flushed(producer)
        audio = await client.xrange(session.keys.audio)
    finally:
        await producer.aclose()
        await client.aclose()
    assert _as_the_worker_reads([int(f[b"seq"]) for _, f in audio if b"seq" in f]) == list(range(41))
    assert audio[-1][1] == {b"end": b"1", b"frames": b"41"}


async def test_connection_killed_mid_stream_loses_no_frame(redis_client: aioredis.Redis) -> None:
    async with Producer(redis_client, flush_interval=0.001) as producer:
        session = await producer.open_session("nowait-kill")
        sent = 0

        async def talk(frames: int) -> None:
            nonlocal sent
            for _ in range(frames):
                session.send_nowait(marker_frame(sent))
                sent += 1
                if sent % 5 == 0:
                    await asyncio.sleep(0)

        await talk(50)
        await producer.flush()
        # Redis drops the producer's connection (the one whose last command was an XADD) ...
        ours = [c["id"] for c in await redis_client.client_list() if c.get("cmd") == "xadd"]
        assert len(ours) == 1
        await talk(50)
        await redis_client.client_kill_filter(_id=ours[0])
        # ... and the sender reconnects and sends again what was not acknowledged.
        await talk(50)
        async with asyncio.timeout(20):
            await session.end()
    assert _as_the_worker_reads(_seqs(await _audio(redis_client, session))) == list(range(150))


async def test_unanswered_flush_times_out_and_is_sent_again(redis_server: RedisServer) -> None:
    """With a socket timeout on the client, a Redis that stops answering (here: SIGSTOP) makes the
    sender drop the connection after that long and send the flush again on a new one."""
    client = aioredis.Redis.from_url(redis_server.url, socket_timeout=0.5)
    producer = Producer(client)
    assert redis_server.process is not None
    pid = redis_server.process.pid
    try:
        session = await producer.open_session("nowait-stall")
        session.send_nowait(marker_frame(0))
        await producer.flush()
        os.kill(pid, signal.SIGSTOP)
        try:
            session.send_nowait(marker_frame(1))
            with pytest.raises(ProducerConnectionError, match="unreachable"):
                async with asyncio.timeout(10):
                    await producer.flush()
        finally:
            os.kill(pid, signal.SIGCONT)
        async with asyncio.timeout(20):
            with contextlib.suppress(ProducerConnectionError):
                await session.end()
            await _flushed(producer)
        seqs = _seqs(await _audio(client, session))
    finally:
        await producer.aclose()
        await client.aclose()
    assert _as_the_worker_reads(seqs) == [0, 1]


async def test_send_nowait_on_a_cluster_goes_through_the_task_sender(redis_cluster: RedisCluster) -> None:
    """Redis Cluster keeps the task-based sender (one pipeline per node): the same queue, the same
    order per session, whichever shard serves the session's partition."""
    producer = Producer(redis_cluster.url.replace("redis://", "redis+cluster://"), partitions=8)
    try:
        sessions = [await producer.open_session(f"nowait-cl-{i}") for i in range(8)]
        for n in range(30):
            for session in sessions:
                session.send_nowait(marker_frame(n))
            if n % 10 == 0:
                await asyncio.sleep(0)
        async with asyncio.timeout(20):
            await asyncio.gather(*(s.end() for s in sessions))
        assert producer._batcher.engine == "task"
        assert producer.outstanding_frames == 0
        assert len({s.keys.partition for s in sessions}) > 1
        client = connect(redis_cluster.url, cluster=True)
        try:
            for session in sessions:
                audio = await _audio(client, session)
                assert _seqs(audio) == list(range(30)) and audio[-1] == {b"end": b"1", b"frames": b"30"}
        finally:
            await client.aclose()
    finally:
        await producer.aclose()


async def test_a_connection_that_cannot_be_taken_over_falls_back_to_the_task_sender(
    redis_client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client whose connections are not asyncio streams (another redis-py, a custom class) still
    works: the batcher sends through redis-py with its flusher task."""

    async def refuse(*_: object) -> None:
        raise batcher.CannotTakeOver("not an asyncio stream (test)")

    monkeypatch.setattr(batcher, "take_over", refuse)
    async with Producer(redis_client) as producer:
        session = await producer.open_session("nowait-fallback")
        for n in range(20):
            session.send_nowait(marker_frame(n))
        await session.end()
        assert producer._batcher.engine == "task" and producer.outstanding_frames == 0
    assert _seqs(await _audio(redis_client, session)) == list(range(20))


async def test_nowait_frames_wait_the_interval_an_awaited_send_does_not(redis_client: aioredis.Redis) -> None:
    """Frames handed over with send_nowait go out `flush_interval` after the previous round trip
    (batching is the point); a caller that awaits a flush gets it `waited_flush_interval` after."""
    async with Producer(redis_client, flush_interval=0.5, waited_flush_interval=0.01) as producer:
        session = await producer.open_session("nowait-hurry")  # the previous round trip
        loop = asyncio.get_running_loop()
        started = loop.time()
        session.send_nowait(marker_frame(0))
        await asyncio.sleep(0.1)
        assert producer.stats.frames == 0  # still waiting out the 0.5 s interval
        await session.send_frame(marker_frame(1))  # awaited: brings that flush forward
        assert loop.time() - started < 0.3
        assert producer.stats.frames == 2
        await session.end()
    assert _seqs(await _audio(redis_client, session)) == [0, 1]


async def test_send_nowait_takes_any_buffer_by_its_bytes(redis_client: aioredis.Redis) -> None:
    """A memoryview counts items, not bytes: an int16 view of 640 samples is two 640-byte frames,
    not one (packed by its item count, its RESP length would not match its payload and the rest
    would reach Redis as commands). A buffer that cannot be read takes no seq."""
    import array

    samples = array.array("h", range(640))  # 1280 bytes
    async with Producer(redis_client) as producer:
        session = await producer.open_session("nowait-view")
        assert session.send_nowait(memoryview(samples)) == 2
        assert session.send_nowait(bytearray(marker_frame(2))) == 1
        with pytest.raises(TypeError):
            session.send_nowait("not audio")  # type: ignore[arg-type]
        assert session.frames_sent == 3
        await session.end()
    audio = await _audio(redis_client, session)
    assert _seqs(audio) == [0, 1, 2]
    assert audio[0][b"pcm"] + audio[1][b"pcm"] == samples.tobytes()
    assert await redis_client.exists("injected") == 0 and await redis_client.dbsize() <= 3


async def test_closing_the_task_sender_fails_a_flush_in_flight_instead_of_hanging_it(
    redis_client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The task sender (Redis Cluster, or a connection it cannot take over): a close that cancels a
    flush in flight tells that flush's waiters, rather than leaving them waiting forever."""

    async def refuse(*_: object) -> None:
        raise batcher.CannotTakeOver("not an asyncio stream (test)")

    monkeypatch.setattr(batcher, "take_over", refuse)
    producer = Producer(redis_client)
    session = await producer.open_session("nowait-close-inflight")
    session.send_nowait(marker_frame(0))
    pauser = aioredis.Redis(connection_pool=redis_client.connection_pool)
    await pauser.execute_command("CLIENT", "PAUSE", "1500", "ALL")  # the flush now waits on Redis
    ending = asyncio.create_task(session.end())
    await asyncio.sleep(0.1)  # let the flush go out and wait for its reply
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(producer.aclose(), 0.2)  # the caller gives up on closing
    with pytest.raises(ProducerError):
        await asyncio.wait_for(ending, 5)
