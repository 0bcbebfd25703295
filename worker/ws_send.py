"""Writing an audio message onto an SDK connection's socket without the SDK's send path.

deepgram-sdk's `send_media` goes through websockets' legacy `send()`: an ensure-open await, a
`Frame` object, a BytesIO serializer, `secrets.token_bytes(4)` (a getrandom syscall) for the mask
key, and a drain await: about 6 µs per 640-byte message on our machines, against 1.5 µs for the
same bytes built here (BENCHMARKS.md, "Worker profile"). A worker sends 50 such messages per second
per session, so this is the largest single cost it can cut without changing what goes on the wire.

What is written is exactly what websockets writes (RFC 6455 §5.2: one unfragmented binary frame,
masked with a fresh key from the OS's CSPRNG, taken from a pooled `os.urandom` buffer instead of a
syscall per frame), in one `transport.write` call, as websockets does, so frames written here and
frames websockets writes itself (pings, close) can never interleave. Anything unusual (the
connection not open, an extension such as permessage-deflate negotiated, a transport that is
closing, a server-side object, an attribute layout this code does not know) makes `write_binary`
return False, and the caller sends through the SDK as before.
"""

from __future__ import annotations

import os
import struct
from typing import Any, Final

from websockets.protocol import State

try:  # websockets' C extension; its pure-Python twin is the fallback websockets itself uses
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - a build without the extension
    from websockets.utils import apply_mask

_OPCODE_BINARY_FIN: Final = 0x82
_MASKED: Final = 0x80
_SHORT: Final = struct.Struct("!BB")
_MEDIUM: Final = struct.Struct("!BBH")
_LONG: Final = struct.Struct("!BBQ")
_KEY_POOL_BYTES: Final = 4096  # 1024 mask keys per getrandom call


class _MaskKeys:
    """Masking keys from os.urandom, fetched 1024 at a time."""

    def __init__(self) -> None:
        self._pool = b""
        self._next = 0

    def take(self) -> bytes:
        start = self._next
        if start + 4 > len(self._pool):
            self._pool, start = os.urandom(_KEY_POOL_BYTES), 0
        self._next = start + 4
        return self._pool[start : start + 4]


_keys = _MaskKeys()


def write_binary(conn: Any, payload: bytes) -> bool:
    """Writes `payload` as one masked binary frame on the SDK connection `conn` (its legacy
    websockets protocol, `conn._websocket`). False: nothing was written; send it through the SDK."""
    ws = getattr(conn, "_websocket", None)
    transport = getattr(ws, "transport", None)
    if (
        transport is None
        or getattr(ws, "state", None) is not State.OPEN
        or getattr(ws, "is_client", False) is not True
        or getattr(ws, "extensions", None)
        or transport.is_closing()
    ):
        return False
    length = len(payload)
    if length < 126:
        head = _SHORT.pack(_OPCODE_BINARY_FIN, _MASKED | length)
    elif length < 65536:
        head = _MEDIUM.pack(_OPCODE_BINARY_FIN, _MASKED | 126, length)
    else:
        head = _LONG.pack(_OPCODE_BINARY_FIN, _MASKED | 127, length)
    key = _keys.take()
    transport.write(head + key + apply_mask(payload, key))
    return True
