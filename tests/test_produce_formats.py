"""`voxqueue produce` sends WAV files in their own format (any supported rate and channel count,
μ-law and A-law WAV) and headerless files in the format given by --encoding/--sample-rate/
--channels, against a real redis-server (no worker needed: the entries are what is checked)."""

from __future__ import annotations

import struct
import wave
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from producer.audio import format_marker_frame
from producer.protocol import AudioFormat, Keys, SessionStart
from tests.test_producer_cli import audio_frames, run
from worker.redis_server import RedisServer


def g711_wav(path: Path, tag: int, channels: int, data: bytes) -> None:
    block = channels
    fmt = struct.pack("<HHIIHH", tag, channels, 8000, 8000 * block, block, 8)
    chunks = b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    path.write_bytes(b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks)


@pytest.fixture
def rc(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    try:
        yield client
    finally:
        client.close()


def session_format(r: redis.Redis, sid: str) -> AudioFormat:
    (_, fields), *_ = [e for e in r.xrange(Keys().sessions(0)) if e[1][b"sid"] == sid.encode()]
    return SessionStart.from_fields(fields).format


def test_produce_mulaw_wav_sends_160_byte_frames(
    redis_server: RedisServer, rc: redis.Redis, tmp_path: Path
) -> None:
    fmt = AudioFormat("mulaw", 8000)
    data = b"".join(format_marker_frame(fmt, n) for n in range(5)) + b"\x01" * 10
    g711_wav(tmp_path / "call.wav", 7, 1, data)
    result = run(redis_server, "produce", str(tmp_path / "call.wav"), "--speed", "0", "--session", "mu-1")
    assert result.exit_code == 0, result.output
    assert session_format(rc, "mu-1") == fmt
    frames = audio_frames(rc, Keys(), "mu-1")
    pcm = [f[b"pcm"] for f in frames if b"pcm" in f]
    assert [len(x) for x in pcm] == [160] * 6
    assert pcm[:5] == [format_marker_frame(fmt, n) for n in range(5)]
    assert pcm[5] == b"\x01" * 10 + b"\xff" * 150  # padded with μ-law silence, not zero bytes


def test_produce_alaw_stereo_and_48k_stereo_wav(
    redis_server: RedisServer, rc: redis.Redis, tmp_path: Path
) -> None:
    g711_wav(tmp_path / "a.wav", 6, 2, bytes([0xD5]) * 320 * 3)
    with wave.open(str(tmp_path / "webrtc.wav"), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(48000)
        w.writeframes(bytes(3840 * 4))
    for name, sid, fmt, frames in (
        ("a.wav", "al-1", AudioFormat("alaw", 8000, 2), 3),
        ("webrtc.wav", "w48", AudioFormat("linear16", 48000, 2), 4),
    ):
        result = run(redis_server, "produce", str(tmp_path / name), "--speed", "0", "--session", sid)
        assert result.exit_code == 0, result.output
        assert session_format(rc, sid) == fmt
        sizes = [len(f[b"pcm"]) for f in audio_frames(rc, Keys(), sid) if b"pcm" in f]
        assert sizes == [fmt.frame_bytes] * frames


def test_produce_raw_with_format_flags(redis_server: RedisServer, rc: redis.Redis, tmp_path: Path) -> None:
    (tmp_path / "call.raw").write_bytes(bytes([0xFF]) * 160 * 3)
    result = run(
        redis_server,
        "produce",
        str(tmp_path / "call.raw"),
        "--encoding",
        "mulaw",
        "--sample-rate",
        "8000",
        "--speed",
        "0",
        "--session",
        "raw-mu",
    )
    assert result.exit_code == 0, result.output
    assert session_format(rc, "raw-mu") == AudioFormat("mulaw", 8000)
    bad = run(redis_server, "produce", str(tmp_path / "call.raw"), "--encoding", "mulaw")
    assert bad.exit_code == 2 and "sample_rate 16000 is not supported for mulaw" in bad.stderr
    g711_wav(tmp_path / "w.wav", 7, 1, bytes(160))
    wav_flags = run(redis_server, "produce", str(tmp_path / "w.wav"), "--sample-rate", "8000")
    assert wav_flags.exit_code == 2 and "describe headerless files" in wav_flags.stderr
