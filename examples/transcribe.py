"""Transcribe a WAV file through voxqueue: python examples/transcribe.py [file.wav]"""

import asyncio
import os
import sys
from pathlib import Path

from producer.audio import read_audio_file
from producer.client import Producer

SAMPLE = Path(__file__).resolve().parent.parent / "worker" / "assets" / "sample.wav"


async def main(path: Path) -> None:
    fmt, pcm = read_audio_file(path)  # any supported WAV: PCM 8-48 kHz, mu-law, A-law; 1-2 channels
    env = os.environ.get
    url = env("VOXQUEUE_REDIS_URL", "redis://127.0.0.1:6379/0")
    # Namespace and partition count must be the workers' (see Configuration).
    namespace, partitions = env("VOXQUEUE_NAMESPACE", "vq"), int(env("VOXQUEUE_PARTITIONS", "1"))
    async with Producer(url, namespace=namespace, partitions=partitions) as producer:
        session = await producer.open_session(format=fmt, options={"model": "nova-3", "punctuate": True})
        await session.send(pcm)  # any length; re-chunked into frames of its format
        await session.end()
        async for event in session.events():  # ends after session_ended
            if event["type"] == "final" and event["transcript"]:
                print(f"{event['start']:.2f} {event['transcript']}")


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]) if len(sys.argv) > 1 else SAMPLE))
