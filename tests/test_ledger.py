"""The pure session rules: frame bookkeeping, final coverage, timestamp offsets, pacing, watchdog."""

from __future__ import annotations

import random

import pytest

from worker.backoff import Backoff
from worker.flow import CatchupPacer, LinkClock
from worker.ledger import Admission, FrameLedger, stream_id_key


def eid(n: int) -> bytes:
    return f"1000-{n}".encode()


def send(ledger: FrameLedger, seqs: range) -> None:
    for seq in seqs:
        admission, _ = ledger.admit(seq)
        assert admission is Admission.SEND
        ledger.record_sent(seq, eid(seq))
        ledger.mark_written(seq)


def test_stream_ids_compare_numerically() -> None:
    assert stream_id_key(b"1000-10") > stream_id_key(b"1000-9")
    assert stream_id_key(b"999-99") < stream_id_key(b"1000-0")


def test_final_covers_exactly_the_frames_up_to_its_end() -> None:
    ledger = FrameLedger()
    send(ledger, range(50))
    commit = ledger.coverage(start=0.0, duration=0.5)
    assert commit is not None
    assert (commit.seq_from, commit.seq_to) == (0, 24)
    assert commit.last_entry_id == eid(24)
    ledger.apply(commit)
    assert ledger.committed_seq == 24 and ledger.committed_id == eid(24)
    nxt = ledger.coverage(start=0.5, duration=0.5)
    assert nxt is not None and (nxt.seq_from, nxt.seq_to) == (25, 49)


def test_final_never_covers_unsent_frames() -> None:
    ledger = FrameLedger()
    send(ledger, range(10))
    commit = ledger.coverage(start=0.0, duration=5.0)
    assert commit is not None and commit.seq_to == 9


def test_repeated_or_empty_final_covers_nothing() -> None:
    ledger = FrameLedger()
    send(ledger, range(30))
    ledger.apply(ledger.coverage(0.0, 0.4))  # type: ignore[arg-type]
    assert ledger.coverage(0.0, 0.4) is None
    assert ledger.coverage(0.0, 0.0) is None


def test_rewind_resends_from_first_uncommitted_with_the_right_time_offset() -> None:
    ledger = FrameLedger()
    send(ledger, range(40))
    ledger.apply(ledger.coverage(0.0, 0.5))  # type: ignore[arg-type]  # commits 0..24
    ledger.rewind()  # the connection dropped
    assert ledger.next_seq == 25 and ledger.connection_base_seq == 25
    assert ledger.connection_offset == pytest.approx(0.5)
    # Deepgram restarts at 0: its 0.1 s on the new connection is 0.6 s into the session.
    assert ledger.session_time(0.1) == pytest.approx(0.6)
    assert ledger.seq_at(0.1) == 30
    send(ledger, range(25, 40))
    commit = ledger.coverage(0.0, 0.3)
    assert commit is not None and (commit.seq_from, commit.seq_to) == (25, 39)


def test_resume_after_takeover_starts_at_commit_point() -> None:
    ledger = FrameLedger.resume(99, eid(99))
    assert ledger.next_seq == 100 and ledger.connection_offset == pytest.approx(2.0)
    assert ledger.admit(100) == (Admission.SEND, 0)


def test_duplicates_are_dropped() -> None:
    ledger = FrameLedger()
    send(ledger, range(5))
    assert ledger.admit(3) == (Admission.DUPLICATE, 0)  # a producer retry, or a re-read
    assert ledger.admit(5) == (Admission.SEND, 0)


def test_gap_is_reported_with_its_size() -> None:
    ledger = FrameLedger()
    send(ledger, range(3))
    assert ledger.admit(7) == (Admission.GAP, 4)
    for seq in range(3, 7):
        ledger.record_sent(seq, None)  # silence in place of the missing frames
    ledger.record_sent(7, eid(7))
    ledger.mark_written(7)
    commit = ledger.coverage(0.0, 0.16)
    assert commit is not None and commit.seq_to == 7
    assert commit.last_entry_id == eid(7)


def test_out_of_order_record_is_a_bug() -> None:
    ledger = FrameLedger()
    with pytest.raises(ValueError):
        ledger.record_sent(1, eid(1))


def test_frames_are_committed_exactly_once_under_random_reconnects() -> None:
    """Random drops between finals: every frame ends up in exactly one commit, in order."""
    rng = random.Random(7)
    ledger = FrameLedger()
    total = 500
    committed: list[int] = []
    while ledger.committed_seq < total - 1:
        ledger.rewind()
        sent_here = 0
        while ledger.next_seq < total and rng.random() > 0.02:
            ledger.record_sent(ledger.next_seq, eid(ledger.next_seq))
            ledger.mark_written(ledger.next_seq - 1)
            sent_here += 1
            if sent_here % 25 == 0 or ledger.next_seq == total:
                commit = ledger.coverage(0.0, sent_here * 0.02)
                if commit and rng.random() > 0.1:  # sometimes the connection dies before the final
                    committed.extend(range(commit.seq_from, commit.seq_to + 1))
                    ledger.apply(commit)
    assert committed == list(range(total))


def test_catchup_pacer_limits_replay_speed_after_the_burst() -> None:
    pacer = CatchupPacer(speed=1.25, burst_seconds=2.0)
    pacer.start(now=0.0)
    assert pacer.delay(2.0, now=0.0) == 0.0
    pacer.sent(2.0)
    # 1 s later 1.25 s more is allowed; asking for 2.25 s must wait (2.25 - 1.25) / 1.25 = 0.8 s.
    assert pacer.delay(2.25, now=1.0) == pytest.approx(0.8)
    assert CatchupPacer(speed=0, burst_seconds=0).delay(100.0, now=0.0) == 0.0


def test_link_clock_keepalive_and_stall() -> None:
    clock = LinkClock(keepalive_seconds=4.0, stall_seconds=5.0)
    clock.start(0.0)
    assert not clock.keepalive_due(3.9) and clock.keepalive_due(4.0)
    clock.keepalive_sent(4.0)
    assert not clock.stalled(100.0)  # only KeepAlive went out: silence is not a stall
    clock.audio_sent(10.0)
    clock.audio_sent(12.0)
    assert not clock.stalled(14.9) and clock.stalled(15.0)  # counted from the first unanswered audio
    clock.reply_received(15.0)
    assert not clock.stalled(30.0)
    assert clock.next_check_in(15.0) == pytest.approx(1.0)  # keepalive due at 12 + 4


def test_backoff_grows_bounded_with_jitter() -> None:
    backoff = Backoff(initial=0.1, maximum=1.0, rng=random.Random(1))
    delays = [backoff.next_delay() for _ in range(10)]
    assert 0.05 <= delays[0] <= 0.1
    assert all(d <= 1.0 for d in delays) and max(delays) >= 0.5
    backoff.reset()
    assert backoff.next_delay() <= 0.1


def test_a_final_covers_only_frames_written_to_the_connection() -> None:
    ledger = FrameLedger()
    for seq in range(50):
        ledger.record_sent(seq, eid(seq))  # queued: the runner has not written them yet
    ledger.mark_written(19)
    commit = ledger.coverage(start=0.0, duration=1.0)  # claims all 50 frames
    assert commit is not None and commit.seq_to == 19
    ledger.mark_written(1000)  # never past what was recorded
    assert ledger.written_seq == 49
