"""The producer's `finalize` control entry: the worker sends Deepgram's Finalize after the frames
before it, the finals that answer carry `from_finalize`, and the session goes on."""

from __future__ import annotations

import asyncio
import time

import pytest

from producer import protocol as p
from producer.audio import marker_frame
from tests.harness import rig, session_events, wait_until_ended
from tests.test_session_machine import eid, entry, live_machine, of, sent
from worker import session_machine as sm


def finalize_entry(n: int) -> sm.Entry:
    return eid(n), {b"finalize": b"1"}


def test_finalize_is_sent_after_the_frames_before_it() -> None:
    m = live_machine()
    actions = m.live([entry(0), entry(1), finalize_entry(2), entry(3, seq=2)], 0.0)
    kinds = [type(a) for a in actions]
    assert sent(actions) == [0, 1, 2]
    # Frames 0 and 1 go out before Finalize, frame 2 after it.
    assert kinds.index(sm.Finalize) > kinds.index(sm.Send)
    assert sent(actions[: kinds.index(sm.Finalize)]) == [0, 1]
    assert m.phase is sm.Phase.LIVE  # the session goes on


def test_finalize_with_nothing_new_before_it_is_not_sent_again() -> None:
    m = live_machine()
    assert of(sm.Finalize, m.live([finalize_entry(0)], 0.0)) == []  # nothing sent yet
    actions = m.live([entry(1, seq=0), finalize_entry(2), finalize_entry(3)], 0.0)
    assert len(of(sm.Finalize, actions)) == 1
    assert of(sm.Finalize, m.live([finalize_entry(4)], 0.0)) == []


def test_a_finalize_entry_with_other_fields_is_rejected_alone() -> None:
    m = live_machine()
    actions = m.live([(eid(0), {b"finalize": b"1", b"seq": b"0"}), entry(1, seq=0)], 0.0)
    (reject,) = of(sm.RejectEntry, actions)
    assert reject.reason.startswith("unknown_fields") and sent(actions) == [0]
    assert of(sm.Finalize, actions) == []


def test_finalize_fields_decode() -> None:
    assert p.decode_audio_entry({b"finalize": b"1"}, 640) == p.FinalizeMarker()
    assert p.finalize_fields() == {"finalize": "1"}


async def test_finalize_mid_session_gets_its_final_now() -> None:
    """With finals every 10 s of audio, only the Finalize can produce a final after 0.2 s of
    audio: it arrives flagged from_finalize, covering exactly the frames before the entry."""
    async with rig() as r:
        r.emulator.final_every = 10.0
        session = await r.producer.open_session(sid="fin-1")
        for n in range(10):
            await session.send_frame(marker_frame(n), wait=False)
        await session.finalize()
        deadline = time.monotonic() + 15
        finals: list[dict[str, object]] = []
        while time.monotonic() < deadline and not finals:
            finals = [
                e for e in await session_events(r.redis, r.producer.keys, "fin-1") if e["type"] == "final"
            ]
            await asyncio.sleep(0.05)
        assert finals, "no final answered the finalize entry"
        (first,) = finals
        assert first["from_finalize"] is True
        assert [w["word"] for w in first["words"]] == [f"f{n}" for n in range(10)]  # type: ignore[index]
        assert (first["seq_from"], first["seq_to"]) == (0, 9)
        for n in range(10, 20):
            await session.send_frame(marker_frame(n), wait=False)
        await session.end()
        await wait_until_ended(r.redis, r.producer.keys, ["fin-1"], 15)
        events = await session_events(r.redis, r.producer.keys, "fin-1")
        words = [w["word"] for e in events if e["type"] == "final" for w in e["words"]]
        assert words == [f"f{n}" for n in range(20)]
        with pytest.raises(ValueError):
            await session.finalize()
