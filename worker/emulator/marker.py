"""The `marker` engine: deterministic "recognition" that reveals exactly which frames arrived.

Audio is cut into consecutive 20 ms frames counted from the connection's first byte (a partial
frame waits for the rest of its bytes in the next message). A frame that starts with b"VQMK" and a
little-endian uint32 `n` is heard as the word `f<n>` at that frame's position on the connection;
every other frame is silence. The marker is read from the bytes as they are on the wire, whatever
the encoding: a μ-law/A-law frame (160 bytes at 8 kHz) carries it in its encoded payload, a linear16
frame in its first samples. With `multichannel=true` each channel is its own marker stream
(`channels.ChannelSplitter` de-interleaves the samples and runs one engine per channel), so a
2-channel frame carries one marker per channel, interleaved sample by sample
(`producer.audio.format_marker_frame` builds such frames); without multichannel the interleaved
frame is read as one. Bytes 8..16 of a marker frame may carry the producer's
`time.time_ns()` (0 = absent), from which the arrival lag is measured. A frame starting with
b"VQBADAUD" is undecodable audio. The layout matches `producer.audio.marker_frame`; its flags byte
(offset 16) only means something to Flux's engine (flux.py) and is ignored here.

Timing rules, all in whole frames so that start/duration are exact multiples of 0.02 s:
- a final every `final_every` seconds of audio, on Finalize (`from_finalize`) and on CloseStream;
  each final covers exactly the audio since the previous final;
- with interim results, an interim every 0.1 s of audio that carries the words since the last
  final, sent only when a new word arrived since the previous interim (silence makes no interims);
- `speech_final` when a final contains words and its last frame is silence, or when endpointing
  (only if the client set `endpointing=<ms>`) cuts a final after that much silence after a word;
- `SpeechStarted` (vad_events) at a word frame that follows silence or the start of the stream;
- `UtteranceEnd` once `utterance_end_ms` of silence followed a word.

Pure and I/O free: the server feeds bytes and renders the returned events.
"""

from __future__ import annotations

import math
import struct
from typing import Final

from .events import (
    FRAME_MS,
    BadAudio,
    Event,
    FrameCutter,
    SpeechStarted,
    Transcript,
    UtteranceEnd,
    Word,
    frame_bytes_for,
)

MARKER_MAGIC: Final = b"VQMK"
BAD_AUDIO_MAGIC: Final = b"VQBADAUD"
# n (uint32) and sent_ns (uint64) follow the magic; unpack_from avoids slicing a copy.
_MARK_BODY: Final = struct.Struct("<IQ")
_INTERIM_FRAMES: Final = 100 // FRAME_MS
BAD_AUDIO_REASON: Final = "DATA-0000: could not process audio: the payload cannot be decoded as audio"


def _t(frame_index: int) -> float:
    # An exact integer divided once is the double nearest the decimal value (0.06, not
    # 0.060000000000000005): the same float a client parses from "0.06", with no rounding needed.
    return frame_index * FRAME_MS / 1000


class MarkerEngine:
    blocking = False

    def __init__(
        self,
        *,
        sample_rate: int = 16000,
        channels: int = 1,
        sample_width: int = 2,
        interim_results: bool = False,
        vad_events: bool = False,
        utterance_end_ms: int | None = None,
        endpointing_ms: int | None = None,
        final_every: float = 0.5,
    ) -> None:
        self.frame_bytes = frame_bytes_for(sample_rate, channels, sample_width)
        if self.frame_bytes < 16:
            raise ValueError("sample rate too low for marker frames")
        self._bytes_per_second = sample_rate * channels * sample_width
        self._final_frames = max(1, round(final_every * 1000 / FRAME_MS))
        self._interim = interim_results
        self._vad = vad_events
        self._ue_frames = math.ceil(utterance_end_ms / FRAME_MS) if utterance_end_ms else 0
        self._ep_frames = max(1, math.ceil(endpointing_ms / FRAME_MS)) if endpointing_ms else 0
        self._cutter = FrameCutter(self.frame_bytes)  # a partial frame waits for its remaining bytes
        self.frames = 0  # complete frames consumed since the connection started
        self._seg_start = 0  # first frame not yet covered by a final
        self._words: list[tuple[int, int]] = []  # (frame index, n) of the words since the last final
        self._interim_sent_words = 0  # len(self._words) when the last interim went out
        self._in_speech = False  # whether the previous frame was a word
        self._silence_run = 0  # silence frames since the last word
        self._ue_armed = False  # a word was heard and its UtteranceEnd is still due
        self._last_word = 0  # frame index of the last word
        self.lag_ns: list[int] = []

    # ------------------------------------------------------------------------------ feeding

    def feed(self, data: bytes, now_ns: int = 0) -> list[Event]:
        """Consume audio; return the events it completes. Raises BadAudio on a VQBADAUD frame."""
        data, whole = self._cutter.take(data)
        fb = self.frame_bytes
        events: list[Event] = []
        for off in range(0, whole, fb):
            index = self.frames
            self.frames = index + 1
            # One startswith() rejects ordinary audio; no slice is copied per frame.
            tagged = data.startswith(b"VQ", off)
            if tagged and data.startswith(MARKER_MAGIC, off):
                n, sent_ns = _MARK_BODY.unpack_from(data, off + 4)
                if sent_ns and now_ns:
                    self.lag_ns.append(now_ns - sent_ns)
                if not self._in_speech:
                    self._in_speech = True
                    if self._vad:
                        events.append(SpeechStarted(_t(index)))
                # (frame, n) now, Word objects only when a result is rendered: most frames are
                # words in a marker stream, and this loop is the emulator's hot path.
                self._words.append((index, n))
                self._silence_run = 0
                self._ue_armed = True
                self._last_word = index
            else:
                if tagged and data.startswith(BAD_AUDIO_MAGIC, off):
                    raise BadAudio(BAD_AUDIO_REASON)
                self._in_speech = False
                self._silence_run += 1
                if self._ep_frames and self._words and self._silence_run == self._ep_frames:
                    events.append(self._final(speech_final=True))
                    continue
            covered = self.frames - self._seg_start
            if covered >= self._final_frames:
                events.append(self._final())
            elif (
                self._interim
                and covered % _INTERIM_FRAMES == 0
                and len(self._words) != self._interim_sent_words
            ):
                events.append(self._interim_result())
            if self._ue_armed and self._ue_frames and self._silence_run >= self._ue_frames:
                self._ue_armed = False
                events.append(UtteranceEnd(_t(self._last_word + 1)))
        return events

    def finalize(self) -> list[Event]:
        """Finalize: always answer, even with nothing buffered, so a client can wait for the flush."""
        return [self._final(from_finalize=True)]

    def close_stream(self) -> list[Event]:
        return [self._final()] if self.frames > self._seg_start else []

    def audio_seconds(self) -> float:
        return round((self.frames * self.frame_bytes + len(self._cutter.rest)) / self._bytes_per_second, 6)

    def release(self) -> None:
        self._words = []

    # ------------------------------------------------------------------------------ results

    def _materialize(self) -> tuple[Word, ...]:
        out = []
        for i, n in self._words:
            name = f"f{n}"
            out.append(Word(name, i * FRAME_MS / 1000, (i + 1) * FRAME_MS / 1000, 1.0, name))
        return tuple(out)

    def _final(self, *, speech_final: bool | None = None, from_finalize: bool = False) -> Transcript:
        words = self._materialize()
        if speech_final is None:
            # The final ends in silence after speech: the speaker paused, as Deepgram would judge.
            speech_final = bool(words) and not self._in_speech
        start = _t(self._seg_start)
        result = Transcript(
            start=start,
            duration=round(_t(self.frames) - start, 6),
            is_final=True,
            speech_final=speech_final,
            words=words,
            from_finalize=from_finalize,
        )
        self._seg_start = self.frames
        self._words = []
        self._interim_sent_words = 0
        return result

    def _interim_result(self) -> Transcript:
        self._interim_sent_words = len(self._words)
        start = _t(self._seg_start)
        return Transcript(
            start=start,
            duration=round(_t(self.frames) - start, 6),
            is_final=False,
            speech_final=False,
            words=self._materialize(),
        )
