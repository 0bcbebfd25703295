"""The Deepgram emulator, driven by the real deepgram-sdk (no mocks), plus its pure parts.

Faults have their own file, test_emulator_faults.py, which reuses the helpers here.
"""

from __future__ import annotations

import asyncio
import json
import struct
import time
import urllib.error
import urllib.request
import wave
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from deepgram import AsyncDeepgramClient
from deepgram.core.api_error import ApiError
from deepgram.environment import DeepgramClientEnvironment
from deepgram.listen.v1.types import (
    ListenV1Metadata,
    ListenV1Results,
    ListenV1SpeechStarted,
    ListenV1UtteranceEnd,
)
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosedError, InvalidStatus

from worker.emulator import EmulatorServer, run_emulator, speech_available
from worker.emulator.events import BadAudio, SpeechStarted, Transcript, UtteranceEnd, Word
from worker.emulator.marker import MarkerEngine
from worker.emulator.messages import Renderer
from worker.emulator.options import ListenOptions, OptionError
from worker.emulator.stats import LagReservoir

KEY = "test-key"
FRAME = 640
SILENCE = bytes(FRAME)
OPTS: dict[str, Any] = {"model": "nova-3", "encoding": "linear16", "sample_rate": "16000", "channels": "1"}


def marker(n: int, sent_ns: int = 0) -> bytes:
    return struct.pack("<4sIQ", b"VQMK", n, sent_ns) + bytes(FRAME - 16)


def client_for(emu: EmulatorServer, key: str = KEY) -> AsyncDeepgramClient:
    env = DeepgramClientEnvironment(
        base=emu.http_url, production=emu.url, agent=emu.url, agent_rest=emu.http_url
    )
    return AsyncDeepgramClient(api_key=key, environment=env)


@asynccontextmanager
async def listen(emu: EmulatorServer, key: str = KEY, **options: Any) -> AsyncIterator[Any]:
    async with client_for(emu, key).listen.v1.connect(**{**OPTS, **options}) as conn:
        yield conn


async def read_all(conn: Any, timeout: float = 5.0) -> list[Any]:
    """Every message until the server closes (the SDK's iterator ends on a 1000 close)."""

    async def run() -> list[Any]:
        return [m async for m in conn]

    return await asyncio.wait_for(run(), timeout)


async def http_get(emu: EmulatorServer, path: str) -> tuple[int, dict[str, Any]]:
    def get() -> tuple[int, dict[str, Any]]:
        try:
            with urllib.request.urlopen(emu.http_url + path, timeout=5) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    return await asyncio.to_thread(get)


def words(result: ListenV1Results) -> list[str]:
    return [w.word for w in result.channel.alternatives[0].words]


@pytest.fixture
async def emu() -> AsyncIterator[EmulatorServer]:
    async with EmulatorServer(engine="marker", port=0, keys={KEY}) as server:
        yield server


# --------------------------------------------------------------------- marker engine (pure)


def test_marker_words_have_frame_timestamps_across_split_messages() -> None:
    eng = MarkerEngine(final_every=10)
    audio = SILENCE + marker(7) + SILENCE + marker(8)
    events = []
    for cut in (1, 700, 1300, 2000):  # messages that split frames at odd places
        events += eng.feed(audio[:cut])
        audio = audio[cut:]
    events += eng.feed(audio)
    assert events == []
    assert eng.frames == 4
    (final,) = eng.finalize()
    assert isinstance(final, Transcript) and final.from_finalize and final.is_final
    assert [(w.word, w.start, w.end, w.confidence) for w in final.words] == [
        ("f7", 0.02, 0.04, 1.0),
        ("f8", 0.06, 0.08, 1.0),
    ]
    assert (final.start, final.duration) == (0.0, 0.08)


def test_marker_finals_tile_the_audio_exactly() -> None:
    eng = MarkerEngine(final_every=0.5)
    finals = [e for i in range(123) for e in eng.feed(marker(i)) if isinstance(e, Transcript)]
    finals += eng.close_stream()
    assert [f.start for f in finals] == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert [f.duration for f in finals] == [0.5, 0.5, 0.5, 0.5, 0.46]
    assert all(f.is_final and not f.from_finalize for f in finals)
    heard = [w.word for f in finals for w in f.words]
    assert heard == [f"f{i}" for i in range(123)]
    for f in finals:
        for w in f.words:
            assert f.start <= w.start < w.end <= round(f.start + f.duration, 6)
    assert eng.audio_seconds() == 2.46


def test_marker_interims_speech_final_and_vad_events() -> None:
    eng = MarkerEngine(interim_results=True, vad_events=True, utterance_end_ms=100, final_every=0.5)
    events = []
    for i in range(3):
        events += eng.feed(marker(i))
    events += eng.feed(SILENCE * 22)  # up to the 0.5 s final, which ends in silence
    events += eng.feed(marker(3) + SILENCE * 24)
    kinds = [type(e).__name__ + ("F" if isinstance(e, Transcript) and e.is_final else "") for e in events]
    assert kinds == [
        "SpeechStarted",
        "Transcript",  # interim at 0.1 s: f0..f2
        "UtteranceEnd",  # 100 ms of silence after f2
        "TranscriptF",  # final 0.0-0.5
        "SpeechStarted",
        "Transcript",  # interim at 0.6 s: f3
        "UtteranceEnd",
        "TranscriptF",
    ]
    first_interim, ue, final1 = events[1], events[2], events[3]
    assert isinstance(first_interim, Transcript) and not first_interim.is_final
    assert [w.word for w in first_interim.words] == ["f0", "f1", "f2"]
    assert isinstance(ue, UtteranceEnd) and ue.last_word_end == 0.06
    assert isinstance(final1, Transcript) and final1.speech_final
    started = events[4]
    assert isinstance(started, SpeechStarted) and started.timestamp == 0.5
    # A final whose last frame is speech is not speech_final.
    eng2 = MarkerEngine(final_every=0.04)
    (f,) = eng2.feed(marker(0) + marker(1))
    assert isinstance(f, Transcript) and not f.speech_final


def test_marker_without_interims_endpointing_and_empty_finalize() -> None:
    eng = MarkerEngine(endpointing_ms=40, final_every=10)
    events = eng.feed(marker(0) + SILENCE + SILENCE)
    assert len(events) == 1
    final = events[0]
    assert isinstance(final, Transcript) and final.speech_final and final.duration == 0.06
    (empty,) = eng.finalize()
    assert isinstance(empty, Transcript) and empty.from_finalize and empty.words == () and empty.duration == 0
    assert eng.close_stream() == []


def test_marker_bad_audio_and_lag() -> None:
    eng = MarkerEngine()
    sent = time.time_ns() - 5_000_000
    eng.feed(marker(1, sent) + marker(2), now_ns=sent + 5_000_000)
    assert eng.lag_ns == [5_000_000]
    with pytest.raises(BadAudio, match="DATA-0000"):
        eng.feed(b"VQBADAUD" + bytes(FRAME - 8))
    # A frame that merely starts with "VQ" is silence.
    assert MarkerEngine(final_every=0.02).feed(b"VQxx" + bytes(FRAME - 4))[0].words == ()  # type: ignore[union-attr]


def test_listen_options_and_lag_reservoir() -> None:
    o = ListenOptions.from_query(
        "encoding=linear16&sample_rate=8000&interim_results=true&endpointing=false&x=1"
    )
    assert o.decodable and o.sample_rate == 8000 and o.interim_results and o.endpointing_ms is None
    assert o.model == "base" and o.extra == {"x": "1"}
    assert ListenOptions.from_query("endpointing=300").endpointing_ms == 300
    with pytest.raises(OptionError):
        ListenOptions.from_query("interim_results=maybe")
    with pytest.raises(OptionError):
        ListenOptions.from_query("sample_rate=fast")
    r = LagReservoir(capacity=100, seed=1)
    r.add(list(range(1_000_000, 1_000_000 * 1001, 1_000_000)))
    s = r.summary()
    assert s["count"] == 1000 and s["max_ms"] == 1000.0 and len(r.samples) == 100
    assert 300 < s["p50_ms"] < 700


def test_results_json_is_deepgram_shaped_and_escaped() -> None:
    r = Renderer(request_id="rid", model="nova-3", engine="speech")
    odd = Word('caf\u00e9"\\', 0.5, 0.52, 0.25, "Caf\u00e9.")
    msg = json.loads(r.results(Transcript(0.5, 0.04, True, True, (Word("a", 0.52, 0.54, 1.0, "a"), odd))))
    assert msg["type"] == "Results" and msg["is_final"] is True and msg["speech_final"] is True
    assert "from_finalize" not in msg
    alt = msg["channel"]["alternatives"][0]
    assert alt["transcript"] == "a Caf\u00e9." and alt["confidence"] == 0.625
    assert alt["words"][1] == {
        "word": 'caf\u00e9"\\',
        "start": 0.5,
        "end": 0.52,
        "confidence": 0.25,
        "punctuated_word": "Caf\u00e9.",
    }
    assert msg["metadata"]["request_id"] == "rid" and msg["metadata"]["model_info"]["arch"] == "speech"
    empty = json.loads(r.results(Transcript(0.0, 0.0, True, False, (), from_finalize=True)))
    assert empty["from_finalize"] is True and empty["channel"]["alternatives"][0]["words"] == []


# --------------------------------------------------------------------- through the SDK


async def test_run_emulator_serves_until_cancelled() -> None:
    ready: asyncio.Future[EmulatorServer] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(run_emulator("127.0.0.1", 0, "marker", None, on_ready=ready.set_result))
    emu = await asyncio.wait_for(ready, 5)
    async with listen(emu, key="any-key-is-fine") as conn:
        await conn.send_media(marker(1))
        await conn.send_close_stream()
        assert words((await read_all(conn))[0]) == ["f1"]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_sdk_parses_results_finalize_closestream_and_metadata(emu: EmulatorServer) -> None:
    async with listen(emu, interim_results="true") as conn:
        request_id = conn._websocket.response_headers["dg-request-id"]
        for i in range(30):
            await conn.send_media(marker(100 + i))
        await conn.send_finalize()
        await conn.send_media(marker(500) + SILENCE)
        await conn.send_close_stream()
        messages = await read_all(conn)
        assert conn._websocket.close_code == 1000
    assert all(isinstance(m, ListenV1Results | ListenV1Metadata) for m in messages), messages
    results = [m for m in messages if isinstance(m, ListenV1Results)]
    finals = [r for r in results if r.is_final]
    interims = [r for r in results if not r.is_final]
    assert interims and all(r.from_finalize is None for r in interims)
    assert [(f.start, f.duration, f.from_finalize) for f in finals] == [
        (0.0, 0.5, None),
        (0.5, 0.1, True),
        (0.6, 0.04, None),
    ]
    assert [w for f in finals for w in words(f)] == [f"f{100 + i}" for i in range(30)] + ["f500"]
    last = finals[-1].channel.alternatives[0]
    assert last.transcript == "f500" and last.confidence == 1.0
    assert (last.words[0].start, last.words[0].end, last.words[0].punctuated_word) == (0.6, 0.62, "f500")
    assert finals[-1].speech_final is True
    assert finals[0].channel_index == [0, 1]
    assert finals[0].metadata.request_id == request_id
    assert finals[0].metadata.model_info.name == "nova-3"
    meta = messages[-1]
    assert isinstance(meta, ListenV1Metadata)
    assert meta.request_id == request_id and meta.transaction_key == "deprecated"
    assert meta.duration == 0.64 and meta.channels == 1 and meta.created.endswith("Z")
    assert meta.models == [finals[0].metadata.model_uuid]
    stats = emu.stats_json()
    assert stats["frames_received"] == 32 and stats["close_codes"] == {"1000": 1}
    assert stats["finals_sent"] == 3 and stats["messages_sent"]["Metadata"] == 1


async def test_sdk_parses_speech_started_and_utterance_end(emu: EmulatorServer) -> None:
    async with listen(emu, vad_events="true", utterance_end_ms="1000") as conn:
        await conn.send_media(SILENCE * 5 + marker(1) + marker(2) + SILENCE * 50)
        await conn.send_close_stream()
        messages = await read_all(conn)
    started = [m for m in messages if isinstance(m, ListenV1SpeechStarted)]
    ends = [m for m in messages if isinstance(m, ListenV1UtteranceEnd)]
    assert len(started) == 1 and started[0].timestamp == 0.1 and started[0].channel == [0]
    assert len(ends) == 1 and ends[0].last_word_end == 0.14 and ends[0].channel == [0, 1]
    assert not [m for m in messages if isinstance(m, dict)]


async def test_no_interims_unless_asked_and_keepalive_is_silent(emu: EmulatorServer) -> None:
    async with listen(emu) as conn:
        await conn.send_keep_alive()
        for i in range(10):
            await conn.send_media(marker(i))
        await conn.send_close_stream()
        messages = await read_all(conn)
    assert [type(m).__name__ for m in messages] == ["ListenV1Results", "ListenV1Metadata"]
    assert messages[0].is_final


async def test_bad_key_is_401_with_deepgram_error(emu: EmulatorServer) -> None:
    with pytest.raises(ApiError) as info:
        async with listen(emu, key="wrong"):
            pass
    assert info.value.status_code == 401
    assert info.value.__context__.headers["dg-error"] == "Invalid credentials."  # type: ignore[union-attr]
    # Without any Authorization header: 401 with Deepgram's JSON body.
    with pytest.raises(InvalidStatus) as raw:
        async with ws_connect(emu.url + "/v1/listen?encoding=linear16"):
            pass
    response = raw.value.response
    assert response.status_code == 401 and response.headers["dg-request-id"]
    body = json.loads(response.body)
    assert body["err_code"] == "INVALID_AUTH" and body["err_msg"] == "Invalid credentials."
    assert body["request_id"] == response.headers["dg-request-id"]
    assert emu.stats_json()["handshakes_rejected"] == {"401": 2}


async def test_bearer_auth_wrong_path_and_bad_parameter(emu: EmulatorServer) -> None:
    async with listen(emu, authorization=f"Bearer {KEY}") as conn:
        await conn.send_close_stream()
        assert isinstance((await read_all(conn))[-1], ListenV1Metadata)
    headers = {"Authorization": f"Token {KEY}"}
    with pytest.raises(InvalidStatus) as raw:
        async with ws_connect(emu.url + "/v3/listen", additional_headers=headers):
            pass
    assert raw.value.response.status_code == 404
    with pytest.raises(ApiError) as info:
        async with listen(emu, interim_results="maybe"):
            pass
    assert info.value.status_code == 400


async def test_undecodable_audio_and_wrong_encoding_close_1008(emu: EmulatorServer) -> None:
    for options, audio in (
        ({}, marker(1) + b"VQBADAUD" + bytes(FRAME - 8)),
        ({"encoding": "opus"}, SILENCE),
    ):
        async with listen(emu, **options) as conn:
            await conn.send_media(audio)
            with pytest.raises(ConnectionClosedError) as info:
                await read_all(conn)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1008
        assert info.value.rcvd.reason.startswith("DATA-0000")
        assert "could not process audio" in info.value.rcvd.reason


async def test_silence_timeout_closes_1011_unless_kept_alive() -> None:
    async with (
        EmulatorServer(port=0, silence_timeout=0.6) as emu,
        listen(emu) as kept,
        listen(emu) as idle,
    ):
        for _ in range(6):  # 1.2 s of KeepAlive, twice the timeout
            await kept.send_keep_alive()
            await asyncio.sleep(0.2)
        with pytest.raises(ConnectionClosedError) as info:
            await read_all(idle)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1011
        assert info.value.rcvd.reason.startswith("NET-0001")
        await kept.send_close_stream()
        assert isinstance((await read_all(kept))[-1], ListenV1Metadata)


async def test_control_endpoints(emu: EmulatorServer) -> None:
    status, body = await http_get(emu, "/_emulator/faults?stall_next=2&seed=3")
    assert status == 200 and body["plan"]["stall_next"] == 2 and body["pending"]["stalls_left"] == 2
    status, body = await http_get(emu, "/_emulator/faults")
    assert body["plan"]["seed"] == 3
    status, body = await http_get(emu, "/_emulator/faults?reset=1")
    assert body["plan"]["stall_next"] == 0
    status, body = await http_get(emu, "/_emulator/faults?drop_kind=sideways")
    assert status == 400 and "drop_kind" in body["error"]
    status, body = await http_get(emu, "/_emulator/faults?bogus=1")
    assert status == 400
    async with listen(emu) as conn:
        await conn.send_media(marker(1, time.time_ns()) + marker(2, time.time_ns()))
        await conn.send_close_stream()
        await read_all(conn)
    status, stats = await http_get(emu, "/_emulator/stats?reset=1")
    assert stats["connections_accepted"] == 1 and stats["bytes_received"] == 2 * FRAME
    assert stats["lag"]["count"] == 2 and stats["lag"]["p99_ms"] >= 0
    _, stats = await http_get(emu, "/_emulator/stats")
    assert stats["connections_accepted"] == 0 and stats["lag"]["count"] == 0
    assert (await http_get(emu, "/_emulator/health"))[1]["ok"] is True


# --------------------------------------------------------------------- speech engine


def _speech_pcm() -> bytes:
    """16 kHz mono PCM of the bundled sample (worker/assets/README.md): no espeak-ng needed."""
    with wave.open(str(Path(__file__).resolve().parent.parent / "worker" / "assets" / "sample.wav")) as w:
        return w.readframes(w.getnframes())


@pytest.mark.slow  # CPU-heavy: runs in the second tier, alone
@pytest.mark.skipif(not speech_available(), reason="pocketsphinx is not installed")
async def test_speech_engine_recognises_spoken_words() -> None:
    pcm = bytes(16000) + _speech_pcm() + bytes(32000)  # 0.5 s before, 1 s after
    async with (
        EmulatorServer(engine="speech", port=0) as emu,
        listen(emu, interim_results="true", vad_events="true") as conn,
    ):
        for i in range(0, len(pcm), 3200):
            await conn.send_media(pcm[i : i + 3200])
        await conn.send_close_stream()
        messages = await read_all(conn, timeout=15)
    assert isinstance(messages[-1], ListenV1Metadata)
    finals = [m for m in messages if isinstance(m, ListenV1Results) and m.is_final]
    heard = [w for f in finals for w in f.channel.alternatives[0].words]
    # A small 2016 model on a synthetic voice: expect some of the words, not all of them.
    said = {"hello", "from", "sentence", "travels", "through", "streams", "recognise"}
    assert {w.word for w in heard} & said, [w.word for w in heard]
    assert any(isinstance(m, ListenV1SpeechStarted) for m in messages)
    for f in finals:  # timings are in the connection's clock and inside their final
        for w in f.channel.alternatives[0].words:
            assert f.start - 1e-6 <= w.start < w.end <= f.start + f.duration + 1e-6
    assert heard[0].start >= 0.4  # the speech starts after half a second of silence
