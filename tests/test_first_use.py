"""First use, as a new user meets it: the speech emulator on real speech, the CLI's and the
library's waits when no worker claims a session, and the CLI's input checks.

Speech comes from the bundled sample (worker/assets/sample.wav), so no test needs espeak-ng.
"""

from __future__ import annotations

import itertools
import wave
from pathlib import Path

import pytest
from deepgram.listen.v1.types import ListenV1Metadata, ListenV1Results

from tests.test_emulator import listen, read_all
from worker.config import Settings
from worker.emulator import EmulatorServer, speech_available
from worker.emulator.events import Transcript
from worker.emulator.speech import ANSWER_EVERY_S, SpeechEngine

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "worker" / "assets" / "sample.wav"
FRAME = 640  # 20 ms at 16 kHz mono 16-bit

needs_speech = pytest.mark.skipif(not speech_available(), reason="pocketsphinx is not installed")


def sample_pcm() -> bytes:
    with wave.open(str(SAMPLE)) as w:
        return w.readframes(w.getnframes())


# --------------------------------------------------------------------- speech engine


@needs_speech
@pytest.mark.parametrize("frames", [75, 76, 77])  # 1.5 s: mid-speech; 75 frames = 50 endpointer frames
async def test_speech_session_ending_mid_speech_ends_cleanly(frames: int) -> None:
    """A stream that stops inside speech on a 30 ms boundary (a frame count that is a multiple of
    3) used to make pocketsphinx's end_stream(b"") raise IndexError: the connection died with 1011
    and the worker retried for a minute and a half. Now it closes with a final and Metadata."""
    pcm = sample_pcm()[: frames * FRAME]
    async with EmulatorServer(engine="speech", port=0) as emu, listen(emu) as conn:
        for i in range(0, len(pcm), FRAME):
            await conn.send_media(pcm[i : i + FRAME])
        await conn.send_close_stream()
        messages = await read_all(conn, timeout=15)
    assert isinstance(messages[-1], ListenV1Metadata), messages[-3:]
    finals = [m for m in messages if isinstance(m, ListenV1Results) and m.is_final]
    heard = [w.word for f in finals for w in f.channel.alternatives[0].words]
    assert "hello" in heard, heard  # the words still held back by the endpointer were decoded
    assert finals[-1].start + finals[-1].duration == pytest.approx(frames * 0.02, abs=1e-6)


@needs_speech
@pytest.mark.parametrize("interim", [False, True])
def test_speech_engine_answers_during_long_continuous_speech(interim: bool) -> None:
    """31 s of speech without a pause: the engine answers at least every ANSWER_EVERY_S of audio
    (finals, or partials with interim results), so the worker's stall watchdog (counting from the
    first unanswered audio) never takes a long utterance for a dead connection. It used to say
    nothing for 10.3 s, and an 11.6 s clip took 22.3 s through a reconnect."""
    pcm = sample_pcm() * 4
    engine = SpeechEngine(interim_results=interim)
    try:
        answered_at = [0.0]
        heard: list[str] = []
        for i in range(0, len(pcm), FRAME):
            events = engine.feed(pcm[i : i + FRAME])
            if events:
                answered_at.append((i + FRAME) / 32000)
            heard += [w.word for e in events if isinstance(e, Transcript) and e.is_final for w in e.words]
        gaps = [b - a for a, b in itertools.pairwise(answered_at)]
    finally:
        engine.release()
    assert max(gaps) <= ANSWER_EVERY_S + 0.05, gaps
    # The cuts still carry words (a small model on cut audio: some of them, not all).
    assert len(heard) >= 30 and {"hello", "sentence", "travels", "through", "streams"} & set(heard), heard
    # The worst gap a client can see (plus the endpointer's longest window, 2 s) stays inside the
    # worker's default stall watchdog.
    assert Settings.model_fields["stall_seconds"].default > ANSWER_EVERY_S + 2.0
