"""The emulator's WebSocket server: Deepgram's `/v1/listen` and `/v2/listen` (Flux) handshakes, plus
a small HTTP control API.

In-process use (tests):

    async with EmulatorServer(engine="marker", port=0, keys={"k1"}) as emu:
        ...  # point deepgram-sdk's DeepgramClientEnvironment.production at emu.url: both
             # client.listen.v1.connect(...) and client.listen.v2.connect(...) then reach it

From the CLI (`voxqueue emulator`), which runs until cancelled (Ctrl-C):

    await run_emulator(host="127.0.0.1", port=8765, engine="marker", keys=None,
                       silence_timeout=10.0, final_every=0.5, faults=None, on_ready=None)

- `engine`: "marker" (deterministic frame words, see marker.py) or "speech" (pocketsphinx).
- `keys`: accepted API keys; None or empty = any key, but an `Authorization: Token|Bearer <key>`
  header (or `Sec-WebSocket-Protocol: token, <key>`) is always required, as on Deepgram.
- `silence_timeout`: seconds without any message before closing 1011 NET-0001 (Deepgram: 10). Flux
  has no KeepAlive: a `/v2/listen` client keeps an idle connection open by sending audio (silence).
- `final_every`: seconds of audio per final (marker) or per empty final over silence (speech).
- `faults`: a FaultPlan or a mapping of its parameters (see faults.py), applied from the start.
- `on_ready`: called with the started server (e.g. to print its URL).

`/v1/listen` is Deepgram's live streaming API (session.py, marker.py); `/v2/listen` is Flux, its
turn-based API (flux_session.py, flux.py): `Connected`, then `TurnInfo` events; mono only, options
in options.FluxOptions. Both share the authentication, the handshake errors, the control endpoints
and the faults (drops, stalls, handshake statuses, slow results, 1008 on undecodable audio).

Handshake answers, like Deepgram's: wrong path 404, missing/unknown key 401, malformed query
parameter 400, each with a JSON body {"err_code", "err_msg", "request_id"} and `dg-error` and
`dg-request-id` headers; an accepted upgrade carries `dg-request-id` (the request id repeated in
every message). Control endpoints (plain HTTP GET on the same port):

- `/_emulator/faults?<plan params>`: replace the fault plan (no params: read it; `reset=1`: clear);
- `/_emulator/stats`: counters as JSON (`reset=1`: return them, then zero them);
- `/_emulator/finals`: [request id, end on the connection, time.time_ns()] of each final sent
  (`reset=1`: then forget them), for measuring transcript latency; on `/v2/listen` each EndOfTurn
  is a final, ending at its `audio_window_end`;
- `/_emulator/health`: {"ok": true}.

Compression is off: permessage-deflate would cost CPU per 640-byte frame for nothing on localhost.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Self
from urllib.parse import parse_qsl

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from .channels import ChannelSplitter
from .events import Engine, frame_bytes_for
from .faults import FaultInjector, FaultPlan, FaultPlanError, handshake_error
from .flux import FluxEngine, FluxMarkerEngine
from .flux_session import FluxSession
from .marker import MarkerEngine
from .messages import FluxRenderer, Renderer, http_error_body
from .options import FluxOptions, ListenOptions, OptionError
from .session import BaseSession, Session
from .speech import FluxSpeechEngine, SpeechEngine, speech_available
from .stats import EmulatorStats

log = logging.getLogger(__name__)

ENGINES = ("marker", "speech")
DEFAULT_PORT = 8765
LISTEN_PATH = "/v1/listen"
FLUX_PATH = "/v2/listen"
CONTROL_PREFIX = "/_emulator/"


def _auth_key(request: Request) -> str | None:
    header = request.headers.get("Authorization")
    if header:
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() in ("token", "bearer") and value.strip():
            return value.strip()
        return None
    # Browsers cannot set headers; Deepgram also takes the key as a subprotocol: "token, <key>".
    protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")]
    if len(protocols) >= 2 and protocols[0].lower() in ("token", "bearer") and protocols[1]:
        return protocols[1]
    return None


def _select_subprotocol(connection: ServerConnection, offered: Sequence[Subprotocol]) -> Subprotocol | None:
    # Echo "token"/"bearer" when the key came as a subprotocol; anything else (or nothing) is fine.
    for protocol in offered:
        if protocol.lower() in ("token", "bearer"):
            return protocol
    return None


class EmulatorServer:
    """A Deepgram live-protocol emulator listening on `host:port` (port 0 = any free port)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        engine: str = "marker",
        keys: Iterable[str] | None = None,
        *,
        silence_timeout: float = 10.0,
        final_every: float = 0.5,
        faults: FaultPlan | Mapping[str, Any] | None = None,
        close_timeout: float = 2.0,
        stop_code: int = 1012,
    ) -> None:
        if engine not in ENGINES:
            raise ValueError(f"unknown engine {engine!r}: choose one of {', '.join(ENGINES)}")
        if engine == "speech" and not speech_available():
            raise RuntimeError("engine 'speech' needs pocketsphinx: pip install 'voxqueue[speech]'")
        if silence_timeout <= 0 or final_every <= 0:
            raise ValueError("silence_timeout and final_every must be positive")
        self.host = host
        self._port = port
        self.engine = engine
        self.keys = frozenset(keys or ())
        self.silence_timeout = silence_timeout
        self.final_every = final_every
        self.close_timeout = close_timeout
        # 1012 (service restart) on stop, as Deepgram during a deploy: clients must reconnect. 1000/1001
        # would surface as a clean end of stream (ConnectionClosedOK), hiding the interruption.
        self.stop_code = stop_code
        plan = faults if isinstance(faults, FaultPlan) else FaultPlan.from_params(faults or {})
        self.faults = FaultInjector(plan)
        self.stats = EmulatorStats()
        self._server: Server | None = None
        self._sessions: set[BaseSession[Any, Any]] = set()
        self._accepted: dict[ServerConnection, ListenOptions | FluxOptions] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------------------ lifecycle

    async def start(self) -> Self:
        self._server = await serve(
            self._handler,
            self.host,
            self._port,
            process_request=self._process_request,
            process_response=self._process_response,
            select_subprotocol=_select_subprotocol,
            compression=None,
            close_timeout=self.close_timeout,
            server_header="voxqueue-emulator",
        )
        self._port = self._server.sockets[0].getsockname()[1]
        self._sweeper = asyncio.create_task(self._sweep())
        log.info("deepgram emulator (%s engine) listening on %s", self.engine, self.url)
        return self

    async def stop(self, bound: float = 5.0) -> None:
        """Closes every connection (code `stop_code`) and stops. Each wait is bounded by `bound` s:
        a stop must never hang its caller (a test's teardown, Ctrl-C), whatever a client does."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.wait([self._sweeper], timeout=bound)
            self._sweeper = None
        if self._server is not None:
            self._server.close(code=self.stop_code, reason="emulator stopping")
            closing = asyncio.ensure_future(self._server.wait_closed())
            await asyncio.wait([closing], timeout=bound)
            if not closing.done():
                closing.cancel()
                log.warning("emulator connections did not close within %s s; leaving them", bound)
            self._server = None
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=bound)

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        """The base URL for DeepgramClientEnvironment(production=...): the SDK appends /v1/listen
        or /v2/listen."""
        return f"ws://{self.host}:{self._port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self._port}"

    def set_faults(self, plan: FaultPlan | Mapping[str, Any]) -> FaultPlan:
        """Replace the fault plan in-process (the same as GET /_emulator/faults?...)."""
        new = plan if isinstance(plan, FaultPlan) else FaultPlan.from_params(plan)
        self.faults.set_plan(new)
        return new

    def reset_faults(self) -> None:
        self.faults.reset()

    def stats_json(self) -> dict[str, Any]:
        for session in self._sessions:
            session.flush_lags()
        return self.stats.to_json(connections_open=len(self._sessions))

    # ------------------------------------------------------------------------------ handshake

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path, _, query = request.path.partition("?")
        if path.startswith(CONTROL_PREFIX):
            return self._control(connection, path, query)
        route = path.rstrip("/")
        if route not in (LISTEN_PATH, FLUX_PATH):
            return self._reject(connection, 404, "NOT_FOUND", f"No route for {path}.")
        key = _auth_key(request)
        if key is None or (self.keys and key not in self.keys):
            return self._reject(connection, 401, *handshake_error(401))
        options: ListenOptions | FluxOptions
        try:
            options = (
                ListenOptions.from_query(query) if route == LISTEN_PATH else FluxOptions.from_query(query)
            )
        except OptionError as exc:
            return self._reject(connection, 400, "Bad Request", str(exc))
        status = self.faults.handshake_fault()
        if status:
            return self._reject(connection, status, *handshake_error(status))
        self._accepted[connection] = options
        return None

    def _process_response(
        self, connection: ServerConnection, request: Request, response: Response
    ) -> Response | None:
        if response.status_code == 101:
            response.headers["dg-request-id"] = str(connection.id)
        else:
            self._accepted.pop(connection, None)
        return None

    def _reject(self, connection: ServerConnection, status: int, err_code: str, err_msg: str) -> Response:
        request_id = str(connection.id)
        self.stats.handshakes_rejected[status] += 1
        response = self._json(connection, status, http_error_body(err_code, err_msg, request_id))
        response.headers["dg-error"] = err_msg
        response.headers["dg-request-id"] = request_id
        return response

    @staticmethod
    def _json(connection: ServerConnection, status: int, body: str) -> Response:
        response = connection.respond(status, body)
        del response.headers["Content-Type"]
        response.headers["Content-Type"] = "application/json"
        return response

    # ------------------------------------------------------------------------------ control API

    def _control(self, connection: ServerConnection, path: str, query: str) -> Response:
        params = dict(parse_qsl(query, keep_blank_values=True))
        reset = params.pop("reset", "").lower() in ("1", "true", "yes")
        if path == CONTROL_PREFIX + "faults":
            if reset:
                self.faults.reset()
            if params:
                try:
                    self.faults.set_plan(FaultPlan.from_params(params))
                except FaultPlanError as exc:
                    return self._json(connection, 400, json.dumps({"error": str(exc)}))
            body = {"plan": self.faults.plan.to_json(), "pending": self.faults.pending()}
            return self._json(connection, 200, json.dumps(body))
        if path == CONTROL_PREFIX + "stats":
            body = self.stats_json()  # flushes every session's pending lag samples first
            if reset:
                self.stats.reset()
            return self._json(connection, 200, json.dumps(body))
        if path == CONTROL_PREFIX + "finals":
            finals = {"finals": list(self.stats.final_times)}
            if reset:
                self.stats.final_times.clear()
            return self._json(connection, 200, json.dumps(finals))
        if path == CONTROL_PREFIX + "health":
            return self._json(connection, 200, json.dumps({"ok": True, "engine": self.engine}))
        return self._json(connection, 404, json.dumps({"error": f"unknown control endpoint {path}"}))

    # ------------------------------------------------------------------------------ connections

    def _make_engine(self, o: ListenOptions) -> Engine:
        if o.multichannel and o.channels > 1:
            # Deepgram transcribes each channel on its own: one engine per channel.
            mono = dataclasses.replace(o, channels=1, multichannel=False)
            return ChannelSplitter([self._make_engine(mono) for _ in range(o.channels)], o.sample_width)
        common: dict[str, Any] = {
            "sample_rate": o.sample_rate,
            "channels": o.channels,
            "interim_results": o.interim_results,
            "vad_events": o.vad_events,
            "utterance_end_ms": o.utterance_end_ms,
            "endpointing_ms": o.endpointing_ms,
            "final_every": self.final_every,
        }
        if self.engine == "speech":
            return SpeechEngine(punctuate=o.punctuate or o.smart_format, encoding=o.encoding or "", **common)
        return MarkerEngine(sample_width=o.sample_width, **common)

    def _make_flux_engine(self, o: FluxOptions) -> FluxEngine:
        if self.engine == "speech":
            return FluxSpeechEngine(
                sample_rate=o.sample_rate,
                encoding=o.encoding or "",
                thresholds=o.thresholds,
                final_every=self.final_every,
            )
        return FluxMarkerEngine(
            sample_rate=o.sample_rate, sample_width=o.sample_width, thresholds=o.thresholds
        )

    async def _handler(self, connection: ServerConnection) -> None:
        options = self._accepted.pop(connection, None)
        if options is None:  # pragma: no cover - process_request always records accepted upgrades
            await connection.close(1011, "internal error: unknown connection")
            return
        self.stats.connections_accepted += 1
        make: Callable[[], Engine | FluxEngine]
        if isinstance(options, FluxOptions):
            make = functools.partial(self._make_flux_engine, options)
        else:
            make = functools.partial(self._make_engine, options)
        try:
            if self.engine == "speech":
                # Loading a decoder takes a quarter second of CPU: keep it off the event loop.
                engine = await asyncio.to_thread(make)
            else:
                engine = make()
        except Exception as exc:  # a connection must fail alone, never the server
            log.exception("cannot create the %s engine", self.engine)
            self.stats.close_codes[1011] += 1
            await connection.close(1011, f"NET-0000: engine failed: {exc}"[:120])
            return
        request_id = str(connection.id)
        common: dict[str, Any] = {
            "engine": engine,
            "faults": self.faults.for_connection(),
            "injector": self.faults,
            "stats": self.stats,
            "clock": asyncio.get_running_loop().time,
            "decodable": options.decodable,
        }
        session: BaseSession[Any, Any]
        if isinstance(options, FluxOptions):
            session = FluxSession(
                connection,
                renderer=FluxRenderer(request_id=request_id, multilingual=options.multilingual),
                options=options,
                frame_bytes=frame_bytes_for(options.sample_rate, 1, options.sample_width),
                **common,
            )
        else:
            session = Session(
                connection,
                renderer=Renderer(
                    request_id=request_id,
                    model=options.model,
                    engine=self.engine,
                    channels=options.channels,
                    multichannel=options.multichannel,
                ),
                frame_bytes=frame_bytes_for(options.sample_rate, options.channels, options.sample_width),
                **common,
            )
        self._sessions.add(session)
        try:
            await session.run()
        finally:
            self._sessions.discard(session)

    async def _sweep(self) -> None:
        """Close connections that sent nothing for `silence_timeout`, one timer for all of them.

        A per-message timer would cost a timer handle per audio frame; checking every quarter of the
        timeout costs nothing and closes within 1.25 x the timeout.
        """
        loop = asyncio.get_running_loop()
        period = min(1.0, self.silence_timeout / 4)
        while True:
            await asyncio.sleep(period)
            deadline = loop.time() - self.silence_timeout
            for session in list(self._sessions):
                if session.last_activity < deadline:
                    task = session.expire()
                    if task is not None:
                        self._tasks.add(task)
                        task.add_done_callback(self._tasks.discard)


async def run_emulator(
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    engine: str = "marker",
    keys: Iterable[str] | None = None,
    *,
    silence_timeout: float = 10.0,
    final_every: float = 0.5,
    faults: FaultPlan | Mapping[str, Any] | None = None,
    on_ready: Callable[[EmulatorServer], None] | None = None,
) -> None:
    """Serve until cancelled, then close every connection (1012) and return."""
    async with EmulatorServer(
        host,
        port,
        engine,
        keys,
        silence_timeout=silence_timeout,
        final_every=final_every,
        faults=faults,
    ) as emulator:
        if on_ready is not None:
            on_ready(emulator)
        await asyncio.Event().wait()
