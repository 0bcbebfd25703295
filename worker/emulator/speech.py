"""The `speech` engine: honest offline recognition with pocketsphinx 5 and its bundled English model.

Audio goes through pocketsphinx's `Endpointer` (voice activity detection in 30 ms frames), and the
speech regions it finds through a `Decoder`. A region is one utterance:
- its start is `SpeechStarted` (vad_events);
- while it lasts, partial hypotheses become interim results every 0.1 s of audio (interim_results);
- its end (the endpointer heard enough silence), Finalize, CloseStream, or `MAX_UTTERANCE_S` of
  continuous speech make a final with word timings (`speech_final` true at a natural end), decoded
  again over the whole utterance for a better result than the live partials;
- it never lets `ANSWER_EVERY_S` of audio go by without a message: with interim results a partial
  goes out even if its text did not change, without them the utterance is cut with a final
  (`speech_final` false), as Deepgram finalizes continuous speech every few seconds. A client that
  takes a long silence from a server it keeps sending audio to as a dead connection (the worker's
  stall watchdog, `VOXQUEUE_STALL_SECONDS`, 10 s by default) must never see one for a long
  utterance;
- `UtteranceEnd` follows once `utterance_end_ms` of silence came after the last word.
While nothing is said, an empty final covers the silence every `final_every` seconds, as Deepgram
keeps answering during silence, so a client can acknowledge silent audio too.

Accuracy is that of a small 2016-era model: plausible words, not Deepgram quality. Input is
linear16 at 8, 16, 24, 32, 44.1 or 48 kHz, or μ-law/A-law at 8 kHz (decoded by `g711`), any channel
count, converted to 16 kHz mono here (integer ratios by averaging, 24 and 44.1 kHz by linear
interpolation); other rates are refused as undecodable. pocketsphinx is optional
(`pip install 'voxqueue[speech]'`): `speech_available()` says whether this engine can run.
Decoding is CPU work: the server calls `feed` in a thread.

On `/v2/listen` (Flux), `FluxSpeechEngine` makes turns of the same recognition: a turn starts at
the first words heard (StartOfTurn) and ends where the endpointer ends the utterance (EndOfTurn,
trigger "model"), or on ForceEndTurn ("manual"). Updates follow every 240 ms of audio, as in
flux.py. It has no confidence model, so no EagerEndOfTurn/TurnResumed, and `eot_timeout_ms` never
applies: the endpointer ends every utterance after well under a second of silence (the minimum
timeout is 500 ms, and its window here is 0.3 s).
"""

from __future__ import annotations

import sys
import threading
from array import array
from typing import Any, Final

from . import g711
from .events import BadAudio, Event, FrameCutter, SpeechStarted, Transcript, UtteranceEnd, Word, seconds
from .flux import (
    END_OF_TURN,
    LOW_CONFIDENCE,
    MODEL_EOT_CONFIDENCE,
    START_OF_TURN,
    UPDATE,
    UPDATE_MS,
    TurnEvent,
)
from .options import Thresholds

try:  # optional dependency
    from pocketsphinx import Decoder, Endpointer
except ImportError:  # pragma: no cover - depends on the environment
    Decoder = Endpointer = None

RATE: Final = 16000
SUPPORTED_RATES: Final = (8000, 16000, 24000, 32000, 44100, 48000)
MAX_UTTERANCE_S: Final = 10.0
# Most audio, in seconds, that may go by in speech without any message (see the module docstring).
# The worst gap a client sees is this plus the endpointer's window (<= 2 s) before speech is
# recognised as such: 6.5 s at most, well inside the worker's 10 s stall watchdog even at 1x.
ANSWER_EVERY_S: Final = 4.5
INTERIM_EVERY_S: Final = 0.1
# Plain forward search, no second pass: on short utterances the extra passes made results worse.
_DECODER_CONFIG: Final = {"samprate": RATE, "loglevel": "FATAL", "fwdflat": False, "bestpath": False}

_pool: list[Any] = []
_pool_lock = threading.Lock()


def speech_available() -> bool:
    """Whether the `speech` engine can run (pocketsphinx is installed)."""
    return Decoder is not None


_initial_cmn: str | None = None


def _take_decoder() -> Any:
    # Loading the acoustic model takes ~0.25 s; decoders are reused across connections. Its live
    # cepstral mean normalisation adapts to the audio it heard, so a reused decoder gets the
    # initial one back: a connection's transcript must not depend on which connections came before.
    global _initial_cmn
    with _pool_lock:
        decoder = _pool.pop() if _pool else None
    if decoder is None:
        decoder = Decoder(**_DECODER_CONFIG)
        if _initial_cmn is None:
            _initial_cmn = decoder.get_cmn(False)
    elif _initial_cmn is not None:
        decoder.set_cmn(_initial_cmn)
    return decoder


def _give_back(decoder: Any) -> None:
    with _pool_lock:
        if len(_pool) < 64:
            _pool.append(decoder)


class _ToMono16k:
    """linear16 at an integer ratio of 16 kHz, any channel count -> 16 kHz mono.

    Averaging neighbours is a crude low-pass, enough for a recogniser that looks at 8 kHz of band.
    """

    def __init__(self, sample_rate: int, channels: int, encoding: str = "linear16") -> None:
        if sample_rate not in SUPPORTED_RATES:
            raise BadAudio(
                f"DATA-0000: could not process audio: the speech engine takes {SUPPORTED_RATES} Hz,"
                f" not {sample_rate}"
            )
        self._g711 = encoding if encoding in ("mulaw", "alaw") else ""
        self.passthrough = sample_rate == RATE and channels == 1 and not self._g711
        self._channels = channels
        # Integer ratios (8, 32, 48 kHz) average or interpolate exactly; 24 and 44.1 kHz are first
        # brought to mono at their own rate, then resampled by linear interpolation (`_step`).
        integer = sample_rate % RATE == 0 or RATE % sample_rate == 0
        self._step = 0.0 if integer else sample_rate / RATE
        self._pos = 0.0  # fractional input position of the next output sample (non-integer ratios)
        self._down = max(1, sample_rate // RATE) if integer else 1
        self._up = RATE // sample_rate if integer and sample_rate < RATE else 1
        self._block = 2 * channels * self._down
        self._cutter = FrameCutter(self._block)  # a partial sample block waits for the rest
        self._last = 0  # previous output sample, for interpolation when upsampling

    def convert(self, data: bytes) -> bytes:
        if self._g711:
            data = g711.decode(self._g711, data)
        if self.passthrough:
            return data
        data, whole = self._cutter.take(data)
        samples = array("h", data[:whole])
        if sys.byteorder == "big":
            samples.byteswap()
        group = self._channels * self._down
        mono = [sum(samples[i : i + group]) // group for i in range(0, len(samples), group)]
        if self._up > 1:
            out: list[int] = []
            prev = self._last
            for s in mono:
                out.extend((prev + (s - prev) * k // self._up) for k in range(1, self._up + 1))
                prev = s
            self._last = prev
            mono = out
        if self._step:
            mono = self._resample(mono)
        result = array("h", mono)
        if sys.byteorder == "big":
            result.byteswap()
        return result.tobytes()

    def _resample(self, mono: list[int]) -> list[int]:
        """Linear interpolation at a fractional ratio, continuing across calls: `_last` is the
        sample before `mono[0]` (index -1), `_pos` the next output position from there."""
        src = [self._last, *mono]
        out: list[int] = []
        pos, step = self._pos, self._step
        limit = len(src) - 1
        while pos < limit:
            i = int(pos)
            frac = pos - i
            out.append(int(src[i] + (src[i + 1] - src[i]) * frac))
            pos += step
        self._pos = pos - len(mono)
        self._last = src[-1]
        return out


class SpeechEngine:
    blocking = True

    def __init__(
        self,
        *,
        sample_rate: int = RATE,
        channels: int = 1,
        interim_results: bool = False,
        vad_events: bool = False,
        utterance_end_ms: int | None = None,
        endpointing_ms: int | None = None,
        final_every: float = 0.5,
        punctuate: bool = False,
        encoding: str = "linear16",
    ) -> None:
        if not speech_available():
            raise RuntimeError("the speech engine needs pocketsphinx: pip install 'voxqueue[speech]'")
        self._bad_format: BadAudio | None = None
        try:
            self._conv: _ToMono16k | None = _ToMono16k(sample_rate, channels, encoding)
        except BadAudio as exc:
            self._conv, self._bad_format = None, exc  # refused at the first audio, like Deepgram
        self._bytes_per_second = sample_rate * channels * (1 if encoding in ("mulaw", "alaw") else 2)
        self._interim = interim_results
        self._vad = vad_events
        self._ue_s = utterance_end_ms / 1000 if utterance_end_ms else 0.0
        # Endpointing asks for a pause length; the VAD decides over a window of at least 0.3 s.
        self._window = min(2.0, max(0.3, (endpointing_ms or 0) / 1000))
        self._final_every = final_every
        self._punctuate = punctuate
        self._lock = threading.Lock()
        self._decoder = _take_decoder()
        self._new_endpointer(0)
        self._buf = bytearray()
        self._received = 0  # bytes received, in the client's format
        self._in_utt = False
        self._utt_start = 0  # sample (16 kHz, absolute) of the decoder's frame 0
        self._utt_fed = 0  # samples given to the decoder in this utterance
        self._utt_audio = bytearray()  # those samples, for the final's second decoding
        self._seg_start = 0  # sample where the audio not yet covered by a final begins
        self._last_interim = 0
        self._last_interim_text = ""
        self._ue_due: float | None = None  # end of the last word whose UtteranceEnd is pending
        self._last_answer = 0  # self._pos when the last message went out
        self.lag_ns: list[int] = []

    def _new_endpointer(self, offset: int) -> None:
        self._ep = Endpointer(window=self._window, ratio=0.9, sample_rate=RATE)
        self._ep_offset = offset  # absolute sample where this endpointer's stream began
        self._ep_samples = 0  # samples this endpointer has consumed
        self._ep_frame = self._ep.frame_bytes

    @property
    def _pos(self) -> int:
        return self._ep_offset + self._ep_samples

    # ------------------------------------------------------------------------------ feeding

    def feed(self, data: bytes, now_ns: int = 0) -> list[Event]:
        # The lock keeps release() from handing the decoder to another connection while a feed
        # that the server stopped waiting for (cancelled on shutdown) still runs in its thread.
        with self._lock:
            return self._feed(data)

    def _feed(self, data: bytes) -> list[Event]:
        if self._conv is None:
            raise self._bad_format or BadAudio("DATA-0000: could not process audio")
        self._received += len(data)
        self._buf += self._conv.convert(data)
        events: list[Event] = []
        fb = self._ep_frame
        while len(self._buf) >= fb:
            frame = bytes(self._buf[:fb])
            del self._buf[:fb]
            before = len(events)
            self._step(frame, events)
            if len(events) > before:
                self._last_answer = self._pos
        return events

    def _step(self, frame: bytes, events: list[Event]) -> None:
        was_speech = self._ep.in_speech
        speech = self._ep.process(frame)
        self._ep_samples += len(frame) // 2
        if speech is not None:
            if not was_speech or not self._in_utt:
                self._start_utt(self._ep_offset + round(self._ep.speech_start * RATE))
                if self._vad:
                    events.append(SpeechStarted(seconds(self._utt_start / RATE)))
            self._decoder.process_raw(speech)
            self._utt_audio += speech
            self._utt_fed += len(speech) // 2
            overdue = self._pos - self._last_answer >= ANSWER_EVERY_S * RATE
            if not self._ep.in_speech:
                events.extend(self._end_utt(speech_final=True))
            elif self._utt_fed >= MAX_UTTERANCE_S * RATE or (overdue and not self._interim):
                events.extend(self._end_utt(speech_final=False))
            elif self._interim and (overdue or self._pos - self._last_interim >= INTERIM_EVERY_S * RATE):
                self._last_interim = self._pos
                partial = self._transcript(is_final=False, speech_final=False)
                text = " ".join(w.word for w in partial.words)
                if overdue or (text and text != self._last_interim_text):
                    self._last_interim_text = text
                    events.append(partial)
            return
        if self._in_utt:
            return  # the endpointer is still holding back the start of the region
        pos = self._pos
        # Only audio older than the VAD window is surely silence: speech may start inside the window.
        settled = pos - round(self._window * RATE)
        if settled - self._seg_start >= self._final_every * RATE:
            events.append(self._cover(settled))
        if self._ue_due is not None and pos / RATE - self._ue_due >= self._ue_s:
            events.append(UtteranceEnd(seconds(self._ue_due)))
            self._ue_due = None

    def _start_utt(self, start_sample: int) -> None:
        self._decoder.start_utt()
        self._in_utt = True
        self._utt_start = start_sample
        self._utt_fed = 0
        self._utt_audio = bytearray()
        self._last_interim_text = ""

    def _end_utt(self, *, speech_final: bool, from_finalize: bool = False) -> list[Event]:
        self._decoder.end_utt()
        if self._utt_audio:
            # Decode the whole utterance again with its own cepstral mean (full_utt): the live mean
            # starts cold and garbles the first seconds; partials stay live, the final gets better.
            self._decoder.start_utt()
            self._decoder.process_raw(bytes(self._utt_audio), full_utt=True)
            self._decoder.end_utt()
        self._in_utt = False
        # A natural end covers all audio heard so far; a cut inside speech covers only the audio the
        # decoder has seen, so that the next final's words never start before that final does.
        end = self._pos if speech_final else self._utt_start + self._utt_fed
        result = self._transcript(
            is_final=True, speech_final=speech_final, from_finalize=from_finalize, end=end
        )
        self._seg_start = end
        if result.words and self._ue_s:
            self._ue_due = result.words[-1].end
        if not speech_final and self._ep.in_speech:
            # Cut inside continuing speech: go on decoding right where the last utterance stopped.
            self._start_utt(self._utt_start + self._utt_fed)
        return [result]

    # ------------------------------------------------------------------------------ flushing

    def _flush(self, *, from_finalize: bool) -> list[Event]:
        """Decode what the endpointer still holds, then close the utterance."""
        if self._in_utt:
            tail = bytes(self._buf[: self._ep_frame])
            # pocketsphinx's end_stream raises IndexError on an empty frame, which is what is left
            # whenever the stream ended on an endpointer frame boundary (30 ms: every third 20 ms
            # frame). Give it one silent sample instead and take that sample back off its answer.
            rest = self._ep.end_stream(tail or bytes(2))
            if rest and not tail:
                rest = rest[:-2]
            if rest:
                self._decoder.process_raw(rest)
                self._utt_audio += rest
                self._utt_fed += len(rest) // 2
            self._ep_samples += len(self._buf) // 2
            self._buf.clear()
            result = self._end_utt(speech_final=True, from_finalize=from_finalize)
            self._new_endpointer(self._pos)
            return result
        return [self._cover(self._pos, from_finalize=from_finalize)]

    def finalize(self) -> list[Event]:
        with self._lock:
            return self._flush(from_finalize=True)

    def close_stream(self) -> list[Event]:
        with self._lock:
            if not self._in_utt and self._pos <= self._seg_start:
                return []
            return self._flush(from_finalize=False)

    def audio_seconds(self) -> float:
        return round(self._received / self._bytes_per_second, 6)

    def release(self) -> None:
        with self._lock:
            if self._decoder is not None:
                if self._in_utt:
                    self._decoder.end_utt()
                    self._in_utt = False
                _give_back(self._decoder)
                self._decoder = None

    # ------------------------------------------------------------------------------ results

    def _cover(self, end: int, *, from_finalize: bool = False) -> Transcript:
        """An empty final over the silence from the previous final up to sample `end`."""
        start = self._seg_start
        self._seg_start = end
        return Transcript(
            start=seconds(start / RATE),
            duration=seconds((end - start) / RATE),
            is_final=True,
            speech_final=False,
            words=(),
            from_finalize=from_finalize,
        )

    def _transcript(
        self, *, is_final: bool, speech_final: bool, from_finalize: bool = False, end: int | None = None
    ) -> Transcript:
        base = self._utt_start / RATE
        words: list[Word] = []
        for seg in self._decoder.seg() or ():  # None before the first hypothesis
            name: str = seg.word
            if name.startswith(("<", "[", "+")):
                continue  # <s>, </s>, <sil> and noise fillers are not words
            name = name.split("(", 1)[0]  # "to(3)" is the third pronunciation of "to"
            confidence = round(min(1.0, max(0.0, float(seg.prob))), 4)
            words.append(
                Word(
                    name,
                    seconds(base + seg.start_frame / 100),
                    seconds(base + (seg.end_frame + 1) / 100),
                    confidence,
                    name,
                )
            )
        text = None
        if self._punctuate and words:
            first, last = words[0], words[-1]
            words[0] = Word(first.word, first.start, first.end, first.confidence, first.word.capitalize())
            if is_final and speech_final:
                last = words[-1]
                words[-1] = Word(last.word, last.start, last.end, last.confidence, last.punctuated_word + ".")
            text = " ".join(w.punctuated_word for w in words)
        start = self._seg_start
        end = self._pos if end is None else end
        return Transcript(
            start=seconds(start / RATE),
            duration=seconds((end - start) / RATE),
            is_final=is_final,
            speech_final=speech_final,
            words=tuple(words),
            from_finalize=from_finalize,
            text=text,
        )


class FluxSpeechEngine:
    """Flux turns over `SpeechEngine`: one turn per utterance of its endpointer."""

    blocking = True

    def __init__(
        self,
        *,
        sample_rate: int = RATE,
        encoding: str = "linear16",
        thresholds: Thresholds | None = None,
        final_every: float = 0.5,
    ) -> None:
        # Interim results give the live hypothesis that opens a turn early (barge-in); finals end it.
        self._v1 = SpeechEngine(
            sample_rate=sample_rate, encoding=encoding, interim_results=True, final_every=final_every
        )
        self.thresholds = thresholds or Thresholds()
        width = 1 if encoding in ("mulaw", "alaw") else 2
        self._bytes_per_second = sample_rate * width
        self._received = 0
        self._update_slot = 0  # 240 ms slots of audio whose Update is done
        self.turn_index = 0
        self._window_start = 0.0
        self._open = False
        self._turn_words: list[Word] = []  # words of the open turn's finals so far
        self._partial: tuple[Word, ...] = ()  # the latest live hypothesis after them
        self.lag_ns: list[int] = []

    def set_thresholds(self, thresholds: Thresholds) -> None:
        self.thresholds = thresholds  # kept for the end-of-turn confidence; see the module docstring

    def _position(self) -> float:
        return seconds(self._received / self._bytes_per_second)

    def feed(self, data: bytes, now_ns: int = 0) -> list[TurnEvent]:
        heard = self._v1.feed(data)
        self._received += len(data)
        out = self._turns(heard, manual=False)
        slot = self._received * 1000 // (self._bytes_per_second * UPDATE_MS)
        if slot > self._update_slot:
            self._update_slot = slot
            if not out:  # as in flux.py: no Update next to another event
                out.append(self._info(UPDATE, seconds(slot * UPDATE_MS / 1000)))
        return out

    def force_end_turn(self) -> list[TurnEvent]:
        # Finalize makes the recogniser decode what its endpointer still holds: words said just
        # before the ForceEndTurn belong to the turn it ends.
        return self._turns(self._v1.finalize(), manual=True)

    def close_stream(self) -> list[TurnEvent]:
        return []  # CloseStream does not end an open turn; everything else was answered in feed

    def release(self) -> None:
        self._v1.release()

    def _turns(self, heard: list[Event], *, manual: bool) -> list[TurnEvent]:
        out: list[TurnEvent] = []
        for e in heard:
            if not isinstance(e, Transcript):
                continue
            end = seconds(e.start + e.duration)
            if e.is_final:
                self._turn_words.extend(e.words)
                self._partial = ()
            elif e.words:
                self._partial = e.words
            if e.words and not self._open:
                self._open = True
                out.append(self._info(START_OF_TURN, end))
            if e.is_final and e.speech_final and self._open and not manual:
                out.append(self._end("model", end))
        if manual and self._open:
            out.append(self._end("manual", self._position()))
        return out

    def _info(self, event: str, end: float) -> TurnEvent:
        return TurnEvent(
            event=event,
            turn_index=self.turn_index,
            window_start=self._window_start,
            window_end=max(end, self._window_start),
            words=(*self._turn_words, *self._partial),
            end_of_turn_confidence=LOW_CONFIDENCE,
        )

    def _end(self, trigger: str, end: float) -> TurnEvent:
        confidence = (
            max(MODEL_EOT_CONFIDENCE, self.thresholds.eot_threshold) if trigger == "model" else LOW_CONFIDENCE
        )
        event = TurnEvent(
            event=END_OF_TURN,
            turn_index=self.turn_index,
            window_start=self._window_start,
            window_end=max(end, self._window_start),
            words=tuple(self._turn_words),
            end_of_turn_confidence=confidence,
            trigger=trigger,
        )
        self.turn_index += 1
        self._window_start = event.window_end
        self._open = False
        self._turn_words = []
        self._partial = ()
        return event
