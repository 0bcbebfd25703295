"""worker/ws_send.py: audio frames written straight onto the SDK connection's socket arrive as the
same messages the SDK's own send_media would deliver, interleaved with it in order, and anything
unusual falls back to the SDK."""

from __future__ import annotations

import asyncio
import os
from types import SimpleNamespace
from typing import Any

from websockets.asyncio.server import ServerConnection, serve
from websockets.protocol import State

from producer.protocol import AudioFormat
from tests.harness import bounded
from worker import ws_send
from worker.deepgram_link import DeepgramLink


async def test_frames_written_directly_arrive_intact_and_in_order_with_sdk_sends() -> None:
    received: list[bytes] = []
    done = asyncio.Event()

    async def handler(ws: ServerConnection) -> None:
        async for message in ws:
            if isinstance(message, bytes):
                received.append(message)
            elif "CloseStream" in message:
                done.set()
                await ws.close()

    payloads = [os.urandom(n) for n in (1, 125, 126, 640, 3200, 65535, 65536, 70_000)]
    async with serve(handler, "127.0.0.1", 0, compression=None) as server:
        port = server.sockets[0].getsockname()[1]
        link = DeepgramLink(f"ws://127.0.0.1:{port}", "", 5)
        async with link.connect({}, AudioFormat()) as conn:
            expected = []
            for i, payload in enumerate(payloads):
                if i % 3 == 2:
                    await conn.send_media(payload)  # the SDK's path, between direct writes
                else:
                    assert ws_send.write_binary(conn, payload)
                expected.append(payload)
            await conn.send_close_stream()
            await bounded(done.wait(), 5, "the server reading every message")
    assert received == expected


def test_mask_keys_are_fresh_for_every_frame() -> None:
    keys = [ws_send._keys.take() for _ in range(3000)]  # across several refills of the pool
    assert all(len(k) == 4 for k in keys)
    assert len(set(keys)) > 2990  # 32 random bits each: repeats are vanishingly rare


class _Transport:
    def __init__(self, closing: bool = False) -> None:
        self.closing, self.written = closing, b""

    def is_closing(self) -> bool:
        return self.closing

    def write(self, data: bytes) -> None:
        self.written += data


def _conn(**ws: Any) -> Any:
    fields = {"transport": _Transport(), "state": State.OPEN, "is_client": True, "extensions": []}
    fields.update(ws)
    return SimpleNamespace(_websocket=SimpleNamespace(**fields))


def test_anything_unusual_falls_back_to_the_sdk() -> None:
    assert ws_send.write_binary(_conn(), b"x")  # the plain case writes
    for conn in (
        SimpleNamespace(),  # no socket attribute (another SDK layout)
        _conn(transport=None),
        _conn(state=State.CLOSING),
        _conn(is_client=False),
        _conn(extensions=["permessage-deflate"]),
        _conn(transport=_Transport(closing=True)),
    ):
        assert not ws_send.write_binary(conn, b"x")
        transport = getattr(getattr(conn, "_websocket", None), "transport", None)
        assert transport is None or transport.written == b""
