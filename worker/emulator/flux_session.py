"""One accepted `/v2/listen` (Flux) connection: the Flux protocol on top of `session.BaseSession`.

What the server sends, in order, each with the connection's `sequence_id` (0, 1, 2, ... over every
message it sends, whatever the type):
- `Connected` first, as soon as the connection is accepted;
- `TurnInfo` for each engine event (flux.py has the turn rules), an EndOfTurn also recorded in
  `/_emulator/finals` (its `audio_window_end` as the end) and counted in `finals_sent`;
- `ConfigureSuccess` (the whole configuration now in force) or `ConfigureFailure` (nothing changed,
  the connection goes on) for each `Configure`;
- a fatal `Error` {code, description} right before the emulator closes the connection for a cause
  of its own: silence timeout (code TIMEOUT, then close 1011 NET-0001), undecodable audio
  (UNPARSABLE_AUDIO, 1008), a client message Flux does not know (UNPARSABLE_CLIENT_MESSAGE, 1008),
  an engine failure (INTERNAL_SERVER_ERROR, 1011). Injected drops send nothing before their close,
  as a crash would not.

Client messages: binary audio; {"type": "CloseStream"} (everything due is sent, an open turn is not
ended, then a close frame without a status code (1005 to the client), as Deepgram documents; an
empty binary message means the same, as on v1); {"type": "ForceEndTurn"}
(ends the open turn at once, trigger "manual"; nothing when no turn is open); {"type": "Configure",
"thresholds": {...}, "keyterms": [...], "language_hints": [...], "numerals": bool}, each part
optional, a missing part or threshold keeps its value. Flux has no KeepAlive and no Finalize: any
other text, KeepAlive included, is fatal, as a JSON KeepAlive is reported to close a real Flux
connection (deepgram-python-sdk issue #649). So a client keeps an idle Flux connection alive by
sending audio (silence): the emulator closes a connection that sent no message at all for the
server's `silence_timeout` (10 s by default), as on v1.
"""

from __future__ import annotations

from typing import Any, Final

from websockets.asyncio.server import ServerConnection

from .flux import END_OF_TURN, FluxEngine, TurnEvent
from .messages import FluxRenderer
from .options import FluxOptions, OptionError, check_terms
from .session import NO_STATUS, BaseSession

UNKNOWN_MESSAGE_CODE: Final = "UNPARSABLE_CLIENT_MESSAGE"
UNKNOWN_MESSAGE_REASON: Final = "The client message is not one of CloseStream, ForceEndTurn, Configure."
CONFIGURE_FAILURE_CODE: Final = "INVALID_CONFIGURATION"


class FluxSession(BaseSession[FluxEngine, TurnEvent]):
    def __init__(
        self, connection: ServerConnection, *, renderer: FluxRenderer, options: FluxOptions, **kwargs: Any
    ) -> None:
        super().__init__(connection, **kwargs)
        self._renderer = renderer
        self._thresholds = options.thresholds
        self._keyterms = options.keyterms
        self._language_hints = options.language_hints
        self._numerals = options.numerals
        self._multilingual = options.multilingual
        self._seq = 0

    def _next_seq(self) -> int | None:
        """The sequence_id of the next message, or None when nothing can be sent (stalled, closing):
        a message that never leaves must not use up a number, or the client would see a gap."""
        if self.stalled or self.closing:
            return None
        seq = self._seq
        self._seq = seq + 1
        return seq

    async def _opened(self) -> None:
        seq = self._next_seq()
        if seq is not None:
            await self._send(self._renderer.connected(seq), "Connected")

    async def _on_text(self, msg: dict[str, Any], text: str) -> bool:
        kind = msg.get("type")
        if kind == "CloseStream":
            await self._close_stream()
            return True
        if kind == "ForceEndTurn":
            await self._send_events(await self._call(self._engine.force_end_turn))
            return False
        if kind == "Configure":
            await self._configure(msg)
            return False
        await self._fail(1008, UNKNOWN_MESSAGE_REASON, UNKNOWN_MESSAGE_CODE)
        return True

    async def _configure(self, msg: dict[str, Any]) -> None:
        r = self._renderer
        try:
            thresholds = self._thresholds
            if msg.get("thresholds") is not None:
                thresholds = thresholds.merged(msg["thresholds"])
            keyterms = self._keyterms
            if msg.get("keyterms") is not None:
                keyterms = check_terms("keyterms", msg["keyterms"])
            hints = self._language_hints
            if msg.get("language_hints") is not None:
                if not self._multilingual:
                    raise OptionError("language_hints need model=flux-general-multi")
                hints = check_terms("language_hints", msg["language_hints"])
            numerals = self._numerals
            if msg.get("numerals") is not None:
                if not isinstance(msg["numerals"], bool):
                    raise OptionError("numerals must be true or false")
                numerals = msg["numerals"]
        except OptionError as exc:
            # All or nothing: a Configure with one bad part changes nothing.
            seq = self._next_seq()
            if seq is not None:
                await self._send(
                    r.configure_failure(seq, CONFIGURE_FAILURE_CODE, str(exc)), "ConfigureFailure"
                )
            return
        self._thresholds, self._keyterms, self._language_hints, self._numerals = (
            thresholds,
            keyterms,
            hints,
            numerals,
        )
        self._engine.set_thresholds(thresholds)
        seq = self._next_seq()
        if seq is not None:
            shown_hints = hints if self._multilingual else None
            await self._send(
                r.configure_success(seq, thresholds, keyterms, shown_hints, numerals), "ConfigureSuccess"
            )

    async def _close_stream(self) -> None:
        await self._send_events(await self._call(self._engine.close_stream))
        # Flux closes after CloseStream without a status code (Deepgram's Close Stream page): an
        # empty close frame, which clients see as 1005, not the 1000 of v1.
        await self._close(NO_STATUS, "")

    async def _send_events(self, events: list[TurnEvent]) -> None:
        r = self._renderer
        stats = self._stats
        hints = self._language_hints
        for e in events:
            seq = self._next_seq()
            if seq is None:
                return
            await self._send(r.turn_info(e, seq, hints), "TurnInfo")
            if e.event == END_OF_TURN:
                stats.finals_sent += 1
                stats.record_final(r.request_id, e.window_end)

    async def _fail(self, code: int, reason: str, error_code: str, *, drain: bool = True) -> None:
        seq = self._next_seq()
        if seq is not None:
            await self._send(self._renderer.error(seq, error_code, reason), "Error")
        # Always behind the Error (and anything delayed before it), so the client reads why.
        await self._close(code, reason, drain=True)
