"""Opening Deepgram live connections through the official SDK, and nothing more.

The SDK neither reconnects nor sends KeepAlive; the session runner does both. This module only
builds the client once per worker and opens one connection with a bounded handshake time: on
`/v1/listen` (`listen.v1.connect`), or on Flux's `/v2/listen` (`listen.v2.connect`) for a session
whose model is a Flux model.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator
from typing import Any

from deepgram import AsyncDeepgramClient
from deepgram.environment import DeepgramClientEnvironment

from producer.options import connect_kwargs, connect_kwargs_v2, is_flux
from producer.protocol import AudioFormat


def http_base(ws_url: str) -> str:
    return (
        "https://" + ws_url.removeprefix("wss://")
        if ws_url.startswith("wss://")
        else ("http://" + ws_url.removeprefix("ws://"))
    )


class DeepgramLink:
    def __init__(self, url: str, api_key: str, connect_timeout: float) -> None:
        base = http_base(url)
        environment = DeepgramClientEnvironment(base=base, production=url, agent=url, agent_rest=base)
        # The emulator accepts any key; the SDK insists on one, so give it a harmless placeholder.
        self.client = AsyncDeepgramClient(api_key=api_key or "voxqueue-emulator", environment=environment)
        self.connect_timeout = connect_timeout
        unsent = {"request_options", "authorization"}
        self._known = frozenset(inspect.signature(self.client.listen.v1.connect).parameters) - unsent
        self._known_v2 = frozenset(inspect.signature(self.client.listen.v2.connect).parameters) - unsent

    @contextlib.asynccontextmanager
    async def connect(self, options: dict[str, Any], fmt: AudioFormat) -> AsyncIterator[Any]:
        """An open connection: the SDK's AsyncV1SocketClient, or AsyncV2SocketClient for Flux."""
        flux = is_flux(options)
        kwargs = connect_kwargs_v2(options, fmt) if flux else connect_kwargs(options, fmt)
        # Options the SDK has no keyword for (`no_delay`, a deployment's extra options) go on the
        # query string as they are, through the SDK's documented additional_query_parameters.
        known = self._known_v2 if flux else self._known
        extra = {k: kwargs.pop(k) for k in list(kwargs) if k not in known}
        if extra:
            kwargs["request_options"] = {"additional_query_parameters": extra}
        listen = self.client.listen.v2 if flux else self.client.listen.v1
        manager = listen.connect(**kwargs)
        async with asyncio.timeout(self.connect_timeout):
            conn = await manager.__aenter__()
        try:
            yield conn
        except BaseException as exc:
            # Leaving normally would run the closing handshake, which waits up to 10 s on a
            # half-open socket; after a failure there is nothing left to say, so drop it now. The
            # SDK's exit may then raise its own ConnectionClosed: never let it replace the original
            # exception (a cancellation swallowed here would keep a handed-over session running).
            abort(conn)
            with contextlib.suppress(Exception):
                await manager.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        else:
            await manager.__aexit__(None, None, None)


def abort(conn: Any) -> None:
    transport = getattr(getattr(conn, "_websocket", None), "transport", None)
    if transport is not None:
        transport.abort()


def request_id_of(conn: Any) -> str:
    """Deepgram's request id from the handshake response (`dg-request-id`), for logs and events."""
    ws = getattr(conn, "_websocket", None)
    headers = getattr(ws, "response_headers", None)
    if headers is None:
        return ""
    return str(headers.get("dg-request-id", ""))
