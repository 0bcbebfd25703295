"""The emulator in every format of the wire contract: markers read from μ-law/A-law payloads and
from each channel of a multichannel stream, Results shaped like Deepgram's multichannel ones
(`channel_index: [i, n]`, parsed by the real SDK), G.711 decoding, and speech at 8 kHz μ-law and
48 kHz converted from the bundled sample."""

from __future__ import annotations

import array
import bisect
import importlib
import sys
import warnings
import wave
from pathlib import Path
from typing import Any

import pytest
from deepgram.listen.v1.types import ListenV1Metadata, ListenV1Results, ListenV1SpeechStarted

from producer.audio import format_marker_frame
from producer.protocol import AudioFormat
from tests.test_emulator import listen, read_all
from worker.emulator import EmulatorServer, g711, speech_available
from worker.emulator.channels import ChannelSplitter, deinterleave
from worker.emulator.events import ChannelTagged, Transcript
from worker.emulator.marker import MarkerEngine

KEY = "test-key"


def _audioop() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return importlib.import_module("audioop")
        except ImportError:  # Python 3.13+
            return None


@pytest.mark.skipif(_audioop() is None, reason="audioop is gone (Python 3.13+)")
def test_g711_tables_match_audioop() -> None:
    audioop = _audioop()
    codes = bytes(range(256))
    assert g711.decode("mulaw", codes) == audioop.ulaw2lin(codes, 2)
    assert g711.decode("alaw", codes) == audioop.alaw2lin(codes, 2)


def test_g711_known_values() -> None:
    # μ-law 0xFF and A-law 0xD5 are the codes for (near) silence; 0x00/0x80 the extremes.
    assert g711.sample("mulaw", 0xFF) == 0 and g711.sample("mulaw", 0x00) == -32124
    assert g711.sample("alaw", 0xD5) == 8 and g711.sample("alaw", 0x2A) == -32256


def test_deinterleave_splits_samples_by_channel() -> None:
    data = bytes([1, 2, 3, 4, 5, 6, 7, 8])  # 16-bit stereo: L=0x0201,0x0605  R=0x0403,0x0807
    assert deinterleave(data, 2, 2) == [bytes([1, 2, 5, 6]), bytes([3, 4, 7, 8])]
    assert deinterleave(data, 2, 1) == [bytes([1, 3, 5, 7]), bytes([2, 4, 6, 8])]


@pytest.mark.parametrize(
    "fmt",
    [
        AudioFormat("mulaw", 8000),
        AudioFormat("alaw", 8000),
        AudioFormat("linear16", 8000),
        AudioFormat("linear16", 44100),
        AudioFormat("linear16", 48000),
    ],
)
def test_marker_engine_reads_markers_in_every_mono_format(fmt: AudioFormat) -> None:
    engine = MarkerEngine(sample_rate=fmt.sample_rate, sample_width=fmt.sample_width, final_every=0.1)
    assert engine.frame_bytes == fmt.frame_bytes
    audio = b"".join(format_marker_frame(fmt, n) for n in range(10))
    events = engine.feed(audio[:7]) + engine.feed(audio[7:])  # a split frame waits for its rest
    words = [w.word for e in events if isinstance(e, Transcript) for w in e.words]
    assert words == [f"f{n}" for n in range(10)]


def test_two_channels_each_carry_their_own_markers() -> None:
    fmt = AudioFormat("linear16", 48000, 2)
    splitter = ChannelSplitter(
        [MarkerEngine(sample_rate=48000, final_every=0.1) for _ in range(2)], fmt.sample_width
    )
    audio = b"".join(format_marker_frame(fmt, n) for n in range(5))
    events = splitter.feed(audio[:1001]) + splitter.feed(audio[1001:]) + splitter.close_stream()
    by_channel: dict[int, list[str]] = {0: [], 1: []}
    for e in events:
        assert isinstance(e, ChannelTagged)
        if isinstance(e.event, Transcript):
            by_channel[e.channel] += [w.word for w in e.event.words]
    assert by_channel == {0: [f"f{n}" for n in range(5)], 1: [f"f{n}" for n in range(5)]}


async def test_mulaw_markers_through_the_sdk() -> None:
    fmt = AudioFormat("mulaw", 8000)
    async with (
        EmulatorServer(port=0, keys={KEY}) as emu,
        listen(emu, encoding="mulaw", sample_rate="8000") as conn,
    ):
        for n in range(30):
            await conn.send_media(format_marker_frame(fmt, n))
        await conn.send_close_stream()
        messages = await read_all(conn)
    finals = [m for m in messages if isinstance(m, ListenV1Results) and m.is_final]
    assert [w.word for f in finals for w in f.channel.alternatives[0].words] == [f"f{n}" for n in range(30)]
    assert all(f.channel_index == [0, 1] for f in finals)
    assert isinstance(messages[-1], ListenV1Metadata) and messages[-1].duration == 0.6


async def test_multichannel_results_have_deepgrams_shape() -> None:
    """Deepgram with multichannel=true answers one Results per channel, `channel_index` [i, n],
    each channel's times on the shared clock; the SDK's model parses them (fidelity)."""
    fmt = AudioFormat("linear16", 48000, 2)
    async with (
        EmulatorServer(port=0, keys={KEY}) as emu,
        listen(emu, sample_rate="48000", channels="2", multichannel="true", vad_events="true") as conn,
    ):
        for n in range(25):
            await conn.send_media(format_marker_frame(fmt, n))
        await conn.send_finalize()
        await conn.send_close_stream()
        messages = await read_all(conn)
    finals = [m for m in messages if isinstance(m, ListenV1Results) and m.is_final]
    for channel in (0, 1):
        mine = [f for f in finals if f.channel_index == [channel, 2]]
        assert [w.word for f in mine for w in f.channel.alternatives[0].words] == [f"f{n}" for n in range(25)]
        # The same segmentation per channel: a final of channel 0 has its twin on channel 1.
        assert [(f.start, f.duration) for f in mine] == [
            (f.start, f.duration) for f in finals if f.channel_index == [0, 2]
        ]
        assert any(f.from_finalize for f in mine)
    assert {tuple(f.channel_index) for f in finals} == {(0, 2), (1, 2)}
    started = [m for m in messages if isinstance(m, ListenV1SpeechStarted)]
    assert sorted(tuple(m.channel) for m in started) == [(0,), (1,)]
    metadata = messages[-1]
    assert isinstance(metadata, ListenV1Metadata) and metadata.channels == 2


# --------------------------------------------------------------------------------------- speech


def _sample_16k() -> array.array[int]:
    path = Path(__file__).resolve().parent.parent / "worker" / "assets" / "sample.wav"
    with wave.open(str(path)) as w:
        samples = array.array("h", w.readframes(w.getnframes()))
    if sys.byteorder == "big":
        samples.byteswap()
    return samples


def _mulaw_8k(samples: array.array[int]) -> bytes:
    """16 kHz linear16 -> 8 kHz μ-law: average pairs, then the nearest μ-law code (by the decoder's
    own table, so the test needs no encoder of its own to be right)."""
    table = sorted((g711.sample("mulaw", b), b) for b in range(256))
    values = [v for v, _ in table]
    out = bytearray()
    for i in range(0, len(samples) - 1, 2):
        x = (samples[i] + samples[i + 1]) // 2
        j = min(bisect.bisect_left(values, x), 255)
        if j > 0 and abs(values[j - 1] - x) <= abs(values[j] - x):
            j -= 1
        out.append(table[j][1])
    return bytes(out)


def _linear16_48k_stereo(samples: array.array[int]) -> bytes:
    out = array.array("h")
    for s in samples:
        out.extend((s, s, s, s, s, s))  # 3x in time, both channels
    if sys.byteorder == "big":
        out.byteswap()
    return out.tobytes()


SAID = {"hello", "from", "sentence", "travels", "through", "streams", "recognise"}


@pytest.mark.slow  # CPU-heavy: runs in the second tier, alone
@pytest.mark.skipif(not speech_available(), reason="pocketsphinx is not installed")
@pytest.mark.parametrize("kind", ["mulaw8k", "linear48k_stereo"])
async def test_speech_engine_hears_the_sample_in_other_formats(kind: str) -> None:
    samples = _sample_16k()
    if kind == "mulaw8k":
        audio = bytes([0xFF]) * 4000 + _mulaw_8k(samples) + bytes([0xFF]) * 8000
        options = {"encoding": "mulaw", "sample_rate": "8000"}
        chunk, channels = 1600, 1
    else:
        audio = bytes(48000) + _linear16_48k_stereo(samples) + bytes(192000)
        options = {"sample_rate": "48000", "channels": "2", "multichannel": "true"}
        chunk, channels = 19200, 2
    async with EmulatorServer(engine="speech", port=0) as emu, listen(emu, **options) as conn:
        for i in range(0, len(audio), chunk):
            await conn.send_media(audio[i : i + chunk])
        await conn.send_close_stream()
        messages = await read_all(conn, timeout=30)
    finals = [m for m in messages if isinstance(m, ListenV1Results) and m.is_final]
    for channel in range(channels):
        heard = {
            w.word
            for f in finals
            if f.channel_index == [channel, channels]
            for w in f.channel.alternatives[0].words
        }
        assert heard & SAID, (channel, heard)
