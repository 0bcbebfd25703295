"""First use, as a new user meets it: the speech emulator on real speech, the CLI's and the
library's waits when no worker claims a session, and the CLI's input checks.

Speech comes from the bundled sample (worker/assets/sample.wav), so no test needs espeak-ng.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import wave
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from deepgram.listen.v1.types import ListenV1Metadata, ListenV1Results

from producer import transcripts
from producer.audio import AudioFileError, read_audio_file
from producer.client import Producer
from producer.protocol import SESSION_ENDED, Keys, encode_event
from producer.transcripts import SessionUnclaimed
from tests.harness import reap
from tests.test_emulator import listen, read_all
from worker.config import Settings
from worker.emulator import EmulatorServer, speech_available
from worker.emulator.events import Transcript
from worker.emulator.speech import ANSWER_EVERY_S, SpeechEngine
from worker.redis_server import RedisServer, child_env

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "worker" / "assets" / "sample.wav"
FRAME = 640  # 20 ms at 16 kHz mono 16-bit

needs_speech = pytest.mark.skipif(not speech_available(), reason="pocketsphinx is not installed")


def sample_pcm() -> bytes:
    with wave.open(str(SAMPLE)) as w:
        return w.readframes(w.getnframes())


# --------------------------------------------------------------------- speech engine


@needs_speech
@pytest.mark.parametrize("frames", [75, 76, 77])  # 1.5 s: mid-speech; 75 frames = 50 endpointer frames
async def test_speech_session_ending_mid_speech_ends_cleanly(frames: int) -> None:
    """A stream that stops inside speech on a 30 ms boundary (a frame count that is a multiple of
    3) used to make pocketsphinx's end_stream(b"") raise IndexError: the connection died with 1011
    and the worker retried for a minute and a half. Now it closes with a final and Metadata."""
    pcm = sample_pcm()[: frames * FRAME]
    async with EmulatorServer(engine="speech", port=0) as emu, listen(emu) as conn:
        for i in range(0, len(pcm), FRAME):
            await conn.send_media(pcm[i : i + FRAME])
        await conn.send_close_stream()
        messages = await read_all(conn, timeout=15)
    assert isinstance(messages[-1], ListenV1Metadata), messages[-3:]
    finals = [m for m in messages if isinstance(m, ListenV1Results) and m.is_final]
    heard = [w.word for f in finals for w in f.channel.alternatives[0].words]
    assert "hello" in heard, heard  # the words still held back by the endpointer were decoded
    assert finals[-1].start + finals[-1].duration == pytest.approx(frames * 0.02, abs=1e-6)


@needs_speech
@pytest.mark.slow  # CPU-heavy: runs in the second tier, alone
@pytest.mark.parametrize("interim", [False, True])
def test_speech_engine_answers_during_long_continuous_speech(interim: bool) -> None:
    """31 s of speech without a pause: the engine answers at least every ANSWER_EVERY_S of audio
    (finals, or partials with interim results), so the worker's stall watchdog (counting from the
    first unanswered audio) never takes a long utterance for a dead connection. It used to say
    nothing for 10.3 s, and an 11.6 s clip took 22.3 s through a reconnect."""
    pcm = sample_pcm() * 4
    engine = SpeechEngine(interim_results=interim)
    try:
        answered_at = [0.0]
        heard: list[str] = []
        for i in range(0, len(pcm), FRAME):
            events = engine.feed(pcm[i : i + FRAME])
            if events:
                answered_at.append((i + FRAME) / 32000)
            heard += [w.word for e in events if isinstance(e, Transcript) and e.is_final for w in e.words]
        gaps = [b - a for a, b in itertools.pairwise(answered_at)]
    finally:
        engine.release()
    assert max(gaps) <= ANSWER_EVERY_S + 0.05, gaps
    # The cuts still carry words (a small model on cut audio: some of them, not all).
    assert len(heard) >= 30 and {"hello", "sentence", "travels", "through", "streams"} & set(heard), heard
    # The worst gap a client can see (plus the endpointer's longest window, 2 s) stays inside the
    # worker's default stall watchdog.
    assert Settings.model_fields["stall_seconds"].default > ANSWER_EVERY_S + 2.0


# --------------------------------------------------------------------- nobody claims the session


async def test_library_reader_warns_then_gives_up_when_no_worker_claims(
    redis_client: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """No worker (or one on another namespace, partition count or database): the reader used to
    wait forever without a word. Now it warns once, naming what to check, and with
    `unclaimed_timeout` gives up with SessionUnclaimed."""
    async with Producer(redis_client, namespace="mine", partitions=3) as producer:
        session = await producer.open_session("nobody-home")
        await session.send(bytes(FRAME * 3))
        await session.end()
        caplog.set_level(logging.WARNING, logger="voxqueue.producer")
        events = transcripts.follow_session(
            redis_client,
            producer.keys,
            session.sid,
            block_ms=50,
            state_check_seconds=0.05,
            unclaimed_warning=0.2,
            unclaimed_timeout=0.6,
        )
        started = time.monotonic()
        with pytest.raises(SessionUnclaimed) as raised:
            async for _ in events:
                pass
        assert 0.6 <= time.monotonic() - started < 5
        (warning,) = [r.getMessage() for r in caplog.records if "no worker has claimed" in r.getMessage()]
        for hint in ("nobody-home", "db 0", "namespace ('mine')", "partition count (3)"):
            assert hint in warning and hint in str(raised.value)
        # The library's own entry point passes the timeout through.
        with pytest.raises(SessionUnclaimed):
            async for _ in session.events(unclaimed_timeout=0.01):
                pass


async def test_library_reader_does_not_warn_once_a_worker_holds_the_session(
    redis_client: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    keys = Keys()
    state = keys.session("claimed").state
    await redis_client.hset(state, mapping={"epoch": 1, "started_at": 1, "status": "running"})
    caplog.set_level(logging.WARNING, logger="voxqueue.producer")
    reader = transcripts.follow_session(
        redis_client, keys, "claimed", block_ms=50, state_check_seconds=0.05, unclaimed_warning=0.1
    )
    first = asyncio.ensure_future(reader.__anext__())
    done, _ = await asyncio.wait([first], timeout=0.5)
    assert not done  # still waiting for events, quietly: the session is claimed
    ended = {"v": 1, "id": "claimed/e", "type": SESSION_ENDED, "sid": "claimed", "ts": 1, "epoch": 1}
    await redis_client.xadd(keys.session("claimed").results, encode_event(ended))  # type: ignore[arg-type]
    assert (await asyncio.wait_for(first, 5))["type"] == SESSION_ENDED
    assert not [r for r in caplog.records if "no worker has claimed" in r.getMessage()]


def test_produce_follow_says_so_when_no_worker_claims(redis_server: RedisServer, tmp_path: Path) -> None:
    """`voxqueue produce --follow` with no worker: a warning on stderr within seconds, naming the
    namespace, partition count and database to check, instead of silence forever."""
    wav = tmp_path / "a.wav"
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(bytes(FRAME * 5))
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "produce", str(wav), "--speed", "0", "--follow"],
        env=child_env(VOXQUEUE_REDIS_URL=redis_server.url, VOXQUEUE_PARTITIONS="2"),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stderr is not None
    reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True)  # type: ignore[union-attr]
    reader.start()
    try:
        deadline = time.monotonic() + 20
        seen: list[str] = []
        while not any("no worker has claimed" in line for line in seen):
            assert time.monotonic() < deadline, seen
            with contextlib.suppress(queue.Empty):
                seen.append(lines.get(timeout=0.2))
        warning = next(line for line in seen if "no worker has claimed" in line)
        assert warning.startswith("warning: ") and "partition count (2)" in warning and "db 0" in warning
        assert proc.poll() is None  # it warns and goes on waiting: a worker may still come
    finally:
        proc.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=10)
        reap(proc)
    assert "Traceback" not in "".join(seen)


# --------------------------------------------------------------------- smaller traps


def voxqueue(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        env=child_env(**env),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_emulator_refuses_a_port_out_of_range() -> None:
    result = voxqueue("emulator", "--port", "99999", timeout=30)
    assert result.returncode == 2 and "99999 is not in the range 0<=x<=65535" in result.stderr


def test_emulator_says_where_it_listens() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "emulator", "--port", "0", "--engine", "marker"],
        env=child_env(),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()  # bounded: the watchdog, and the emulator starts in < 2 s
        match = re.search(r"listening on ws://127\.0\.0\.1:(\d+) \(engine marker", line)
        assert match, line
        port = int(match.group(1))
        assert port > 0 and f"VOXQUEUE_DEEPGRAM_URL=ws://127.0.0.1:{port}" in line
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/_emulator/health", timeout=5) as resp:
            assert resp.status == 200  # the URL it printed is the one it serves
    finally:
        reap(proc)


def test_demo_with_a_bad_file_exits_2(tmp_path: Path) -> None:
    (tmp_path / "notes.wav").write_text("not audio")
    result = voxqueue("demo", "--engine", "marker", "--file", str(tmp_path / "notes.wav"))
    assert result.returncode == 2, result.stderr
    assert "notes.wav is not a WAV file" in result.stderr and "Traceback" not in result.stderr


def test_produce_refuses_empty_options_and_audio(redis_server: RedisServer, tmp_path: Path) -> None:
    (tmp_path / "empty.raw").write_bytes(b"")
    (tmp_path / "one.raw").write_bytes(bytes(FRAME))
    url = {"VOXQUEUE_REDIS_URL": redis_server.url}
    empty = voxqueue("produce", str(tmp_path / "one.raw"), "--option", "model=", **url)
    assert empty.returncode == 2 and "option 'model' is empty" in empty.stderr, empty.stderr
    nothing = voxqueue("produce", "--raw", str(tmp_path / "empty.raw"), **url)
    assert nothing.returncode == 2 and "empty.raw has no audio" in nothing.stderr, nothing.stderr
    assert nothing.stdout == ""  # no session id: no session was opened


@pytest.mark.skipif(shutil.which("sox") is None, reason="sox is not installed")
def test_the_sox_hint_converts_the_file(tmp_path: Path) -> None:
    """The hint is a command that works as printed, from anywhere, with awkward file names."""
    folder = tmp_path / "my recordings"
    folder.mkdir()
    song = folder / "it's a song.wav"
    with wave.open(str(song), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(22050)
        w.writeframes(bytes(22050 * 4))  # 1 s
    with pytest.raises(AudioFileError) as refused:
        read_audio_file(song)
    command = re.search(r"\(convert with: (.*)\)$", str(refused.value)).group(1)  # type: ignore[union-attr]
    subprocess.run(["sh", "-c", command], check=True, timeout=30, cwd="/")
    fmt, pcm = read_audio_file(folder / "it's a song-16k.wav")
    assert len(pcm) == 32000 and fmt.sample_rate == 16000
    # A file named .wav that is not one: sox would trust the name; ffmpeg reads the contents.
    (folder / "fake.wav").write_bytes(b"\xff\xfb\x90\x00" + bytes(100))
    with pytest.raises(AudioFileError, match=r"convert with: ffmpeg -i "):
        read_audio_file(folder / "fake.wav")


def test_suite_ignores_voxqueue_settings_exported_in_the_shell() -> None:
    """A developer with VOXQUEUE_NAMESPACE (or any VOXQUEUE_* setting) exported used to see tests
    fail: the CLI under test read it. tests/conftest.py clears them for every test."""
    env = dict(
        child_env(),
        VOXQUEUE_NAMESPACE="elsewhere",
        VOXQUEUE_PARTITIONS="5",
        VOXQUEUE_REDIS_URL="redis://127.0.0.1:1/9",
        DEEPGRAM_API_KEY="not-a-key",
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_producer_cli.py::test_produce_wav_fast",
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-3000:]
