"""A Twilio Media Streams bridge: each phone call becomes a voxqueue session.

    python examples/twilio_bridge.py [--host 0.0.0.0] [--port 8765]

Point a TwiML `<Connect><Stream url="wss://your-host/stream"/></Connect>` (or `<Start><Stream>`) at
this server. Twilio opens one WebSocket per call and sends JSON messages: `connected`, then
`start` (the stream's and call's ids and the audio format), then `media` messages whose `payload`
is base64 of 20 ms of 8 kHz mono μ-law (160 bytes), and finally `stop` when the call ends. The
bridge opens a voxqueue session named after the stream (`streamSid`), with the format Twilio
announces (mulaw, 8000 Hz, 1 channel: 160 bytes a frame), appends the audio as it arrives and ends
the session on `stop`, or when the WebSocket closes without one (a dropped call). Transcripts
then come out of the session's results stream like any other session's (`voxqueue transcripts`).

Only `media` of the inbound track is sent (with `<Start><Stream track="both_tracks">` the outbound
track is skipped); `mark` and `dtmf` messages are ignored. A message that is not valid JSON, or
whose payload is not base64, is logged and skipped: one bad message never ends a call, let alone
the other calls this server carries.

Settings (environment): VOXQUEUE_REDIS_URL, VOXQUEUE_NAMESPACE, VOXQUEUE_PARTITIONS (the workers'),
VOXQUEUE_TWILIO_OPTIONS (Deepgram options as JSON, default {"model": "nova-3"}).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from producer.client import Producer, ProducerSession
from producer.protocol import AudioFormat

log = logging.getLogger("twilio_bridge")

# Twilio's mediaFormat.encoding for μ-law; the only one Media Streams sends today.
TWILIO_ENCODINGS = {"audio/x-mulaw": "mulaw", "audio/x-alaw": "alaw"}
TELEPHONY = AudioFormat("mulaw", 8000, 1)  # 160 bytes every 20 ms


def session_format(start: Mapping[str, Any]) -> AudioFormat:
    """The voxqueue format of a stream, from the `start` message's mediaFormat."""
    media = start.get("mediaFormat") or {}
    encoding = TWILIO_ENCODINGS.get(str(media.get("encoding", "audio/x-mulaw")), "")
    fmt = AudioFormat(encoding or "?", int(media.get("sampleRate", 8000)), int(media.get("channels", 1)))
    fmt.validate()  # ProtocolError (a ValueError) for anything voxqueue cannot carry
    return fmt


class Call:
    """One Twilio WebSocket: its voxqueue session, from `start` to `stop`."""

    def __init__(self, producer: Producer, options: Mapping[str, Any]) -> None:
        self.producer = producer
        self.options = options
        self.session: ProducerSession | None = None
        self.stopped = False

    async def handle(self, message: str | bytes) -> None:
        try:
            msg = json.loads(message)
            event = msg["event"]
        except (ValueError, TypeError, KeyError):
            log.warning("skipped a message that is not Twilio JSON")
            return
        if event == "start" and self.session is None:
            start = msg.get("start") or {}
            sid = str(start.get("streamSid") or msg.get("streamSid") or "")
            labels = {"source": "twilio"}
            if start.get("callSid"):
                labels["call_sid"] = str(start["callSid"])
            self.session = await self.producer.open_session(
                sid or None, options=self.options, labels=labels, format=session_format(start)
            )
            log.info("call started: session %s", self.session.sid)
        elif event == "media" and self.session is not None and not self.stopped:
            media = msg.get("media") or {}
            if media.get("track", "inbound") != "inbound":
                return
            try:
                audio = base64.b64decode(media.get("payload", ""), validate=True)
            except (binascii.Error, ValueError, TypeError):
                log.warning("skipped a media message whose payload is not base64")
                return
            # Any length: the session re-chunks into whole 160-byte frames.
            await self.session.send(audio, wait=False)
        elif event == "stop":
            await self.stop()

    async def stop(self) -> None:
        if self.session is not None and not self.stopped:
            self.stopped = True
            frames = await self.session.end()
            log.info("call ended: session %s, %d frames", self.session.sid, frames)


async def bridge(connection: ServerConnection, producer: Producer, options: Mapping[str, Any]) -> None:
    call = Call(producer, options)
    try:
        async for message in connection:
            try:
                await call.handle(message)
            except ValueError as exc:  # a format voxqueue cannot carry, an id already used
                log.warning("call refused: %s", exc)
                await connection.close(1003, "unsupported stream")
                return
    except ConnectionClosed:
        pass
    finally:
        await call.stop()  # a dropped call still ends its session, so its audio is transcribed


async def main(host: str, port: int, ready: asyncio.Future[int] | None = None) -> None:
    env = os.environ.get
    url = env("VOXQUEUE_REDIS_URL", "redis://127.0.0.1:6379/0")
    namespace, partitions = env("VOXQUEUE_NAMESPACE", "vq"), int(env("VOXQUEUE_PARTITIONS", "1"))
    options = json.loads(env("VOXQUEUE_TWILIO_OPTIONS", '{"model": "nova-3"}'))
    async with (
        Producer(url, namespace=namespace, partitions=partitions) as producer,
        serve(lambda c: bridge(c, producer, options), host, port) as server,
    ):
        bound = next(iter(server.sockets)).getsockname()[1]
        log.info("twilio bridge listening on ws://%s:%d", host, bound)
        if ready is not None:
            ready.set_result(bound)
        await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    asyncio.run(main(args.host, args.port))
