"""Two channels in the session machine: each channel's finals commit on their own, the session's
commit point is the minimum over channels, each final is published once under an id naming its
channel, and replays after a reconnect, a takeover or lost writes stay exact (a channel that was
ahead never republishes a word). Ends with the randomized model test of test_session_machine.py
run with two channels against a model of lua.COMMIT's channel form."""

from __future__ import annotations

import dataclasses
import itertools
import random
from dataclasses import dataclass, field
from typing import Any

import pytest

from producer import protocol as p
from tests.test_session_machine import FB, STARTED, InstantSends, World, eid, entry, sent, seq_of
from worker import deepgram_messages as dm
from worker import session_machine as sm
from worker.failures import Failure
from worker.ledger import Commit

RULES2 = sm.Rules(frame_bytes=FB, catchup_speed=0, max_frames_per_message=4, stall_seconds=1e9, channels=2)


def final(
    channel: int, start: float, duration: float, words: list[tuple[str, float]] | None = None
) -> dm.Results:
    ws = [dm.Word(w, t, t + 0.02, 1.0) for w, t in (words or [])]
    text = " ".join(w for w, _ in (words or []))
    alt = dm.Alternative(text, 1.0, ws)
    return dm.Results(start, duration, True, True, False, dm.Channel([alt]), None, [channel, 2])


def words_of(seqs: range, base: int = 0) -> list[tuple[str, float]]:
    return [(f"f{s}", (s - base) * 0.02) for s in seqs]


def live2(committed: int = -1, marks: list[int] | None = None) -> sm.SessionMachine:
    cid = eid(committed) if committed >= 0 else b"0-0"
    m = InstantSends("s1", RULES2, sm.Resume(1, committed, cid), rng=random.Random(1))
    m.begin(0.0, STARTED)
    m.commit_point(committed, cid, None, marks)
    m.connected(0.0)
    m.caught_up([], 0.0)
    return m


def test_the_session_commit_point_is_the_minimum_over_channels() -> None:
    m = live2()
    assert sent(m.live([entry(n) for n in range(8)], 0.0)) == list(range(8))
    (c0,) = m.message(final(0, 0.0, 0.1, words_of(range(5))), 0.0)
    assert isinstance(c0, sm.CommitFinal)
    # Channel 0 covers 0..4, channel 1 nothing yet: the session's point does not move.
    assert c0.commit == Commit(0, 4, None, 0, -1)
    assert c0.event is not None and c0.event["channel"] == 0
    assert c0.event["id"] == "s1/final/c0/0-4"
    m.commit_result(c0, "ok")
    assert m.ledger.committed_seq == -1 and m.ledger.marks == [4, -1]
    assert m.ledger.pending_frames == 8  # nothing acknowledged: channel 1 may still need them
    (c1,) = m.message(final(1, 0.0, 0.06, words_of(range(3))), 0.0)
    assert c1.commit == Commit(0, 2, eid(2), 1, 2)
    assert c1.event is not None and c1.event["id"] == "s1/final/c1/0-2" and c1.event["channel"] == 1
    m.commit_result(c1, "ok")
    assert (m.ledger.committed_seq, m.ledger.committed_id, m.ledger.marks) == (2, eid(2), [4, 2])
    assert m.ledger.pending_frames == 5
    # Channel 1 overtakes channel 0: the point follows the slower one (4).
    (c1b,) = m.message(final(1, 0.06, 0.1, words_of(range(3, 8))), 0.0)
    assert c1b.commit == Commit(3, 7, eid(4), 1, 4)
    m.commit_result(c1b, "ok")
    assert (m.ledger.committed_seq, m.ledger.committed_id) == (4, eid(4))
    assert m.finals == 3


def test_a_channel_that_was_ahead_does_not_republish_after_a_reconnect() -> None:
    """Redis has channel 0 at 6 and channel 1 at 2: the new connection replays from frame 3, and
    channel 0's first final (frames 3..8) publishes only f7 and f8."""
    m = live2(2, [6, 2])
    assert m.ledger.connection_base_seq == 3
    assert sent(m.live([entry(n) for n in range(3, 9)], 0.0)) == list(range(3, 9))
    (again,) = m.message(final(0, 0.0, 0.12, words_of(range(3, 9), base=3)), 0.0)
    assert again.commit == Commit(7, 8, None, 0, 2)
    assert again.event is not None
    assert [w["word"] for w in again.event["words"]] == ["f7", "f8"]
    assert again.event["transcript"] == "f7 f8"
    assert again.event["start"] == pytest.approx(0.14) and again.event["seq_from"] == 7
    # A final of channel 0 entirely inside what it published: nothing at all.
    m2 = live2(2, [6, 2])
    m2.live([entry(n) for n in range(3, 9)], 0.0)
    assert m2.message(final(0, 0.0, 0.08, words_of(range(3, 7), base=3)), 0.0) == []
    # Channel 1's final of the same frames is all new.
    (c1,) = m2.message(final(1, 0.0, 0.08, words_of(range(3, 7), base=3)), 0.0)
    assert c1.commit == Commit(3, 6, eid(6), 1, 6)
    assert c1.event is not None and [w["word"] for w in c1.event["words"]] == ["f3", "f4", "f5", "f6"]


def test_a_final_whose_words_were_all_published_commits_without_an_event() -> None:
    m = live2(2, [6, 2])
    m.live([entry(n) for n in range(3, 9)], 0.0)
    (c,) = m.message(final(0, 0.0, 0.12, words_of(range(3, 7), base=3)), 0.0)
    assert c.commit == Commit(7, 8, None, 0, 2) and c.event is None


def test_marks_missing_in_redis_are_at_the_session_point_and_never_below_it() -> None:
    m = live2(4, [-1, 9])
    assert m.ledger.marks == [4, 9]
    m = live2(4, None)
    assert m.ledger.marks == [4, 4]


def test_a_results_message_for_a_channel_the_session_lacks_is_noted_not_committed() -> None:
    m = live2()
    m.live([entry(0)], 0.0)
    msg = dm.Results(0.0, 0.02, True, True, False, dm.Channel([]), None, [2, 3])
    (note,) = m.message(msg, 0.0)
    assert isinstance(note, sm.Note) and note.what == "unknown_channel"


def test_speech_started_of_each_channel_has_its_own_id() -> None:
    m = live2()
    m.live([entry(0)], 0.0)
    (a,) = m.message(dm.SpeechStarted(0.0, [0]), 0.0)
    (b,) = m.message(dm.SpeechStarted(0.0, [1]), 0.0)
    assert isinstance(a, sm.Publish) and isinstance(b, sm.Publish)
    assert a.event["id"] != b.event["id"] and (a.event["channel"], b.event["channel"]) == (0, 1)


def test_mono_sessions_keep_their_ids_whatever_channel_index_says() -> None:
    m = InstantSends("s1", sm.Rules(frame_bytes=FB, catchup_speed=0), sm.Resume(1), rng=random.Random(1))
    m.begin(0.0, STARTED)
    m.commit_point(-1, b"0-0")
    m.connected(0.0)
    m.caught_up([], 0.0)
    m.live([entry(0)], 0.0)
    (c,) = m.message(final(0, 0.0, 0.02, [("f0", 0.0)]), 0.0)
    assert c.event is not None and c.event["id"] == "s1/final/0-0" and c.commit == Commit(0, 0, eid(0))


# ----------------------------------------------------------------------------------------- model


@dataclass
class RedisModel2:
    """lua.COMMIT's channel form: per-channel marks, the session point is their minimum."""

    channels: int = 2
    committed_seq: int = -1
    committed_id: bytes = b"0-0"
    marks: dict[int, int] = field(default_factory=dict)
    finals: list[dict[str, Any]] = field(default_factory=list)
    epoch: int = 1
    ended: list[sm.End] = field(default_factory=list)

    def snapshot(self) -> tuple[int, bytes, int, tuple[tuple[int, int], ...]]:
        return self.committed_seq, self.committed_id, len(self.finals), tuple(sorted(self.marks.items()))

    def restore(self, snap: tuple[int, bytes, int, tuple[tuple[int, int], ...]]) -> None:
        self.committed_seq, self.committed_id, n, marks = snap
        self.marks = dict(marks)
        del self.finals[n:]

    def mark_list(self) -> list[int]:
        return [self.marks.get(c, -1) for c in range(self.channels)]

    def commit(self, epoch: int, c: sm.CommitFinal) -> str:
        if epoch != self.epoch:
            return "fenced"
        marks = [max(self.committed_seq, m) for m in self.mark_list()]
        ch = c.commit.channel
        if marks[ch] >= c.commit.seq_to:
            return "dup"
        if marks[ch] != c.commit.seq_from - 1:
            return "stale"
        marks[ch] = c.commit.seq_to
        low = min(marks)
        if low != c.commit.session_point:
            return "stale"
        if c.event is not None:
            self.finals.append(c.event)
        self.marks[ch] = c.commit.seq_to
        if low > self.committed_seq:
            self.committed_seq = low
            if c.commit.last_entry_id is not None:
                self.committed_id = c.commit.last_entry_id
        return "ok"


@dataclass
class DeepgramModel2:
    received: list[int | None] = field(default_factory=list)
    finalized: list[int] = field(default_factory=lambda: [0, 0])

    def final(self, channel: int, upto: int) -> dm.Results:
        start = self.finalized[channel]
        words = [(f"f{s}", i * 0.02) for i, s in enumerate(self.received[start:upto], start) if s is not None]
        self.finalized[channel] = upto
        return final(channel, start * 0.02, (upto - start) * 0.02, words)


class World2(World):
    def __init__(self, seed: int, frames: int) -> None:
        self.redis2 = RedisModel2()
        super().__init__(seed, frames)
        self.history = [self.redis2.snapshot()]  # type: ignore[list-item]

    def _new_owner(self) -> None:
        self.redis = self.redis2  # type: ignore[assignment]
        if self.rules.channels != 2:
            self.rules = dataclasses.replace(self.rules, channels=2)
        r = self.redis2
        self.m = sm.SessionMachine(
            "s1",
            self.rules,
            sm.Resume(r.epoch, r.committed_seq, r.committed_id, len(r.finals), tuple(r.mark_list())),
            rng=self.rng,
        )
        self.conn = None
        self.queue = list(self.m.begin(self.now, STARTED))

    def perform(self, action: sm.Action) -> None:
        if isinstance(action, sm.Connect):
            r, m = self.redis2, self.m
            m.commit_point(r.committed_seq, r.committed_id, len(r.finals), r.mark_list())
            if self.rng.random() < 0.1:
                self.queue = list(m.failed(Failure(False, "http_503", "busy"), self.now))
                return
            self.conn = DeepgramModel2()  # type: ignore[assignment]
            self.connections.append((r.committed_seq + 1, self.conn.received))  # type: ignore[union-attr]
            self.queue += m.connected(self.now)
            return
        super().perform(action)

    def step(self) -> None:
        """test_session_machine.World.step with each channel's finals at their own random cuts."""
        self.now += 0.01
        if self.queue:
            self.perform(self.queue.pop(0))
            return
        m = self.m
        conn: DeepgramModel2 | None = self.conn  # type: ignore[assignment]
        roll = self.rng.random()
        channel = self.rng.randrange(2)
        if roll < 0.3:
            self.write_audio()
            if m.phase is sm.Phase.LIVE:
                fresh = self.entries_after(m.last_read_id)
                if fresh and self.rng.random() < 0.5:
                    payload = m.live_inline(fresh[:3], self.now)
                    if payload is not None and conn is not None:
                        conn.received += [seq_of(payload[i : i + FB]) for i in range(0, len(payload), FB)]
                        return
                if fresh:
                    self.queue += m.live(fresh, self.now)
        elif roll < 0.55 and conn is not None and conn.finalized[channel] < len(conn.received):
            upto = self.rng.randint(conn.finalized[channel] + 1, len(conn.received))
            self.queue += m.message(conn.final(channel, upto), self.now)
        elif roll < 0.6 and conn is not None:
            self.drop_connection()
        elif roll < 0.63:
            self.redis2.epoch += 1  # takeover
            self._new_owner()
        elif roll < 0.66 and len(self.history) > 1:
            snap: Any = self.history[self.rng.randrange(len(self.history))]
            self.redis2.restore(snap)  # Redis loses its last writes
            self.history = [h for h in self.history if h[2] <= snap[2]]
        elif m.phase is sm.Phase.CLOSING and conn is not None:
            for c in (0, 1):  # Deepgram flushes every channel, then closes
                if conn.finalized[c] < len(conn.received):
                    self.queue += m.message(conn.final(c, len(conn.received)), self.now)
                    return
            self.conn = None
            self.queue += m.closed(self.now)
        else:
            self.queue += m.tick(self.now)


@pytest.mark.parametrize("seed", range(200))
def test_model_two_channels_random_interleavings_keep_every_guarantee(seed: int) -> None:
    world = World2(seed, frames=random.Random(seed).randint(5, 100))
    for _ in range(200_000):
        if world.redis2.ended:
            break
        world.step()
    r = world.redis2
    assert len(r.ended) == 1, "exactly one end"
    end = r.ended[0]
    assert (end.status, end.reason) == (p.STATUS_ENDED, p.END_COMPLETED), end
    expected = [s for s in range(world.total) if s not in world.skipped]
    for start, received in world.connections:
        for got, want in zip(received, range(start, start + len(received)), strict=True):
            assert got == want or (got is None and want in world.skipped)
    for channel in (0, 1):
        finals = [f for f in r.finals if f["channel"] == channel]
        words = [w["word"] for f in finals for w in f["words"]]
        assert words == [f"f{s}" for s in expected], f"channel {channel}: lost, repeated or out of order"
        ranges = [(f["seq_from"], f["seq_to"]) for f in finals]
        assert all(a[1] < b[0] for a, b in itertools.pairwise(ranges))
        for f in finals:
            assert f["id"].startswith(f"s1/final/c{channel}/")
            for w in f["words"]:
                assert w["start"] == pytest.approx(int(w["word"][1:]) * 0.02, abs=1e-6)
    ids = [f["id"] for f in r.finals]
    assert len(ids) == len(set(ids)), "a final published twice"
    assert end.frames == world.total
