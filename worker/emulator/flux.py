"""Flux (`/v2/listen`): turn events, and the `marker` engine's deterministic turn detection.

Flux answers with `TurnInfo` messages about the speaker's current turn instead of v1's Results.
Engines produce `TurnEvent`s (pure values, rendered by `messages.FluxRenderer`); `FluxMarkerEngine`
is the marker engine of marker.py with Flux's turn rules, scripted by flags in the marker frames.

Audio is cut into 20 ms frames counted from the connection's first byte, as in marker.py. A frame
that starts with b"VQMK" is the word `f<n>` (uint32 LE `n` at offset 4, the producer's
`time.time_ns()` as uint64 LE at offset 8, 0 = absent); the byte at offset 16 carries flags:

- bit 0 (`FLAG_END_OF_TURN`): the turn ends after this word: EndOfTurn with trigger "model" at the
  end of this frame. Ignored when eot_threshold is 1.0, which turns confidence-based ends off.
- bit 1 (`FLAG_EAGER`): EagerEndOfTurn after this word, only when eager_eot_threshold is set (as on
  Deepgram, eager events are off otherwise). A word that follows before the turn ended makes
  TurnResumed first. With both bits, EagerEndOfTurn then EndOfTurn, at the same frame.

Every other frame is silence; a frame starting with b"VQBADAUD" is undecodable audio (close 1008).
`producer.audio.marker_frame(n, end_of_turn=..., eager=...)` builds these frames.

Turn rules, in whole frames so that every time is an exact multiple of 0.02 s:
- StartOfTurn at the first word of a turn (so it always carries a transcript, as Deepgram's does);
- EndOfTurn when a flagged word says so (trigger "model"), when `eot_timeout_ms` of silence
  followed the turn's last word (trigger "timeout", at the end of the frame that completes the
  timeout), or at once on ForceEndTurn (trigger "manual", at the end of the audio received so far;
  nothing when no turn is open). CloseStream does not end an open turn.
- Update every 240 ms of audio (at 0.24, 0.48, ... s of the connection), whether or not a turn is
  open and whether or not its transcript changed, as Deepgram's state-machine guide describes
  ("about every 0.25 s of audio, regardless of transcript updates, unless a state change occurred"):
  a frame that already produced another event produces no Update. Outside a turn an Update has an
  empty transcript and the index of the next turn.
- `turn_index` counts the turns of the connection from 0 and increases right after EndOfTurn.
- The audio window of every event of a turn starts where the previous turn ended (0 for the first),
  so the turns' windows tile the connection's audio; it ends at the end of the current frame.
- Words carry connection-relative start/end (the word's frame) and confidence 1.0; the transcript is
  the turn's words joined by spaces.
- end_of_turn_confidence: 0.1 outside a turn and while speaking (StartOfTurn, Update, TurnResumed); the
  eager_eot_threshold on EagerEndOfTurn (and on Updates until a word or the end follows);
  max(0.9, eot_threshold) on a "model" EndOfTurn, never below the threshold that ended the turn; on
  "timeout" and "manual" ends the value it had (the model was not sure; something else ended it).

Pure and I/O free: the server feeds bytes and renders the returned events.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Final, Protocol

from .events import FRAME_MS, BadAudio, FrameCutter, Word, frame_bytes_for
from .marker import BAD_AUDIO_MAGIC, BAD_AUDIO_REASON, MARKER_MAGIC, _t
from .options import Thresholds

FLAG_END_OF_TURN: Final = 0x01
FLAG_EAGER: Final = 0x02
FLAGS_OFFSET: Final = 16
_MARK_BODY: Final = struct.Struct("<IQ")
UPDATE_MS: Final = 240
_UPDATE_FRAMES: Final = UPDATE_MS // FRAME_MS
LOW_CONFIDENCE: Final = 0.1
MODEL_EOT_CONFIDENCE: Final = 0.9

# The values of TurnInfo's `event`.
UPDATE: Final = "Update"
START_OF_TURN: Final = "StartOfTurn"
EAGER_END_OF_TURN: Final = "EagerEndOfTurn"
TURN_RESUMED: Final = "TurnResumed"
END_OF_TURN: Final = "EndOfTurn"


@dataclass(frozen=True, slots=True)
class TurnEvent:
    """One `TurnInfo` message: the state of turn `turn_index` over [window_start, window_end)."""

    event: str
    turn_index: int
    window_start: float
    window_end: float
    words: tuple[Word, ...]
    end_of_turn_confidence: float
    trigger: str | None = None  # EndOfTurn only: "model" | "manual" | "timeout"


class FluxEngine(Protocol):
    """The interface the server drives on `/v2/listen`; one engine instance per connection."""

    blocking: bool
    lag_ns: list[int]

    def feed(self, data: bytes, now_ns: int = 0) -> list[TurnEvent]: ...

    def force_end_turn(self) -> list[TurnEvent]: ...

    def close_stream(self) -> list[TurnEvent]: ...

    def set_thresholds(self, thresholds: Thresholds) -> None: ...

    def release(self) -> None: ...


def timeout_frames(timeout_ms: int) -> int:
    return max(1, math.ceil(timeout_ms / FRAME_MS))


class FluxMarkerEngine:
    blocking = False

    def __init__(
        self,
        *,
        sample_rate: int = 16000,
        sample_width: int = 2,
        thresholds: Thresholds | None = None,
    ) -> None:
        self.frame_bytes = frame_bytes_for(sample_rate, 1, sample_width)
        if self.frame_bytes <= FLAGS_OFFSET:
            raise ValueError("sample rate too low for marker frames")
        self.set_thresholds(thresholds or Thresholds())
        self._cutter = FrameCutter(self.frame_bytes)  # a partial frame waits for its remaining bytes
        self.frames = 0  # complete frames consumed since the connection started
        self.turn_index = 0
        self._window_start = 0  # frame where the current (or next) turn's window starts
        self._open = False
        self._words: list[Word] = []  # the open turn's words
        self._eager_sent = False  # an EagerEndOfTurn went out and no word followed yet
        self._silence_run = 0  # silence frames since the open turn's last word
        self._confidence = LOW_CONFIDENCE
        self.lag_ns: list[int] = []

    def set_thresholds(self, thresholds: Thresholds) -> None:
        """Applies from the next frame on (a Configure mid-stream), e.g. a shorter timeout ends
        a turn whose silence already exceeds it at the next silent frame."""
        self.thresholds = thresholds
        self._timeout_frames = timeout_frames(thresholds.eot_timeout_ms)

    @property
    def turn_open(self) -> bool:
        return self._open

    # ------------------------------------------------------------------------------ feeding

    def feed(self, data: bytes, now_ns: int = 0) -> list[TurnEvent]:
        """Consume audio; return the events it completes. Raises BadAudio on a VQBADAUD frame."""
        data, whole = self._cutter.take(data)
        fb = self.frame_bytes
        events: list[TurnEvent] = []
        for off in range(0, whole, fb):
            index = self.frames
            self.frames = index + 1
            before = len(events)
            tagged = data.startswith(b"VQ", off)
            if tagged and data.startswith(MARKER_MAGIC, off):
                n, sent_ns = _MARK_BODY.unpack_from(data, off + 4)
                if sent_ns and now_ns:
                    self.lag_ns.append(now_ns - sent_ns)
                self._word(index, n, data[off + FLAGS_OFFSET], events)
            else:
                if tagged and data.startswith(BAD_AUDIO_MAGIC, off):
                    raise BadAudio(BAD_AUDIO_REASON)
                if self._open:
                    self._silence_run += 1
                    if self._silence_run >= self._timeout_frames:
                        events.append(self._end("timeout"))
            if len(events) == before and self.frames % _UPDATE_FRAMES == 0:
                events.append(self._info(UPDATE))
        return events

    def _word(self, index: int, n: int, flags: int, events: list[TurnEvent]) -> None:
        name = f"f{n}"
        self._words.append(Word(name, _t(index), _t(index + 1), 1.0, name))
        self._silence_run = 0
        if not self._open:
            self._open = True
            self._confidence = LOW_CONFIDENCE
            events.append(self._info(START_OF_TURN))
        elif self._eager_sent:
            # Deepgram: the transcript changed after an EagerEndOfTurn, so TurnResumed comes first.
            self._eager_sent = False
            self._confidence = LOW_CONFIDENCE
            events.append(self._info(TURN_RESUMED))
        t = self.thresholds
        if flags & FLAG_EAGER and t.eager_eot_threshold is not None:
            self._eager_sent = True
            self._confidence = t.eager_eot_threshold
            events.append(self._info(EAGER_END_OF_TURN))
        if flags & FLAG_END_OF_TURN and t.eot_threshold < 1.0:
            self._confidence = max(MODEL_EOT_CONFIDENCE, t.eot_threshold)
            events.append(self._end("model"))

    def force_end_turn(self) -> list[TurnEvent]:
        """ForceEndTurn: end the open turn at once; nothing to do when no turn is open."""
        return [self._end("manual")] if self._open else []

    def close_stream(self) -> list[TurnEvent]:
        # Everything is answered as the frames arrive, and CloseStream does not end an open turn.
        return []

    def release(self) -> None:
        self._words = []

    # ------------------------------------------------------------------------------ events

    def _info(self, event: str, trigger: str | None = None) -> TurnEvent:
        return TurnEvent(
            event=event,
            turn_index=self.turn_index,
            window_start=_t(self._window_start),
            window_end=_t(self.frames),
            words=tuple(self._words),
            end_of_turn_confidence=self._confidence,
            trigger=trigger,
        )

    def _end(self, trigger: str) -> TurnEvent:
        event = self._info(END_OF_TURN, trigger)
        self.turn_index += 1
        self._window_start = self.frames
        self._open = False
        self._words = []
        self._eager_sent = False
        self._silence_run = 0
        self._confidence = LOW_CONFIDENCE
        return event
