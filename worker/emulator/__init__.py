"""A local Deepgram live-streaming emulator that the official deepgram-sdk talks to unchanged.

See server.py for the public entry points and the control API, marker.py and speech.py for the two
recognition engines, faults.py for injectable failures.
"""

from .faults import FaultPlan
from .server import DEFAULT_PORT, EmulatorServer, run_emulator
from .speech import speech_available

__all__ = ["DEFAULT_PORT", "EmulatorServer", "FaultPlan", "run_emulator", "speech_available"]
