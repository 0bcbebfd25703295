"""`voxqueue replay` reads recorded audio as the worker heard it: seq order, once, gaps as silence."""

from __future__ import annotations

import redis.asyncio as aioredis

from producer import protocol as p
from producer.audio import marker_frame
from producer.cli import recorded_audio


async def test_recorded_audio_orders_dedups_and_fills_gaps(redis_client: aioredis.Redis) -> None:
    keys = p.Keys()
    audio = keys.session("old").audio
    for seq in (1, 0, 3, 1):  # out of order, a retried duplicate, frame 2 never arrived
        await redis_client.xadd(audio, p.frame_fields(seq, marker_frame(seq)))
    await redis_client.xadd(audio, p.end_fields(4))
    pcm = await recorded_audio(redis_client, keys, "old", 640)
    frames = [pcm[i : i + 640] for i in range(0, len(pcm), 640)]
    assert frames == [marker_frame(0), marker_frame(1), bytes(640), marker_frame(3)]


async def test_recorded_audio_fills_mulaw_gaps_with_mulaw_silence(redis_client: aioredis.Redis) -> None:
    keys = p.Keys()
    audio = keys.session("law").audio
    await redis_client.xadd(audio, p.frame_fields(0, b"\x01" * 160))
    await redis_client.xadd(audio, p.frame_fields(2, b"\x02" * 160))
    pcm = await recorded_audio(redis_client, keys, "law", 160, 0xFF)
    assert pcm[160:320] == b"\xff" * 160  # mu-law's zero level, not the loudest negative sample
