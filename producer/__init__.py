"""voxqueue producer: the library AI backends use to stream audio in and read transcripts back.

`from producer import Producer` works, but the names are loaded lazily so that importing the wire
contract (`producer.protocol`), as the worker does, does not import the client machinery.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from producer.audio import AudioFileError, FrameChunker, marker_frame, read_audio_file
    from producer.batcher import ProducerConnectionError, ProducerError, QueueFull, SessionFailed
    from producer.client import DeploymentMismatch, Producer, ProducerSession, SessionExists, connect
    from producer.pacing import Pacer
    from producer.protocol import AudioFormat, Keys
    from producer.transcripts import SessionLost, SessionUnclaimed, follow_all, follow_session

_EXPORTS = {
    "AudioFileError": "producer.audio",
    "FrameChunker": "producer.audio",
    "marker_frame": "producer.audio",
    "read_audio_file": "producer.audio",
    "ProducerConnectionError": "producer.batcher",
    "ProducerError": "producer.batcher",
    "QueueFull": "producer.batcher",
    "SessionFailed": "producer.batcher",
    "DeploymentMismatch": "producer.client",
    "Producer": "producer.client",
    "SessionExists": "producer.client",
    "ProducerSession": "producer.client",
    "connect": "producer.client",
    "Pacer": "producer.pacing",
    "AudioFormat": "producer.protocol",
    "Keys": "producer.protocol",
    "SessionLost": "producer.transcripts",
    "SessionUnclaimed": "producer.transcripts",
    "follow_all": "producer.transcripts",
    "follow_session": "producer.transcripts",
}
__all__ = [
    "AudioFileError",
    "AudioFormat",
    "DeploymentMismatch",
    "FrameChunker",
    "Keys",
    "Pacer",
    "Producer",
    "ProducerConnectionError",
    "ProducerError",
    "ProducerSession",
    "QueueFull",
    "SessionExists",
    "SessionFailed",
    "SessionLost",
    "SessionUnclaimed",
    "connect",
    "follow_all",
    "follow_session",
    "marker_frame",
    "read_audio_file",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'producer' has no attribute {name!r}")
    return getattr(import_module(module), name)
