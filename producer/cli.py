"""`voxqueue produce`, `voxqueue replay` and `voxqueue tail`.

The lead attaches these to the top-level group with `add_producer_commands(group)`;
`python -m producer.cli` runs them standalone. Errors a user can cause (Redis unreachable, a file
voxqueue cannot send, a bad option) end with one line on stderr and exit code 1 (runtime) or 2
(bad input), never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Final, TypeVar, cast

import click
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from producer import transcripts
from producer.aio import cancel_and_wait
from producer.audio import RAW_SUFFIXES, AudioFileError, read_audio_file
from producer.batcher import ProducerConnectionError, ProducerError
from producer.client import Producer, ProducerSession, SessionExists, connect
from producer.options import parse_option_pairs, validate_options
from producer.pacing import Pacer
from producer.protocol import (
    DEFAULT_NAMESPACE,
    END_COMPLETED,
    ERROR,
    FINAL,
    PARTIAL,
    SESSION_ENDED,
    SESSION_STARTED,
    SPEECH_STARTED,
    TURN,
    UTTERANCE_END,
    AudioFormat,
    Keys,
    ProtocolError,
    SessionStart,
    validate_sid,
)
from producer.secrets import check_url_password, describe_url_error, redact, redact_url, register_url

T = TypeVar("T")
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
SEND_BLOCK_FRAMES = 500  # most frames per send() when the schedule lets several go at once
SCAN_BATCH = 1000  # XRANGE page size when searching the sessions stream
DASH = "\u2013"  # en dash between start and end times, as in subtitles


class _RedactedError(click.ClickException):
    """Every error this CLI prints goes through the redactor: the last line of defence for a
    password a library echoed in a message we did not expect."""

    def format_message(self) -> str:
        return redact(self.message)


class BadInput(_RedactedError):
    """The user's input cannot work (file, option, missing session): exit 2 like a usage error."""

    exit_code = 2


class SessionIdTaken(BadInput):
    """The new session's id exists (or existed): ids are never reused."""

    def __init__(self, sid: str) -> None:
        super().__init__(f"session {sid} already exists (or existed); choose another --session")
        self.sid = sid


class RuntimeFailure(_RedactedError):
    """Something failed while running (Redis unreachable, session failed): exit 1."""

    exit_code = 1


# ------------------------------------------------------------------------------ common options


def redis_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--redis-url, --namespace, --partitions, shared with the worker's commands via env vars."""
    func = click.option(
        "--partitions",
        envvar="VOXQUEUE_PARTITIONS",
        type=click.IntRange(min=1),
        default=1,
        show_default=True,
        help="Partition count of the deployment (must match the workers).",
    )(func)
    func = click.option(
        "--namespace",
        envvar="VOXQUEUE_NAMESPACE",
        default=DEFAULT_NAMESPACE,
        show_default=True,
        help="Key namespace.",
    )(func)
    func = click.option(
        "--redis-url",
        envvar="VOXQUEUE_REDIS_URL",
        default=DEFAULT_REDIS_URL,
        show_default=True,
        help="Redis URL (env VOXQUEUE_REDIS_URL).",
    )(func)
    return func


def _options(pairs: tuple[str, ...]) -> dict[str, Any]:
    try:
        return parse_option_pairs(list(pairs))
    except ProtocolError as exc:
        raise BadInput(f"bad --option: {exc}") from None


def _labels(pairs: tuple[str, ...]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise BadInput(f"bad --label {pair!r}: expected key=value")
        labels[name] = value
    return labels


def _sid(sid: str | None) -> str | None:
    if sid is not None:
        try:
            validate_sid(sid)
        except ProtocolError as exc:
            raise BadInput(f"bad --session {sid!r}: {exc}") from None
    return sid


def _client(url: str) -> aioredis.Redis:
    # From here on, every message of this process masks this URL and its password, however written.
    register_url(url)
    try:
        check_url_password(url)
        return connect(url)
    except ValueError as exc:
        raise BadInput(f"bad --redis-url {redact_url(url)}: {_scrub(exc, url)}") from None


def _run(url: str, main: Callable[[aioredis.Redis], Coroutine[Any, Any, T]]) -> T:
    """Run `main(client)` and turn the failures a user can meet into one-line errors."""
    client = _client(url)

    async def wrapper() -> T:
        try:
            await client.ping()  # fail fast and clearly if Redis is not there
            return await main(client)
        finally:
            await client.aclose()

    where = redact_url(url)
    try:
        return asyncio.run(wrapper())
    except KeyboardInterrupt:
        sys.exit(130)
    except (RedisConnectionError, RedisTimeoutError, ProducerConnectionError) as exc:
        raise RuntimeFailure(f"cannot reach Redis at {where}: {_scrub(exc, url)}") from None
    except RedisError as exc:
        raise RuntimeFailure(f"Redis error at {where}: {_scrub(exc, url)}") from None
    except ProducerError as exc:
        raise RuntimeFailure(redact(str(exc))) from None


def _scrub(exc: BaseException, url: str) -> str:
    """A library's message about `url`, with no part of its password (producer/secrets.py)."""
    return describe_url_error(exc, url)


# ---------------------------------------------------------------------------------- output


def _t(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, int | float) else "?"


def _span(event: dict[str, Any]) -> str:
    return f"[{_t(event.get('start'))}{DASH}{_t(event.get('end'))}]"


# Flux turn events `tail` prints: the end of each turn, and the eager end that may precede it (what
# a voice agent starts an LLM call on). Updates and the rest would flood a terminal.
TURN_LINES: Final = {"EndOfTurn": "", "EagerEndOfTurn": " (eager)"}


def turn_line(event: dict[str, Any]) -> str:
    """`[start–end] #index text`, with `(eager)` on an eager end of turn."""
    mark = TURN_LINES.get(str(event.get("event")), "")
    return f"{_span(event)} #{event.get('turn_index', '?')}{mark} {event.get('transcript', '')}"


def event_line(event: dict[str, Any]) -> str | None:
    """One readable line per event, for `tail` (None: not shown, e.g. a Flux Update)."""
    kind = str(event.get("type", "?"))
    sid = str(event.get("sid", "?"))
    head = f"{kind:<15} {sid}"
    if kind in (FINAL, PARTIAL):
        return f"{head} {_span(event)} {event.get('transcript', '')}"
    if kind == TURN:
        return f"{head} {turn_line(event)}" if event.get("event") in TURN_LINES else None
    if kind == SPEECH_STARTED:
        return f"{head} @{_t(event.get('start'))}"
    if kind == UTTERANCE_END:
        return f"{head} @{_t(event.get('end'))}"
    if kind == SESSION_STARTED:
        return f"{head} options={json.dumps(event.get('options', {}), sort_keys=True)}"
    if kind == SESSION_ENDED:
        return (
            f"{head} {event.get('reason', '?')} frames={event.get('frames', '?')} "
            f"audio={_t(event.get('audio_seconds'))}s finals={event.get('finals', '?')}"
        )
    if kind == ERROR:
        fatal = " (fatal)" if event.get("fatal") else ""
        return f"{head} {event.get('code', '?')}: {event.get('message', '')}{fatal}"
    return f"{head} {json.dumps(event, default=str)}"


def event_json(event: dict[str, Any]) -> str:
    """The event dict exactly, one compact line."""
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False, default=str)


class TranscriptView:
    """`--follow` output of produce/replay: finals as `[start-end] text` lines on stdout, partials
    redrawn in place when stdout is a terminal, errors and the summary on stderr."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.ended: dict[str, Any] | None = None
        self._live: Any = None
        if not as_json and sys.stdout.isatty():
            from rich.console import Console
            from rich.live import Live

            self._live = Live(console=Console(), transient=True, auto_refresh=False)
            self._live.start()

    def show(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == SESSION_ENDED:
            self.ended = event
        if self.as_json:
            click.echo(event_json(event))
            return
        if kind == FINAL:
            self._line(f"{_span(event)} {event.get('transcript', '')}")
        elif kind == TURN and event.get("event") in TURN_LINES:
            self._line(turn_line(event))
        elif kind in (PARTIAL, TURN) and self._live is not None:
            from rich.text import Text

            self._live.update(Text(f"… {event.get('transcript', '')}", style="dim"), refresh=True)
        elif kind == ERROR:
            click.echo(f"error: {event.get('code', '?')}: {event.get('message', '')}", err=True)
        elif kind == SESSION_ENDED:
            click.echo(
                f"session ended: {event.get('reason', '?')}, {event.get('frames', '?')} frames, "
                f"{_t(event.get('audio_seconds'))} s of audio, {event.get('finals', '?')} finals",
                err=True,
            )

    def _line(self, text: str) -> None:
        if self._live is not None:
            from rich.text import Text

            self._live.update(Text(""), refresh=True)
            self._live.console.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            click.echo(text)

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None


# ------------------------------------------------------------------------------- sending


async def send_paced(session: ProducerSession, pcm: bytes, speed: float) -> int:
    """Send `pcm` at `speed` x real time (0 = as fast as Redis takes it), then end the session.

    Every frame that is due goes out in one send(), so a late wake-up catches up in one flush.
    Each send waits for its flush: a CLI has one session, so the round trip is cheap, and a Redis
    failure surfaces at once instead of at end().
    """
    fb = session.format.frame_bytes
    total = -(-len(pcm) // fb)
    pacer = Pacer(speed, session.format.frame_seconds)
    loop = asyncio.get_running_loop()
    i = 0
    try:
        while i < total:
            now = loop.time()
            j = i
            while j < total and j - i < SEND_BLOCK_FRAMES and pacer.delay(j, now) <= 0:
                j += 1
            if j == i:
                await asyncio.sleep(pacer.delay(i, now))
                continue
            await session.send(pcm[i * fb : j * fb])
            i = j
    except asyncio.CancelledError:
        # Ctrl-C: end the session so the worker finishes what was sent now, rather than after
        # its abandonment timeout. Best effort and brief; a second Ctrl-C stops at once.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(session.end(), 2)
        raise
    return await session.end()


async def _stream_and_follow(
    producer: Producer,
    session: ProducerSession,
    pcm: bytes,
    speed: float,
    follow: bool,
    as_json: bool,
) -> None:
    view = TranscriptView(as_json) if follow else None
    if view is None:
        frames = await send_paced(session, pcm, speed)
        seconds = frames * session.format.frame_seconds
        click.echo(f"sent {frames} frames ({seconds:.2f} s of audio)", err=True)
        return
    follower = asyncio.create_task(_follow(producer.redis, producer.keys, session.sid, view))
    sender = asyncio.create_task(send_paced(session, pcm, speed))
    try:
        # A follower that fails while the audio is still going out (Redis lost the session) ends
        # the command at once: sending the rest would only feed a session nobody will transcribe.
        await asyncio.wait([sender, follower], return_when=asyncio.FIRST_COMPLETED)
        if follower.done() and follower.exception() is not None:
            await follower
        await sender
        await follower
    finally:
        await cancel_and_wait(sender)
        await cancel_and_wait(follower)
        view.close()
    if view.ended is not None and view.ended.get("reason") != END_COMPLETED:
        raise RuntimeFailure(f"session {session.sid} ended: {view.ended.get('reason')}")


def _warn_unclaimed(message: str) -> None:
    click.echo(f"warning: {message}", err=True)


async def _follow(redis: aioredis.Redis, keys: Keys, sid: str, view: TranscriptView) -> None:
    events = transcripts.follow_session(redis, keys, sid, from_id="0", on_unclaimed=_warn_unclaimed)
    async for event in events:
        view.show(event)


# ------------------------------------------------------------------------------- commands

speed_option = click.option(
    "--speed",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    help="Times real time; 0 = as fast as Redis takes it.",
)


@click.command("produce")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@speed_option
@click.option("--session", "sid", help="Session id (default: a new random id).")
@click.option(
    "--option",
    "option_pairs",
    multiple=True,
    metavar="KEY=VALUE",
    help="Deepgram option, repeatable (allow-listed).",
)
@click.option("--label", "label_pairs", multiple=True, metavar="KEY=VALUE", help="Session label, repeatable.")
@click.option(
    "--raw", is_flag=True, help="FILE is headerless audio (default 16 kHz mono linear16; see --encoding)."
)
@click.option(
    "--encoding",
    type=click.Choice(["linear16", "mulaw", "alaw"]),
    help="Headerless FILE: its encoding (default linear16).",
)
@click.option("--sample-rate", type=int, help="Headerless FILE: its sample rate in Hz (default 16000).")
@click.option(
    "--channels", type=click.IntRange(1, 2), help="Headerless FILE: interleaved channels (default 1)."
)
@click.option("--follow", is_flag=True, help="Print the transcript as it arrives, until the session ends.")
@click.option("--json", "as_json", is_flag=True, help="With --follow: one event per line as JSON.")
@redis_options
def produce(
    file: Path,
    speed: float,
    sid: str | None,
    option_pairs: tuple[str, ...],
    label_pairs: tuple[str, ...],
    raw: bool,
    encoding: str | None,
    sample_rate: int | None,
    channels: int | None,
    follow: bool,
    as_json: bool,
    redis_url: str,
    namespace: str,
    partitions: int,
) -> None:
    """Send a WAV or headerless FILE as one session; prints the session id.

    A WAV is sent in its own format: 16-bit PCM at 8, 16, 24, 32, 44.1 or 48 kHz, or 8 kHz
    mu-law/A-law, mono or stereo (docs/protocol.md, "Audio formats"). Headerless files (--raw, or
    .raw/.pcm) take their format from --encoding, --sample-rate and --channels."""
    options, labels, sid = _options(option_pairs), _labels(label_pairs), _sid(sid)
    headerless = raw or file.suffix.lower() in RAW_SUFFIXES
    if not headerless and (encoding or sample_rate or channels):
        raise BadInput(
            "--encoding, --sample-rate and --channels describe headerless files (--raw); "
            f"{file.name} is read as a WAV, which says its own format"
        )
    try:
        fmt, pcm = read_audio_file(
            file, raw=raw, encoding=encoding, sample_rate=sample_rate, channels=channels
        )
    except AudioFileError as exc:
        raise BadInput(str(exc)) from None
    if not pcm:
        # A session of 0 frames would "complete" with nothing transcribed: say so instead.
        raise BadInput(f"{file.name} has no audio (0 bytes of PCM)")

    async def main(client: aioredis.Redis) -> None:
        await _produce(client, namespace, partitions, sid, fmt, options, labels, pcm, speed, follow, as_json)

    _run(redis_url, main)


async def _produce(
    client: aioredis.Redis,
    namespace: str,
    partitions: int,
    sid: str | None,
    fmt: AudioFormat,
    options: dict[str, Any],
    labels: dict[str, str],
    pcm: bytes,
    speed: float,
    follow: bool,
    as_json: bool,
) -> None:
    async with Producer(client, namespace=namespace, partitions=partitions) as producer:
        try:
            session = await producer.open_session(sid, options=options, labels=labels, format=fmt)
        except SessionExists:
            # Ids are never reused (the workers would refuse it: sid_reused): a usage error, exit 2.
            raise SessionIdTaken(str(sid)) from None
        click.echo(session.sid)  # first stdout line, alone, for scripts
        await _stream_and_follow(producer, session, pcm, speed, follow, as_json)


@click.command("replay")
@click.argument("old_sid", metavar="SESSION")
@speed_option
@click.option("--session", "sid", help="Id of the new session (default: a new random id).")
@click.option(
    "--option",
    "option_pairs",
    multiple=True,
    metavar="KEY=VALUE",
    help="Deepgram option overriding the recorded session's, repeatable.",
)
@click.option("--follow", is_flag=True, help="Print the transcript as it arrives, until the session ends.")
@click.option("--json", "as_json", is_flag=True, help="With --follow: one event per line as JSON.")
@redis_options
def replay(
    old_sid: str,
    speed: float,
    sid: str | None,
    option_pairs: tuple[str, ...],
    follow: bool,
    as_json: bool,
    redis_url: str,
    namespace: str,
    partitions: int,
) -> None:
    """Send a retained session's recorded audio again as a new session (e.g. with other options)."""
    overrides, sid = _options(option_pairs), _sid(sid)
    try:
        validate_sid(old_sid)
    except ProtocolError as exc:
        raise BadInput(f"bad SESSION {old_sid!r}: {exc}") from None
    if sid == old_sid:
        raise BadInput("--session must differ from the replayed SESSION")

    async def main(client: aioredis.Redis) -> None:
        await rerun_session(
            client,
            namespace,
            partitions,
            old_sid,
            sid,
            overrides,
            {"replay_of": old_sid},
            speed,
            follow,
            as_json,
        )

    _run(redis_url, main)


async def rerun_session(
    client: aioredis.Redis,
    namespace: str,
    partitions: int,
    old_sid: str,
    sid: str | None,
    overrides: dict[str, Any],
    extra_labels: dict[str, str],
    speed: float,
    follow: bool,
    as_json: bool,
) -> None:
    """Sends a retained session's recorded audio again as a new session, in its format, with its
    options (plus `overrides`) and labels (plus `extra_labels`): `replay` and `dead requeue`."""
    keys = Keys(namespace=namespace, partitions=partitions)
    start = await find_session_start(client, keys, old_sid)
    fmt = start.format if start else AudioFormat()
    pcm = await recorded_audio(client, keys, old_sid, fmt.frame_bytes, fmt.silence_byte)  # BadInput: gone
    if start is None:
        click.echo(f"warning: the start entry of {old_sid} is gone; using defaults", err=True)
    try:
        options = validate_options({**(start.options if start else {}), **overrides}, fmt)
    except ProtocolError as exc:
        raise BadInput(f"recorded options of {old_sid} are not allowed: {exc}") from None
    labels = {**(start.labels if start else {}), **extra_labels}
    await _produce(client, namespace, partitions, sid, fmt, options, labels, pcm, speed, follow, as_json)


async def find_session_start(client: aioredis.Redis, keys: Keys, sid: str) -> SessionStart | None:
    """The session's start: from the state hash, where a worker copies the entry's format, options
    and labels when the session ends (ended sessions' entries are deleted from the sessions
    stream); for a session still running, its `sessions` entry (via the `start_id` in the state
    hash, else by scanning the partition's sessions stream page by page)."""
    skeys = keys.session(sid)
    state = cast(dict[bytes, bytes], await client.hgetall(skeys.state))
    kept = {name: state[name] for name in STATE_START_FIELDS if name in state}
    if kept:
        try:
            return SessionStart.from_fields({b"sid": sid.encode(), **kept})
        except ProtocolError:
            return None
    start_id = state.get(b"start_id")
    if start_id:
        entries = await _xrange(client, skeys.sessions, start_id, start_id, 1)
        start = _matching_start(entries, sid)
        if start is not None:
            return start
    cursor = "-"
    while True:
        entries = await _xrange(client, skeys.sessions, cursor, "+", SCAN_BATCH)
        start = _matching_start(entries, sid)
        if start is not None:
            return start
        if len(entries) < SCAN_BATCH:
            break
        last = entries[-1][0]
        cursor = "(" + (last.decode() if isinstance(last, bytes) else str(last))
    return None


# What FINISH copies from the session's entry into its state hash (worker/lua.py).
STATE_START_FIELDS = (b"encoding", b"sample_rate", b"channels", b"frame_ms", b"options", b"labels")


async def _xrange(
    client: aioredis.Redis, key: str, start: str | bytes, end: str | bytes, count: int
) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """XRANGE as this module's clients return it (bytes, decode_responses off)."""
    return cast(list[tuple[bytes, dict[bytes, bytes]]], await client.xrange(key, start, end, count=count))


def _matching_start(entries: list[tuple[bytes, dict[bytes, bytes]]], sid: str) -> SessionStart | None:
    for _, fields in entries:
        if fields.get(b"sid", b"").decode(errors="replace") != sid:
            continue
        try:
            return SessionStart.from_fields(fields)
        except ProtocolError:
            continue
    return None


async def recorded_audio(
    client: aioredis.Redis, keys: Keys, sid: str, frame_bytes: int, silence_byte: int = 0
) -> bytes:
    """The session's frames in seq order, each seq once (a retried XADD may have stored one twice)."""
    audio = keys.session(sid).audio
    frames: dict[int, bytes] = {}
    cursor = "-"
    while True:
        entries = await _xrange(client, audio, cursor, "+", SCAN_BATCH)
        for _, fields in entries:
            seq, pcm = fields.get(b"seq"), fields.get(b"pcm")
            if seq is None or pcm is None or len(pcm) != frame_bytes:
                continue  # the end marker, or an entry the worker would have refused
            try:
                frames.setdefault(int(seq), pcm)
            except ValueError:
                continue
        if len(entries) < SCAN_BATCH:
            break
        last = entries[-1][0]
        cursor = "(" + (last.decode() if isinstance(last, bytes) else str(last))
    if not frames:
        raise BadInput(f"session {sid} has no recorded audio in Redis (expired, or never existed)")
    # Frames the original session never got were silence to Deepgram (the worker fills gaps);
    # fill them the same way here so the replay's timestamps match the original's.
    silence = bytes([silence_byte]) * frame_bytes  # a zero byte is loud in mu-law and A-law
    return b"".join(frames.get(seq, silence) for seq in range(max(frames) + 1))


@click.command("tail")
@click.option("--session", "sid", help="Follow one session from its first event until it ends.")
@click.option("--json", "as_json", is_flag=True, help="One event per line, as JSON.")
@redis_options
def tail(sid: str | None, as_json: bool, redis_url: str, namespace: str, partitions: int) -> None:
    """Print transcript events live: of every session from now on, or of one session."""
    sid = _sid(sid)
    show: Callable[[dict[str, Any]], str | None] = event_json if as_json else event_line

    async def main(client: aioredis.Redis) -> None:
        keys = Keys(namespace=namespace, partitions=partitions)
        if sid is not None:
            sk = keys.session(sid)
            if not await client.exists(sk.results, sk.state, sk.audio):
                # Starting tail before the producer is fine; say so rather than sit silent.
                click.echo(f"waiting for session {sid} to start (no such session yet) …", err=True)
        events = (
            transcripts.follow_session(client, keys, sid, from_id="0", on_unclaimed=_warn_unclaimed)
            if sid is not None
            else transcripts.follow_all(client, keys, from_id="$")
        )
        async for event in events:
            line = show(event)
            if line is not None:
                click.echo(line)

    _run(redis_url, main)


PRODUCER_COMMANDS = (produce, replay, tail)


def add_producer_commands(group: click.Group) -> click.Group:
    """Attach produce, replay and tail to a click group (the `voxqueue` CLI)."""
    for command in PRODUCER_COMMANDS:
        group.add_command(command)
    return group


@click.group()
def main() -> None:
    """voxqueue producer commands (standalone; normally part of `voxqueue`)."""


add_producer_commands(main)


if __name__ == "__main__":
    main()
