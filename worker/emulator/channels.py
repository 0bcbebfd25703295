"""`multichannel=true`: one engine per channel, as Deepgram transcribes each channel on its own.

The audio of a connection is interleaved sample by sample (channel 0's sample, channel 1's, ...);
the splitter cuts it into each channel's own byte stream and feeds each to its engine, then tags
what each engine heard with its channel index, which the renderer turns into Deepgram's
`channel_index: [i, n]` (one Results per channel). A partial sample group waits for the rest of its
bytes in the next message, as a partial frame does in the engines.
"""

from __future__ import annotations

from collections.abc import Sequence

from .events import ChannelTagged, Engine, Event, FrameCutter


def deinterleave(data: bytes, channels: int, width: int) -> list[bytes]:
    """Each channel's bytes of whole interleaved sample groups (len(data) a multiple of the group)."""
    group = channels * width
    out = []
    for c in range(channels):
        mono = bytearray(len(data) // channels)
        for k in range(width):
            mono[k::width] = data[c * width + k :: group]
        out.append(bytes(mono))
    return out


class ChannelSplitter:
    def __init__(self, engines: Sequence[Engine], width: int) -> None:
        self._engines = list(engines)
        self._width = width
        self._group = width * len(self._engines)
        self._cutter = FrameCutter(self._group)  # a partial sample group waits for the rest
        self.blocking = any(e.blocking for e in self._engines)
        self.lag_ns: list[int] = []

    def _gather(self, per_channel: list[list[Event]]) -> list[Event]:
        out: list[Event] = []
        for c, events in enumerate(per_channel):
            out.extend(ChannelTagged(c, e) for e in events)  # type: ignore[arg-type]
        for e in self._engines:
            if e.lag_ns:
                self.lag_ns.extend(e.lag_ns)
                e.lag_ns.clear()
        return out

    def feed(self, data: bytes, now_ns: int = 0) -> list[Event]:
        data, whole = self._cutter.take(data)
        if not whole:
            return []
        parts = deinterleave(data[:whole], len(self._engines), self._width)
        # Every channel is fed before any BadAudio propagates: the first failure closes the
        # connection anyway, as one undecodable channel makes Deepgram's whole request fail.
        return self._gather([e.feed(part, now_ns) for e, part in zip(self._engines, parts, strict=True)])

    def finalize(self) -> list[Event]:
        return self._gather([e.finalize() for e in self._engines])

    def close_stream(self) -> list[Event]:
        return self._gather([e.close_stream() for e in self._engines])

    def audio_seconds(self) -> float:
        return self._engines[0].audio_seconds()

    def release(self) -> None:
        for e in self._engines:
            e.release()
