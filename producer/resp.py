"""Redis commands packed straight into RESP, for the hot paths where redis-py's generic argument
packing costs more than the work itself: the producer's XADD of a frame, the worker's XREAD over
every stream it follows, and the worker's fenced script calls on its commit path. Each has a fixed
shape, so building the bytes is one join.
"""

from __future__ import annotations


def bulk(data: bytes) -> bytes:
    """One RESP bulk string."""
    return b"$%d\r\n%s\r\n" % (len(data), data)


def pack_xadd(key: str, fields: dict[str, bytes | str]) -> bytes:
    """`XADD key * field value ...`."""
    parts = [b"*%d\r\n$4\r\nXADD\r\n" % (3 + 2 * len(fields)), bulk(key.encode()), b"$1\r\n*\r\n"]
    for name, value in fields.items():
        parts.append(bulk(name.encode()))
        parts.append(bulk(value if isinstance(value, bytes) else value.encode()))
    return b"".join(parts)


def pack_xread(
    count: int, block_ms: int | None, packed_keys: bytes, key_count: int, ids: list[bytes]
) -> bytes:
    """`XREAD COUNT c BLOCK ms STREAMS key... id...`, with the keys already packed (they change far
    less often than the ids, so callers keep `packed_keys = b"".join(map(bulk, keys))`).
    `block_ms` None: no BLOCK (a read that answers at once, for a pipeline of several)."""
    if block_ms is None:
        head = b"*%d\r\n$5\r\nXREAD\r\n$5\r\nCOUNT\r\n%s$7\r\nSTREAMS\r\n" % (
            4 + 2 * key_count,
            bulk(b"%d" % count),
        )
    else:
        head = b"*%d\r\n$5\r\nXREAD\r\n$5\r\nCOUNT\r\n%s$5\r\nBLOCK\r\n%s$7\r\nSTREAMS\r\n" % (
            6 + 2 * key_count,
            bulk(b"%d" % count),
            bulk(b"%d" % block_ms),
        )
    return head + packed_keys + b"".join([bulk(i) for i in ids])


def pack_xreadgroup(group: str, consumer: str, count: int, block_ms: int, key: str) -> bytes:
    """`XREADGROUP GROUP g c COUNT n BLOCK ms STREAMS key >`: one stream's new entries."""
    parts = [b"XREADGROUP", b"GROUP", group.encode(), consumer.encode(), b"COUNT", b"%d" % count]
    parts += [b"BLOCK", b"%d" % block_ms, b"STREAMS", key.encode(), b">"]
    return pack(*parts)


def pack(*parts: bytes) -> bytes:
    """Any command whose arguments are bytes already."""
    return b"*%d\r\n" % len(parts) + b"".join([bulk(x) for x in parts])


def pack_evalsha(sha: str, keys: list[str], args: list[bytes | str | int]) -> bytes:
    """`EVALSHA sha numkeys key... arg...`: str as UTF-8, int in decimal, bytes as they are (what
    redis-py's packer does for the same arguments)."""
    head = b"*%d\r\n$7\r\nEVALSHA\r\n" % (3 + len(keys) + len(args))
    parts = [head, bulk(sha.encode()), bulk(b"%d" % len(keys))]
    parts += [bulk(key.encode()) for key in keys]
    for arg in args:
        if isinstance(arg, bytes):
            parts.append(bulk(arg))
        elif isinstance(arg, int):  # bool is an int to redis-py too, but none is passed here
            parts.append(bulk(b"%d" % arg))
        else:
            parts.append(bulk(arg.encode()))
    return b"".join(parts)
