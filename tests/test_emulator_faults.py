"""Injected faults of the Deepgram emulator, each observed from the real deepgram-sdk."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from deepgram.core.api_error import ApiError
from deepgram.listen.v1.types import ListenV1Metadata, ListenV1Results
from websockets.exceptions import ConnectionClosedError

from tests.test_emulator import KEY, SILENCE, http_get, listen, marker, read_all
from worker.emulator import EmulatorServer, FaultPlan
from worker.emulator.faults import FaultInjector, FaultPlanError


@pytest.fixture
async def emu() -> AsyncIterator[EmulatorServer]:
    async with EmulatorServer(engine="marker", port=0, keys={KEY}) as server:
        yield server


async def send_frames(conn: object, count: int, first: int = 0) -> None:
    for i in range(first, first + count):
        await conn.send_media(marker(i))  # type: ignore[attr-defined]


# --------------------------------------------------------------------- the plan (pure)


def test_fault_plan_is_seeded_and_validated() -> None:
    plan = FaultPlan.from_params(
        {"drop_rate": "0.5", "drop_after_min": "5", "drop_after_max": "50", "seed": "7"}
    )
    a, b = FaultInjector(plan), FaultInjector(plan)
    fates_a = [a.for_connection() for _ in range(50)]
    assert fates_a == [b.for_connection() for _ in range(50)]
    drops = [f for f in fates_a if f.drop_at is not None]
    assert 10 < len(drops) < 40
    assert all(5 <= f.drop_at <= 50 for f in drops)  # type: ignore[operator]
    assert {f.drop_kind for f in drops} == {"close", "abrupt"}
    only_close = FaultInjector(FaultPlan(drop_rate=1.0, drop_kind="close", seed=1))
    assert {only_close.for_connection().drop_kind for _ in range(10)} == {"close"}
    for bad in ({"drop_rate": "2"}, {"drop_kind": "x"}, {"handshake_status": "200"}, {"nope": "1"}):
        with pytest.raises(FaultPlanError):
            FaultPlan.from_params(bad)
    counted = FaultInjector(FaultPlan(handshake_status=429, handshake_count=2, stall_next=1))
    assert [counted.handshake_fault() for _ in range(3)] == [429, 429, None]
    assert counted.for_connection().stall_at == 20 and counted.for_connection().stall_at is None


# --------------------------------------------------------------------- through the SDK


async def test_drop_with_close_frame_is_1011(emu: EmulatorServer) -> None:
    emu.set_faults({"drop_rate": 1, "drop_kind": "close", "drop_after_min": 10, "drop_after_max": 10})
    async with listen(emu) as conn:
        await send_frames(conn, 12)
        with pytest.raises(ConnectionClosedError) as info:
            await read_all(conn)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1011
    assert info.value.rcvd.reason.startswith("NET-")
    stats = emu.stats_json()
    assert stats["drops"] == {"close": 1} and stats["close_codes"] == {"1011": 1}


async def test_abrupt_drop_has_no_close_frame(emu: EmulatorServer) -> None:
    status, _ = await http_get(
        emu, "/_emulator/faults?drop_rate=1&drop_kind=abrupt&drop_after_min=5&drop_after_max=5"
    )
    assert status == 200
    async with listen(emu) as conn:
        await send_frames(conn, 6)
        with pytest.raises(ConnectionClosedError) as info:
            await read_all(conn)
    assert info.value.rcvd is None  # no close frame: the client reports 1006
    assert conn._websocket.close_code == 1006
    assert emu.stats_json()["drops"] == {"abrupt": 1}


async def test_fail_after_frames_only_for_the_counted_connections(emu: EmulatorServer) -> None:
    emu.set_faults(FaultPlan(fail_after_frames=30, fail_count=1))
    async with listen(emu) as conn:
        await send_frames(conn, 31)
        with pytest.raises(ConnectionClosedError) as info:
            await read_all(conn)
        # The final at 25 frames (0.5 s) arrived before the failure.
        assert info.value.rcvd is not None and info.value.rcvd.code == 1011
    async with listen(emu) as conn:
        await send_frames(conn, 31)
        await conn.send_close_stream()
        assert isinstance((await read_all(conn))[-1], ListenV1Metadata)


async def test_handshake_429_for_the_next_two_then_accepted(emu: EmulatorServer) -> None:
    await http_get(emu, "/_emulator/faults?handshake_status=429&handshake_count=2")
    for _ in range(2):
        with pytest.raises(ApiError) as info:
            async with listen(emu):
                pass
        assert info.value.status_code == 429
    async with listen(emu) as conn:
        await conn.send_close_stream()
        await read_all(conn)
    assert emu.stats_json()["handshakes_rejected"] == {"429": 2}
    emu.set_faults({"handshake_status": 500, "handshake_count": -1})
    for _ in range(2):
        with pytest.raises(ApiError) as info:
            async with listen(emu):
                pass
        assert info.value.status_code == 500


async def test_half_open_stall(emu: EmulatorServer) -> None:
    emu.set_faults({"stall_next": 1, "stall_after": 30})
    async with listen(emu) as stalled, listen(emu) as healthy:
        await send_frames(stalled, 100)  # sends keep succeeding after the stall
        await stalled.send_finalize()
        await send_frames(healthy, 30)
        got = await asyncio.wait_for(healthy.recv(), 2)
        assert isinstance(got, ListenV1Results) and got.is_final
        first = await asyncio.wait_for(stalled.recv(), 1)  # the final at 25 frames came before the stall
        assert isinstance(first, ListenV1Results) and first.duration == 0.5
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(stalled.recv(), 1.0)
        await send_frames(stalled, 10, first=100)
        await stalled.send_close_stream()  # not even CloseStream is answered
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(stalled.recv(), 0.5)
    stats = emu.stats_json()
    assert stats["stalls"] == 1 and stats["frames_received"] == 140


async def test_slow_results_are_delayed_in_order(emu: EmulatorServer) -> None:
    emu.set_faults({"slow_results_ms": 300})
    async with listen(emu) as conn:
        started = time.monotonic()
        await send_frames(conn, 25)
        await conn.send_media(SILENCE)
        await conn.send_finalize()
        await conn.send_close_stream()
        messages = await read_all(conn)
        elapsed = time.monotonic() - started
    assert elapsed >= 0.3
    assert [type(m).__name__ for m in messages] == ["ListenV1Results", "ListenV1Results", "ListenV1Metadata"]
    assert messages[0].start == 0.0 and messages[1].start == 0.5 and messages[1].from_finalize
