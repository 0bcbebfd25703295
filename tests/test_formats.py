"""Audio formats in the wire contract, and the options a session may ask for (docs/protocol.md)."""

from __future__ import annotations

from typing import Any

import pytest

from producer import options as o
from producer import protocol as p


@pytest.mark.parametrize(
    ("encoding", "rate", "channels", "frame_ms", "frame_bytes"),
    [
        ("linear16", 16000, 1, 20, 640),
        ("linear16", 8000, 1, 20, 320),
        ("linear16", 24000, 1, 20, 960),
        ("linear16", 32000, 1, 20, 1280),
        ("linear16", 44100, 1, 20, 1764),
        ("linear16", 48000, 2, 20, 3840),
        ("linear16", 48000, 1, 10, 960),
        ("mulaw", 8000, 1, 20, 160),
        ("alaw", 8000, 2, 20, 320),
        ("mulaw", 8000, 1, 250, 2000),
    ],
)
def test_supported_formats_and_their_frame_sizes(
    encoding: str, rate: int, channels: int, frame_ms: int, frame_bytes: int
) -> None:
    fmt = p.AudioFormat(encoding, rate, channels, frame_ms)
    fmt.validate()
    assert fmt.frame_bytes == frame_bytes
    start = p.SessionStart.from_fields(p.SessionStart("s1", fmt).to_fields())
    assert start.format == fmt


@pytest.mark.parametrize(
    ("encoding", "rate", "channels", "frame_ms", "words"),
    [
        ("mulaw", 16000, 1, 20, "sample_rate 16000 is not supported for mulaw"),
        ("alaw", 48000, 1, 20, "sample_rate 48000 is not supported for alaw"),
        ("linear16", 16000, 3, 20, "channels 3 is not supported"),
        ("linear16", 16000, 0, 20, "channels 0 is not supported"),
        ("linear16", 22050, 1, 20, "sample_rate 22050"),
        ("opus", 48000, 1, 20, "encoding 'opus' is not supported"),
        ("linear16", 44100, 1, 15, "frame_ms 15 is not supported at 44100 Hz"),
        ("linear16", 16000, 1, 5, "frame_ms 5"),
    ],
)
def test_bad_combinations_are_bad_format(
    encoding: str, rate: int, channels: int, frame_ms: int, words: str
) -> None:
    fields = p.SessionStart("s1").to_fields()
    fields.update(encoding=encoding, sample_rate=str(rate), channels=str(channels), frame_ms=str(frame_ms))
    with pytest.raises(p.ProtocolError) as err:
        p.SessionStart.from_fields(fields)
    assert err.value.code == "bad_format"
    assert words in str(err.value)


@pytest.mark.parametrize(
    ("fmt", "size"),
    [(p.AudioFormat("mulaw", 8000), 160), (p.AudioFormat("linear16", 48000, 2), 3840)],
)
def test_a_frame_of_the_wrong_size_for_its_format_is_bad_frame_size(fmt: p.AudioFormat, size: int) -> None:
    assert isinstance(p.decode_audio_entry({b"seq": b"0", b"pcm": bytes(size)}, fmt.frame_bytes), p.Frame)
    # 640 bytes is the default format's frame: wrong for μ-law and for 48 kHz stereo.
    with pytest.raises(p.ProtocolError) as err:
        p.decode_audio_entry({b"seq": b"0", b"pcm": bytes(640)}, fmt.frame_bytes)
    assert err.value.code == "bad_frame_size"
    assert f"expected {size}" in str(err.value)


def test_the_worker_passes_the_format_unchanged_and_sets_multichannel() -> None:
    mono = o.connect_kwargs({}, p.AudioFormat("mulaw", 8000))
    assert mono == {"model": o.DEFAULT_MODEL, "encoding": "mulaw", "sample_rate": "8000", "channels": "1"}
    stereo = o.connect_kwargs({"no_delay": "true"}, p.AudioFormat("linear16", 48000, 2))
    assert stereo["multichannel"] == "true" and stereo["channels"] == "2"
    assert stereo["sample_rate"] == "48000" and stereo["no_delay"] == "true"


@pytest.mark.parametrize(
    "name", ["multichannel", "channels", "encoding", "sample_rate", "callback", "callback_method"]
)
def test_producers_may_not_set_format_or_callback_options(name: str) -> None:
    with pytest.raises(p.ProtocolError) as err:
        o.validate_options({name: "true"})
    assert err.value.code == "option_not_allowed"


def test_harmless_live_options_are_allowed() -> None:
    assert o.validate_options({"no_delay": True, "diarize": "true"}) == {
        "no_delay": "true",
        "diarize": "true",
    }


def test_a_deployment_extends_the_allow_list_but_never_with_callback() -> None:
    extra = o.parse_extra_options("diarize_model:str, redact_pii:bool")
    assert extra == {"diarize_model": "str", "redact_pii": "bool"}
    with pytest.raises(p.ProtocolError):
        o.validate_options({"redact_pii": True})
    o.install_extra_options(extra)
    try:
        assert o.validate_options({"redact_pii": True, "diarize_model": "x-1"}) == {
            "redact_pii": "true",
            "diarize_model": "x-1",
        }
        with pytest.raises(p.ProtocolError) as err:
            o.validate_options({"redact_pii": "maybe"})
        assert err.value.code == "bad_option"
    finally:
        o.install_extra_options({})
    for spec in ("callback:str", "callback_method:str", "multichannel:bool", "x:float", "Bad:str", "y"):
        with pytest.raises(ValueError):
            o.parse_extra_options(spec)
    with pytest.raises(ValueError):
        o.install_extra_options({"callback": "str"})


def test_the_worker_setting_refuses_callback_and_installs_the_extension(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from worker.config import ConfigError, load_settings

    url = "ws://127.0.0.1:9/v1/listen"
    with pytest.raises(ConfigError) as err:
        load_settings(deepgram_url=url, extra_options="callback:str")
    assert "extra_options" in str(err.value)
    try:
        settings = load_settings(deepgram_url=url, extra_options="language_hint:str_list")
        assert settings.extra_options_map == {"language_hint": "str_list"}
        assert o.validate_options({"language_hint": "en"}) == {"language_hint": ["en"]}
    finally:
        o.install_extra_options({})


async def test_options_the_sdk_has_no_keyword_for_reach_deepgram() -> None:
    """`no_delay` and `filler_words` are not keywords of the SDK's connect(): they go on the query
    string through additional_query_parameters (a keyword would be a TypeError at connect)."""
    from worker.deepgram_link import DeepgramLink
    from worker.emulator import EmulatorServer

    async with EmulatorServer(port=0) as emu:
        seen: list[Any] = []
        original = emu._make_engine

        def spy(options: Any) -> Any:
            seen.append(options)
            return original(options)

        emu._make_engine = spy  # type: ignore[method-assign]
        link = DeepgramLink(emu.url, "", 5.0)
        options = o.validate_options({"no_delay": True, "filler_words": True})
        async with link.connect(options, p.AudioFormat("linear16", 48000, 2)) as conn:
            await conn.send_close_stream()
            async for _ in conn:
                pass
    heard = seen[0]  # the connection's options (then one mono engine per channel)
    assert heard.extra == {"no_delay": "true", "filler_words": "true"}
    assert (heard.multichannel, heard.sample_rate, heard.channels, heard.encoding) == (
        True,
        48000,
        2,
        "linear16",
    )
