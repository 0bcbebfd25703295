"""Producer library: pure pieces (chunking, pacing, files) and the client against a real Redis."""

from __future__ import annotations

import asyncio
import json
import random
import struct
import wave
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from producer.audio import (
    WANTED,
    AudioFileError,
    FrameChunker,
    marker_frame,
    parse_marker_frame,
    read_audio_file,
)
from producer.batcher import ProducerConnectionError, ProducerError, SessionFailed
from producer.client import Producer, connect, redact_url
from producer.options import parse_option_pairs
from producer.pacing import Pacer
from producer.protocol import (
    FINAL,
    PARTIAL,
    SESSION_ENDED,
    SESSION_STARTED,
    AudioFormat,
    Keys,
    ProtocolError,
    SessionStart,
    encode_event,
)
from producer.transcripts import follow_all, follow_session
from worker.redis_server import RedisServer

FB = 640

# ------------------------------------------------------------------------------ FrameChunker


def _pcm(n: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(n)


def test_chunker_any_split_gives_identical_frames() -> None:
    data = _pcm(FB * 37 + 123)
    reference = FrameChunker(FB)
    expected = reference.push(data)
    expected_last = reference.flush()
    rng = random.Random(7)
    for _ in range(25):
        chunker = FrameChunker(FB)
        frames, pos = [], 0
        while pos < len(data):
            step = rng.choice([0, 1, 2, 17, 639, 640, 641, 1280, 5000])
            frames += chunker.push(data[pos : pos + step])
            pos += step
        assert frames == expected
        assert chunker.flush() == expected_last


def test_chunker_pads_last_frame_with_silence_and_keeps_seq_running() -> None:
    chunker = FrameChunker(FB, start_seq=5)
    assert chunker.push(b"\x01" * 100) == []
    assert chunker.pending_bytes == 100
    frames = chunker.push(b"\x02" * 1000)
    assert [f.seq for f in frames] == [5]
    assert frames[0].pcm == b"\x01" * 100 + b"\x02" * 540
    last = chunker.flush()
    assert last is not None and last.seq == 6
    assert last.pcm == b"\x02" * 460 + bytes(180) and len(last.pcm) == FB
    assert chunker.flush() is None
    assert chunker.next_seq == 7
    assert [f.seq for f in chunker.push(bytes(FB * 3))] == [7, 8, 9]


def test_chunker_whole_frames_fast_path() -> None:
    chunker = FrameChunker(FB)
    data = _pcm(FB * 4)
    frames = chunker.push(memoryview(data))
    assert b"".join(f.pcm for f in frames) == data and chunker.pending_bytes == 0


def test_marker_frame_round_trip() -> None:
    frame = marker_frame(42, sent_ns=123456789, frame_bytes=FB)
    assert len(frame) == FB and frame[:4] == b"VQMK"
    assert struct.unpack_from("<IQ", frame, 4) == (42, 123456789)
    assert frame[16:] == bytes(FB - 16)
    assert parse_marker_frame(frame) == (42, 123456789)
    assert parse_marker_frame(bytes(FB)) is None
    assert marker_frame(1) == marker_frame(1)


# ------------------------------------------------------------------------------------- Pacer


def test_pacer_real_time_schedule() -> None:
    pacer = Pacer(1.0)
    assert pacer.delay(0, now=100.0) == 0
    assert pacer.delay(1, now=100.0) == pytest.approx(0.02)
    assert pacer.delay(50, now=100.5) == pytest.approx(0.5)
    # Late: due frames go at once, and the schedule does not drift.
    assert pacer.delay(10, now=101.0) == 0
    assert pacer.delay(100, now=101.0) == pytest.approx(1.0)


def test_pacer_speed_factor_and_zero() -> None:
    fast = Pacer(2.0)
    fast.delay(0, now=0.0)
    assert fast.delay(100, now=0.0) == pytest.approx(1.0)
    assert Pacer(0).delay(10_000, now=0.0) == 0
    with pytest.raises(ValueError):
        Pacer(-1)


# ------------------------------------------------------------------------------------- files


def _wav(path: Path, rate: int = 16000, channels: int = 1, width: int = 2, frames: int = 1600) -> bytes:
    pcm = _pcm(frames * channels * width)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(pcm)
    return pcm


def _riff(
    path: Path, tag: int, rate: int, channels: int, bits: int, data: bytes, sub_tag: int | None = None
) -> None:
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", tag, channels, rate, rate * block, block, bits)
    if sub_tag is not None:
        guid = struct.pack("<H", sub_tag) + b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
        fmt += struct.pack("<HHI", 22, bits, 0x4) + guid
    chunks = b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    body = b"WAVE" + chunks
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)


def test_wav_16k_mono_accepted(tmp_path: Path) -> None:
    pcm = _wav(tmp_path / "ok.wav")
    fmt, data = read_audio_file(tmp_path / "ok.wav")
    assert fmt == AudioFormat() and data == pcm


def test_wav_extensible_pcm_accepted(tmp_path: Path) -> None:
    pcm = _pcm(3200)
    _riff(tmp_path / "ext.wav", 0xFFFE, 16000, 1, 16, pcm, sub_tag=1)
    assert read_audio_file(tmp_path / "ext.wav") == (AudioFormat(), pcm)


def test_raw_pcm_by_suffix_or_flag(tmp_path: Path) -> None:
    pcm = _pcm(1000)
    (tmp_path / "a.raw").write_bytes(pcm)
    (tmp_path / "a.bin").write_bytes(pcm)
    assert read_audio_file(tmp_path / "a.raw")[1] == pcm
    assert read_audio_file(tmp_path / "a.bin", raw=True)[1] == pcm
    (tmp_path / "odd.pcm").write_bytes(b"123")
    with pytest.raises(AudioFileError, match="not a whole number of 2-byte samples"):
        read_audio_file(tmp_path / "odd.pcm")


def test_wav_22k_refused_with_conversion_hint(tmp_path: Path) -> None:
    _wav(tmp_path / "song.wav", rate=22050, channels=2)
    with pytest.raises(AudioFileError) as info:
        read_audio_file(tmp_path / "song.wav")
    assert str(info.value) == (
        f"song.wav is 22050 Hz stereo 16-bit PCM; voxqueue needs {WANTED} "
        f"(convert with: sox -t wav {tmp_path}/song.wav -r 16000 -c 1 -b 16 {tmp_path}/song-16k.wav)"
    )


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda p: _wav(p, width=1), "16000 Hz mono 8-bit PCM"),
        (lambda p: _wav(p, rate=11025), "11025 Hz mono 16-bit PCM"),
        (lambda p: _wav(p, channels=3), "16000 Hz 3-channel 16-bit PCM"),
        (lambda p: _riff(p, 7, 16000, 1, 8, bytes(64)), "16000 Hz mono 8-bit mu-law"),
        (lambda p: _riff(p, 3, 16000, 1, 32, bytes(64)), "16000 Hz mono 32-bit float"),
        (lambda p: _riff(p, 0xFFFE, 48000, 2, 32, bytes(64), sub_tag=3), "48000 Hz stereo 32-bit float"),
        (lambda p: p.write_bytes(b"ID3\x04" + bytes(100)), "is an MP3 file"),
        (lambda p: p.write_bytes(b"hello, this is text"), "is not a WAV file"),
        (lambda p: p.write_bytes(b""), "is empty"),
    ],
)
def test_unusable_files_refused(tmp_path: Path, make, expected: str) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "in.wav"
    make(path)
    with pytest.raises(AudioFileError, match=expected) as info:
        read_audio_file(path)
    assert str(info.value).startswith("in.wav is ") and WANTED in str(info.value)


@pytest.mark.parametrize(
    ("tag", "encoding", "rate", "channels", "bits"),
    [
        (1, "linear16", 8000, 1, 16),
        (1, "linear16", 24000, 1, 16),
        (1, "linear16", 44100, 2, 16),
        (1, "linear16", 48000, 2, 16),
        (7, "mulaw", 8000, 1, 8),
        (6, "alaw", 8000, 2, 8),
    ],
)
def test_wav_in_every_supported_format_is_sent_as_it_is(
    tmp_path: Path, tag: int, encoding: str, rate: int, channels: int, bits: int
) -> None:
    data = _pcm(rate // 50 * channels * bits // 8 * 3 + 2)  # 3 frames and a bit
    _riff(tmp_path / "in.wav", tag, rate, channels, bits, data)
    fmt, samples = read_audio_file(tmp_path / "in.wav")
    assert fmt == AudioFormat(encoding, rate, channels)
    whole = channels * bits // 8
    assert samples == data[: len(data) // whole * whole]
    if tag == 1:  # Python's wave module reads these; the same answer
        _wav(tmp_path / "w.wav", rate=rate, channels=channels)
        assert read_audio_file(tmp_path / "w.wav")[0] == AudioFormat(encoding, rate, channels)
    _riff(tmp_path / "ext.wav", 0xFFFE, rate, channels, bits, data, sub_tag=tag)
    assert read_audio_file(tmp_path / "ext.wav")[0] == fmt


def test_raw_files_take_their_format_from_the_flags(tmp_path: Path) -> None:
    (tmp_path / "call.raw").write_bytes(bytes([0xFF]) * 480)
    fmt, data = read_audio_file(tmp_path / "call.raw", encoding="mulaw", sample_rate=8000)
    assert fmt == AudioFormat("mulaw", 8000) and len(data) == 480
    fmt, _ = read_audio_file(tmp_path / "call.raw", sample_rate=48000, channels=2)
    assert fmt == AudioFormat("linear16", 48000, 2)
    with pytest.raises(AudioFileError, match=r"call\.raw: sample_rate 16000 is not supported for mulaw"):
        read_audio_file(tmp_path / "call.raw", encoding="mulaw")
    with pytest.raises(AudioFileError, match="not a whole number of 4-byte samples"):
        (tmp_path / "odd.pcm").write_bytes(bytes(6))
        read_audio_file(tmp_path / "odd.pcm", channels=2)


def test_the_last_frame_is_padded_with_the_formats_silence() -> None:
    mu = FrameChunker(160, silence=AudioFormat("mulaw", 8000).silence_byte)
    assert mu.push(b"\x01" * 10) == []
    last = mu.flush()
    assert last is not None and last.pcm == b"\x01" * 10 + b"\xff" * 150
    assert AudioFormat("alaw", 8000).silence_byte == 0xD5 and AudioFormat().silence_byte == 0


def test_mp3_suffix_gets_ffmpeg_hint(tmp_path: Path) -> None:
    (tmp_path / "talk.mp3").write_bytes(b"\xff\xfb\x90\x00" + bytes(100))
    with pytest.raises(AudioFileError, match=r"talk.mp3 is an MP3 file.*ffmpeg -i \S*/talk.mp3"):
        read_audio_file(tmp_path / "talk.mp3")


# ------------------------------------------------------------------------- options and urls


def test_option_pairs_parsed_and_checked() -> None:
    assert parse_option_pairs(["model=nova-3", "punctuate=TRUE", "keywords=a", "keywords=b"]) == {
        "model": "nova-3",
        "punctuate": "true",
        "keywords": ["a", "b"],
    }
    with pytest.raises(ProtocolError, match="callback"):
        parse_option_pairs(["callback=https://evil.example"])
    with pytest.raises(ProtocolError, match="key=value"):
        parse_option_pairs(["model"])


def test_redact_url_hides_password() -> None:
    assert redact_url("redis://:s3cret@host:6380/0") == "redis://:***@host:6380/0"
    assert redact_url("rediss://user:pw@h/1") == "rediss://user:***@h/1"
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


# ------------------------------------------------------------------------- client, real Redis


async def _entries(client: aioredis.Redis, key: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
    return await client.xrange(key)


async def test_open_send_end_writes_exact_entries(redis_client: aioredis.Redis) -> None:
    monitor_client = aioredis.Redis(connection_pool=redis_client.connection_pool)
    monitor = await monitor_client.monitor().__aenter__()
    producer = Producer(redis_client, partitions=3)
    session = await producer.open_session(
        "call-1", options={"model": "nova-3", "punctuate": True}, labels={"tenant": "acme"}
    )
    keys = Keys(partitions=3).session("call-1")
    assert session.sid == "call-1" and session.keys == keys
    pcm = _pcm(FB * 5 + 100)
    await session.send(pcm[:1000])
    await session.send(pcm[1000:])
    assert await session.end() == 6
    assert session.frames_sent == 6
    await producer.aclose()

    ((_, start_fields),) = await _entries(redis_client, keys.sessions)
    expected = SessionStart(
        "call-1", options={"model": "nova-3", "punctuate": "true"}, labels={"tenant": "acme"}
    )
    assert {k.decode(): v.decode() for k, v in start_fields.items()} == expected.to_fields()
    audio = await _entries(redis_client, keys.audio)
    assert len(audio) == 7
    frames, (_, end) = audio[:-1], audio[-1]
    assert [int(f[b"seq"]) for _, f in frames] == list(range(6))
    assert all(set(f) == {b"seq", b"pcm"} and len(f[b"pcm"]) == FB for _, f in frames)
    assert b"".join(f[b"pcm"] for _, f in frames) == pcm + bytes(FB - 100)
    assert end == {b"end": b"1", b"frames": b"6"}
    # The order Redis executed the XADDs in: the session entry strictly before the first frame.
    order: list[str] = []
    while len(order) < 8:
        command = (await asyncio.wait_for(monitor.next_command(), 5))["command"]
        if command.startswith("XADD"):
            order.append(command.split()[1])
    await monitor.__aexit__()
    assert order == [keys.sessions] + [keys.audio] * 7


async def test_default_sid_and_input_checks(redis_client: aioredis.Redis) -> None:
    async with Producer(redis_client) as producer:
        session = await producer.open_session()
        assert len(session.sid) == 32
        with pytest.raises(ValueError, match="expected 640"):
            await session.send_frame(bytes(100))
        await session.send(bytes(10))
        with pytest.raises(ProducerError, match="partial frame"):
            await session.send_frame(bytes(FB))
        await session.end()
        with pytest.raises(ProducerError, match="has ended"):
            await session.send(bytes(FB))
        with pytest.raises(ProtocolError, match="callback"):
            await producer.open_session(options={"callback": "https://x"})
        with pytest.raises(ProtocolError, match="braces"):
            await producer.open_session("a{b}")


async def test_context_manager_ends_session(redis_client: aioredis.Redis) -> None:
    async with Producer(redis_client) as producer, await producer.open_session("cm") as session:
        await session.send_frame(marker_frame(0))
    audio = await _entries(redis_client, Keys().session("cm").audio)
    assert audio[-1][1] == {b"end": b"1", b"frames": b"1"}


async def test_many_sessions_share_round_trips(redis_client: aioredis.Redis) -> None:
    sessions_n, frames_n = 100, 20
    async with Producer(redis_client, partitions=4) as producer:
        sessions = await asyncio.gather(*(producer.open_session(f"s{i}") for i in range(sessions_n)))
        opened = producer.stats.flushes
        # 100 session entries went out together in a few round trips, not one each (each explicit
        # sid is first checked for reuse, so the entries reach the batcher a little apart).
        assert opened <= 10

        async def talk(index: int) -> None:
            session = sessions[index]
            for n in range(frames_n):
                await session.send_frame(marker_frame(n))
            await session.end()

        await asyncio.gather(*(talk(i) for i in range(sessions_n)))
        stats = producer.stats
    assert stats.frames == sessions_n * frames_n
    assert stats.commands == sessions_n * (frames_n + 2)
    # One round trip per tick for all sessions, not one per frame: ~21, far below 2000.
    assert stats.flushes - opened <= 2 * (frames_n + 1)
    assert stats.max_batch >= sessions_n
    keys = Keys(partitions=4)
    for i in (0, 57, 99):
        audio = await _entries(redis_client, keys.session(f"s{i}").audio)
        assert [parse_marker_frame(f[b"pcm"]) for _, f in audio[:-1]] == [(n, 0) for n in range(frames_n)]


async def test_fire_and_forget_then_flush(redis_client: aioredis.Redis) -> None:
    async with Producer(redis_client, flush_interval=0.005) as producer:
        session = await producer.open_session("ff")
        for n in range(300):
            await session.send_frame(marker_frame(n), wait=False)
        await producer.flush()
        assert await redis_client.xlen(session.keys.audio) == 300
        assert producer.stats.flushes <= 3


async def test_flush_interval_caps_round_trips_but_not_idle_latency(redis_client: aioredis.Redis) -> None:
    async with Producer(redis_client, flush_interval=0.3, waited_flush_interval=0.3) as producer:
        session = await producer.open_session("gap")  # flush 1
        await asyncio.sleep(0.35)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await session.send_frame(marker_frame(0))  # idle: goes at once
        first = loop.time() - started
        await asyncio.gather(*(session.send_frame(marker_frame(n), wait=n == 3) for n in (1, 2, 3)))
        second = loop.time() - started
    assert first < 0.1
    assert 0.25 <= second < 1.0  # waited out the rest of the interval, then one flush for all three
    assert producer.stats.flushes == 3


async def test_refused_command_fails_only_its_session(redis_client: aioredis.Redis) -> None:
    async with Producer(redis_client) as producer:
        good = await producer.open_session("good")
        bad = await producer.open_session("bad")
        await redis_client.set(bad.keys.audio, "not a stream")
        results = await asyncio.gather(
            good.send_frame(marker_frame(0)), bad.send_frame(marker_frame(0)), return_exceptions=True
        )
        assert results[0] == 0
        assert isinstance(results[1], SessionFailed) and "WRONGTYPE" in str(results[1])
        with pytest.raises(SessionFailed):
            await bad.send_frame(marker_frame(1))
        await good.end()
    assert await redis_client.xlen(good.keys.audio) == 2


async def test_connection_loss_keeps_frames_queued(redis_server: RedisServer) -> None:
    client = connect(redis_server.url, retries=1)
    producer = Producer(client)
    try:
        session = await producer.open_session("outage")
        await session.send_frame(marker_frame(0))
        redis_server.stop()
        with pytest.raises(ProducerConnectionError, match="stay queued"):
            await session.send_frame(marker_frame(1))
        await session.send_frame(marker_frame(2), wait=False)
        redis_server.start()
        await asyncio.wait_for(session.end(), 10)
        audio = await client.xrange(session.keys.audio)
    finally:
        await producer.aclose()
        await client.aclose()
    seqs = [int(f[b"seq"]) for _, f in audio if b"seq" in f]
    # A retried pipeline may store a frame twice (the worker drops repeated seqs); order is kept.
    assert sorted(set(seqs)) == [0, 1, 2] and seqs == sorted(seqs)
    assert audio[-1][1] == {b"end": b"1", b"frames": b"3"}


# --------------------------------------------------------------------------------- events


def _event(sid: str, kind: str, n: int, **extra: object) -> dict[str, object]:
    return {
        "v": 1,
        "id": f"{sid}/{kind}/{n}",
        "type": kind,
        "sid": sid,
        "ts": 1_700_000_000_000 + n,
        "epoch": 1,
        **extra,
    }


async def _publish(client: aioredis.Redis, keys: Keys, event: dict[str, object]) -> None:
    skeys = keys.session(str(event["sid"]))
    fields = encode_event(event)
    await client.xadd(skeys.results, fields)  # type: ignore[arg-type]
    await client.xadd(skeys.partition_results, fields)  # type: ignore[arg-type]


async def test_session_events_until_session_ended(redis_client: aioredis.Redis) -> None:
    keys = Keys()
    async with Producer(redis_client) as producer:
        session = await producer.open_session("ev")
        first = _event("ev", SESSION_STARTED, 0, format={}, options={}, labels={})
        await _publish(redis_client, keys, first)
        seen: list[dict[str, object]] = []

        async def collect() -> None:
            async for event in session.events():
                seen.append(event)

        reader = asyncio.create_task(collect())
        await asyncio.sleep(0.05)
        final = _event("ev", FINAL, 1, start=0.0, end=1.0, transcript="hello world", is_final=True)
        ended = _event("ev", SESSION_ENDED, 2, reason="completed", frames=50, audio_seconds=1.0, finals=1)
        for event in (final, ended, _event("ev", FINAL, 3, transcript="after end")):
            await _publish(redis_client, keys, event)
        await asyncio.wait_for(reader, 5)
    assert seen == [first, final, ended]


async def test_bad_results_entry_is_skipped(redis_client: aioredis.Redis) -> None:
    keys = Keys()
    results = keys.session("x").results
    await redis_client.xadd(results, {"type": "final", "e": b"\xc1"})
    await redis_client.xadd(results, {"type": "final"})
    ended = _event("x", SESSION_ENDED, 1, reason="completed")
    await _publish(redis_client, keys, ended)
    events = [e async for e in follow_session(redis_client, keys, "x")]
    assert events == [ended]


async def test_follow_all_reads_every_partition_from_now(redis_client: aioredis.Redis) -> None:
    keys = Keys(partitions=4)
    await _publish(redis_client, keys, _event("old", FINAL, 0, transcript="before"))
    sids = [f"sid{i}" for i in range(12)]
    assert len({keys.partition(s) for s in sids}) == 4
    got: list[str] = []

    async def collect() -> None:
        async for event in follow_all(redis_client, keys, block_ms=200):
            got.append(str(event["sid"]))
            if len(got) == len(sids):
                return

    reader = asyncio.create_task(collect())
    await asyncio.sleep(0.05)
    for sid in sids:
        await _publish(redis_client, keys, _event(sid, PARTIAL, 0, transcript="hi"))
    await asyncio.wait_for(reader, 5)
    assert sorted(got) == sorted(sids)


async def test_producer_transcripts_shortcut(redis_client: aioredis.Redis) -> None:
    keys = Keys()
    ended = _event("t1", SESSION_ENDED, 0, reason="completed")
    await _publish(redis_client, keys, ended)
    async with Producer(redis_client) as producer:
        assert [e async for e in producer.transcripts("t1")] == [ended]
    assert json.loads(json.dumps(ended)) == ended


async def test_cancelled_reader_stops_even_as_events_arrive(redis_client: aioredis.Redis) -> None:
    # Python 3.11 + redis-py can swallow a cancellation that lands as a reply arrives (see
    # producer.aio); the reader must stop anyway.
    keys = Keys()

    async def drain() -> None:
        async for _ in follow_all(redis_client, keys, block_ms=200):
            pass

    for n in range(5):
        reader = asyncio.create_task(drain())
        await asyncio.sleep(0.05)
        for k in range(3):
            await _publish(redis_client, keys, _event(f"c{n}", PARTIAL, k, transcript="x"))
        reader.cancel()
        done, _ = await asyncio.wait([reader], timeout=1)  # at worst one block_ms later
        assert done and reader.cancelled()
