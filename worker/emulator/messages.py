"""Deepgram's live JSON messages, rendered from engine events.

`/v1/listen` (`Renderer`): the shapes follow deepgram-sdk's `ListenV1Results`, `ListenV1Metadata`,
`ListenV1SpeechStarted`, `ListenV1UtteranceEnd`, `ListenV1ConfigureSuccess` and `ListenV1Error`
models, so the SDK parses every message into its typed class. Fields that are constant for a
connection are built once.

`/v2/listen` (`FluxRenderer`): `ListenV2Connected`, `ListenV2TurnInfo`, `ListenV2ConfigureSuccess`,
`ListenV2ConfigureFailure` and `ListenV2FatalError` (the emulator has no cause for a `Warning`);
each carries the connection's `sequence_id`, which the session counts (0 for the first message, +1
per message).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import UTC, datetime
from typing import Any

from .events import SpeechStarted, Transcript, UtteranceEnd
from .flux import END_OF_TURN, TurnEvent
from .options import Thresholds

_dumps = json.JSONEncoder(separators=(",", ":")).encode
_quote = json.encoder.encode_basestring_ascii  # the C string encoder behind json.dumps
_BOOL = {True: "true", False: "false"}


def model_uuid(model: str, engine: str) -> str:
    # Stable per model and engine, like Deepgram's model uuids, so clients can compare them.
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"voxqueue-emulator/{engine}/{model}"))


def created_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class Renderer:
    """Renders the messages of one connection."""

    def __init__(
        self, *, request_id: str, model: str, engine: str, channels: int = 1, multichannel: bool = False
    ) -> None:
        self.request_id = request_id
        self.channels = channels
        # Deepgram's channel_index is [channel, channel count] with multichannel, and [0, 1]
        # without it (the channels are transcribed as one).
        self.result_channels = channels if multichannel else 1
        self.created = created_now()
        self.model_uuid = model_uuid(model, engine)
        # Say plainly that this is the emulator: a transcript in a log must never pass for Deepgram's.
        self.model_info = {"name": model, "version": f"voxqueue-emulator-{engine}", "arch": engine}
        self._metadata_json = _dumps(
            {"request_id": request_id, "model_info": self.model_info, "model_uuid": self.model_uuid}
        )

    def results(self, t: Transcript, channel: int = 0) -> str:
        # Built by string formatting, not json.dumps of nested dicts: a final of 25 words renders
        # about 3x faster, and at hundreds of connections results are the bulk of the output. Strings
        # go through the C JSON string encoder and floats through repr(), which is valid JSON.
        q = _quote
        words = ",".join(
            [
                f'{{"word":{q(w.word)},"start":{w.start!r},"end":{w.end!r},'
                f'"confidence":{w.confidence!r},"punctuated_word":{q(w.punctuated_word)}}}'
                for w in t.words
            ]
        )
        transcript = t.text if t.text is not None else " ".join([w.punctuated_word for w in t.words])
        confidence = round(sum([w.confidence for w in t.words]) / len(t.words), 6) if t.words else 0.0
        # Deepgram adds from_finalize only to the result that answers a Finalize.
        tail = ',"from_finalize":true}' if t.from_finalize else "}"
        return (
            f'{{"type":"Results","channel_index":[{channel},{self.result_channels}],'
            f'"duration":{float(t.duration)!r},'
            f'"start":{float(t.start)!r},"is_final":{_BOOL[t.is_final]},'
            f'"speech_final":{_BOOL[t.speech_final]},"channel":{{"alternatives":[{{'
            f'"transcript":{q(transcript)},"confidence":{float(confidence)!r},"words":[{words}]}}]}},'
            f'"metadata":{self._metadata_json}{tail}'
        )

    def speech_started(self, e: SpeechStarted, channel: int = 0) -> str:
        return _dumps({"type": "SpeechStarted", "channel": [channel], "timestamp": e.timestamp})

    def utterance_end(self, e: UtteranceEnd, channel: int = 0) -> str:
        return _dumps(
            {
                "type": "UtteranceEnd",
                "channel": [channel, self.result_channels],
                "last_word_end": e.last_word_end,
            }
        )

    def metadata(self, duration: float) -> str:
        # Deepgram's sha256 is of the audio; hashing every frame would cost CPU on the hot path for a
        # value no client checks, so this is a stable digest of the request id and the duration.
        digest = hashlib.sha256(f"{self.request_id}:{duration}".encode()).hexdigest()
        return _dumps(
            {
                "type": "Metadata",
                "transaction_key": "deprecated",
                "request_id": self.request_id,
                "sha256": digest,
                "created": self.created,
                "duration": duration,
                "channels": self.channels,
                "models": [self.model_uuid],
                "model_info": {self.model_uuid: self.model_info},
            }
        )

    def configure_success(self, keyterms: list[str] | None) -> str:
        msg: dict[str, Any] = {"type": "ConfigureSuccess", "request_id": self.request_id}
        if keyterms is not None:
            msg["keyterms"] = keyterms
        return _dumps(msg)

    def error(self, description: str, message: str) -> str:
        return _dumps(
            {"type": "Error", "variant": "SchemaError", "description": description, "message": message}
        )


class FluxRenderer:
    """Renders the `/v2/listen` messages of one connection; `seq` is the message's sequence_id."""

    def __init__(self, *, request_id: str, multilingual: bool = False) -> None:
        self.request_id = request_id
        self._rid = _quote(request_id)
        # flux-general-multi reports languages on every TurnInfo; flux-general-en never does.
        self.multilingual = multilingual

    def connected(self, seq: int) -> str:
        return _dumps({"type": "Connected", "request_id": self.request_id, "sequence_id": seq})

    def turn_info(self, e: TurnEvent, seq: int, languages_hinted: tuple[str, ...] = ()) -> str:
        # String formatting as in Renderer.results: TurnInfo is the bulk of a Flux connection's output.
        q = _quote
        words = ",".join(
            [
                f'{{"word":{q(w.punctuated_word)},"confidence":{w.confidence!r},'
                f'"start":{w.start!r},"end":{w.end!r}}}'
                for w in e.words
            ]
        )
        transcript = " ".join([w.punctuated_word for w in e.words])
        tail = f',"trigger":{q(e.trigger or "model")}' if e.event == END_OF_TURN else ""
        if self.multilingual:
            # The marker and speech engines only know English: "en" once a word was heard.
            languages = '["en"]' if e.words else "[]"
            hinted = _dumps(list(languages_hinted))
            tail += f',"languages":{languages},"languages_hinted":{hinted}'
        return (
            f'{{"type":"TurnInfo","request_id":{self._rid},"sequence_id":{seq},'
            f'"event":{q(e.event)},"turn_index":{e.turn_index},'
            f'"audio_window_start":{float(e.window_start)!r},"audio_window_end":{float(e.window_end)!r},'
            f'"transcript":{q(transcript)},"words":[{words}],'
            f'"end_of_turn_confidence":{float(e.end_of_turn_confidence)!r}{tail}}}'
        )

    def configure_success(
        self,
        seq: int,
        thresholds: Thresholds,
        keyterms: tuple[str, ...],
        language_hints: tuple[str, ...] | None,
        numerals: bool,
    ) -> str:
        # The whole configuration now in force, not only what the Configure changed.
        msg: dict[str, Any] = {
            "type": "ConfigureSuccess",
            "request_id": self.request_id,
            "sequence_id": seq,
            "thresholds": thresholds.to_json(),
            "keyterms": list(keyterms),
            "numerals": numerals,
        }
        if language_hints is not None:
            msg["language_hints"] = list(language_hints)
        return _dumps(msg)

    def configure_failure(self, seq: int, code: str, description: str) -> str:
        return _dumps(
            {
                "type": "ConfigureFailure",
                "request_id": self.request_id,
                "sequence_id": seq,
                "code": code,
                "description": description,
            }
        )

    def error(self, seq: int, code: str, description: str) -> str:
        """The fatal error: Deepgram closes the connection right after it."""
        return _dumps({"type": "Error", "sequence_id": seq, "code": code, "description": description})


def http_error_body(err_code: str, err_msg: str, request_id: str) -> str:
    """The JSON body Deepgram sends with a rejected handshake."""
    return _dumps({"err_code": err_code, "err_msg": err_msg, "request_id": request_id})
