"""examples/twilio_bridge.py with a fake Twilio client: Media Streams JSON over a WebSocket becomes
one voxqueue session (8 kHz μ-law, 160-byte frames) that a real worker transcribes through the
emulator, exactly, and that ends on `stop` (or when the socket drops without one)."""

from __future__ import annotations

import base64
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve

from producer.audio import format_marker_frame
from producer.protocol import AudioFormat, ProtocolError
from tests.harness import rig, session_events, wait_until_ended

MULAW = AudioFormat("mulaw", 8000)
ROOT = Path(__file__).resolve().parent.parent


def load_bridge() -> ModuleType:
    spec = importlib.util.spec_from_file_location("twilio_bridge", ROOT / "examples" / "twilio_bridge.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["twilio_bridge"] = module
    spec.loader.exec_module(module)
    return module


def media(stream: str, chunk: int, audio: bytes, track: str = "inbound") -> str:
    payload = base64.b64encode(audio).decode()
    return json.dumps(
        {
            "event": "media",
            "sequenceNumber": str(chunk + 2),
            "media": {"track": track, "chunk": str(chunk), "timestamp": str(chunk * 20), "payload": payload},
            "streamSid": stream,
        }
    )


def start(stream: str, call: str) -> str:
    return json.dumps(
        {
            "event": "start",
            "sequenceNumber": "1",
            "start": {
                "accountSid": "AC" + "0" * 32,
                "streamSid": stream,
                "callSid": call,
                "tracks": ["inbound"],
                "customParameters": {},
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            },
            "streamSid": stream,
        }
    )


async def fake_twilio_call(url: str, stream: str, frames: int, *, send_stop: bool = True) -> None:
    audio = b"".join(format_marker_frame(MULAW, n) for n in range(frames))
    async with connect(url) as ws:
        await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
        await ws.send(start(stream, "CA" + "1" * 32))
        await ws.send("this is not json")  # skipped, the call goes on
        await ws.send(media(stream, 0, b"", track="inbound")[:-3] + "!!}")  # broken JSON too
        # Twilio sends 160 bytes a message; a bridge must not rely on it: send 100, 220, 160...
        sizes = [100, 220] + [160] * (len(audio) // 160)
        pos = 0
        for chunk, size in enumerate(sizes):
            if pos >= len(audio):
                break
            await ws.send(media(stream, chunk, audio[pos : pos + size]))
            # The outbound track (the callee's audio with both_tracks) is not this session's.
            await ws.send(media(stream, chunk, bytes(160), track="outbound"))
            pos += size
        bad = json.dumps({"event": "media", "media": {"track": "inbound", "payload": "@@not base64@@"}})
        await ws.send(bad)
        if send_stop:
            await ws.send(
                json.dumps({"event": "stop", "stop": {"callSid": "CA" + "1" * 32}, "streamSid": stream})
            )


@pytest.mark.parametrize("send_stop", [True, False], ids=["stop", "dropped"])
async def test_a_twilio_call_becomes_an_exact_mulaw_session(send_stop: bool) -> None:
    bridge = load_bridge()
    stream = "MZ" + ("a" if send_stop else "b") * 32
    frames = 60
    async with rig() as r:
        async with serve(
            lambda c: bridge.bridge(c, r.producer, {"model": "nova-3"}), "127.0.0.1", 0
        ) as server:
            port = next(iter(server.sockets)).getsockname()[1]
            await fake_twilio_call(f"ws://127.0.0.1:{port}", stream, frames, send_stop=send_stop)
            await wait_until_ended(r.redis, r.producer.keys, [stream], 20)
        events = await session_events(r.redis, r.producer.keys, stream)
    started = next(e for e in events if e["type"] == "session_started")
    assert started["format"] == {"encoding": "mulaw", "sample_rate": 8000, "channels": 1, "frame_ms": 20}
    assert started["labels"] == {"source": "twilio", "call_sid": "CA" + "1" * 32}
    words = [w["word"] for e in events if e["type"] == "final" for w in e["words"]]
    assert words == [f"f{n}" for n in range(frames)]
    (ended,) = [e for e in events if e["type"] == "session_ended"]
    assert ended["reason"] == "completed" and ended["frames"] == frames


def test_the_bridge_refuses_formats_voxqueue_cannot_carry() -> None:
    bridge = load_bridge()
    assert bridge.session_format({"mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000}}) == MULAW
    assert bridge.session_format({}) == MULAW  # Twilio's only format, when it says nothing
    bad: dict[str, Any] = {"mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 16000}}
    with pytest.raises(ProtocolError):
        bridge.session_format(bad)
    with pytest.raises(ProtocolError):
        bridge.session_format({"mediaFormat": {"encoding": "audio/opus", "sampleRate": 48000}})
