"""G.711 μ-law and A-law to linear16, by lookup table.

The stdlib's `audioop` does this but is deprecated in Python 3.11 and gone in 3.13, and a PyPI
package for 40 lines of arithmetic is not worth a dependency: the tables below follow ITU-T G.711
(the same formulas as Sun's g711.c, which audioop also follows), and tests/test_emulator_formats.py
checks them against audioop while it still exists.
"""

from __future__ import annotations

import sys
from array import array
from typing import Final


def _ulaw(byte: int) -> int:
    u = ~byte & 0xFF
    t = (((u & 0x0F) << 3) + 0x84) << ((u & 0x70) >> 4)
    return (0x84 - t) if u & 0x80 else (t - 0x84)


def _alaw(byte: int) -> int:
    a = byte ^ 0x55
    t = (a & 0x0F) << 4
    seg = (a & 0x70) >> 4
    if seg == 0:
        t += 8
    elif seg == 1:
        t += 0x108
    else:
        t = (t + 0x108) << (seg - 1)
    return t if a & 0x80 else -t


def _table(fn: object) -> bytes:
    samples = array("h", [fn(b) for b in range(256)])  # type: ignore[operator]
    if sys.byteorder == "big":
        samples.byteswap()
    return samples.tobytes()


# 256 little-endian int16 samples each: byte b decodes to TABLE[2b:2b+2].
_TABLES: Final[dict[str, bytes]] = {"mulaw": _table(_ulaw), "alaw": _table(_alaw)}
# One 2-byte string per code, so decoding is a join of lookups.
_PAIRS: Final[dict[str, list[bytes]]] = {
    name: [table[2 * b : 2 * b + 2] for b in range(256)] for name, table in _TABLES.items()
}


def decode(encoding: str, data: bytes) -> bytes:
    """μ-law or A-law bytes to little-endian linear16 (twice as many bytes)."""
    pairs = _PAIRS[encoding]
    return b"".join([pairs[b] for b in data])


def sample(encoding: str, byte: int) -> int:
    """The linear value of one code (for tests and silence detection)."""
    return {"mulaw": _ulaw, "alaw": _alaw}[encoding](byte)
