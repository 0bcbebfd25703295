"""Transcript events built from Deepgram messages, in the schema of docs/protocol.md.

Pure: takes the SDK's typed messages and the session's ledger, returns plain dicts. Times are
converted from connection-relative (Deepgram restarts at 0 per connection) to session-relative.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from producer import protocol as p
from worker.ledger import Commit, FrameLedger


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(slots=True)
class EventFactory:
    sid: str
    epoch: int
    ledger: FrameLedger
    channels: int = 1

    def _base(self, kind: str, detail: str) -> dict[str, Any]:
        return {
            "v": p.PROTOCOL_VERSION,
            "id": p.event_id(self.sid, kind, detail),
            "type": kind,
            "sid": self.sid,
            "ts": now_ms(),
            "epoch": self.epoch,
        }

    def _detail(self, detail: str, channel: int) -> str:
        """Event id detail: with several channels it names the channel, so each channel's final
        (and each channel's speech_started) has an id of its own."""
        return detail if self.channels == 1 else f"c{channel}/{detail}"

    def transcript(self, msg: Any, commit: Commit | None, channel: int = 0) -> dict[str, Any]:
        """A `final` (with the frames it covers) or a `partial` from a Results message."""
        is_final = bool(msg.is_final)
        alt = msg.channel.alternatives[0] if msg.channel.alternatives else None
        start = self.ledger.session_time(msg.start)
        end = self.ledger.session_time(msg.start + msg.duration)
        if commit is not None:
            seq_from, seq_to = commit.seq_from, commit.seq_to
        else:
            seq_from = self.ledger.seq_at(msg.start)
            seq_to = max(seq_from, self.ledger.seq_at(msg.start + msg.duration) - 1)
        words = [self._word(w) for w in alt.words] if alt else []
        transcript = alt.transcript if alt else ""
        if commit is not None and self.channels > 1:
            # A channel that was ahead of the session's commit point hears, after a reconnect,
            # frames whose words it published already: its final starts after its own mark, and
            # only the words in [seq_from, seq_to] are this final's.
            floor = round(seq_from * self.ledger.frame_seconds, 6)
            if start < floor - 1e-6:
                kept = [w for w in words if w["start"] >= floor - 1e-6]
                if len(kept) != len(words):
                    words = kept
                    transcript = " ".join(w.get("punctuated_word") or w["word"] for w in kept)
                start = floor
        kind = p.FINAL if is_final else p.PARTIAL
        event = self._base(kind, self._detail(f"{seq_from}-{seq_to}", channel))
        event.update(
            start=start,
            end=end,
            transcript=transcript,
            confidence=float(alt.confidence) if alt else 0.0,
            words=words,
            is_final=is_final,
            speech_final=bool(msg.speech_final),
            from_finalize=bool(msg.from_finalize),
            request_id=msg.metadata.request_id if msg.metadata else "",
            channel=channel,
            seq_from=seq_from,
            seq_to=seq_to,
        )
        return event

    def _word(self, w: Any) -> dict[str, Any]:
        word: dict[str, Any] = {
            "word": w.word,
            "start": self.ledger.session_time(w.start),
            "end": self.ledger.session_time(w.end),
            "confidence": float(w.confidence),
        }
        if w.punctuated_word is not None:
            word["punctuated_word"] = w.punctuated_word
        if w.speaker is not None:
            word["speaker"] = w.speaker
        return word

    def turn(self, msg: Any, turn_index: int, commit: Commit | None, request_id: str) -> dict[str, Any]:
        """A `turn` event from a Flux TurnInfo: `turn_index` is session-global (Deepgram's restarts
        at 0 on every connection) and times are session-relative. EndOfTurn is the committed one
        (`commit`: the frames it covers), one per turn: its id names only the turn. The other
        events are best effort; their ids name the turn, the event and the audio position, so a
        replay of the same audio repeats the same ids (readers may drop what they saw)."""
        start = self.ledger.session_time(msg.audio_window_start)
        end = self.ledger.session_time(msg.audio_window_end)
        if commit is not None:
            detail = f"t{turn_index}"
        else:
            detail = f"t{turn_index}/{msg.event}/{self.ledger.seq_at(msg.audio_window_end)}"
        event = self._base(p.TURN, detail)
        words = []
        for w in msg.words:
            word: dict[str, Any] = {"word": w.word, "confidence": w.confidence}
            if w.start is not None:
                word["start"] = self.ledger.session_time(w.start)
            if w.end is not None:
                word["end"] = self.ledger.session_time(w.end)
            words.append(word)
        event.update(
            event=msg.event,
            turn_index=turn_index,
            start=start,
            end=end,
            transcript=msg.transcript,
            words=words,
            end_of_turn_confidence=msg.end_of_turn_confidence,
            is_final=commit is not None,
            request_id=msg.request_id or request_id,
        )
        if msg.trigger is not None:
            event["trigger"] = msg.trigger
        if msg.languages:
            event["languages"] = msg.languages
        if commit is not None:
            event.update(seq_from=commit.seq_from, seq_to=commit.seq_to)
        return event

    def speech_started(self, msg: Any, request_id: str) -> dict[str, Any]:
        start = self.ledger.session_time(msg.timestamp)
        channel = _channel_of(msg) if self.channels > 1 else 0
        event = self._base(p.SPEECH_STARTED, self._detail(str(self.ledger.seq_at(msg.timestamp)), channel))
        event.update(start=start, request_id=request_id)
        if self.channels > 1:
            event["channel"] = channel
        return event

    def utterance_end(self, msg: Any, request_id: str) -> dict[str, Any]:
        end = self.ledger.session_time(msg.last_word_end)
        channel = _channel_of(msg) if self.channels > 1 else 0
        event = self._base(p.UTTERANCE_END, self._detail(str(self.ledger.seq_at(msg.last_word_end)), channel))
        event.update(end=end, request_id=request_id)
        if self.channels > 1:
            event["channel"] = channel
        return event

    def session_started(self, start: p.SessionStart, worker: str) -> dict[str, Any]:
        event = self._base(p.SESSION_STARTED, "0")
        fmt = start.format
        event.update(
            format={
                "encoding": fmt.encoding,
                "sample_rate": fmt.sample_rate,
                "channels": fmt.channels,
                "frame_ms": fmt.frame_ms,
            },
            options=start.options,
            labels=start.labels,
            worker=worker,
        )
        return event

    def session_ended(self, reason: str, frames: int, finals: int, detail: str = "") -> dict[str, Any]:
        event = self._base(p.SESSION_ENDED, "end")
        event.update(
            reason=reason,
            frames=frames,
            audio_seconds=round(frames * self.ledger.frame_seconds, 3),
            finals=finals,
        )
        if detail:
            event["detail"] = detail
        return event

    def error(self, code: str, message: str, fatal: bool, ordinal: int) -> dict[str, Any]:
        event = self._base(p.ERROR, f"{code}/{self.epoch}.{ordinal}")
        event.update(code=code, message=message, fatal=fatal)
        return event


def _channel_of(msg: Any) -> int:
    channel = getattr(msg, "channel", None)
    return channel[0] if isinstance(channel, list) and channel else 0


def standalone_event(sid: str, kind: str, id_detail: str, **fields: Any) -> dict[str, Any]:
    """An event for a session no worker runs (rejected or dead-lettered before it started)."""
    event: dict[str, Any] = {
        "v": p.PROTOCOL_VERSION,
        "id": p.event_id(sid, kind, id_detail),
        "type": kind,
        "sid": sid,
        "ts": now_ms(),
        "epoch": 0,
    }
    event.update(fields)
    return event
