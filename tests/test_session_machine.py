"""The session state machine, without Redis, sockets or clocks: every rule, then a randomized model
test that drives it through interleavings of frames, finals, disconnects, takeovers, lost replies
and a commit point that moves backwards."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field
from typing import Any

import pytest

from producer import protocol as p
from worker import deepgram_messages as dm
from worker import session_machine as sm
from worker.failures import Failure

FB = 8  # frame bytes in these tests: b"F" + seq (uint32) + padding; silence is all zeros
RULES = sm.Rules(frame_bytes=FB, catchup_speed=0, max_frames_per_message=4, stall_seconds=1e9)
STARTED = {"type": p.SESSION_STARTED}
DROP = Failure(False, "ws_1006", "dropped")


def frame(seq: int) -> bytes:
    return b"F" + seq.to_bytes(4, "little") + bytes(FB - 5)


def seq_of(pcm: bytes) -> int | None:
    return int.from_bytes(pcm[1:5], "little") if pcm[:1] == b"F" else None


def eid(n: int) -> bytes:
    return f"1000-{n}".encode()


def entry(n: int, seq: int | None = None) -> sm.Entry:
    return eid(n), {b"seq": str(n if seq is None else seq).encode(), b"pcm": frame(n if seq is None else seq)}


def end_entry(n: int, frames: int | None = None) -> sm.Entry:
    fields = {b"end": b"1"}
    if frames is not None:
        fields[b"frames"] = str(frames).encode()
    return eid(n), fields


class InstantSends(sm.SessionMachine):
    """A machine whose Sends count as written the moment they are returned, as if the runner
    performed each at once: most rules do not care when audio reaches the socket. Tests of that
    rule (a final covers only what was written) use SessionMachine and call `written` themselves."""

    def caught_up(
        self, entries: list[sm.Entry], now: float, count: int = sm.CATCHUP_BATCH
    ) -> list[sm.Action]:
        return self._written(super().caught_up(entries, now, count))

    def live(self, entries: list[sm.Entry], now: float) -> list[sm.Action]:
        return self._written(super().live(entries, now))

    def _written(self, actions: list[sm.Action]) -> list[sm.Action]:
        for a in actions:
            if isinstance(a, sm.Send):
                self.written(a.last_seq)
        return actions


def machine(rules: sm.Rules = RULES, **resume: Any) -> sm.SessionMachine:
    return InstantSends("s1", rules, sm.Resume(epoch=resume.pop("epoch", 1), **resume), rng=random.Random(1))


def live_machine(rules: sm.Rules = RULES, committed: int = -1, **resume: Any) -> sm.SessionMachine:
    """A machine with a connection open and the catch-up done (nothing in Redis yet)."""
    m = machine(
        rules, committed_seq=committed, committed_id=eid(committed) if committed >= 0 else b"0-0", **resume
    )
    assert [type(a) for a in m.begin(0.0, STARTED)] == [sm.Publish, sm.Connect]
    m.commit_point(committed, eid(committed) if committed >= 0 else b"0-0")
    m.connected(0.0)
    assert isinstance(m.caught_up([], 0.0)[-1], sm.Follow)
    return m


def sent(actions: list[sm.Action]) -> list[int | None]:
    out: list[int | None] = []
    for a in actions:
        if isinstance(a, sm.Send):
            out += [seq_of(a.payload[i : i + FB]) for i in range(0, len(a.payload), FB)]
    return out


def final(start: float, duration: float, words: list[tuple[str, float]] | None = None) -> dm.Results:
    ws = [dm.Word(w, t, t + 0.02, 1.0) for w, t in (words or [])]
    text = " ".join(w for w, _ in (words or []))
    return dm.Results(start, duration, True, True, False, dm.Channel([dm.Alternative(text, 1.0, ws)]), None)


def of(kind: type, actions: list[sm.Action]) -> list[Any]:
    return [a for a in actions if isinstance(a, kind)]


# ----------------------------------------------------------------------------------------- start


def test_refused_options_end_the_session_without_connecting() -> None:
    m = machine()
    actions = m.begin(0.0, STARTED, p.ProtocolError("option_not_allowed", "no callback"))
    assert [type(a) for a in actions] == [sm.Publish, sm.End]
    assert actions[0].event["code"] == "option_not_allowed" and actions[0].event["fatal"]
    end = actions[1]
    assert (end.status, end.reason, end.frames) == (p.STATUS_FAILED, p.END_REJECTED, 0)
    assert end.dead_reason.startswith("option_not_allowed")


def test_start_publishes_session_started_once_then_connects() -> None:
    actions = machine().begin(0.0, STARTED)
    assert actions == [sm.Publish(STARTED, once=sm.STARTED_FLAG), sm.Connect()]


def test_a_connection_needs_a_fresh_commit_point_every_time() -> None:
    m = machine()
    m.begin(0.0, STARTED)
    with pytest.raises(sm.MachineError):
        m.connected(0.0)
    m.commit_point(-1, b"0-0")
    m.connected(0.0)
    m.failed(DROP, 1.0)
    m.reconnecting()
    with pytest.raises(sm.MachineError):  # the runner skipped re-reading Redis
        m.connected(1.0)


# ----------------------------------------------------------------------------------------- commit point


def test_commit_point_ahead_in_redis_is_adopted_and_replay_starts_after_it() -> None:
    m = machine(committed_seq=4, committed_id=eid(4))
    m.begin(0.0, STARTED)
    assert m.commit_point(9, eid(9)) == []
    assert m.connected(0.0) == [sm.ReadAudio(eid(9))]
    assert m.ledger.next_seq == 10 and m.ledger.connection_base_seq == 10


def test_commit_point_behind_in_redis_is_adopted_and_noted() -> None:
    """Redis lost its last writes (everysec fsync and a power loss, a lagging replica promoted):
    replay from Redis's older point instead of refusing every later final as stale."""
    m = machine(committed_seq=20, committed_id=eid(20), finals=3)
    m.begin(0.0, STARTED)
    notes = m.commit_point(7, eid(7))
    assert [n.what for n in notes] == ["commit_point_regressed"]
    assert notes[0].fields == {"ours": 20, "redis": 7, "replaying_frames": 13}
    assert m.connected(0.0) == [sm.ReadAudio(eid(7))]
    actions = m.caught_up([entry(n) for n in range(8, 12)], 0.0)
    assert sent(actions) == [8, 9, 10, 11]
    (commit,) = of(sm.CommitFinal, m.message(final(0.0, 0.08, [("f8", 0.0)]), 0.1))
    assert (commit.commit.seq_from, commit.commit.seq_to) == (8, 11)
    assert commit.event["words"][0]["start"] == pytest.approx(8 * 0.02)


def test_stale_commit_aborts_the_connection_and_the_next_one_rereads() -> None:
    m = live_machine()
    m.live([entry(n) for n in range(5)], 0.0)
    (commit,) = of(sm.CommitFinal, m.message(final(0.0, 0.1, [("f0", 0.0)]), 0.1))
    (abort,) = m.commit_result(commit, "stale")
    assert isinstance(abort, sm.Abort) and abort.failure.code == "stale_commit_point"
    assert m.ledger.committed_seq == -1  # not applied
    (reconnect,) = m.failed(abort.failure, 0.2)
    assert isinstance(reconnect, sm.Reconnect)
    assert m.reconnecting() == [sm.Connect()]
    m.commit_point(4, eid(4))  # the commit had landed after all: its reply was lost
    assert m.connected(1.0) == [sm.ReadAudio(eid(4))]


def test_commit_results_ok_and_dup_both_apply_and_count_the_final() -> None:
    m = live_machine()
    m.live([entry(n) for n in range(10)], 0.0)
    (c1,) = of(sm.CommitFinal, m.message(final(0.0, 0.1, [("f0", 0.0)]), 0.1))
    assert m.commit_result(c1, "ok") == []
    assert (m.ledger.committed_seq, m.finals) == (4, 1)
    (c2,) = of(sm.CommitFinal, m.message(final(0.1, 0.1, [("f5", 0.0)]), 0.2))
    # A retry after a lost reply: Redis published and counted it the first time.
    assert m.commit_result(c2, "dup") == []
    assert (m.ledger.committed_seq, m.finals) == (9, 2)
    with pytest.raises(sm.MachineError):
        m.commit_result(c2, "weird")


def test_empty_final_commits_its_frames_without_an_event() -> None:
    m = live_machine()
    m.live([entry(n) for n in range(5)], 0.0)
    (commit,) = of(sm.CommitFinal, m.message(final(0.0, 0.1), 0.1))
    assert commit.event is None and commit.commit.seq_to == 4


def test_finals_are_seq_exact_across_reconnects() -> None:
    m = live_machine()
    m.live([entry(n) for n in range(10)], 0.0)
    (c,) = of(sm.CommitFinal, m.message(final(0.0, 0.1, [("f0", 0.0)]), 0.1))
    m.commit_result(c, "ok")
    m.failed(DROP, 0.2)
    m.reconnecting()
    m.commit_point(4, eid(4))
    m.connected(0.3)
    assert sent(m.caught_up([entry(n) for n in range(5, 10)], 0.3)) == [5, 6, 7, 8, 9]
    # Deepgram restarted its clock: 0.04 s on this connection is frame 7 of the session.
    (c,) = of(sm.CommitFinal, m.message(final(0.0, 0.1, [("f7", 0.04)]), 0.4))
    assert c.event["words"][0]["start"] == pytest.approx(7 * 0.02)
    assert c.event["start"] == pytest.approx(5 * 0.02)
    assert c.event["id"] == "s1/final/5-9"


# ----------------------------------------------------------------------------------------- audio


def test_frames_go_out_in_messages_of_at_most_max_frames() -> None:
    m = live_machine()
    actions = m.live([entry(n) for n in range(10)], 0.0)
    assert [a.frames for a in of(sm.Send, actions)] == [4, 4, 2]
    assert sent(actions) == list(range(10))


def test_catch_up_is_paced_and_hands_over_to_the_live_reader() -> None:
    rules = sm.Rules(frame_bytes=FB, catchup_speed=1.0, catchup_burst_seconds=0.04, max_frames_per_message=2)
    m = machine(rules)
    m.begin(0.0, STARTED)
    m.commit_point(-1, b"0-0")
    m.connected(10.0)
    actions = m.caught_up([entry(n) for n in range(6)], 10.0, count=6)
    assert [round(a.not_before - 10.0, 3) for a in of(sm.Send, actions)] == [0.0, 0.04, 0.08]
    assert actions[-1] == sm.ReadAudio(eid(5), 6)  # a full batch: read on
    assert m.caught_up([], 10.1, count=6)[-1] == sm.Follow(eid(5))


def test_duplicates_are_skipped_and_small_gaps_become_reported_silence() -> None:
    m = live_machine()
    actions = m.live([entry(0), entry(1), entry(1), entry(4)], 0.0)
    assert sent(actions) == [0, 1, None, None, 4]
    (gap,) = of(sm.Publish, actions)
    assert gap.event["code"] == "seq_gap" and gap.once == "gap:2"


def test_bad_entry_is_rejected_alone() -> None:
    m = live_machine()
    bad = (eid(1), {b"seq": b"1", b"pcm": b"short"})
    actions = m.live([entry(0), bad, entry(1, seq=1)], 0.0)
    (reject,) = of(sm.RejectEntry, actions)
    assert reject.entry_id == eid(1) and reject.reason.startswith("bad_frame_size")
    assert reject.event["id"] == f"s1/error/bad_frame_size/{eid(1).decode()}"
    assert sent(actions) == [0, 1]


@pytest.mark.parametrize("raw", [b" 5", b"+9", b"0_7", b"05", b"-1", b"1e3", b"", b"9" * 30])
def test_seq_must_be_plain_decimal(raw: bytes) -> None:
    with pytest.raises(p.ProtocolError) as info:
        p.decode_audio_entry({b"seq": raw, b"pcm": frame(0)}, FB)
    assert info.value.code == "bad_seq"


def test_undecodable_entry_is_a_rejection_not_a_crash() -> None:
    m = live_machine()
    actions = m.live([(eid(0), {b"end": b"1", b"frames": b"\xff\xfe"})], 0.0)
    assert of(sm.RejectEntry, actions)  # the bad end marker is rejected; the session goes on
    assert m.phase is sm.Phase.LIVE


def test_end_marker_flushes_then_completes_and_late_entries_are_reported() -> None:
    m = live_machine()
    actions = m.live([entry(0), entry(1), end_entry(2, frames=2), entry(3, seq=2), end_entry(4)], 0.0)
    assert sent(actions) == [0, 1]
    assert [r.reason.split(":")[0] for r in of(sm.RejectEntry, actions)] == ["after_end", "after_end"]
    assert isinstance(actions[-1], sm.CloseInput) and m.end_seen
    (c,) = of(sm.CommitFinal, m.message(final(0.0, 0.04, [("f0", 0.0)]), 0.1))
    m.commit_result(c, "ok")
    (end,) = m.closed(0.2)
    assert (end.status, end.reason, end.frames, end.finals) == (p.STATUS_ENDED, p.END_COMPLETED, 2, 1)
    assert end.event["type"] == p.SESSION_ENDED


def test_end_marker_declaring_a_few_more_frames_pads_with_silence() -> None:
    m = live_machine()
    actions = m.live([entry(0), end_entry(1, frames=3)], 0.0)
    assert sent(actions) == [0, None, None]


def test_fatal_gap_flushes_what_was_sent_before_failing() -> None:
    m = live_machine()
    actions = m.live([entry(0), entry(1), entry(2, seq=1_000_000_000)], 0.0)
    assert sent(actions) == [0, 1]
    assert isinstance(actions[-1], sm.CloseInput)
    # The finals of what was sent still come back and are committed before the session fails.
    (c,) = of(sm.CommitFinal, m.message(final(0.0, 0.04, [("f0", 0.0), ("f1", 0.02)]), 0.1))
    m.commit_result(c, "ok")
    error, end = m.closed(0.2)
    assert isinstance(error, sm.Publish) and error.event["code"] == "bad_input" and error.event["fatal"]
    assert (end.status, end.reason, end.frames, end.finals) == (p.STATUS_FAILED, p.END_FAILED, 2, 1)
    assert end.dead_reason.startswith("bad_input: frames 2..999999999 never arrived")


def test_session_over_its_maximum_length_is_flushed_then_failed() -> None:
    rules = sm.Rules(frame_bytes=FB, catchup_speed=0, max_session_seconds=0.1)
    m = live_machine(rules)
    actions = m.live([entry(n) for n in range(8)], 0.0)
    assert sent(actions) == [0, 1, 2, 3, 4]
    assert isinstance(actions[-1], sm.CloseInput)
    assert m.closed(0.1)[-1].dead_reason == "bad_input: session is longer than 0.1 s"


def test_connection_lost_while_closing_replays_and_closes_again() -> None:
    m = live_machine()
    m.live([entry(0), entry(1), end_entry(2)], 0.0)
    assert m.phase is sm.Phase.CLOSING
    m.failed(DROP, 0.1)
    m.reconnecting()
    m.commit_point(-1, b"0-0")
    m.connected(0.2)
    assert m.phase is sm.Phase.CATCHING_UP
    actions = m.caught_up([entry(0), entry(1), end_entry(2)], 0.2)
    assert sent(actions) == [0, 1] and isinstance(actions[-1], sm.CloseInput)


# ----------------------------------------------------------------------------------------- inline


def test_inline_takes_only_the_next_plain_frames() -> None:
    m = live_machine()
    assert seq_of(m.live_inline([entry(0)], 0.0) or b"") == 0
    assert m.live_inline([entry(2)], 0.0) is None  # a gap: the slow path reports it
    assert m.live_inline([end_entry(1)], 0.0) is None
    assert m.live_inline([(eid(1), {b"seq": b"1", b"pcm": b"x"})], 0.0) is None
    payload = m.live_inline([entry(1), entry(2)], 0.0)
    assert payload == frame(1) + frame(2) and m.ledger.next_seq == 3 and m.last_read_id == eid(2)


def test_inline_is_declined_outside_live_or_when_pacing_is_due() -> None:
    rules = sm.Rules(frame_bytes=FB, catchup_speed=1.0, catchup_burst_seconds=0.0)
    m = live_machine(rules)
    assert m.live_inline([entry(0)], 0.0) is None  # pacing: nothing may go out at t=0 with no burst
    m.live([entry(0), end_entry(1)], 0.0)
    assert m.live_inline([entry(1)], 5.0) is None  # closing


# ----------------------------------------------------------------------------------------- timers


def test_keepalive_when_no_audio_flows() -> None:
    m = live_machine(sm.Rules(frame_bytes=FB, keepalive_seconds=4.0, stall_seconds=10.0, idle_timeout=60))
    assert m.tick(3.9) == []
    assert m.tick(4.0) == [sm.KeepAlive()]
    assert m.tick(5.0) == []
    assert m.next_tick_in(5.0) == pytest.approx(3.0)


def test_stall_watchdog_aborts_when_audio_gets_no_reply() -> None:
    m = live_machine(sm.Rules(frame_bytes=FB, keepalive_seconds=4.0, stall_seconds=2.0, catchup_speed=0))
    m.live([entry(0)], 1.0)
    assert m.tick(2.9) == []
    (abort,) = m.tick(3.0)
    assert isinstance(abort, sm.Abort) and abort.failure.code == "stalled"
    m2 = live_machine(sm.Rules(frame_bytes=FB, keepalive_seconds=4.0, stall_seconds=2.0, catchup_speed=0))
    m2.live([entry(0)], 1.0)
    m2.message(final(0.0, 0.0), 2.5)  # any reply resets the watchdog
    assert not of(sm.Abort, m2.tick(3.0))
    m2.unreadable_message(3.0)  # so does a message we could not read
    assert m2.tick(4.9) == [] or not of(sm.Abort, m2.tick(4.9))


def test_idle_session_is_flushed_then_abandoned() -> None:
    m = live_machine(sm.Rules(frame_bytes=FB, idle_timeout=5.0, keepalive_seconds=4.0, catchup_speed=0))
    m.live([entry(0)], 1.0)
    m.message(final(0.0, 0.02), 1.1)
    actions = m.tick(6.0)
    assert [n.what for n in of(sm.Note, actions)] == ["abandoned"]
    assert isinstance(actions[-1], sm.CloseInput)
    (end,) = m.closed(6.1)
    assert (end.status, end.reason) == (p.STATUS_ENDED, p.END_ABANDONED)


def test_server_that_never_closes_after_closestream_is_aborted() -> None:
    m = live_machine(sm.Rules(frame_bytes=FB, close_timeout=3.0, catchup_speed=0))
    m.live([end_entry(0)], 1.0)
    assert m.tick(3.9) == []
    (abort,) = m.tick(4.0)
    assert isinstance(abort, sm.Abort)


def test_server_closing_before_it_was_asked_is_a_failure() -> None:
    m = live_machine()
    (abort,) = m.closed(1.0)
    assert abort.failure.code == "closed_early"


# ----------------------------------------------------------------------------------------- failures


def test_fatal_failure_reports_once_and_fails() -> None:
    m = live_machine()
    m.live([entry(0)], 0.0)
    error, end = m.failed(Failure(True, "http_401", "bad key"), 0.1)
    assert error.event["code"] == "http_401" and error.event["fatal"]
    assert (end.reason, end.dead_reason) == (p.END_FAILED, "http_401: bad key")
    assert m.failed(DROP, 0.2) == []  # ended: nothing more


def test_reconnect_backoff_grows_and_gives_up_after_max_retries() -> None:
    m = machine(sm.Rules(frame_bytes=FB, max_retries=3, backoff_initial=1.0, backoff_max=100.0))
    m.begin(0.0, STARTED)
    delays = []
    for _ in range(3):
        m.commit_point(-1, b"0-0")
        (r,) = m.failed(Failure(False, "http_503", "busy"), 0.0)
        delays.append(r.delay)
        m.reconnecting()
    assert 0.5 <= delays[0] <= 1.0 and 1.0 <= delays[1] <= 2.0 and 2.0 <= delays[2] <= 4.0
    m.commit_point(-1, b"0-0")
    _error, end = m.failed(Failure(False, "http_503", "busy"), 0.0)
    assert end.detail.startswith("gave up after 4 attempts")


def test_a_connection_that_got_replies_resets_the_retry_count() -> None:
    m = machine(sm.Rules(frame_bytes=FB, max_retries=1))
    m.begin(0.0, STARTED)
    for _ in range(5):
        m.commit_point(-1, b"0-0")
        m.connected(0.0)
        m.message(final(0.0, 0.0), 0.1)
        (r,) = m.failed(DROP, 0.2)
        assert isinstance(r, sm.Reconnect)
        m.reconnecting()


def test_crash_loop_failure_reports_the_real_progress() -> None:
    m = machine(committed_seq=3249, committed_id=eid(3249), finals=120)
    error, end = m.fail_crash_loop(6)
    assert error.event["code"] == "crash_loop"
    assert (end.frames, end.finals, end.status) == (3250, 120, p.STATUS_FAILED)


# ----------------------------------------------------------------------------------------- model


@dataclass
class RedisModel:
    """What the fenced scripts keep: the commit point and the published finals, as Lua does it."""

    committed_seq: int = -1
    committed_id: bytes = b"0-0"
    finals: list[dict[str, Any]] = field(default_factory=list)
    epoch: int = 1
    ended: list[sm.End] = field(default_factory=list)

    def snapshot(self) -> tuple[int, bytes, int]:
        return self.committed_seq, self.committed_id, len(self.finals)

    def restore(self, snap: tuple[int, bytes, int]) -> None:
        self.committed_seq, self.committed_id, n = snap
        del self.finals[n:]

    def commit(self, epoch: int, c: sm.CommitFinal) -> str:
        if epoch != self.epoch:
            return "fenced"
        if self.committed_seq >= c.commit.seq_to:
            return "dup"
        if self.committed_seq != c.commit.seq_from - 1:
            return "stale"
        if c.event is not None:
            self.finals.append(c.event)
        self.committed_seq = c.commit.seq_to
        if c.commit.last_entry_id is not None:
            self.committed_id = c.commit.last_entry_id
        return "ok"


@dataclass
class DeepgramModel:
    """One connection: the frames it received (seq, or None for silence), and how far its finals got."""

    received: list[int | None] = field(default_factory=list)
    finalized: int = 0  # frames (of this connection) covered by finals so far

    def final(self, upto: int) -> dm.Results:
        start, end = self.finalized, upto
        words = [(f"f{s}", i * 0.02) for i, s in enumerate(self.received[start:end], start) if s is not None]
        self.finalized = end
        return final(start * 0.02, (end - start) * 0.02, [(w, t) for w, t in words])


class World:
    """A faithful miniature of the runner: performs the machine's actions against the models, with
    random faults between them."""

    def __init__(self, seed: int, frames: int) -> None:
        self.rng = random.Random(seed)
        self.total = frames
        self.stream: list[sm.Entry] = []
        self.next_seq_to_write = 0
        self.skipped: set[int] = set()
        self.redis = RedisModel()
        self.now = 0.0
        self.history: list[tuple[int, bytes, int]] = [self.redis.snapshot()]
        self.connections: list[tuple[int, list[int | None]]] = []  # (start seq, what Deepgram got)
        self.regressed = False
        self.rules = sm.Rules(
            frame_bytes=FB,
            catchup_speed=0,
            stall_seconds=1e9,
            max_frames_per_message=self.rng.randint(1, 5),
            max_gap_frames=3,
            max_retries=1000,
            # Frames held back by the send interval must go out, in order, or be replayed.
            send_interval=self.rng.choice([0.0, 0.0, 0.04, 0.08]),
        )
        self._new_owner()

    def _new_owner(self) -> None:
        r = self.redis
        self.m = sm.SessionMachine(
            "s1", self.rules, sm.Resume(r.epoch, r.committed_seq, r.committed_id, len(r.finals)), rng=self.rng
        )
        self.conn: DeepgramModel | None = None
        self.queue: list[sm.Action] = list(self.m.begin(self.now, STARTED))

    def write_audio(self) -> None:
        for _ in range(self.rng.randint(1, 6)):
            if self.next_seq_to_write > self.total:
                return
            n = len(self.stream)
            if self.next_seq_to_write == self.total:
                self.stream.append(end_entry(n, self.total))
                self.next_seq_to_write += 1
                return
            seq = self.next_seq_to_write
            if seq and seq < self.total - 1 and self.rng.random() < 0.03:
                self.skipped.add(seq)  # a small gap: the producer lost a frame
                self.next_seq_to_write += 1
                continue
            if self.rng.random() < 0.03:
                self.stream.append((f"1000-{n}".encode(), {b"seq": b"x", b"pcm": b""}))  # junk
                n += 1
            self.stream.append((f"1000-{n}".encode(), {b"seq": str(seq).encode(), b"pcm": frame(seq)}))
            self.next_seq_to_write += 1

    def entries_after(self, after: bytes, count: int = 10**9) -> list[sm.Entry]:
        def index(entry_id: bytes) -> int:
            return -1 if entry_id == b"0-0" else int(entry_id.split(b"-")[1])

        return [e for e in self.stream if index(e[0]) > index(after)][:count]

    def drop_connection(self, failure: Failure = DROP) -> None:
        self.conn = None
        self.queue = list(self.m.failed(failure, self.now))

    def perform(self, action: sm.Action) -> None:
        m, r = self.m, self.redis
        if isinstance(action, sm.Connect):
            m.commit_point(r.committed_seq, r.committed_id, len(r.finals))
            if self.rng.random() < 0.1:
                self.queue = list(m.failed(Failure(False, "http_503", "busy"), self.now))
                return
            self.conn = DeepgramModel()
            self.connections.append((r.committed_seq + 1, self.conn.received))
            self.queue += m.connected(self.now)
        elif isinstance(action, sm.Reconnect):
            self.queue += m.reconnecting()
        elif isinstance(action, sm.ReadAudio):
            entries = self.entries_after(action.after, action.count)
            self.queue += m.caught_up(entries, self.now, action.count)
        elif isinstance(action, sm.Follow):
            self.follow_from = action.after
        elif isinstance(action, sm.Send):
            assert self.conn is not None
            for i in range(0, len(action.payload), FB):
                self.conn.received.append(seq_of(action.payload[i : i + FB]))
            m.written(action.last_seq)
        elif isinstance(action, sm.CloseInput):
            self.closing = True
        elif isinstance(action, sm.CommitFinal):
            self.commit(action)
        elif isinstance(action, sm.Abort):
            self.drop_connection(action.failure)
        elif isinstance(action, sm.End):
            if action.expect_committed is not None and r.committed_seq < action.expect_committed:
                self.queue = list(m.end_refused())  # FINISH: Redis lost commits after ours
                return
            r.ended.append(action)
            r.committed_seq = max(r.committed_seq, action.frames - 1)  # FINISH never lowers it
        # Publish, RejectEntry, KeepAlive, Note: nothing the invariants look at.

    def commit(self, action: sm.CommitFinal) -> None:
        luck = self.rng.random()
        result = self.redis.commit(self.m.epoch, action)
        self.history.append(self.redis.snapshot())
        if luck < 0.05 and result == "ok":
            # The reply was lost and the receiver died with the connection.
            self.drop_connection()
            return
        if luck < 0.1 and result == "ok":
            result = self.redis.commit(self.m.epoch, action)  # lost reply, retried: dup
            assert result == "dup"
        self.queue = self.m.commit_result(action, result) + self.queue

    def step(self) -> None:
        self.now += 0.01
        if self.queue:
            self.perform(self.queue.pop(0))
            return
        m = self.m
        roll = self.rng.random()
        if roll < 0.3:
            self.write_audio()
            if m.phase is sm.Phase.LIVE:
                fresh = self.entries_after(m.last_read_id)
                if fresh and self.rng.random() < 0.5:
                    payload = m.live_inline(fresh[:3], self.now)
                    if payload is not None and self.conn is not None:
                        for i in range(0, len(payload), FB):
                            self.conn.received.append(seq_of(payload[i : i + FB]))
                        return
                if fresh:
                    self.queue += m.live(fresh, self.now)
        elif roll < 0.55 and self.conn is not None and self.conn.finalized < len(self.conn.received):
            upto = self.rng.randint(self.conn.finalized + 1, len(self.conn.received))
            self.queue += m.message(self.conn.final(upto), self.now)
        elif roll < 0.6 and self.conn is not None:
            self.drop_connection()
        elif roll < 0.63:
            # Takeover: this owner dies; another acquires the session with the next epoch.
            self.redis.epoch += 1
            self._new_owner()
        elif roll < 0.66 and len(self.history) > 1:
            # Redis loses its last writes (power loss with everysec fsync, lagging replica).
            snap = self.history[self.rng.randrange(len(self.history))]
            if snap[0] < self.redis.committed_seq:
                self.regressed = True
            self.redis.restore(snap)
            self.history = [h for h in self.history if h[2] <= snap[2]]
        elif m.phase is sm.Phase.CLOSING and self.conn is not None:
            # Deepgram flushes everything it got, then closes normally.
            if self.conn.finalized < len(self.conn.received):
                self.queue += m.message(self.conn.final(len(self.conn.received)), self.now)
            else:
                self.conn = None
                self.queue += m.closed(self.now)
        else:
            self.queue += m.tick(self.now)


@pytest.mark.parametrize("seed", range(300))
def test_model_random_interleavings_keep_every_guarantee(seed: int) -> None:
    world = World(seed, frames=random.Random(seed).randint(5, 120))
    for _ in range(200_000):
        if world.redis.ended:
            break
        world.step()
    r = world.redis
    assert len(r.ended) == 1, "exactly one end"
    end = r.ended[0]
    assert (end.status, end.reason) == (p.STATUS_ENDED, p.END_COMPLETED), end
    expected = [s for s in range(world.total) if s not in world.skipped]
    # Every frame was sent at least once, in order, each connection starting right after the
    # commit point it read (silence only where the producer skipped a frame).
    for start, received in world.connections:
        for got, want in zip(received, range(start, start + len(received)), strict=True):
            assert got == want or (got is None and want in world.skipped), f"from {start}: {received[:20]}"
    assert set(expected) <= {s for _, received in world.connections for s in received}
    # Each final is committed once: Redis's finals tile the session without overlap, in order.
    words = [w["word"] for f in r.finals for w in f["words"]]
    assert words == [f"f{s}" for s in expected], "finals lost, repeated or out of order"
    ranges = [(f["seq_from"], f["seq_to"]) for f in r.finals]
    assert all(a[1] < b[0] for a, b in itertools.pairwise(ranges))
    # Timestamps are seq-exact whatever connection a word came back on.
    for f in r.finals:
        for w in f["words"]:
            assert w["start"] == pytest.approx(int(w["word"][1:]) * 0.02, abs=1e-6)
    assert end.frames == world.total


def test_send_interval_holds_live_frames_to_send_them_together() -> None:
    m = live_machine(sm.Rules(frame_bytes=FB, catchup_speed=0, send_interval=0.06))  # 3 frames
    assert m.live_wait(1.0) == 0.0
    # Inline: frames are held (recorded, not written) until three are there ...
    assert m.live_inline([entry(0)], 1.0) == b""
    assert m.live_inline([entry(1)], 1.02) == b""
    assert m.ledger.written_seq == -1  # held frames are not on the wire: no final may cover them
    payload = m.live_inline([entry(2)], 1.04)
    assert payload is not None and [seq_of(payload[i : i + FB]) for i in range(0, len(payload), FB)] == [
        0,
        1,
        2,
    ]
    assert m.ledger.written_seq == 2
    # ... or until the first held one has waited the interval: then `tick` sends what there is.
    assert m.live_inline([entry(3)], 1.10) == b""
    assert m.next_tick_in(1.12) == pytest.approx(0.04)
    assert sent(m.tick(1.13)) == []
    assert sent(m.tick(1.17)) == [3]
    # Anything through the slow path sends the held frames first, in stream order.
    assert m.live_inline([entry(4)], 1.2) == b""
    actions = m.live([entry(5), end_entry(6, 6)], 1.21)
    assert sent(actions) == [4, 5] and isinstance(actions[-1], sm.CloseInput)


def test_held_frames_are_replayed_not_lost_when_the_connection_fails() -> None:
    m = live_machine(sm.Rules(frame_bytes=FB, catchup_speed=0, send_interval=0.08))
    assert m.live_inline([entry(0), entry(1)], 1.0) == b""
    m.failed(DROP, 1.01)
    m.reconnecting()
    m.commit_point(-1, b"0-0")
    m.connected(1.2)
    assert m.held == [] and sent(m.caught_up([entry(0), entry(1)], 1.2)) == [0, 1]


def test_held_frames_go_out_before_a_catch_up_read_and_before_the_stream_closes() -> None:
    rules = sm.Rules(frame_bytes=FB, catchup_speed=0, send_interval=0.08)
    m = live_machine(rules)
    assert m.live_inline([entry(0)], 1.0) == b""
    actions = m.inbox_overflowed(1.01)  # back to reading from Redis, after the held frame
    assert sent(actions) == [0] and actions[-1] == sm.ReadAudio(eid(0))
    m = live_machine(rules)
    assert m.live_inline([entry(0)], 1.0) == b""
    actions = m.input_broken("the audio key is not a stream", 1.01)
    assert sent(actions) == [0] and isinstance(actions[-1], sm.CloseInput)


def test_the_slow_path_send_interval_still_gathers_frames() -> None:
    m = live_machine(sm.Rules(frame_bytes=FB, catchup_speed=0, send_interval=0.06))
    assert sent(m.live([entry(0)], 1.0)) == [0]
    assert m.live_wait(1.02) == pytest.approx(0.04)
    actions = m.live([entry(1), entry(2), entry(3)], 1.06)
    assert [a.frames for a in of(sm.Send, actions)] == [3]
