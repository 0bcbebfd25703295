"""A local Deepgram live-streaming emulator that the official deepgram-sdk talks to unchanged.

It serves `/v1/listen` (live streaming, session.py) and Flux's `/v2/listen` (turns,
flux_session.py). See server.py for the public entry points and the control API, marker.py, flux.py
and speech.py for the recognition engines, faults.py for injectable failures.
"""

from .faults import FaultPlan
from .server import DEFAULT_PORT, EmulatorServer, run_emulator
from .speech import speech_available

__all__ = ["DEFAULT_PORT", "EmulatorServer", "FaultPlan", "run_emulator", "speech_available"]
