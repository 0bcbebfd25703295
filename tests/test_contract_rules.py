"""The wire contract at its edges, without Redis: the end marker's `frames`, protocol versions,
what happens to a dropped frame's seq, the dead-letter reason format, the deployment settings
check, and the CRC-32 test vectors that docs/protocol.md gives to producers in other languages."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from producer import protocol as p
from tests.test_session_machine import DROP, RULES, eid, end_entry, entry, live_machine, machine, of, sent
from worker import session_machine as sm
from worker.failures import Failure

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"

# ------------------------------------------------------------------------------ end marker frames


def test_an_end_marker_counting_fewer_frames_than_arrived_is_reported_not_ignored() -> None:
    """Fails when `frames` below what arrived is silently accepted (it was, before)."""
    m = live_machine()
    actions = m.live([entry(0), entry(1), entry(2), end_entry(3, frames=2)], 0.0)
    assert sent(actions) == [0, 1, 2]  # every frame that arrived is still transcribed
    (report,) = of(sm.Publish, actions)
    assert report.event["code"] == "end_mismatch" and report.event["fatal"] is False
    assert "says 2 frames were sent, but 3 arrived" in report.event["message"]
    assert isinstance(actions[-1], sm.CloseInput)
    (end,) = m.closed(0.1)
    assert (end.status, end.reason, end.frames) == (p.STATUS_ENDED, p.END_COMPLETED, 3)


def test_an_end_marker_counting_more_frames_pads_with_silence_and_says_so() -> None:
    """Fails when the padding of a short stream is reported as a plain seq_gap, or not at all."""
    m = live_machine()
    actions = m.live([entry(0), end_entry(1, frames=3)], 0.0)
    assert sent(actions) == [0, None, None]  # seq-exact timestamps: the tail is silence
    (report,) = of(sm.Publish, actions)
    assert (report.event["code"], report.once) == ("end_mismatch", "end_mismatch")
    assert "frames 1..2 were sent to Deepgram as silence" in report.event["message"]
    (end,) = m.closed(0.1)
    assert (end.reason, end.frames) == (p.END_COMPLETED, 3)


def test_an_end_marker_matching_last_seq_plus_one_reports_nothing() -> None:
    m = live_machine()
    actions = m.live([entry(0), entry(1), end_entry(2, frames=2)], 0.0)
    assert of(sm.Publish, actions) == [] and isinstance(actions[-1], sm.CloseInput)


def test_an_end_mismatch_is_reported_once_across_a_replay() -> None:
    """The same once flag on every replay: Redis's PUBLISH publishes it once per session."""
    m = live_machine()
    first = of(sm.Publish, m.live([entry(0), end_entry(1, frames=5)], 0.0))
    m.failed(DROP, 0.1)
    m.reconnecting()
    m.commit_point(-1, b"0-0")
    m.connected(0.2)
    again = of(sm.Publish, m.caught_up([entry(0), end_entry(1, frames=5)], 0.2))
    assert [a.once for a in first] == [a.once for a in again] == ["end_mismatch"]


@pytest.mark.parametrize("frames", [b"-1", b"+3", b" 3", b"03", b"3.0", b"1" * 19, b""])
def test_end_marker_frames_must_be_a_plain_count(frames: bytes) -> None:
    with pytest.raises(p.ProtocolError) as caught:
        p.decode_audio_entry({b"end": b"1", b"frames": frames}, 640)
    assert caught.value.code == "bad_end"


# ------------------------------------------------------------------------------ codes per entry kind


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({b"seq": b"0", b"pcm": bytes(640), b"x": b"1"}, "bad_entry"),  # an extra field on a frame
        ({b"seq": b"0"}, "bad_entry"),
        ({b"pcm": bytes(640)}, "bad_entry"),
        ({b"x": b"1"}, "bad_entry"),
        ({b"seq": b"+1", b"pcm": bytes(640)}, "bad_seq"),
        ({b"seq": b"0", b"pcm": bytes(639)}, "bad_frame_size"),
        ({b"end": b"1", b"x": b"1"}, "unknown_fields"),  # an extra field on the end marker
        ({b"end": b"1", b"frames": b"x"}, "bad_end"),
        ({b"end": b"1", b"\xff": b"1"}, "bad_encoding"),
        ({b"force_end_turn": b"1", b"x": b"1"}, "unknown_fields"),  # Flux control entries
        ({b"configure": b"{}", b"x": b"1"}, "unknown_fields"),
        ({b"configure": b"not json"}, "bad_configure"),
        ({b"configure": b'{"eot_threshold": {"deep": 1}}'}, "bad_configure"),
        ({b"configure": b"[0.7]"}, "bad_configure"),
    ],
)
def test_audio_entry_codes(fields: dict[bytes, bytes], code: str) -> None:
    """The codes docs/protocol.md §3 lists per audio entry kind."""
    with pytest.raises(p.ProtocolError) as caught:
        p.decode_audio_entry(fields, 640)
    assert caught.value.code == code


def test_a_dropped_frame_whose_seq_is_sent_again_leaves_no_gap() -> None:
    m = live_machine()
    actions = m.live([entry(0), (eid(1), {b"seq": b"1", b"pcm": b"short"}), entry(2, seq=1)], 0.0)
    assert sent(actions) == [0, 1]
    assert [r.reason.split(":")[0] for r in of(sm.RejectEntry, actions)] == ["bad_frame_size"]
    assert of(sm.Publish, actions) == []


def test_a_dropped_frame_whose_seq_never_comes_becomes_a_gap() -> None:
    """Documented in protocol.md §3: the bad frame's seq is free; skipped, it is a seq_gap."""
    m = live_machine()
    actions = m.live([entry(0), (eid(1), {b"seq": b"1", b"pcm": b"short"}), entry(2)], 0.0)
    assert sent(actions) == [0, None, 2]
    assert [r.reason.split(":")[0] for r in of(sm.RejectEntry, actions)] == ["bad_frame_size"]
    assert [a.event["code"] for a in of(sm.Publish, actions)] == ["seq_gap"]


# ------------------------------------------------------------------------------ versions


@pytest.mark.parametrize("v", [b"2", b"0", b"1.0", b" 1", b""])
def test_versions_we_do_not_speak_are_refused(v: bytes) -> None:
    """Fails when `v` is ignored (a v2 entry used to run as version 1)."""
    with pytest.raises(p.ProtocolError) as caught:
        p.SessionStart.from_fields({b"sid": b"s", b"v": v, b"newfield": b"x"})
    assert caught.value.code == "bad_version"  # not unknown_fields: say what is really wrong


def test_version_1_or_absent_is_accepted() -> None:
    assert p.SessionStart.from_fields({b"sid": b"s", b"v": b"1"}).sid == "s"
    assert p.SessionStart.from_fields({b"sid": b"s"}).sid == "s"


# ------------------------------------------------------------------------------ dead-letter reasons


def _ending(actions: list[sm.Action]) -> tuple[str, str]:
    (error,) = [a for a in of(sm.Publish, actions) if a.event["type"] == p.ERROR]
    (end,) = of(sm.End, actions)
    return error.event["code"], end.dead_reason


@pytest.mark.parametrize(
    "how",
    ["options", "fatal", "gave_up", "crash_loop", "bad_input"],
)
def test_every_dead_letter_reason_is_code_colon_message(how: str) -> None:
    """Fails when a machine-made dead letter's reason does not start with its error's code."""
    m = machine(RULES if how != "gave_up" else sm.Rules(frame_bytes=8, max_retries=0))
    if how == "options":
        actions = m.begin(0.0, {"type": p.SESSION_STARTED}, p.ProtocolError("bad_option", "nope"))
    elif how == "crash_loop":
        actions = m.fail_crash_loop(3)
    else:
        m.begin(0.0, {"type": p.SESSION_STARTED})
        m.commit_point(-1, b"0-0")
        m.connected(0.0)
        if how == "fatal":
            actions = m.failed(Failure(True, "http_401", "bad key"), 0.1)
        elif how == "gave_up":
            actions = m.failed(DROP, 0.1)
        else:
            m.caught_up([], 0.0)
            m.live([entry(0), entry(400)], 0.0)
            actions = m.closed(0.1)
    code, reason = _ending(actions)
    assert re.fullmatch(r"[a-z0-9_]+: .+", reason), reason
    assert reason.startswith(f"{code}: ")


# ------------------------------------------------------------------------------ deployment settings


def test_deployment_settings_check() -> None:
    keys = p.Keys("vq", 3)
    assert keys.deployment() == "vq:deployment"
    p.check_deployment({}, keys)  # nothing stored yet: nothing to disagree with
    p.check_deployment({b"partitions": b"3", b"protocol": b"1"}, keys)
    with pytest.raises(p.DeploymentMismatch) as caught:
        p.check_deployment({b"partitions": b"4", b"protocol": b"1"}, keys)
    assert "partitions 4 there, 3 here" in str(caught.value)
    with pytest.raises(p.DeploymentMismatch):
        p.check_deployment({"protocol": "2"}, keys)


# ------------------------------------------------------------------------------ CRC-32 vectors


def test_crc32_vectors_in_the_doc_match_the_code() -> None:
    """Every row of protocol.md's CRC-32 table (`| sid | crc32 | P | partition |`) must hold, so a
    producer in another language can test its partition function against them."""
    rows = re.findall(r"^\| `([^`]+)` \| (\d+) \| (\d+) \| `p(\d+)` \|$", DOC.read_text(), re.MULTILINE)
    assert len(rows) >= 4, "the CRC-32 test vectors are missing from docs/protocol.md"
    assert ("cli-demo-1", "994511390", "3", "2") in rows
    for sid, crc, partitions, partition in rows:
        assert p.zlib.crc32(sid.encode()) == int(crc), sid
        assert p.partition_of(sid, int(partitions)) == int(partition), sid
