"""Edges of the session machine's rules that tests/test_session_machine.py leaves open: phase guards,
the exact boundaries of every limit, the clocks a new connection restarts, the hot path's
bookkeeping, the Deepgram messages besides finals, and the Settings -> Rules mapping. Each test
names the rule it pins; a mutation run (`python -m ops.mutate worker/session_machine.py`) is how
these were found: each kills a mutant the older tests let through."""

from __future__ import annotations

import random
from typing import Any, cast

import pytest

from producer import protocol as p
from tests.test_session_machine import (
    DROP,
    FB,
    RULES,
    STARTED,
    end_entry,
    entry,
    final,
    frame,
    live_machine,
    machine,
    of,
    sent,
)
from worker import deepgram_messages as dm
from worker import session_machine as sm
from worker.config import load_settings
from worker.failures import Failure

BUSY = Failure(False, "http_503", "busy")


def eid(n: int) -> bytes:
    return f"1000-{n}".encode()


def rules(**kw: Any) -> sm.Rules:
    base: dict[str, Any] = {"frame_bytes": FB, "catchup_speed": 0, "stall_seconds": 1e9}
    base.update(kw)
    return sm.Rules(**base)


def partial(start: float, duration: float, text: str = "", meta: str | None = None) -> dm.Results:
    words = [dm.Word(w, start, start + 0.02, 1.0) for w in text.split()]
    return dm.Results(
        start,
        duration,
        False,
        False,
        False,
        dm.Channel([dm.Alternative(text, 1.0, words)]),
        dm.ResultsMetadata(meta) if meta is not None else None,
    )


def reconnect(m: sm.SessionMachine, now: float, committed: int = -1) -> list[sm.Action]:
    """A dropped connection, the backoff wait, a fresh commit point and a new connection."""
    assert isinstance(m.failed(DROP, now)[-1], sm.Reconnect)
    assert m.reconnecting() == [sm.Connect()]
    m.commit_point(committed, eid(committed) if committed >= 0 else b"0-0")
    return m.connected(now)


# ------------------------------------------------------------------------------------ phase guards


def test_every_input_in_the_wrong_phase_is_a_runner_bug() -> None:
    """Each guarded input names the phase it found: a runner bug must not pass silently (begin
    twice would publish session_started twice; reconnecting while live would open a second
    connection; connected while live must say so rather than blame the commit point)."""
    m = live_machine()
    for call in (
        lambda: m.begin(1.0, STARTED),
        lambda: m.commit_point(0, eid(0)),
        lambda: m.connected(1.0),
        lambda: m.caught_up([], 1.0),
        lambda: m.reconnecting(),
        lambda: m.fail_crash_loop(3),
        lambda: m.end_refused(),
    ):
        with pytest.raises(sm.MachineError, match="in phase live"):
            call()
    assert m.phase is sm.Phase.LIVE


# ------------------------------------------------------------------------------------ commit point


def test_commit_point_equal_to_ours_is_not_a_regression() -> None:
    m = machine(committed_seq=4, committed_id=eid(4))
    m.begin(0.0, STARTED)
    assert m.commit_point(4, eid(4)) == []


def test_commit_point_adopts_redis_finals_count() -> None:
    """Redis counts the finals it published; the session_ended event reports Redis's count, also
    when a commit whose reply was lost (or one Redis lost) made ours wrong."""
    m = machine(finals=3)
    m.begin(0.0, STARTED)
    m.commit_point(-1, b"0-0", finals=5)
    m.connected(0.0)
    m.caught_up([end_entry(0)], 0.0)
    (end,) = m.closed(0.1)
    assert (end.finals, end.event["finals"]) == (5, 5)
    m2 = machine(finals=3)
    m2.begin(0.0, STARTED)
    m2.commit_point(-1, b"0-0")  # no count from Redis: keep ours
    assert m2.finals == 3


# ------------------------------------------------------------------------------------ connections


def test_after_end_refused_the_commit_point_must_be_read_again() -> None:
    """FINISH refused the end because Redis is behind: connecting without re-reading Redis would
    replay from our (wrong) commit point and end on it again."""
    m = live_machine()
    m.live([end_entry(0)], 0.0)
    (end,) = m.closed(0.1)
    assert end.expect_committed == -1
    assert m.end_refused() == [sm.Connect()]
    with pytest.raises(sm.MachineError, match="commit point"):
        m.connected(0.2)
    m.commit_point(-1, b"0-0")
    assert m.connected(0.2) == [sm.ReadAudio(b"0-0")]


def test_a_failed_handshake_invalidates_the_commit_point_it_read() -> None:
    m = machine()
    m.begin(0.0, STARTED)
    m.commit_point(-1, b"0-0")
    assert isinstance(m.failed(BUSY, 0.1)[-1], sm.Reconnect)
    m.reconnecting()
    with pytest.raises(sm.MachineError, match="commit point"):
        m.connected(0.5)


def test_a_new_connection_restarts_the_stall_watchdog() -> None:
    """Audio that got no reply on a dead connection must not make the next one look stalled."""
    m = live_machine(rules(keepalive_seconds=4.0, stall_seconds=2.0))
    m.live([entry(0)], 1.0)  # no reply: the watchdog is armed at 1.0
    reconnect(m, 50.0)
    assert sent(m.caught_up([entry(0)], 50.0)) == [0]
    assert m.tick(50.1) == []
    assert m.tick(51.9) == []
    (abort,) = m.tick(52.0)  # counted from this connection's first audio
    assert isinstance(abort, sm.Abort) and abort.failure.code == "stalled"


def test_replies_are_counted_per_connection() -> None:
    """A connection that got replies resets the retry count; the next one starts from zero
    replies, so a later silent failure counts as the next failure in a row."""
    m = live_machine(rules(max_retries=1))
    m.message(final(0.0, 0.0), 0.1)
    reconnect(m, 0.2)  # attempts = 1: the connection had replies
    m.caught_up([], 0.2)
    _error, end = m.failed(DROP, 0.3)  # no reply on this one: attempts = 2 > max_retries
    assert isinstance(end, sm.End) and end.detail.startswith("gave up after 2 attempts")


def test_a_working_connection_resets_the_backoff() -> None:
    m = machine(rules(max_retries=10, backoff_initial=1.0, backoff_max=100.0))
    m.begin(0.0, STARTED)
    for _ in range(3):  # failed handshakes: 1, 2, 4 s caps
        m.commit_point(-1, b"0-0")
        m.failed(BUSY, 0.0)
        m.reconnecting()
    m.commit_point(-1, b"0-0")
    m.connected(0.0)
    m.message(final(0.0, 0.0), 0.1)
    (r,) = m.failed(DROP, 0.2)
    assert 0.5 <= r.delay <= 1.0  # back to the initial cap, not 8 s


def test_request_id_comes_from_results_metadata_and_is_per_connection() -> None:
    m = live_machine()
    assert m.message(partial(0.0, 0.02, meta="req-1"), 0.1) == []  # no words: nothing published
    (started,) = m.message(dm.SpeechStarted(0.04), 0.2)
    (utt,) = m.message(dm.UtteranceEnd(0.1), 0.3)
    assert started.event["type"] == p.SPEECH_STARTED and started.event["request_id"] == "req-1"
    assert started.event["id"] == "s1/speech_started/2" and started.event["start"] == pytest.approx(0.04)
    assert utt.event["type"] == p.UTTERANCE_END and utt.event["request_id"] == "req-1"
    assert utt.event["end"] == pytest.approx(0.1)
    reconnect(m, 1.0)
    m.caught_up([], 1.0)
    (started,) = m.message(dm.SpeechStarted(0.0), 1.1)
    assert started.event["request_id"] == ""  # not the previous connection's


def test_handshake_request_id_reaches_events_before_any_results() -> None:
    """The runner hands Deepgram's request id from the handshake (dg-request-id) to connected()."""
    m = machine()
    m.begin(0.0, STARTED)
    m.commit_point(-1, b"0-0")
    m.connected(0.0, request_id="hs-1")
    m.caught_up([], 0.0)
    (started,) = m.message(dm.SpeechStarted(0.0), 0.1)
    assert started.event["request_id"] == "hs-1"


def test_failed_handshakes_after_a_working_connection_still_give_up() -> None:
    """A working connection resets the count of failures in a row; the failed handshakes that
    follow have no replies of their own and count again (it used to retry forever)."""
    m = live_machine(rules(max_retries=2))
    m.message(final(0.0, 0.0), 0.1)
    assert isinstance(m.failed(DROP, 0.2)[-1], sm.Reconnect)  # attempts = 1
    outcomes = []
    for _ in range(3):  # Deepgram is down: every handshake fails
        m.reconnecting()
        m.commit_point(-1, b"0-0")
        outcomes.append(type(m.failed(BUSY, 0.3)[-1]))
        if outcomes[-1] is sm.End:
            break
    assert outcomes == [sm.Reconnect, sm.End]


# ------------------------------------------------------------------------------------ end of input


def test_end_seen_tracks_input_that_stopped_and_is_cleared_for_a_replay() -> None:
    """The pool's drain lets a session whose input stopped finish (runner.end_seen); a replay
    (reconnect, or an end refused by Redis) has not re-read the end yet."""
    m = live_machine()
    m.live([entry(0), end_entry(1)], 0.0)
    assert m.end_seen
    m.failed(DROP, 0.1)
    assert m.end_seen  # still ending: the replay will close again
    m.reconnecting()
    m.commit_point(-1, b"0-0")
    m.connected(0.2)
    assert not m.end_seen and m.closing is None
    m.caught_up([entry(0), end_entry(1)], 0.2)
    assert m.end_seen
    m.closed(0.3)
    m.end_refused()
    assert not m.end_seen


def test_fatal_input_counts_as_input_that_ended() -> None:
    m = live_machine()
    m.live([entry(0), entry(1, seq=1000)], 0.0)
    assert m.phase is sm.Phase.CLOSING and m.end_seen


def test_a_gap_of_exactly_max_gap_frames_is_filled_one_more_is_fatal() -> None:
    m = live_machine(rules(max_gap_frames=3))
    actions = m.live([entry(0), entry(1, seq=4)], 0.0)
    assert sent(actions) == [0, None, None, None, 4] and m.phase is sm.Phase.LIVE
    m2 = live_machine(rules(max_gap_frames=3))
    actions = m2.live([entry(0), entry(1, seq=5)], 0.0)
    assert sent(actions) == [0] and isinstance(actions[-1], sm.CloseInput)


def test_end_marker_declaring_exactly_the_frames_sent_pads_nothing() -> None:
    m = live_machine()
    actions = m.live([entry(0), entry(1), end_entry(2, frames=2)], 0.0)
    assert sent(actions) == [0, 1]
    assert of(sm.Publish, actions) == []  # no seq_gap report for zero missing frames
    assert isinstance(actions[-1], sm.CloseInput)


def test_end_marker_missing_exactly_max_gap_frames_pads_them() -> None:
    m = live_machine(rules(max_gap_frames=3))
    actions = m.live([entry(0), end_entry(1, frames=4)], 0.0)
    assert sent(actions) == [0, None, None, None]
    (gap,) = of(sm.Publish, actions)
    assert gap.event["code"] == "end_mismatch" and gap.once == "end_mismatch"
    (end,) = m.closed(0.1)
    assert (end.status, end.reason, end.frames) == (p.STATUS_ENDED, p.END_COMPLETED, 4)


def test_end_marker_missing_more_than_max_gap_frames_fails_the_session() -> None:
    m = live_machine(rules(max_gap_frames=3))
    actions = m.live([entry(0), end_entry(1, frames=5)], 0.0)
    assert sent(actions) == [0]
    assert isinstance(actions[-1], sm.CloseInput) and m.end_seen
    error, end = m.closed(0.1)
    assert error.event["code"] == "bad_input" and error.event["fatal"]
    assert (end.status, end.reason, end.frames) == (p.STATUS_FAILED, p.END_FAILED, 1)
    assert end.dead_reason == "bad_input: end marker says 5 frames were sent, but only 1 arrived"


def test_entries_after_a_fatal_end_marker_are_reported_too() -> None:
    m = live_machine(rules(max_gap_frames=3))
    actions = m.live([entry(0), end_entry(1, frames=5), entry(2, seq=1)], 0.0)
    assert [r.reason.split(":")[0] for r in of(sm.RejectEntry, actions)] == ["after_end"]


def test_an_entry_the_decoder_chokes_on_is_rejected_as_bad_entry() -> None:
    """Anything unexpected while decoding (here a value that is not bytes) rejects that entry;
    the session goes on."""
    odd = cast(sm.Entry, (eid(0), {b"seq": 0, b"pcm": frame(0)}))
    with pytest.raises(p.ProtocolError) as info:
        sm.decode_audio_entry(odd[1], FB)
    assert info.value.code == "bad_entry" and "TypeError" in str(info.value)
    m = live_machine()
    actions = m.live([odd, entry(1, seq=0)], 0.0)
    (reject,) = of(sm.RejectEntry, actions)
    assert reject.entry_id == eid(0) and reject.reason.startswith("bad_entry")
    assert sent(actions) == [0] and m.phase is sm.Phase.LIVE


def test_error_event_ids_count_this_owners_errors() -> None:
    """Error ids are `code/epoch.n` with n counting every error this owner reported (rejected
    entries included), so readers deduplicating by id never merge two different errors."""
    m = live_machine(epoch=7)
    bad = [(eid(n), {b"seq": b"x", b"pcm": frame(0)}) for n in range(2)]
    rejects = of(sm.RejectEntry, m.live(bad, 0.0))
    assert [r.event["id"] for r in rejects] == [f"s1/error/bad_seq/{eid(n).decode()}" for n in range(2)]
    error, _end = m.failed(Failure(True, "http_401", "bad key"), 0.1)
    assert error.event["id"] == "s1/error/http_401/7.3"
    m2 = live_machine()
    error, _end = m2.failed(Failure(True, "http_401", "bad key"), 0.1)
    assert error.event["id"] == "s1/error/http_401/1.1"


# ------------------------------------------------------------------------------------ live input


def test_live_entries_arriving_after_the_connection_moved_on_are_ignored() -> None:
    m = live_machine()
    m.live([entry(0), end_entry(1)], 0.0)
    assert m.live([entry(2, seq=1)], 0.1) == []  # closing
    assert m.ledger.next_seq == 1
    m2 = live_machine()
    m2.live([entry(0)], 0.0)
    m2.inbox_overflowed()
    assert m2.live([entry(1)], 0.1) == []  # catching up from Redis, which has it too
    assert m2.ledger.next_seq == 1


def test_inbox_overflow_goes_back_to_reading_redis_from_the_last_entry_read() -> None:
    m = live_machine()
    m.live([entry(0), entry(1), entry(2)], 0.0)
    assert m.inbox_overflowed() == [sm.ReadAudio(eid(2))]
    assert m.phase is sm.Phase.CATCHING_UP
    actions = m.caught_up([entry(3), entry(4)], 0.1)
    assert sent(actions) == [3, 4] and actions[-1] == sm.Follow(eid(4))
    m.live([end_entry(5)], 0.2)
    assert m.inbox_overflowed() == [] and m.phase is sm.Phase.CLOSING


def test_inline_takes_at_most_max_frames_per_message() -> None:
    m = live_machine()  # max_frames_per_message=4
    assert m.live_inline([entry(n) for n in range(4)], 0.0) == b"".join(frame(n) for n in range(4))
    assert m.live_inline([entry(n) for n in range(4, 9)], 0.0) is None
    assert m.ledger.next_seq == 4 and m.last_read_id == eid(3)


def test_inline_stops_exactly_at_the_maximum_session_length() -> None:
    """The hot path and the slow path agree on the limit: frames up to max_session_seconds go."""
    m = live_machine(rules(max_session_seconds=0.1, max_frames_per_message=8))
    assert m.live_inline([entry(n) for n in range(5)], 0.0) is not None  # 5 × 20 ms = 0.1 s
    assert m.live_inline([entry(5)], 0.0) is None
    actions = m.live([entry(5)], 0.0)
    assert sent(actions) == [] and isinstance(actions[-1], sm.CloseInput)


def test_inline_sends_restart_the_idle_clock() -> None:
    m = live_machine(rules(idle_timeout=5.0))
    assert m.live_inline([entry(0)], 4.0) is not None
    assert not of(sm.Note, m.tick(6.0))
    assert [n.what for n in of(sm.Note, m.tick(9.0))] == ["abandoned"]


def test_live_entries_restart_the_idle_clock() -> None:
    m = live_machine(rules(idle_timeout=5.0))
    m.live([entry(0)], 3.0)
    assert not of(sm.Note, m.tick(7.9))
    assert [n.what for n in of(sm.Note, m.tick(8.0))] == ["abandoned"]


def test_inline_sends_count_against_catch_up_pacing() -> None:
    m = live_machine(rules(catchup_speed=1.0, catchup_burst_seconds=0.04))
    assert m.live_inline([entry(0), entry(1)], 0.0) is not None  # the burst
    assert m.live_inline([entry(2)], 0.0) is None  # over speed × time + burst
    assert m.live_inline([entry(2)], 0.02) is not None


def test_inline_sends_arm_the_stall_watchdog() -> None:
    m = live_machine(rules(keepalive_seconds=4.0, stall_seconds=2.0))
    assert m.live_inline([entry(0)], 1.0) is not None
    assert m.tick(2.9) == []
    (abort,) = m.tick(3.0)
    assert isinstance(abort, sm.Abort) and abort.failure.code == "stalled"


# ------------------------------------------------------------------------------------ timers


def test_tick_does_nothing_without_a_live_connection() -> None:
    """Between connections the clocks are the last connection's: no KeepAlive to send, no stall."""
    m = machine(rules(keepalive_seconds=4.0, stall_seconds=2.0))
    assert m.tick(100.0) == []  # new
    m.begin(0.0, STARTED)
    m.commit_point(-1, b"0-0")
    m.connected(0.0)
    m.caught_up([entry(0)], 1.0)  # audio, no reply
    m.failed(DROP, 1.5)
    assert m.tick(100.0) == []  # retrying
    m.reconnecting()
    assert m.tick(100.0) == []  # connecting
    m.commit_point(-1, b"0-0")
    m.failed(Failure(True, "http_401", "bad key"), 101.0)
    assert m.tick(200.0) == []  # ended


def test_no_keepalive_after_closestream() -> None:
    m = live_machine(rules(keepalive_seconds=4.0, close_timeout=15.0))
    m.live([end_entry(0)], 1.0)
    assert m.tick(5.0) == [] and m.tick(15.9) == []
    assert isinstance(m.tick(16.0)[0], sm.Abort)


def test_next_tick_in_honours_the_idle_deadline() -> None:
    m = live_machine(rules(keepalive_seconds=4.0, idle_timeout=2.0))
    m.live([entry(0)], 0.0)
    assert m.next_tick_in(1.0) == pytest.approx(1.0)  # idle at 2.0, before the KeepAlive at 4.0
    assert m.next_tick_in(3.0) == pytest.approx(0.01)  # overdue: check at once


def test_next_tick_in_honours_the_close_deadline() -> None:
    m = live_machine(rules(keepalive_seconds=4.0, close_timeout=1.0, idle_timeout=0.5))
    m.live([end_entry(0)], 0.0)
    assert m.next_tick_in(0.25) == pytest.approx(0.75)  # close timeout; idleness no longer counts


# ------------------------------------------------------------------------------------ deepgram


def test_messages_from_a_connection_that_is_gone_are_ignored() -> None:
    m = live_machine(rules(max_retries=1))
    m.live([entry(n) for n in range(4)], 0.0)
    m.failed(DROP, 0.1)
    assert m.message(final(0.0, 0.08, [("late", 0.0)]), 0.2) == []
    assert m.message(dm.SpeechStarted(0.0), 0.2) == []
    m.reconnecting()
    assert m.message(final(0.0, 0.08, [("late", 0.0)]), 0.2) == []
    assert m.closed(0.2) == []
    m.commit_point(-1, b"0-0")
    # The late replies did not count for the dead connection: this is a second failure in a row.
    assert isinstance(m.failed(BUSY, 0.3)[-1], sm.End)


def test_a_final_covering_nothing_new_commits_nothing() -> None:
    m = live_machine()
    m.live([entry(n) for n in range(4)], 0.0)
    (c,) = of(sm.CommitFinal, m.message(final(0.0, 0.08, [("f0", 0.0)]), 0.1))
    m.commit_result(c, "ok")
    (note,) = m.message(final(0.0, 0.08, [("f0", 0.0)]), 0.2)  # repeated: nothing committed, noted
    assert isinstance(note, sm.Note) and note.what == "final_covers_nothing_new"
    assert m.message(final(0.0, 0.0), 0.2) == []  # empty


def test_partials_are_published_only_with_words() -> None:
    m = live_machine()
    m.live([entry(n) for n in range(4)], 0.0)
    (pub,) = m.message(partial(0.02, 0.04, "hello"), 0.1)
    assert isinstance(pub, sm.Publish) and pub.once == ""
    ev = pub.event
    assert (ev["type"], ev["transcript"], ev["seq_from"], ev["seq_to"]) == (p.PARTIAL, "hello", 1, 2)
    assert m.message(partial(0.0, 0.04, ""), 0.1) == []


def test_metadata_is_silent_and_an_error_message_is_noted() -> None:
    m = live_machine()
    assert m.message(dm.Metadata("req-1", 1.0), 0.1) == []
    (note,) = m.message(dm.ErrorMessage("bad_audio", "cannot decode"), 0.2)
    assert note == sm.Note(
        "deepgram_error_message", "warning", {"variant": "bad_audio", "description": "cannot decode"}
    )


def test_an_unreadable_message_is_a_sign_of_life() -> None:
    m = live_machine(rules(keepalive_seconds=4.0, stall_seconds=2.0, max_retries=1))
    m.live([entry(0)], 1.0)
    m.unreadable_message(2.0)
    assert not of(sm.Abort, m.tick(3.5))  # the watchdog saw a reply
    for now in (5.0, 6.0):  # each connection got a (garbled) reply: never two failures in a row
        assert isinstance(m.failed(DROP, now)[-1], sm.Reconnect)
        m.reconnecting()
        m.commit_point(-1, b"0-0")
        m.connected(now)
        m.unreadable_message(now)


def test_close_outside_a_connection_is_ignored() -> None:
    m = live_machine()
    m.failed(DROP, 0.1)
    assert m.closed(0.2) == [] and m.phase is sm.Phase.RETRYING


# ------------------------------------------------------------------------------------ settings


def test_rules_take_every_knob_from_settings_and_the_audio_format() -> None:
    settings = load_settings(
        deepgram_url="ws://127.0.0.1:9",
        max_session_seconds=600.0,
        idle_timeout=33.0,
        max_retries=4,
        max_frames_per_message=6,
        keepalive_seconds=3.0,
        stall_seconds=7.0,
        close_timeout=11.0,
        catchup_speed=2.5,
        catchup_burst_seconds=3.5,
        backoff_initial=0.3,
        backoff_max=5.0,
        send_interval_ms=40,
    )
    fmt = p.AudioFormat(sample_rate=8000, channels=2, frame_ms=30)
    assert sm.Rules.from_settings(settings, fmt) == sm.Rules(
        frame_seconds=0.03,
        frame_bytes=960,
        max_session_seconds=600.0,
        idle_timeout=33.0,
        max_retries=4,
        max_frames_per_message=6,
        keepalive_seconds=3.0,
        stall_seconds=7.0,
        close_timeout=11.0,
        catchup_speed=2.5,
        catchup_burst_seconds=3.5,
        backoff_initial=0.3,
        backoff_max=5.0,
        send_interval=0.04,
        channels=2,
    )
    mulaw = sm.Rules.from_settings(settings, p.AudioFormat("mulaw", 8000))
    assert (mulaw.frame_bytes, mulaw.silence_byte) == (160, 0xFF)


def test_a_new_machine_reads_from_its_resume_point() -> None:
    """Before any connection the read position is the commit point it resumed from (and every
    field is set: the runner logs machines)."""
    m = sm.SessionMachine("s1", RULES, sm.Resume(2, 9, eid(9), 4), rng=random.Random(1))
    assert m.last_read_id == eid(9) and "s1" in repr(m)


@pytest.mark.parametrize("first", ["inline", "live"])
def test_replaying_old_audio_is_no_input_so_a_failing_session_is_still_found_idle(first: str) -> None:
    """A producer that went silent while the session's connections keep failing (Flux closes idle
    connections: it has no KeepAlive) must be abandoned after the idle timeout, not kept alive by
    its own replays of audio it had already read."""
    from tests.test_session_machine import DROP, FB, STARTED, InstantSends, entry, of

    rules = sm.Rules(frame_bytes=FB, catchup_speed=0, stall_seconds=1e9, idle_timeout=60, max_retries=1000)
    m = InstantSends("s1", rules, sm.Resume(1), rng=random.Random(1))
    m.begin(0.0, STARTED)
    now = 0.0
    for attempt in range(10):  # a connection every 10 s, each replaying frames 0..4 and failing
        m.commit_point(-1, b"0-0")
        m.connected(now)
        if attempt == 0:  # the frames first arrive live (sent inline by the reader, or not)
            m.caught_up([], now)
            if first == "inline":
                assert m.live_inline([entry(s) for s in range(5)], now) is not None
            else:
                m.live([entry(s) for s in range(5)], now)
        else:
            m.caught_up([entry(s) for s in range(5)], now)
        if now >= 60:
            assert any(isinstance(a, sm.CloseInput) for a in m.tick(now)), "not abandoned"
            return
        assert of(sm.CloseInput, m.tick(now)) == []
        now += 10
        m.failed(DROP, now)
        m.reconnecting()
    raise AssertionError("the session was never found idle")
