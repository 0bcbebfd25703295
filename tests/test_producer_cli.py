"""`voxqueue produce | replay | tail` through click's CliRunner against a real redis-server."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import wave
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
import redis
from click.testing import CliRunner, Result

from producer.audio import WANTED, marker_frame
from producer.cli import add_producer_commands, event_line, main
from producer.protocol import FINAL, PARTIAL, SESSION_ENDED, SESSION_STARTED, Keys, encode_event
from worker.redis_server import RedisServer, child_env, free_port

FB = 640


@pytest.fixture
def r(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    try:
        yield client
    finally:
        client.close()


def run(redis_server: RedisServer | None, *args: str, url: str | None = None) -> Result:
    env = {"VOXQUEUE_REDIS_URL": url or (redis_server.url if redis_server else "")}
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def marker_wav(path: Path, frames: int, extra_samples: int = 0) -> bytes:
    pcm = b"".join(marker_frame(n) for n in range(frames)) + b"\x01\x00" * extra_samples
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(pcm)
    return pcm


def audio_frames(r: redis.Redis, keys: Keys, sid: str) -> list[dict[bytes, bytes]]:
    return [fields for _, fields in r.xrange(keys.session(sid).audio)]


def event(sid: str, kind: str, n: int, **extra: object) -> dict[str, object]:
    return {
        "v": 1,
        "id": f"{sid}/{kind}/{n}",
        "type": kind,
        "sid": sid,
        "ts": 1_700_000_000_000 + n,
        "epoch": 1,
        **extra,
    }


def publish(r: redis.Redis, keys: Keys, ev: dict[str, object]) -> None:
    skeys = keys.session(str(ev["sid"]))
    r.xadd(skeys.results, encode_event(ev))  # type: ignore[arg-type]
    r.xadd(skeys.partition_results, encode_event(ev))  # type: ignore[arg-type]


def test_commands_attach_to_a_group() -> None:
    group = add_producer_commands(click.Group("voxqueue"))
    assert set(group.commands) == {"produce", "replay", "tail"}


def test_produce_wav_fast(redis_server: RedisServer, r: redis.Redis, tmp_path: Path) -> None:
    pcm = marker_wav(tmp_path / "a.wav", frames=10, extra_samples=50)
    result = run(
        redis_server,
        "produce",
        str(tmp_path / "a.wav"),
        "--speed",
        "0",
        "--partitions",
        "2",
        "--option",
        "model=nova-3",
        "--option",
        "keywords=voxqueue",
        "--label",
        "tenant=acme",
    )
    assert result.exit_code == 0, result.output
    sid = result.stdout.splitlines()[0]
    assert len(sid) == 32 and sid.isalnum()
    assert "sent 11 frames" in result.stderr
    keys = Keys(partitions=2)
    frames = audio_frames(r, keys, sid)
    assert [int(f[b"seq"]) for f in frames[:-1]] == list(range(11))
    assert b"".join(f[b"pcm"] for f in frames[:-1]) == pcm + bytes(FB - 100)
    assert frames[-1] == {b"end": b"1", b"frames": b"11"}
    ((_, start),) = r.xrange(keys.session(sid).sessions)
    assert json.loads(start[b"options"]) == {"model": "nova-3", "keywords": ["voxqueue"]}
    assert json.loads(start[b"labels"]) == {"tenant": "acme"}


def test_produce_raw_paced_with_given_session(
    redis_server: RedisServer, r: redis.Redis, tmp_path: Path
) -> None:
    (tmp_path / "a.pcm").write_bytes(b"".join(marker_frame(n) for n in range(10)))
    started = time.monotonic()
    result = run(redis_server, "produce", str(tmp_path / "a.pcm"), "--session", "call-7")
    elapsed = time.monotonic() - started
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == "call-7"
    assert len(audio_frames(r, Keys(), "call-7")) == 11
    assert elapsed >= 0.15  # 10 frames of 20 ms at real time


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--option", "callback=https://evil.example"], "Deepgram option 'callback' is not allowed"),
        (["--option", "punctuate=maybe"], "must be true or false"),
        (["--label", "novalue"], "bad --label"),
        (["--session", "a b"], "bad --session"),
    ],
)
def test_produce_bad_input_exits_2(
    redis_server: RedisServer, tmp_path: Path, args: list[str], message: str
) -> None:
    marker_wav(tmp_path / "a.wav", frames=2)
    result = run(redis_server, "produce", str(tmp_path / "a.wav"), *args)
    assert result.exit_code == 2
    assert message in result.stderr and "Traceback" not in result.output
    assert result.stdout == ""


def test_produce_refuses_unusable_file(redis_server: RedisServer, tmp_path: Path) -> None:
    with wave.open(str(tmp_path / "song.wav"), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(22050)
        w.writeframes(bytes(400))
    result = run(redis_server, "produce", str(tmp_path / "song.wav"))
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"Error: song.wav is 22050 Hz stereo 16-bit PCM; voxqueue needs {WANTED} "
        f"(convert with: sox -t wav {tmp_path}/song.wav -r 16000 -c 1 -b 16 {tmp_path}/song-16k.wav)"
    )
    missing = run(redis_server, "produce", str(tmp_path / "nope.wav"))
    assert missing.exit_code == 2 and "does not exist" in missing.stderr


def test_unreachable_redis_exits_1_without_password(tmp_path: Path) -> None:
    marker_wav(tmp_path / "a.wav", frames=2)
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    result = run(None, "produce", str(tmp_path / "a.wav"), "--speed", "0", url=url)
    assert result.exit_code == 1
    assert "cannot reach Redis at redis://:***@127.0.0.1" in result.stderr
    assert "hunter2" not in result.output and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1
    tail = run(None, "tail", url=url)
    assert tail.exit_code == 1 and "cannot reach Redis" in tail.stderr


def test_produce_follow_json_prints_events(redis_server: RedisServer, r: redis.Redis, tmp_path: Path) -> None:
    marker_wav(tmp_path / "a.wav", frames=5)
    keys = Keys()
    events: list[dict[str, object]] = []

    def fake_worker() -> None:
        # Stand in for a worker: wait for the session entry, then publish its transcript.
        reply = r.xread({keys.sessions(0): "0"}, block=5000, count=1)
        sid = reply[0][1][0][1][b"sid"].decode()
        events.extend(
            [
                event(sid, SESSION_STARTED, 0, format={}, options={}, labels={}),
                event(sid, PARTIAL, 1, start=0.0, end=0.1, transcript="f0"),
                event(sid, FINAL, 2, start=0.0, end=0.1, transcript="f0 f1 f2 f3 f4", is_final=True),
                event(sid, SESSION_ENDED, 3, reason="completed", frames=5, audio_seconds=0.1, finals=1),
            ]
        )
        for ev in events:
            publish(r, keys, ev)

    thread = threading.Thread(target=fake_worker)
    thread.start()
    result = run(redis_server, "produce", str(tmp_path / "a.wav"), "--speed", "0", "--follow", "--json")
    thread.join()
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == events[0]["sid"]
    assert [json.loads(line) for line in lines[1:]] == events

    # Human form: only finals on stdout (no TTY, so no partials), summary on stderr.
    marker_wav(tmp_path / "b.wav", frames=5)
    r.delete(keys.sessions(0))
    events.clear()
    thread = threading.Thread(target=fake_worker)
    thread.start()
    result = run(redis_server, "produce", str(tmp_path / "b.wav"), "--speed", "0", "--follow")
    thread.join()
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[1:] == ["[0.00\u20130.10] f0 f1 f2 f3 f4"]
    assert "session ended: completed, 5 frames" in result.stderr


def test_tail_session_json_until_ended(redis_server: RedisServer, r: redis.Redis) -> None:
    keys = Keys(partitions=3)
    mine = [
        event(
            "t-1", SESSION_STARTED, 0, format={"sample_rate": 16000}, options={"model": "nova-3"}, labels={}
        ),
        event(
            "t-1",
            FINAL,
            1,
            start=0.5,
            end=1.25,
            transcript="héllo",
            confidence=0.9,
            words=[{"word": "héllo", "start": 0.5, "end": 1.25, "confidence": 0.9}],
            is_final=True,
        ),
        event("t-1", SESSION_ENDED, 2, reason="completed", frames=63, audio_seconds=1.26, finals=1),
    ]
    publish(r, keys, event("other", FINAL, 0, transcript="not mine"))
    for ev in mine:
        publish(r, keys, ev)
    result = run(redis_server, "tail", "--session", "t-1", "--json", "--partitions", "3")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines == [json.dumps(ev, separators=(",", ":"), ensure_ascii=False) for ev in mine]

    human = run(redis_server, "tail", "--session", "t-1", "--partitions", "3")
    assert human.exit_code == 0
    assert human.stdout.splitlines()[1] == "final           t-1 [0.50\u20131.25] héllo"
    assert human.stdout.splitlines()[2].startswith("session_ended   t-1 completed frames=63")


def test_event_line_formats() -> None:
    assert event_line(event("s", "error", 0, code="bad_frame_size", message="frame 3", fatal=True)) == (
        "error           s bad_frame_size: frame 3 (fatal)"
    )
    assert event_line(event("s", "speech_started", 0, start=1.5)) == "speech_started  s @1.50"


def test_tail_shows_one_line_per_turn_end_and_marks_eager_ends() -> None:
    """Flux sessions: `tail` prints each EndOfTurn, and each EagerEndOfTurn marked; the other turn
    events (StartOfTurn, Update, TurnResumed) would flood a terminal and are not shown."""
    turn = {"start": 1.0, "end": 2.5, "transcript": "book a table", "turn_index": 3}
    assert event_line(event("s", "turn", 0, event="EndOfTurn", **turn)) == (
        "turn            s [1.00–2.50] #3 book a table"
    )
    assert event_line(event("s", "turn", 0, event="EagerEndOfTurn", **turn)) == (
        "turn            s [1.00–2.50] #3 (eager) book a table"
    )
    for quiet in ("StartOfTurn", "Update", "TurnResumed"):
        assert event_line(event("s", "turn", 0, event=quiet, **turn)) is None


def test_replay_creates_new_session_with_same_frames(
    redis_server: RedisServer, r: redis.Redis, tmp_path: Path
) -> None:
    marker_wav(tmp_path / "a.wav", frames=30)
    produced = run(
        redis_server,
        "produce",
        str(tmp_path / "a.wav"),
        "--speed",
        "0",
        "--session",
        "orig",
        "--option",
        "model=nova-2",
        "--option",
        "punctuate=false",
        "--label",
        "tenant=acme",
    )
    assert produced.exit_code == 0, produced.output
    keys = Keys()
    # Other sessions before it in the sessions stream: replay must find the right entry.
    r.xadd(keys.sessions(0), {"sid": "decoy", "options": '{"model":"wrong"}'})
    # A duplicated frame (a retried XADD) must not be replayed twice.
    r.xadd(keys.session("orig").audio, {"seq": "3", "pcm": marker_frame(3)})

    result = run(
        redis_server, "replay", "orig", "--speed", "0", "--session", "again", "--option", "punctuate=true"
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == "again"
    old = [f for f in audio_frames(r, keys, "orig") if b"pcm" in f][:30]
    new = audio_frames(r, keys, "again")
    assert [f[b"pcm"] for f in new[:-1]] == [f[b"pcm"] for f in old]
    assert new[-1] == {b"end": b"1", b"frames": b"30"}
    entry = next(f for _, f in r.xrange(keys.sessions(0)) if f[b"sid"] == b"again")
    assert json.loads(entry[b"options"]) == {"model": "nova-2", "punctuate": "true"}
    assert json.loads(entry[b"labels"]) == {"tenant": "acme", "replay_of": "orig"}


def test_replay_of_expired_session_exits_2(redis_server: RedisServer) -> None:
    result = run(redis_server, "replay", "gone", "--speed", "0")
    assert result.exit_code == 2
    assert "session gone has no recorded audio" in result.stderr
    assert result.stdout == ""


def test_tail_all_sessions_live_until_interrupted(redis_server: RedisServer, r: redis.Redis) -> None:
    keys = Keys(partitions=2)
    publish(r, keys, event("before", FINAL, 0, transcript="old news"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "producer.cli", "tail", "--json", "--partitions", "2"],
        env=child_env(VOXQUEUE_REDIS_URL=redis_server.url),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 10
        while b"cmd=xread" not in r.execute_command("CLIENT", "LIST"):  # tail is now blocked reading
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        live = [event(f"live{i}", FINAL, i, transcript=f"t{i}") for i in range(6)]
        assert len({keys.partition(str(ev["sid"])) for ev in live}) == 2
        for ev in live:
            publish(r, keys, ev)
        assert proc.stdout is not None
        got = [json.loads(proc.stdout.readline()) for _ in live]
        assert got == live
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 130 and "Traceback" not in err


def test_replay_finds_start_via_state_hash(redis_server: RedisServer, r: redis.Redis, tmp_path: Path) -> None:
    marker_wav(tmp_path / "a.wav", frames=3)
    assert (
        run(
            redis_server,
            "produce",
            str(tmp_path / "a.wav"),
            "--speed",
            "0",
            "--session",
            "s1",
            "--option",
            "model=nova-2",
        ).exit_code
        == 0
    )
    keys = Keys()
    ((start_id, _),) = r.xrange(keys.sessions(0))
    r.hset(keys.session("s1").state, mapping={"status": "ended", "start_id": start_id})
    assert run(redis_server, "replay", "s1", "--speed", "0", "--session", "s2").exit_code == 0
    # The sessions entry trimmed away: fall back to the options the state hash keeps.
    r.delete(keys.sessions(0))
    r.hset(keys.session("s1").state, mapping={"options": '{"model":"nova-3"}'})
    assert run(redis_server, "replay", "s1", "--speed", "0", "--session", "s3").exit_code == 0
    entries = {f[b"sid"]: json.loads(f[b"options"]) for _, f in r.xrange(keys.sessions(0))}
    assert entries == {b"s3": {"model": "nova-3"}}
    assert len(audio_frames(r, keys, "s3")) == 4


def test_existing_session_id_refused(redis_server: RedisServer, tmp_path: Path) -> None:
    marker_wav(tmp_path / "a.wav", frames=3)
    args = ("produce", str(tmp_path / "a.wav"), "--speed", "0", "--session", "dup")
    assert run(redis_server, *args).exit_code == 0
    again = run(redis_server, *args)
    assert again.exit_code == 2 and "session dup already exists" in again.stderr
    same = run(redis_server, "replay", "dup", "--session", "dup")
    assert same.exit_code == 2 and "must differ" in same.stderr


def test_replay_of_an_ended_session_keeps_its_format(redis_server: RedisServer, r: redis.Redis) -> None:
    """Workers delete an ended session's `sessions` entry and copy its format, options and labels
    into the state hash: replay must take the format from there, not fall back to the default."""
    keys = Keys()
    sk = keys.session("narrow")
    for seq in range(3):
        r.xadd(sk.audio, {"seq": str(seq), "pcm": bytes([seq + 1]) * 320})  # 8 kHz: 320-byte frames
    r.xadd(sk.audio, {"end": "1"})
    r.hset(
        sk.state,
        mapping={
            "status": "ended",
            "encoding": "linear16",
            "sample_rate": "8000",
            "channels": "1",
            "frame_ms": "20",
            "options": '{"model":"nova-2"}',
            "labels": '{"team":"a"}',
        },
    )
    assert run(redis_server, "replay", "narrow", "--speed", "0", "--session", "wide").exit_code == 0
    ((_, entry),) = r.xrange(keys.sessions(0))
    assert (entry[b"sample_rate"], json.loads(entry[b"options"])) == (b"8000", {"model": "nova-2"})
    assert [len(f[b"pcm"]) for f in audio_frames(r, keys, "wide") if b"pcm" in f] == [320, 320, 320]
