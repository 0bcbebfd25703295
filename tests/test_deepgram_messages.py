"""The lean decoder reads every Deepgram message exactly as the SDK's own models do."""

from __future__ import annotations

import json
from typing import Any

import pytest
from deepgram.core.unchecked_base_model import construct_type
from deepgram.listen.v1.socket_client import V1SocketClientResponse

from worker import deepgram_messages as dm

RESULTS: dict[str, Any] = {
    "type": "Results",
    "channel_index": [0, 1],
    "duration": 1.04,
    "start": 2.5,
    "is_final": True,
    "speech_final": True,
    "from_finalize": False,
    "channel": {
        "alternatives": [
            {
                "transcript": "Hello world.",
                "confidence": 0.98,
                "words": [
                    {
                        "word": "hello",
                        "start": 2.6,
                        "end": 2.9,
                        "confidence": 0.99,
                        "punctuated_word": "Hello",
                        "speaker": 0,
                    },
                    {
                        "word": "world",
                        "start": 3.0,
                        "end": 3.4,
                        "confidence": 0.97,
                        "punctuated_word": "world.",
                    },
                ],
            }
        ]
    },
    "metadata": {
        "request_id": "r-1",
        "model_info": {"name": "n", "version": "v", "arch": "a"},
        "model_uuid": "u",
    },
}
MESSAGES = [
    RESULTS,
    {
        **RESULTS,
        "is_final": False,
        "speech_final": False,
        "channel": {"alternatives": [{"transcript": "", "confidence": 0.0, "words": []}]},
    },
    {"type": "SpeechStarted", "channel": [0], "timestamp": 1.25},
    {"type": "UtteranceEnd", "channel": [0, 1], "last_word_end": 3.4},
    {
        "type": "Metadata",
        "transaction_key": "deprecated",
        "request_id": "r-1",
        "sha256": "x",
        "created": "2026-01-01T00:00:00.000Z",
        "duration": 4.2,
        "channels": 1,
    },
    {"type": "Error", "variant": "SchemaError", "description": "bad", "message": "m"},
]


def same(lean: Any, sdk: Any) -> None:
    """Every field the lean class has reads the same on the SDK's model."""
    for name in lean.__slots__:
        a, b = getattr(lean, name), getattr(sdk, name)
        if isinstance(a, list) and not any(hasattr(x, "__slots__") for x in a):
            assert a == b, (name, a, b)  # plain values (channel_index)
        elif isinstance(a, list):
            assert len(a) == len(b), name
            for x, y in zip(a, b, strict=True):
                same(x, y)
        elif hasattr(a, "__slots__"):
            same(a, b)
        else:
            assert a == b, (name, a, b)


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: m["type"])
def test_lean_decoding_matches_the_sdk(message: dict[str, Any]) -> None:
    raw = json.dumps(message)
    sdk = construct_type(type_=V1SocketClientResponse, object_=json.loads(raw))
    same(dm.decode(raw), sdk)


@pytest.mark.parametrize(
    "raw", ["not json", '{"no": "type"}', '{"type": "Brand new"}', '{"type": "Results"}']
)
def test_unknown_or_malformed_messages_are_refused(raw: str) -> None:
    with pytest.raises(dm.UnknownMessage):
        dm.decode(raw)


def _results_with(**changes: Any) -> str:
    message = json.loads(json.dumps(RESULTS))
    for path, value in changes.items():
        target = message
        *parents, leaf = path.split("__")
        for name in parents:
            target = target[int(name)] if isinstance(target, list) else target[name]
        target[leaf] = value
    return json.dumps(message)


@pytest.mark.parametrize(
    "raw",
    [
        "[" * 100_000 + "]" * 100_000,  # RecursionError in json
        '{"type": ["Results"]}',  # unhashable type
        "[1, 2]",
        '{"type": "Results", "start": "x", "duration": 1}',
        _results_with(start=float("nan")),
        _results_with(duration=float("inf")),
        _results_with(start=-1),
        _results_with(start=True),
        _results_with(channel__alternatives=[{"transcript": "a", "confidence": 1, "words": [5]}]),
        _results_with(channel__alternatives__0__words__0__start="soon"),
        _results_with(metadata=[1]),
        '{"type": "SpeechStarted", "timestamp": null}',
        _results_with(channel_index=[2, 2]),
        _results_with(channel_index=[0, "1"]),
        _results_with(channel_index=[0, 1, 2]),
        _results_with(channel_index={"0": 1}),
        '{"type": "SpeechStarted", "timestamp": 1, "channel": [-1]}',
        '{"type": "UtteranceEnd", "last_word_end": 1e999}',
        " " * (dm.MAX_MESSAGE_BYTES + 1),
    ],
    ids=lambda raw: raw[:40],
)
def test_hostile_messages_are_refused_one_by_one_never_raised(raw: str) -> None:
    """Whatever a server (or something posing as one) sends, the decoder's only failure is
    UnknownMessage: the runner logs and skips it, the connection and the worker go on."""
    with pytest.raises(dm.UnknownMessage):
        dm.decode(raw)


def test_multichannel_messages_decode_like_the_sdk_and_name_their_channel() -> None:
    message = json.loads(json.dumps(RESULTS))
    message["channel_index"] = [1, 2]
    raw = json.dumps(message)
    lean = dm.decode(raw)
    same(lean, construct_type(type_=V1SocketClientResponse, object_=json.loads(raw)))
    assert isinstance(lean, dm.Results) and lean.channel_number == 1
    for other in (
        {"type": "SpeechStarted", "channel": [1], "timestamp": 1.25},
        {"type": "UtteranceEnd", "channel": [1, 2], "last_word_end": 3.4},
    ):
        raw = json.dumps(other)
        decoded = dm.decode(raw)
        same(decoded, construct_type(type_=V1SocketClientResponse, object_=json.loads(raw)))
        assert getattr(decoded, "channel", None)[0] == 1  # type: ignore[index]
