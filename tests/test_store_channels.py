"""lua.COMMIT's channel form against real redis-server: per-channel marks, the session's commit
point is their minimum, each channel's final is published once (dup and stale per channel), and
a takeover reads every mark back, fenced."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from producer import protocol as p
from tests.test_store import KEYS, redis, start_session, store_for  # noqa: F401 (fixture)
from worker.events import standalone_event
from worker.ledger import Commit
from worker.store import Fenced, StaleCommitPoint


def final(sid: str, channel: int, seq_from: int, seq_to: int) -> dict[str, object]:
    return standalone_event(
        sid, p.FINAL, f"c{channel}/{seq_from}-{seq_to}", transcript="x", channel=channel, seq_from=seq_from
    )


async def test_channel_commits_move_the_session_point_to_the_minimum(redis: aioredis.Redis) -> None:  # noqa: F811
    store, sk = store_for(redis), KEYS.session("st")
    entry = await start_session(redis, "st")
    await store.acquire(sk, "w1", 5, entry)
    # Channel 0 covers 0..9: its mark moves, the session's point does not (channel 1 is at -1).
    assert await store.commit_channel(sk, 1, Commit(0, 9, None, 0, -1), final("st", 0, 0, 9), 2) == "ok"
    assert await store.commit_point(sk, 1) == (-1, b"0-0", 1)
    assert await store.channel_marks(sk, 1, 2) == [9, -1]
    # A retry of it (lost reply) is dup and publishes nothing.
    assert await store.commit_channel(sk, 1, Commit(0, 9, None, 0, -1), final("st", 0, 0, 9), 2) == "dup"
    # Channel 1 covers 0..4: the session's point is 4.
    commit = Commit(0, 4, b"1-4", 1, 4)
    assert await store.commit_channel(sk, 1, commit, final("st", 1, 0, 4), 2) == "ok"
    assert await store.commit_point(sk, 1) == (4, b"1-4", 2)
    # A final of channel 1 that does not start after its mark is stale, even though channel 0's
    # mark would allow it: marks are per channel.
    with pytest.raises(StaleCommitPoint):
        await store.commit_channel(sk, 1, Commit(3, 12, b"1-9", 1, 9), final("st", 1, 3, 12), 2)
    # A caller whose idea of the minimum is wrong (its marks are not Redis's) is stale too.
    with pytest.raises(StaleCommitPoint):
        await store.commit_channel(sk, 1, Commit(5, 12, b"1-12", 1, 12), final("st", 1, 5, 12), 2)
    assert await redis.xlen(sk.results) == 2
    # A takeover reads each mark back; the old owner is fenced.
    second = await store.acquire(sk, "w2", 5, entry)
    assert second.committed_seq == 4
    assert await store.channel_marks(sk, second.epoch, 2) == [9, 4]
    with pytest.raises(Fenced):
        await store.commit_channel(sk, 1, Commit(5, 9, b"1-9", 1, 9), final("st", 1, 5, 9), 2)
    with pytest.raises(Fenced):
        await store.channel_marks(sk, 1, 2)
    ok = await store.commit_channel(sk, second.epoch, Commit(5, 9, b"1-9", 1, 9), final("st", 1, 5, 9), 2)
    assert ok == "ok"
    assert await store.commit_point(sk, second.epoch) == (9, b"1-9", 3)
    events = [p.decode_event(fields) for _, fields in await redis.xrange(sk.results)]
    assert [e["id"] for e in events] == ["st/final/c0/0-9", "st/final/c1/0-4", "st/final/c1/5-9"]


async def test_a_mark_below_the_session_point_counts_as_the_point(redis: aioredis.Redis) -> None:  # noqa: F811
    """FINISH (or a state written before marks existed) moves only `committed_seq`: a channel's
    older mark then counts as the session's point, so its next final starts after that."""
    store, sk = store_for(redis), KEYS.session("old")
    entry = await start_session(redis, "old")
    await store.acquire(sk, "w1", 5, entry)
    await redis.hset(sk.state, mapping={"committed_seq": 7, "committed_seq:0": 3})
    with pytest.raises(StaleCommitPoint):
        await store.commit_channel(sk, 1, Commit(4, 9, None, 0, 7), final("old", 0, 4, 9), 2)
    assert await store.commit_channel(sk, 1, Commit(8, 9, None, 0, 7), final("old", 0, 8, 9), 2) == "ok"
    assert await store.channel_marks(sk, 1, 2) == [9, -1]
    assert (await store.commit_point(sk, 1))[0] == 7
