"""Frame bookkeeping of one session: which frames were sent, which a final covers, what time it is.

Pure logic, no I/O. The rules it encodes are delivery guarantees (docs/architecture.md):

* Frames go to Deepgram in seq order, each at least once; a seq already sent on this connection is
  a duplicate (a producer retry, or the same entry read twice) and is not sent again.
* "Acked" means committed: the session's state records the last frame a final covered and its
  audio entry id. The audio stream is never consumed destructively, so a new connection or a new
  owner re-reads it from there.
* A frame is committed (acked) only when a final result covers it; after a reconnect or takeover
  sending restarts at the first uncommitted frame (`rewind`).
* Deepgram's clock restarts at 0 on every connection; session time = connection time + the time of
  the first frame sent on that connection (`seq × frame duration`).
* Two channels (`multichannel`): Deepgram finalizes each channel on its own. Each channel has its
  own committed mark (the last frame a final of that channel covered); a frame is committed for
  the session only when every channel has a final covering it, so the session's commit point is
  the minimum of the marks, and a new connection replays from there. A channel that was ahead then
  hears frames it already published again: `coverage` starts its next final after its own mark, so
  nothing is published twice.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import Enum


def stream_id_key(entry_id: bytes) -> tuple[int, int]:
    """Stream ids compare as (milliseconds, sequence) numbers, not as strings."""
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq or 0)


class Admission(Enum):
    SEND = "send"  # the next frame: send it
    DUPLICATE = "duplicate"  # already sent (or committed): skip it
    GAP = "gap"  # frames are missing before it: fill them, then send it


@dataclass(frozen=True, slots=True)
class Commit:
    """Frames a final covers, [seq_from, seq_to], and the audio entry id of the last frame of the
    new commit point, from which a new connection or a new owner re-reads the stream.

    With one channel the commit point becomes seq_to. With several, the final is `channel`'s and
    the session's commit point becomes `session_seq` (the minimum of every channel's mark after it;
    it may not move at all), `last_entry_id` being the id of the last entry up to `session_seq`."""

    seq_from: int
    seq_to: int
    last_entry_id: bytes | None
    channel: int = 0
    session_seq: int | None = None  # None: one channel, the session's point is seq_to

    @property
    def session_point(self) -> int:
        return self.seq_to if self.session_seq is None else self.session_seq


@dataclass(slots=True)
class FrameLedger:
    frame_seconds: float = 0.02
    committed_seq: int = -1
    committed_id: bytes = b"0-0"
    next_seq: int = 0
    # The last frame really written to the connection (the runner reports each Send it performed):
    # a final can only cover frames Deepgram got, however long the server says it is. Frames
    # queued behind a pacing delay are not covered; a drop then replays them.
    written_seq: int = -1
    connection_base_seq: int = 0
    # (seq, entry id or None for silence we filled in) of frames sent but not yet covered by a final.
    unacked: deque[tuple[int, bytes | None]] = field(default_factory=deque)
    # Per channel (multichannel only): the last frame a final of that channel covered. The session's
    # commit point (`committed_seq`) is their minimum. Empty for one channel.
    marks: list[int] = field(default_factory=list)

    @classmethod
    def resume(
        cls,
        committed_seq: int,
        committed_id: bytes,
        frame_seconds: float = 0.02,
        channels: int = 1,
        marks: list[int] | None = None,
    ) -> FrameLedger:
        ledger = cls(frame_seconds=frame_seconds, committed_seq=committed_seq, committed_id=committed_id)
        if channels > 1:
            ledger.adopt_marks(committed_seq, marks or [], channels)
        ledger.rewind()
        return ledger

    @property
    def channels(self) -> int:
        return max(1, len(self.marks))

    def adopt_marks(self, committed_seq: int, marks: list[int], channels: int) -> None:
        """Each channel's mark as Redis has it; a channel with none (never finalized, or a state
        written before per-channel marks) is at the session's commit point, and no mark is ever
        below it (FINISH and a lost write can only leave the session point higher)."""
        known = list(marks) + [committed_seq] * (channels - len(marks))
        self.marks = [max(committed_seq, m) for m in known[:channels]]

    def channel_mark(self, channel: int) -> int:
        return self.marks[channel] if self.marks else self.committed_seq

    # -------------------------------------------------------------------------------- sending

    def admit(self, seq: int) -> tuple[Admission, int]:
        """Classify an incoming frame. For GAP, the int is how many frames are missing before it."""
        if seq < self.next_seq:
            return Admission.DUPLICATE, 0
        if seq > self.next_seq:
            return Admission.GAP, seq - self.next_seq
        return Admission.SEND, 0

    def record_sent(self, seq: int, entry_id: bytes | None) -> None:
        if seq != self.next_seq:
            raise ValueError(f"frame {seq} sent out of order (expected {self.next_seq})")
        self.unacked.append((seq, entry_id))
        self.next_seq = seq + 1

    def mark_written(self, seq: int) -> None:
        """Frames up to `seq` are on the wire."""
        self.written_seq = max(self.written_seq, min(seq, self.next_seq - 1))

    def rewind(self) -> None:
        """Start over from the first uncommitted frame (new connection, or a new owner)."""
        self.next_seq = self.committed_seq + 1
        self.written_seq = self.committed_seq
        self.unacked.clear()
        self.connection_base_seq = self.next_seq

    @property
    def pending_frames(self) -> int:
        return len(self.unacked)

    # -------------------------------------------------------------------------------- finals

    def coverage(self, start: float, duration: float) -> Commit | None:
        """Frames covered by a final that ends at `start + duration` on the current connection.

        Returns None when it covers nothing that is not already committed (an empty or repeated
        final). Only frames actually sent can be covered, whatever the server claims.
        """
        return self.channel_coverage(0, start, duration)

    def channel_coverage(self, channel: int, start: float, duration: float) -> Commit | None:
        """`coverage` of a final of one channel: it starts after that channel's own mark."""
        frames_covered = round((start + duration) / self.frame_seconds)
        last = min(self.connection_base_seq + frames_covered - 1, self.written_seq)
        if not self.marks:
            if last <= self.committed_seq:
                return None
            return Commit(self.committed_seq + 1, last, self._last_id(last))
        if not 0 <= channel < len(self.marks):
            return None  # a channel the session does not have: nothing of ours
        mark = self.marks[channel]
        if last <= mark:
            return None
        session = min(last if c == channel else m for c, m in enumerate(self.marks))
        last_id = self._last_id(session) if session > self.committed_seq else None
        return Commit(mark + 1, last, last_id, channel, session)

    def _last_id(self, upto: int) -> bytes | None:
        last_id: bytes | None = None
        for seq, entry_id in self.unacked:
            if seq > upto:
                break
            if entry_id is not None:
                last_id = entry_id
        return last_id

    def apply(self, commit: Commit) -> None:
        """The commit is durable in Redis: forget the covered frames."""
        if self.marks and 0 <= commit.channel < len(self.marks):
            self.marks[commit.channel] = max(self.marks[commit.channel], commit.seq_to)
        point = commit.session_point
        while self.unacked and self.unacked[0][0] <= point:
            self.unacked.popleft()
        self.committed_seq = max(self.committed_seq, point)
        last = commit.last_entry_id
        if last is not None and stream_id_key(last) > stream_id_key(self.committed_id):
            self.committed_id = last

    # -------------------------------------------------------------------------------- time

    @property
    def connection_offset(self) -> float:
        return round(self.connection_base_seq * self.frame_seconds, 6)

    def session_time(self, connection_time: float) -> float:
        return round(self.connection_base_seq * self.frame_seconds + connection_time, 6)

    def seq_at(self, connection_time: float) -> int:
        """The seq of the frame playing at a connection-relative time."""
        return self.connection_base_seq + int(connection_time / self.frame_seconds + 1e-9)
