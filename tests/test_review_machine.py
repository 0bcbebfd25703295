"""Adversarial review of the session machine's delivery rules (no I/O).

Each test started as a sequence of legal inputs that broke a promise of README "Guarantees" (the
review's findings, each fixed since), or pins a guarantee no other test pinned.
"""

from __future__ import annotations

import pytest

from producer import protocol as p
from tests.test_session_machine import (
    DROP,
    FB,
    RULES,
    STARTED,
    eid,
    end_entry,
    entry,
    final,
    live_machine,
    machine,
    of,
    seq_of,
)
from tests.test_session_machine_edges import partial
from worker import session_machine as sm


def performed_until(actions: list[sm.Action], now: float) -> list[int | None]:
    """The frames the runner has really written to the socket at `now`: it performs Sends one by
    one and sleeps until each one's not_before (session_runner._send)."""
    out: list[int | None] = []
    for a in actions:
        if isinstance(a, sm.Send):
            if a.not_before > now:
                break
            out += [seq_of(a.payload[i : i + FB]) for i in range(0, len(a.payload), FB)]
    return out


# ------------------------------------------------------------------------- no frame lost


def test_a_final_never_commits_frames_that_are_queued_but_not_yet_sent() -> None:
    """A final covers only frames the runner reported written (`written`), never frames still
    queued behind their pacing delay: an over-long final used to commit those, and a drop then
    replayed from after them."""
    rules = sm.Rules(frame_bytes=FB, max_frames_per_message=4, stall_seconds=1e9, catchup_speed=1.25)
    m = sm.SessionMachine("s1", rules, sm.Resume(epoch=1))  # Sends are written only when performed
    m.begin(0.0, STARTED)
    m.commit_point(-1, b"0-0")
    m.connected(0.0)
    actions = m.caught_up([entry(n) for n in range(200)], 0.0)
    # 2 s of burst, then 1.25x real time: half a second in, about 2.6 s (frames 0..127, in
    # messages of 4) are on the wire; the rest of the batch waits for its not_before.
    on_wire = performed_until(actions, 0.5)
    assert on_wire == list(range(128))
    for a in of(sm.Send, actions):
        if a.not_before <= 0.5:
            m.written(a.last_seq)
    # Deepgram answers with a final that reaches past what it received (legal, if odd: a rounded
    # or padded end); the ledger must cap it at what was really written.
    (commit,) = of(sm.CommitFinal, m.message(final(0.0, 3.0, [("f0", 0.0)]), 0.5))
    m.commit_result(commit, "ok")
    m.failed(DROP, 0.6)  # the connection drops before the rest of the batch goes out
    m.reconnecting()
    m.commit_point(commit.commit.seq_to, commit.commit.last_entry_id or b"0-0")
    m.connected(1.0)
    replayed = [
        seq_of(a.payload[i : i + FB])
        for a in m.caught_up([entry(n) for n in range(commit.commit.seq_to + 1, 200)], 1.0)
        if isinstance(a, sm.Send)
        for i in range(0, len(a.payload), FB)
    ]
    reached_deepgram = set(on_wire) | set(replayed)
    assert set(range(200)) <= reached_deepgram, f"never sent: {sorted(set(range(200)) - reached_deepgram)}"


# ------------------------------------------------------------------------- finals exactly once


def test_finals_out_of_order_are_noted_not_silently_dropped() -> None:
    """Deepgram's finals come in order; one that arrives after a later one covers nothing new and
    cannot be committed exactly once: its words are dropped with a Note (logged), never silently."""
    m = live_machine()
    m.live([entry(n) for n in range(100)], 0.0)
    published: list[str] = []
    notes: list[str] = []
    for msg in (final(1.0, 1.0, [("second", 1.0)]), final(0.0, 1.0, [("first", 0.0)])):
        actions = m.message(msg, 0.1)
        notes += [n.what for n in of(sm.Note, actions)]
        for c in of(sm.CommitFinal, actions):
            if c.event is not None:
                published += [w["word"] for w in c.event["words"]]
            m.commit_result(c, "ok")
    assert published == ["second"] and notes == ["final_covers_nothing_new"]


def test_a_zero_duration_final_with_words_is_noted() -> None:
    m = live_machine()
    m.live([entry(n) for n in range(100)], 0.0)
    (c,) = of(sm.CommitFinal, m.message(final(0.0, 1.0, [("a", 0.0)]), 0.1))
    m.commit_result(c, "ok")
    (note,) = m.message(final(1.0, 0.0, [("b", 1.0)]), 0.2)
    assert isinstance(note, sm.Note) and note.what == "final_covers_nothing_new"
    assert note.fields["committed_seq"] == 49


def test_overlapping_final_is_published_once_from_the_commit_point() -> None:
    """Pinned: a final overlapping the previous one commits only the new frames (its id names
    them), so a replay of the overlap never publishes the old frames twice."""
    m = live_machine()
    m.live([entry(n) for n in range(100)], 0.0)
    (c,) = of(sm.CommitFinal, m.message(final(0.0, 1.0, [("a", 0.0)]), 0.1))
    m.commit_result(c, "ok")
    (c2,) = of(sm.CommitFinal, m.message(final(0.5, 1.0, [("b", 1.2)]), 0.2))
    assert (c2.commit.seq_from, c2.commit.seq_to) == (50, 74)
    assert c2.event is not None and c2.event["id"] == "s1/final/50-74"


def test_a_final_past_everything_sent_live_covers_only_what_was_sent() -> None:
    """Pinned: on the live path (frames handed to the socket as they are recorded) an over-long
    final is capped at the last frame sent and the rest is committed by a later final."""
    m = live_machine()
    m.live([entry(n) for n in range(10)], 0.0)
    (c,) = of(sm.CommitFinal, m.message(final(0.0, 5.0, [("a", 0.0)]), 0.1))
    assert (c.commit.seq_from, c.commit.seq_to, c.commit.last_entry_id) == (0, 9, eid(9))
    m.commit_result(c, "ok")
    m.live([entry(n) for n in range(10, 15)], 0.2)
    # The next final starts where Deepgram thinks the last one ended: still after frame 9.
    (c2,) = of(sm.CommitFinal, m.message(final(5.0, 0.1, [("b", 5.0)]), 0.3))
    assert (c2.commit.seq_from, c2.commit.seq_to) == (10, 14)


def test_session_ended_counts_a_final_whose_commit_reply_was_lost() -> None:
    m = live_machine()
    m.live([entry(n) for n in range(5)] + [end_entry(5)], 0.0)
    (c,) = of(sm.CommitFinal, m.message(final(0.0, 0.1, [("f0", 0.0)]), 0.1))
    # Redis ran the COMMIT (published the final, HINCRBY finals), the reply was lost, the runner's
    # retry of the same script answered 'dup'.
    m.commit_result(c, "dup")
    (end,) = of(sm.End, m.closed(0.2))
    assert end.reason == p.END_COMPLETED
    assert end.finals == 1 and end.event["finals"] == 1


# ------------------------------------------------------------------------- giving up


def test_a_session_that_never_progresses_gives_up() -> None:
    rules = sm.Rules(frame_bytes=FB, catchup_speed=0, stall_seconds=1e9, max_retries=3)
    m = machine(rules)
    m.begin(0.0, STARTED)
    now = 0.0
    for _ in range(50):
        m.commit_point(-1, b"0-0")
        m.connected(now)
        m.caught_up([entry(n) for n in range(50)], now)
        assert of(sm.CommitFinal, m.message(partial(0.0, 0.5, "f0 f1"), now)) == []
        actions = m.failed(sm.Failure(False, "ws_1011", "internal error"), now)
        if of(sm.End, actions):
            return
        (reconnect,) = of(sm.Reconnect, actions)
        now += reconnect.delay
        m.reconnecting()
    pytest.fail("50 connections in a row without a single commit, and the session still retries")


# ------------------------------------------------------------------------- pinned guarantees


def test_end_refused_replays_and_names_the_new_commit_point() -> None:
    """Pinned: after Redis refused a normal End (it lost commits), the replayed session ends
    naming the commit point it reached on the replay, which Redis then has."""
    m = live_machine()
    m.live([entry(n) for n in range(10)] + [end_entry(10)], 0.0)
    (c,) = of(sm.CommitFinal, m.message(final(0.0, 0.2, [("f0", 0.0)]), 0.1))
    m.commit_result(c, "ok")
    (end,) = of(sm.End, m.closed(0.2))
    assert end.expect_committed == 9
    assert m.end_refused() == [sm.Connect()]
    m.commit_point(4, eid(4))  # Redis lost the commit of frames 5..9
    m.connected(1.0)
    m.caught_up([entry(n) for n in range(5, 10)] + [end_entry(10)], 1.0)
    assert m.phase is sm.Phase.CLOSING
    (c,) = of(sm.CommitFinal, m.message(final(0.0, 0.1, [("f5", 0.0)]), 1.1))
    assert (c.commit.seq_from, c.commit.seq_to) == (5, 9)
    m.commit_result(c, "ok")
    (end,) = of(sm.End, m.closed(1.2))
    assert end.expect_committed == 9 and end.frames == 10


def test_machine_never_sends_a_frame_twice_on_one_connection_after_a_replayed_read() -> None:
    """Pinned: the live reader's and a catch-up read's entries overlapping (an overflow sends the
    session back to Redis) never puts a frame on one connection twice."""
    m = live_machine(RULES)
    first = m.live([entry(n) for n in range(6)], 0.0)
    assert [a for a in m.inbox_overflowed()] == [sm.ReadAudio(eid(5))]
    again = m.caught_up([entry(n) for n in range(3, 9)], 0.1)  # overlap 3..5 (a hostile re-read)
    sent_all = [
        seq_of(a.payload[i : i + FB])
        for a in first + again
        if isinstance(a, sm.Send)
        for i in range(0, len(a.payload), FB)
    ]
    assert sent_all == list(range(9))
