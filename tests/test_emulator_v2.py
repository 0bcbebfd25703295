"""The emulator's Flux API (`/v2/listen`), driven by the real deepgram-sdk `client.listen.v2`, plus
its pure parts (the Flux marker engine, options, rendering).

Every message the emulator sends is validated strictly against the SDK's own pydantic type for its
`type` (model_validate(strict=True), no extra fields), and must also be what the SDK's lenient
parser makes of it; `sequence_id` must count 0, 1, 2, ... over the whole connection.
"""

from __future__ import annotations

import asyncio
import json
import struct
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from deepgram.core.api_error import ApiError
from deepgram.core.unchecked_base_model import construct_type
from deepgram.listen.v2.socket_client import V2SocketClientResponse
from deepgram.listen.v2.types import (
    ListenV2Configure,
    ListenV2ConfigureFailure,
    ListenV2ConfigureSuccess,
    ListenV2ConfigureThresholds,
    ListenV2Connected,
    ListenV2FatalError,
    ListenV2TurnInfo,
    ListenV2Warning,
)
from pydantic import BaseModel
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, ConnectionClosedError, InvalidStatus

from producer.audio import MARKER_EAGER, MARKER_END_OF_TURN, MARKER_FLAGS_OFFSET, marker_frame
from tests.test_emulator import (
    FRAME,
    KEY,
    SILENCE,
    _speech_pcm,
    client_for,
    http_get,
    listen,
    read_all,
    words,
)
from worker.emulator import EmulatorServer, speech_available
from worker.emulator.events import BadAudio, Transcript, Word
from worker.emulator.flux import (
    FLAG_EAGER,
    FLAG_END_OF_TURN,
    FLAGS_OFFSET,
    FluxMarkerEngine,
    TurnEvent,
)
from worker.emulator.marker import MarkerEngine
from worker.emulator.messages import FluxRenderer
from worker.emulator.options import FluxOptions, OptionError, Thresholds

FLUX: dict[str, Any] = {"model": "flux-general-en", "encoding": "linear16", "sample_rate": "16000"}
TYPES: dict[str, type[BaseModel]] = {
    "Connected": ListenV2Connected,
    "TurnInfo": ListenV2TurnInfo,
    "ConfigureSuccess": ListenV2ConfigureSuccess,
    "ConfigureFailure": ListenV2ConfigureFailure,
    "Warning": ListenV2Warning,
    "Error": ListenV2FatalError,
}


def mk(n: int, *, eot: bool = False, eager: bool = False) -> bytes:
    return marker_frame(n, end_of_turn=eot, eager=eager)


def quiet(frames: int) -> bytes:
    return SILENCE * frames


@pytest.fixture
async def emu() -> AsyncIterator[EmulatorServer]:
    async with EmulatorServer(engine="marker", port=0, keys={KEY}) as server:
        yield server


@asynccontextmanager
async def flux(emu: EmulatorServer, key: str = KEY, **options: Any) -> AsyncIterator[Any]:
    async with client_for(emu, key).listen.v2.connect(**{**FLUX, **options}) as conn:
        yield conn


class Stream:
    """What one connection received: strictly validated messages, and how it closed."""

    def __init__(self) -> None:
        self.messages: list[Any] = []
        self.closed: ConnectionClosed | None = None  # None: closed with 1000/1001

        self.close_code: int | None = None

    @property
    def ended_by_close_stream(self) -> bool:
        """Flux's end after CloseStream: a close frame without a status code, which the client
        reports as 1005 and websockets counts as a normal close (no exception)."""
        return self.closed is None and self.close_code == 1005

    def of(self, kind: type[BaseModel]) -> list[Any]:
        return [m for m in self.messages if isinstance(m, kind)]

    @property
    def turns(self) -> list[ListenV2TurnInfo]:
        return self.of(ListenV2TurnInfo)

    def events(self, *, updates: bool = False) -> list[tuple[str, int]]:
        return [(t.event, t.turn_index) for t in self.turns if updates or t.event != "Update"]


def validated(raw: str | bytes) -> Any:
    assert isinstance(raw, str), "the emulator sends only text messages"
    data = json.loads(raw)
    kind = TYPES[data["type"]]
    model = kind.model_validate(data, strict=True)
    assert not model.model_extra, f"fields the SDK does not know: {model.model_extra}"
    # What the SDK's own reader (construct_type over its union) makes of it: the same class.
    assert type(construct_type(type_=V2SocketClientResponse, object_=data)) is kind  # type: ignore[arg-type]
    return model


async def read_v2(conn: Any, timeout: float = 5.0, *, marker: bool = True) -> Stream:
    """Every message until the server closes, each validated; sequence ids checked."""
    stream = Stream()

    async def run() -> None:
        try:
            async for raw in conn._websocket:
                stream.messages.append(validated(raw))
        except ConnectionClosedError as exc:
            stream.closed = exc

    await asyncio.wait_for(run(), timeout)
    stream.close_code = conn._websocket.close_code
    assert [m.sequence_id for m in stream.messages] == list(range(len(stream.messages)))
    if stream.messages:
        assert isinstance(stream.messages[0], ListenV2Connected)
    check_turns(stream.turns, marker=marker)
    return stream


def is_frame_time(t: float) -> bool:
    # An exact multiple of 0.02 s, as the float a client parses from its shortest decimal.
    return t == round(t * 50) * 20 / 1000


def check_turns(turns: list[ListenV2TurnInfo], *, marker: bool = True) -> None:
    """Flux's documented state-machine rules, over every TurnInfo of a connection."""
    start = 0.0
    index = 0
    eager = False
    for t in turns:
        assert t.turn_index == index and t.audio_window_start == start, t
        assert t.audio_window_start <= t.audio_window_end
        assert t.transcript == " ".join(w.word for w in t.words)
        assert (t.trigger is not None) == (t.event == "EndOfTurn"), t
        if marker:
            assert is_frame_time(t.audio_window_start) and is_frame_time(t.audio_window_end)
            for w in t.words:
                assert w.confidence == 1.0 and w.start is not None and w.end is not None
                assert is_frame_time(w.start) and w.end == round(w.start + 0.02, 6)
                assert start <= w.start < w.end <= t.audio_window_end
        if t.event == "StartOfTurn":
            assert t.words, "a StartOfTurn always has a transcript"
        if t.event == "EagerEndOfTurn":
            assert t.words
            eager = True
        if t.event == "TurnResumed":
            assert eager, "TurnResumed only follows EagerEndOfTurn"
            eager = False
        if t.event == "EndOfTurn":
            assert t.trigger in ("model", "manual", "timeout")
            start, index, eager = t.audio_window_end, index + 1, False


# ------------------------------------------------------------------------------ marker frames


def test_marker_frame_flags_layout() -> None:
    # Without flags: byte for byte the frame marker_frame always made.
    assert marker_frame(7, 123) == struct.pack("<4sIQ", b"VQMK", 7, 123) + bytes(FRAME - 16)
    assert marker_frame(7, frame_bytes=16) == struct.pack("<4sIQ", b"VQMK", 7, 0)
    assert (MARKER_FLAGS_OFFSET, MARKER_END_OF_TURN, MARKER_EAGER) == (
        FLAGS_OFFSET,
        FLAG_END_OF_TURN,
        FLAG_EAGER,
    )
    both = marker_frame(7, 123, end_of_turn=True, eager=True)
    assert len(both) == FRAME and both[:16] == marker_frame(7, 123)[:16]
    assert both[16] == 0b11 and both[17:] == bytes(FRAME - 17)
    assert marker_frame(1, end_of_turn=True)[16] == 1 and marker_frame(1, eager=True)[16] == 2
    with pytest.raises(ValueError):
        marker_frame(1, frame_bytes=16, eager=True)
    # The v1 engine hears a flagged frame as the same word.
    (final,) = MarkerEngine(final_every=0.02).feed(both)
    assert isinstance(final, Transcript) and [w.word for w in final.words] == ["f7"]


# ------------------------------------------------------------------------------ engine (pure)


def kinds(events: list[TurnEvent]) -> list[str]:
    return [e.event + (f":{e.trigger}" if e.trigger else "") for e in events]


def test_engine_model_end_of_turn_windows_and_words() -> None:
    eng = FluxMarkerEngine()
    audio = quiet(2) + mk(1) + mk(2) + quiet(1) + mk(3, eot=True) + quiet(2) + mk(4)
    events = []
    for cut in (1, 700, 1500, 2600, 3000):  # messages that split frames at odd places
        events += eng.feed(audio[:cut])
        audio = audio[cut:]
    events += eng.feed(audio)
    assert kinds(events) == ["StartOfTurn", "EndOfTurn:model", "StartOfTurn"]
    start, end, second = events
    assert (start.turn_index, start.window_start, start.window_end) == (0, 0.0, 0.06)
    assert [(w.word, w.start, w.end, w.confidence) for w in start.words] == [("f1", 0.04, 0.06, 1.0)]
    assert (end.window_start, end.window_end, end.end_of_turn_confidence) == (0.0, 0.12, 0.9)
    assert [(w.word, w.start, w.end) for w in end.words] == [
        ("f1", 0.04, 0.06),
        ("f2", 0.06, 0.08),
        ("f3", 0.1, 0.12),
    ]
    assert (second.turn_index, second.window_start, second.window_end) == (1, 0.12, 0.18)
    assert [w.word for w in second.words] == ["f4"] and second.end_of_turn_confidence == 0.1
    assert eng.frames == 9 and eng.turn_open


def test_engine_updates_every_240_ms_in_and_out_of_turns() -> None:
    eng = FluxMarkerEngine()
    events = eng.feed(quiet(30))
    assert kinds(events) == ["Update", "Update"]
    assert [(e.window_start, e.window_end, e.words, e.turn_index) for e in events] == [
        (0.0, 0.24, (), 0),
        (0.0, 0.48, (), 0),
    ]
    # A word on the 0.72 s boundary makes StartOfTurn there, and no Update next to it.
    events = eng.feed(quiet(5) + mk(35) + mk(36) + quiet(11))
    assert kinds(events) == ["StartOfTurn", "Update"]
    assert events[0].window_end == 0.72 and events[1].window_end == 0.96
    assert [w.word for w in events[1].words] == ["f35", "f36"]  # the turn's transcript so far
    assert all(e.turn_index == 0 and e.window_start == 0.0 for e in events)
    # Updates go on over silence inside the turn, with its transcript.
    events = eng.feed(quiet(12))
    assert kinds(events) == ["Update"] and events[0].window_end == 1.2 and len(events[0].words) == 2


def test_engine_eager_resumed_and_model_end() -> None:
    eng = FluxMarkerEngine(thresholds=Thresholds(eager_eot_threshold=0.4, eot_threshold=0.8))
    events = eng.feed(mk(1, eager=True) + quiet(2) + mk(2) + mk(3, eager=True, eot=True))
    assert kinds(events) == [
        "StartOfTurn",
        "EagerEndOfTurn",
        "TurnResumed",
        "EagerEndOfTurn",
        "EndOfTurn:model",
    ]
    conf = [e.end_of_turn_confidence for e in events]
    assert conf == [0.1, 0.4, 0.1, 0.4, 0.9]
    resumed, eager2, end = events[2], events[3], events[4]
    assert [w.word for w in resumed.words] == ["f1", "f2"] and resumed.window_end == 0.08
    assert eager2.words == end.words and eager2.window_end == end.window_end == 0.1
    # Without eager_eot_threshold the eager flag does nothing (as on Deepgram), and a high
    # eot_threshold shows in the model end's confidence.
    plain = FluxMarkerEngine(thresholds=Thresholds(eot_threshold=0.95))
    events = plain.feed(mk(1, eager=True) + mk(2) + mk(3, eot=True))
    assert kinds(events) == ["StartOfTurn", "EndOfTurn:model"]
    assert events[1].end_of_turn_confidence == 0.95


def test_engine_timeout_end_and_eot_threshold_one() -> None:
    # eot_threshold 1.0: the model never ends a turn; the 500 ms timeout does, 25 frames after.
    eng = FluxMarkerEngine(thresholds=Thresholds(eot_threshold=1.0, eot_timeout_ms=500))
    events = eng.feed(mk(1) + mk(2, eot=True) + quiet(24))
    assert kinds(events) == ["StartOfTurn", "Update", "Update"]
    events = eng.feed(quiet(1))
    assert kinds(events) == ["EndOfTurn:timeout"]
    assert (events[0].window_end, events[0].end_of_turn_confidence) == (0.54, 0.1)
    assert [w.word for w in events[0].words] == ["f1", "f2"]
    # A timeout that is not a whole number of frames rounds up: 510 ms waits 26 frames.
    eng = FluxMarkerEngine(thresholds=Thresholds(eot_timeout_ms=510))
    events = eng.feed(mk(1) + quiet(25))
    assert kinds(events) == ["StartOfTurn", "Update", "Update"]
    assert kinds(eng.feed(quiet(1))) == ["EndOfTurn:timeout"]
    # A word resets the silence count.
    eng = FluxMarkerEngine(thresholds=Thresholds(eot_timeout_ms=500))
    assert "EndOfTurn:timeout" not in kinds(eng.feed(mk(1) + quiet(24) + mk(2) + quiet(24)))


def test_engine_force_end_turn_close_stream_and_configure() -> None:
    eng = FluxMarkerEngine()
    assert eng.force_end_turn() == []  # no turn open: nothing
    eng.feed(mk(1) + quiet(3) + SILENCE[:100])  # a partial frame is not yet audio of the turn
    (end,) = eng.force_end_turn()
    assert (end.event, end.trigger, end.window_start, end.window_end) == ("EndOfTurn", "manual", 0.0, 0.08)
    assert end.end_of_turn_confidence == 0.1 and eng.force_end_turn() == []
    (start,) = eng.feed(SILENCE[100:] + mk(2))
    assert start.event == "StartOfTurn" and start.turn_index == 1 and start.window_start == 0.08
    assert [(w.start, w.end) for w in start.words] == [(0.1, 0.12)]
    assert eng.close_stream() == [] and eng.turn_open  # CloseStream does not end the turn
    # A shorter timeout applies from the next frame on: 40 silent frames already exceed 500 ms.
    eng.feed(quiet(40))
    assert eng.turn_open
    eng.set_thresholds(Thresholds(eot_timeout_ms=500))
    (timeout,) = eng.feed(SILENCE)
    assert timeout.trigger == "timeout" and timeout.window_end == 0.94


def test_engine_bad_audio_lag_and_low_rates() -> None:
    eng = FluxMarkerEngine()
    sent = time.time_ns() - 5_000_000
    eng.feed(marker_frame(1, sent) + mk(2), now_ns=sent + 5_000_000)
    assert eng.lag_ns == [5_000_000]
    with pytest.raises(BadAudio, match="DATA-0000"):
        eng.feed(b"VQBADAUD" + bytes(FRAME - 8))
    g711 = FluxMarkerEngine(sample_rate=8000, sample_width=1)
    assert g711.frame_bytes == 160
    (start, end) = g711.feed(marker_frame(5, frame_bytes=160, end_of_turn=True))
    assert end.trigger == "model" and end.window_end == 0.02 and start.words[0].word == "f5"


# ------------------------------------------------------------------------------ options


def test_flux_options_parse_and_defaults() -> None:
    o = FluxOptions.from_query(
        "model=flux-general-en&encoding=mulaw&sample_rate=8000&keyterm=a&keyterm=b%20c"
        "&eager_eot_threshold=0.4&eot_timeout_ms=1500&numerals=true&tag=x&tag=y&channels=1&foo=1"
    )
    assert (o.model, o.encoding, o.sample_rate, o.sample_width, o.decodable) == (
        "flux-general-en",
        "mulaw",
        8000,
        1,
        True,
    )
    assert o.thresholds == Thresholds(0.4, 0.7, 1500) and o.keyterms == ("a", "b c")
    assert o.numerals and o.tags == ("x", "y") and o.extra == {"foo": "1"} and not o.multilingual
    d = FluxOptions.from_query("model=flux-general-multi&language_hint=en&language_hint=de")
    assert d.thresholds == Thresholds(None, 0.7, 5000) and d.encoding is None and not d.decodable
    assert d.multilingual and d.language_hints == ("en", "de")
    assert not FluxOptions.from_query("model=flux-general-en&encoding=opus").decodable
    # The range ends are allowed.
    edge = FluxOptions.from_query(
        "model=flux-general-en&eager_eot_threshold=0.3&eot_threshold=1.0&eot_timeout_ms=60000"
    )
    assert edge.thresholds == Thresholds(0.3, 1.0, 60000)


@pytest.mark.parametrize(
    "query",
    [
        "",  # model is required
        "model=nova-3",
        "model=flux-general-en&encoding=mp3",
        "model=flux-general-en&eot_threshold=0.45",
        "model=flux-general-en&eot_threshold=1.01",
        "model=flux-general-en&eot_threshold=high",
        "model=flux-general-en&eot_threshold=nan",
        "model=flux-general-en&eager_eot_threshold=0.2",
        "model=flux-general-en&eager_eot_threshold=0.95",
        "model=flux-general-en&eager_eot_threshold=0.8&eot_threshold=0.6",  # eager above eot
        "model=flux-general-en&eot_timeout_ms=499",
        "model=flux-general-en&eot_timeout_ms=60001",
        "model=flux-general-en&eot_timeout_ms=1000.5",
        "model=flux-general-en&channels=2",
        "model=flux-general-en&multichannel=true",
        "model=flux-general-en&numerals=yes",
        "model=flux-general-en&sample_rate=100",
        "model=flux-general-en&language_hint=en",  # hints need flux-general-multi
        "model=flux-general-en&keyterm=",
    ],
)
def test_flux_options_refused(query: str) -> None:
    with pytest.raises(OptionError):
        FluxOptions.from_query(query)


def test_thresholds_merge() -> None:
    t = Thresholds(None, 0.7, 5000)
    assert t.merged({}) == t
    assert t.merged({"eot_threshold": 0.8, "eager_eot_threshold": None}) == Thresholds(None, 0.8, 5000)
    assert t.merged({"eager_eot_threshold": "0.5", "eot_timeout_ms": 800.0}) == Thresholds(0.5, 0.7, 800)
    for bad in (
        {"eot_threshold": 0.2},
        {"eot_threshold": True},
        {"eot_threshold": [0.7]},
        {"eot_timeout_ms": 10},
        {"eot_timeout_ms": "inf"},
        {"eager_eot_threshold": 0.8, "eot_threshold": 0.6},
        {"eot_thresold": 0.7},  # a typo is an error, not silently ignored
    ):
        with pytest.raises(OptionError):
            t.merged(bad)
    with pytest.raises(OptionError):
        t.merged([1])


def test_renderer_turn_info_multilingual_and_escaping() -> None:
    r = FluxRenderer(request_id="rid", multilingual=True)
    e = TurnEvent("EndOfTurn", 2, 0.5, 0.74, (Word('a"b', 0.5, 0.52, 0.5, 'A"b.'),), 0.9, "model")
    msg = json.loads(r.turn_info(e, 7, ("en", "de")))
    assert validated(json.dumps(msg)).trigger == "model"
    assert msg["words"] == [{"word": 'A"b.', "confidence": 0.5, "start": 0.5, "end": 0.52}]
    assert (
        msg["transcript"] == 'A"b.' and msg["languages"] == ["en"] and msg["languages_hinted"] == ["en", "de"]
    )
    empty = json.loads(r.turn_info(TurnEvent("Update", 0, 0.0, 0.24, (), 0.1), 8))
    assert empty["languages"] == [] and "trigger" not in empty
    plain = json.loads(FluxRenderer(request_id="rid").turn_info(e, 1))
    assert "languages" not in plain and "languages_hinted" not in plain


# ------------------------------------------------------------------------------ through the SDK


async def test_turns_through_the_sdk(emu: EmulatorServer) -> None:
    await http_get(emu, "/_emulator/finals?reset=1")
    async with flux(emu, eager_eot_threshold="0.5", eot_timeout_ms="500") as conn:
        request_id = conn._websocket.response_headers["dg-request-id"]
        # Turn 0 ends by the model; turn 1 has an eager end, resumes, then times out; turn 2 is
        # ended by ForceEndTurn; a ForceEndTurn with no open turn does nothing; turn 3 is still
        # open at CloseStream, which does not end it.
        await conn.send_media(quiet(3) + mk(1) + mk(2) + mk(3, eot=True))  # 0.12 s
        await conn.send_media(quiet(2) + mk(4, eager=True) + quiet(2) + mk(5) + quiet(25))  # 0.74 s
        await conn.send_media(mk(6) + mk(7))  # 0.78 s
        await conn.send_force_end_turn()
        await conn.send_force_end_turn()
        await conn.send_media(quiet(3) + mk(8))  # 0.86 s
        await conn.send_close_stream()
        stream = await read_v2(conn)
    assert stream.ended_by_close_stream and conn._websocket.close_code == 1005
    connected = stream.messages[0]
    assert connected.request_id == request_id and connected.sequence_id == 0
    assert all(m.request_id == request_id for m in stream.turns)
    assert stream.events() == [
        ("StartOfTurn", 0),
        ("EndOfTurn", 0),
        ("StartOfTurn", 1),
        ("EagerEndOfTurn", 1),
        ("TurnResumed", 1),
        ("EndOfTurn", 1),
        ("StartOfTurn", 2),
        ("EndOfTurn", 2),
        ("StartOfTurn", 3),
    ]
    ends = [t for t in stream.turns if t.event == "EndOfTurn"]
    assert [(t.trigger, t.audio_window_start, t.audio_window_end) for t in ends] == [
        ("model", 0.0, 0.12),
        ("timeout", 0.12, 0.74),  # f5 ends at 0.24; 500 ms of silence after it
        ("manual", 0.74, 0.78),
    ]
    assert [t.transcript for t in ends] == ["f1 f2 f3", "f4 f5", "f6 f7"]
    assert [t.end_of_turn_confidence for t in ends] == [0.9, 0.1, 0.1]
    eager = next(t for t in stream.turns if t.event == "EagerEndOfTurn")
    assert (eager.transcript, eager.audio_window_end, eager.end_of_turn_confidence) == ("f4", 0.18, 0.5)
    assert stream.turns[-1].words[0].start == 0.84
    assert all(t.languages is None and t.languages_hinted is None for t in stream.turns)
    # No Update at 0.24 s: TurnResumed went out at that frame.
    updates = [t for t in stream.turns if t.event == "Update"]
    assert [u.audio_window_end for u in updates] == [0.48, 0.72]
    assert [u.transcript for u in updates] == ["f4 f5"] * 2
    # Each EndOfTurn is a final in /_emulator/finals, ending at its audio_window_end.
    _, finals = await http_get(emu, "/_emulator/finals")
    assert [(rid, end) for rid, end, _ in finals["finals"]] == [
        (request_id, 0.12),
        (request_id, 0.74),
        (request_id, 0.78),
    ]
    stats = emu.stats_json()
    assert stats["finals_sent"] == 3 and stats["close_codes"] == {"1005": 1}
    assert stats["messages_sent"]["Connected"] == 1 and stats["messages_sent"]["TurnInfo"] == len(
        stream.turns
    )


async def test_configure_success_and_failure(emu: EmulatorServer) -> None:
    async with flux(emu, keyterm=["alpha", "beta"]) as conn:
        await conn.send_configure(
            ListenV2Configure(
                thresholds=ListenV2ConfigureThresholds(eot_timeout_ms=600, eager_eot_threshold=0.4)
            )
        )
        bad = [
            {"type": "Configure", "thresholds": {"eot_threshold": 2.0}},
            {"type": "Configure", "thresholds": {"eager_eot_threshold": 0.9}},  # above eot_threshold 0.7
            {"type": "Configure", "thresholds": {"eot_timeout_ms": 600}, "keyterms": [""]},  # all or nothing
            {"type": "Configure", "language_hints": ["en"]},  # needs flux-general-multi
            {"type": "Configure", "numerals": "yes"},
            {"type": "Configure", "thresholds": "fast"},
        ]
        for msg in bad:
            await conn.send_configure(msg)
        await conn.send_configure({"type": "Configure", "keyterms": ["gamma"], "numerals": True})
        # The new 600 ms timeout ends this turn: 30 silent frames after f1.
        await conn.send_media(mk(1) + quiet(30))
        await conn.send_close_stream()
        stream = await read_v2(conn)
    ok = stream.of(ListenV2ConfigureSuccess)
    failed = stream.of(ListenV2ConfigureFailure)
    assert len(ok) == 2 and len(failed) == len(bad)
    assert ok[0].thresholds.eot_timeout_ms == 600 and ok[0].thresholds.eager_eot_threshold == 0.4
    assert ok[0].thresholds.eot_threshold == 0.7 and ok[0].keyterms == ["alpha", "beta"]
    assert ok[1].keyterms == ["gamma"] and ok[1].numerals is True
    assert ok[1].thresholds.eot_timeout_ms == 600  # the failures changed nothing
    assert ok[0].language_hints is None
    assert all(f.code == "INVALID_CONFIGURATION" and f.description for f in failed)
    assert "eot_threshold" in failed[0].description
    assert stream.events() == [("StartOfTurn", 0), ("EndOfTurn", 0)]
    end = stream.turns[-1]
    assert (end.trigger, end.audio_window_end) == ("timeout", 0.62)


async def test_configure_answers_in_order_with_the_turns(emu: EmulatorServer) -> None:
    # Configure with no thresholds at all still answers with the whole configuration.
    async with flux(emu, eot_threshold="0.8") as conn:
        await conn.send_media(mk(1))
        await conn.send_configure({"type": "Configure"})
        await conn.send_media(mk(2, eot=True))
        await conn.send_close_stream()
        stream = await read_v2(conn)
    kinds_seen = [type(m).__name__ for m in stream.messages]
    assert kinds_seen == [
        "ListenV2Connected",
        "ListenV2TurnInfo",
        "ListenV2ConfigureSuccess",
        "ListenV2TurnInfo",
    ]
    success = stream.messages[2]
    assert success.thresholds.eot_threshold == 0.8 and success.thresholds.eot_timeout_ms == 5000
    assert success.thresholds.eager_eot_threshold is None and success.keyterms == []
    assert stream.turns[-1].end_of_turn_confidence == 0.9


async def test_multilingual_languages(emu: EmulatorServer) -> None:
    async with flux(emu, model="flux-general-multi", language_hint="en") as conn:
        await conn.send_media(quiet(11) + mk(1, eot=True))
        await conn.send_configure({"type": "Configure", "language_hints": ["en", "fr"]})
        await conn.send_media(mk(2))
        await conn.send_close_stream()
        stream = await read_v2(conn, timeout=5)
    raw = [json.loads(m.model_dump_json()) for m in stream.turns]
    assert [(t["event"], t["languages"], t["languages_hinted"]) for t in raw] == [
        ("StartOfTurn", ["en"], ["en"]),
        ("EndOfTurn", ["en"], ["en"]),
        ("StartOfTurn", ["en"], ["en", "fr"]),
    ]
    (ok,) = stream.of(ListenV2ConfigureSuccess)
    assert ok.language_hints == ["en", "fr"]


@pytest.mark.parametrize(
    "options",
    [
        {"model": "nova-3"},
        {"eot_threshold": "0.3"},
        {"eager_eot_threshold": "0.95"},
        {"eot_timeout_ms": "100"},
        {"encoding": "flac"},
        {"request_options": {"additional_query_parameters": {"channels": "2"}}},
    ],
)
async def test_bad_parameters_are_400(emu: EmulatorServer, options: dict[str, Any]) -> None:
    with pytest.raises(ApiError) as info:
        async with flux(emu, **options):
            pass
    assert info.value.status_code == 400
    headers = info.value.__context__.headers  # type: ignore[union-attr]
    assert headers["dg-error"] and headers["dg-request-id"]


async def test_auth_and_handshake_faults(emu: EmulatorServer) -> None:
    with pytest.raises(ApiError) as info:
        async with flux(emu, key="wrong"):
            pass
    assert info.value.status_code == 401
    emu.set_faults({"handshake_status": 429, "handshake_count": 1})
    with pytest.raises(ApiError) as info:
        async with flux(emu):
            pass
    assert info.value.status_code == 429
    emu.set_faults({"handshake_status": 503, "handshake_count": 1})
    with pytest.raises(ApiError) as info:
        async with flux(emu):
            pass
    assert info.value.status_code == 503
    async with flux(emu, authorization=f"Bearer {KEY}") as conn:  # then accepted again
        await conn.send_close_stream()
        stream = await read_v2(conn)
    assert stream.ended_by_close_stream and len(stream.messages) == 1
    # A 400 carries Deepgram's JSON body, as on /v1/listen.
    with pytest.raises(InvalidStatus) as raw:
        async with ws_connect(
            emu.url + "/v2/listen?model=nova-3", additional_headers={"Authorization": f"Token {KEY}"}
        ):
            pass
    response = raw.value.response
    body = json.loads(response.body)
    assert (
        response.status_code == 400
        and body["err_code"] == "Bad Request"
        and "flux-general-en" in body["err_msg"]
    )
    assert (
        body["request_id"] == response.headers["dg-request-id"]
        and response.headers["dg-error"] == body["err_msg"]
    )
    assert emu.stats_json()["handshakes_rejected"] == {"400": 1, "401": 1, "429": 1, "503": 1}


async def test_drop_mid_stream(emu: EmulatorServer) -> None:
    emu.set_faults({"drop_rate": 1, "drop_kind": "close", "drop_after_min": 10, "drop_after_max": 10})
    async with flux(emu) as conn:
        await conn.send_media(mk(1) + mk(2, eot=True) + quiet(3))  # answered before the drop
        await conn.send_media(mk(3) + quiet(10))  # reaches frame 10: lost with the connection
        stream = await read_v2(conn)
    assert stream.closed is not None and stream.closed.rcvd is not None
    assert stream.closed.rcvd.code == 1011 and stream.closed.rcvd.reason.startswith("NET-0000")
    # An injected drop is a crash: no Error message before it.
    assert stream.events() == [("StartOfTurn", 0), ("EndOfTurn", 0)] and not stream.of(ListenV2FatalError)
    emu.set_faults({"drop_rate": 1, "drop_kind": "abrupt", "drop_after_min": 3, "drop_after_max": 3})
    async with flux(emu) as conn:
        await conn.send_media(quiet(5))
        stream = await read_v2(conn)
    assert stream.closed is not None and stream.closed.rcvd is None  # no close frame: 1006
    assert emu.stats_json()["drops"] == {"close": 1, "abrupt": 1}


async def test_stall_and_slow_results(emu: EmulatorServer) -> None:
    emu.set_faults({"stall_next": 1, "stall_after": 5})
    async with flux(emu) as conn:
        await conn.send_media(mk(1) + quiet(3))
        first = validated(await asyncio.wait_for(conn._websocket.recv(), 2))
        second = validated(await asyncio.wait_for(conn._websocket.recv(), 2))
        assert isinstance(first, ListenV2Connected) and second.event == "StartOfTurn"
        await conn.send_media(mk(2, eot=True) + quiet(30))
        await conn.send_force_end_turn()
        await conn.send_close_stream()  # a half-open stream answers nothing, not even this
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(conn._websocket.recv(), 0.5)
    emu.set_faults({"slow_results_ms": 300})
    async with flux(emu) as conn:
        started = time.monotonic()
        await conn.send_media(mk(1, eot=True))
        await conn.send_close_stream()
        stream = await read_v2(conn)
        elapsed = time.monotonic() - started
    assert elapsed >= 0.3 and stream.ended_by_close_stream
    assert stream.events() == [("StartOfTurn", 0), ("EndOfTurn", 0)]


async def test_undecodable_audio_is_an_error_then_1008(emu: EmulatorServer) -> None:
    for options, audio in (
        ({}, mk(1) + b"VQBADAUD" + bytes(FRAME - 8)),
        ({"encoding": "opus"}, SILENCE),
        ({"encoding": "linear32"}, SILENCE),
    ):
        async with flux(emu, **options) as conn:
            await conn.send_media(audio)
            stream = await read_v2(conn)
        assert stream.closed is not None and stream.closed.rcvd is not None
        assert stream.closed.rcvd.code == 1008 and stream.closed.rcvd.reason.startswith("DATA-0000")
        error = stream.messages[-1]
        assert isinstance(error, ListenV2FatalError) and error.code == "UNPARSABLE_AUDIO"
        assert error.description == stream.closed.rcvd.reason


async def test_unknown_client_messages_are_fatal(emu: EmulatorServer) -> None:
    # Flux has no KeepAlive (nor Finalize): a JSON KeepAlive closes the connection.
    for text in ('{"type": "KeepAlive"}', '{"type": "Finalize"}', "not json", "[" * 100_000):
        async with flux(emu) as conn:
            await conn._websocket.send(text)
            stream = await read_v2(conn)
        assert stream.closed is not None and stream.closed.rcvd is not None
        assert stream.closed.rcvd.code == 1008
        assert [type(m).__name__ for m in stream.messages] == ["ListenV2Connected", "ListenV2FatalError"]
        assert stream.messages[-1].code == "UNPARSABLE_CLIENT_MESSAGE"


async def test_silence_timeout_unless_audio_keeps_it_alive() -> None:
    async with (
        EmulatorServer(port=0, silence_timeout=0.6) as emu,
        flux(emu) as kept,
        flux(emu) as idle,
    ):
        for _ in range(6):  # 1.2 s of audio, twice the timeout: audio (silence) is the keep-alive
            await kept.send_media(quiet(10))
            await asyncio.sleep(0.2)
        stream = await read_v2(idle)
        assert stream.closed is not None and stream.closed.rcvd is not None
        assert stream.closed.rcvd.code == 1011 and stream.closed.rcvd.reason.startswith("NET-0001")
        error = stream.messages[-1]
        assert isinstance(error, ListenV2FatalError) and error.code == "TIMEOUT"
        await kept.send_close_stream()
        kept_stream = await read_v2(kept)
        assert kept_stream.ended_by_close_stream
        assert [u.audio_window_end for u in kept_stream.turns] == [0.24, 0.48, 0.72, 0.96, 1.2]


async def test_v1_and_v2_on_one_server(emu: EmulatorServer) -> None:
    async with listen(emu) as v1, flux(emu) as v2:
        await v1.send_media(mk(1, eot=True))
        await v2.send_media(mk(1, eot=True))
        await v1.send_close_stream()
        await v2.send_close_stream()
        v1_messages = await read_all(v1)
        stream = await read_v2(v2)
    assert words(v1_messages[0]) == ["f1"]
    assert stream.events() == [("StartOfTurn", 0), ("EndOfTurn", 0)]


# ------------------------------------------------------------------------------ speech engine


@pytest.mark.slow  # CPU-heavy: runs in the second tier, alone
@pytest.mark.skipif(not speech_available(), reason="pocketsphinx is not installed")
async def test_speech_engine_turns() -> None:
    pcm = bytes(16000) + _speech_pcm() + bytes(32000)  # 0.5 s before, 1 s after
    async with EmulatorServer(engine="speech", port=0) as emu, flux(emu) as conn:
        for i in range(0, len(pcm), 3200):
            await conn.send_media(pcm[i : i + 3200])
        await conn.send_media(pcm[:32000])  # more speech, ended by ForceEndTurn
        await conn.send_force_end_turn()
        await conn.send_close_stream()
        stream = await read_v2(conn, timeout=20, marker=False)
    assert stream.ended_by_close_stream
    turns = stream.turns
    ends = [t for t in turns if t.event == "EndOfTurn"]
    assert ends and ends[0].trigger == "model"
    said = {"hello", "from", "sentence", "travels", "through", "streams", "recognise"}
    heard = {w.word for t in ends for w in t.words}
    assert heard & said, heard
    first = next(t for t in turns if t.event == "StartOfTurn")
    assert first.words and first.words[0].start is not None and first.words[0].start >= 0.4
    assert all(t.trigger in ("model", "manual") for t in ends)
    updates = [t for t in turns if t.event == "Update"]
    assert updates and all(is_frame_time(u.audio_window_end) for u in updates)
    # The windows tile the audio, turn after turn, as with the marker engine.
    start = 0.0
    for t in turns:
        assert t.audio_window_start == start and t.audio_window_end >= start
        if t.event == "EndOfTurn":
            start = t.audio_window_end
