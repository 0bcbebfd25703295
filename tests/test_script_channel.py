"""The commit path's pipelined connection (worker/script_channel.py), against a real redis-server:
calls of one loop iteration share a write, replies reach their own callers (also after a caller
gave up), Redis's errors arrive as redis-py's exceptions, a lost connection fails the calls in
flight with ConnectionError and the next call reconnects, a forgotten script is loaded again, and
a client whose connections cannot be taken over leaves the calls to redis-py."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from producer import batcher
from producer import protocol as p
from producer.resp import pack_evalsha
from tests.harness import bounded
from tests.test_fencing import KEYS, final, start_session, store_for
from worker.ledger import Commit
from worker.redis_server import RedisServer
from worker.script_channel import ScriptChannel
from worker.store import Fenced, connect_redis

ECHO = "return {KEYS[1], ARGV[1], ARGV[2]}"
# Keeps Redis busy for 0.3 s, so that a call is certainly in flight while the server goes away.
BUSY_300_MS = """
local t = redis.call('TIME')
while true do
  local n = redis.call('TIME')
  if (n[1] - t[1]) * 1000000 + n[2] - t[2] > 300000 then return 1 end
end"""
TIMEOUT = 10.0


def count_writes(channel: ScriptChannel) -> list[int]:
    """How many bytes each write of the channel's socket carried (the transport's own write,
    wrapped: what is counted is our calls, not Redis)."""
    assert channel.transport is not None
    sizes: list[int] = []
    write = channel.transport.write

    def counted(data: Any) -> None:
        sizes.append(len(data))
        write(data)

    channel.transport.write = counted  # type: ignore[method-assign]
    return sizes


def test_evalsha_is_packed_as_redis_py_packs_it() -> None:
    packed = pack_evalsha("ab" * 20, ["k1", "ké"], [7, "ü", b"\x00\xff", ""])
    expected = (
        aioredis.Redis()
        .connection_pool.connection_class()
        .pack_command("EVALSHA", "ab" * 20, 2, "k1", "ké", 7, "ü", b"\x00\xff", "")
    )
    assert packed == b"".join(expected)


async def test_calls_of_one_iteration_share_one_write_and_each_gets_its_reply(
    redis_client: aioredis.Redis,
) -> None:
    channel = ScriptChannel(redis_client)
    script = redis_client.register_script(ECHO)
    assert await bounded(channel.call(script, ["k"], [0, "first"]), TIMEOUT, "call") == [b"k", b"0", b"first"]
    writes = count_writes(channel)
    replies = await bounded(
        asyncio.gather(*(channel.call(script, [f"key{i}"], [i, b"x" * i]) for i in range(50))),
        TIMEOUT,
        "50 calls",
    )
    assert replies == [[f"key{i}".encode(), b"%d" % i, b"x" * i] for i in range(50)]
    assert len(writes) == 1  # fifty calls, one write
    channel.close()


async def test_a_caller_that_gave_up_does_not_shift_the_replies_of_the_others(
    redis_client: aioredis.Redis,
) -> None:
    channel = ScriptChannel(redis_client)
    script = redis_client.register_script(ECHO)
    await bounded(channel.call(script, ["k"], [0, ""]), TIMEOUT, "connect")
    gone = asyncio.create_task(channel.call(script, ["gone"], [1, "a"]))
    kept = asyncio.create_task(channel.call(script, ["kept"], [2, "b"]))
    await asyncio.sleep(0)  # both queued; the write happens after this iteration
    gone.cancel()
    assert await bounded(kept, TIMEOUT, "kept") == [b"kept", b"2", b"b"]
    assert await bounded(channel.call(script, ["next"], [3, "c"]), TIMEOUT, "next") == [b"next", b"3", b"c"]
    channel.close()


async def test_redis_errors_arrive_as_redis_py_exceptions(redis_client: aioredis.Redis) -> None:
    channel = ScriptChannel(redis_client)
    await redis_client.set("a-string", "x")
    wrongtype = redis_client.register_script("return redis.call('XLEN', KEYS[1])")
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await bounded(channel.call(wrongtype, ["a-string"], []), TIMEOUT, "wrongtype")
    refused = redis_client.register_script("return redis.error_reply('MYERR refused here')")
    with pytest.raises(ResponseError, match="refused here"):
        await bounded(channel.call(refused, [], []), TIMEOUT, "error reply")
    # and the connection is still in step: the next reply is the next call's
    ok = redis_client.register_script(ECHO)
    assert await bounded(channel.call(ok, ["k"], [1, "y"]), TIMEOUT, "after errors") == [b"k", b"1", b"y"]
    channel.close()


async def test_a_script_redis_forgot_is_loaded_again(redis_client: aioredis.Redis) -> None:
    channel = ScriptChannel(redis_client)
    script = redis_client.register_script(ECHO)
    assert await bounded(channel.call(script, ["k"], [1, "a"]), TIMEOUT, "first") == [b"k", b"1", b"a"]
    await redis_client.script_flush()
    assert await bounded(channel.call(script, ["k"], [2, "b"]), TIMEOUT, "after flush") == [b"k", b"2", b"b"]
    channel.close()


async def test_a_lost_connection_fails_the_calls_in_flight_and_the_next_call_reconnects(
    redis_server: RedisServer,
) -> None:
    client = connect_redis(redis_server.url)  # as the worker's: its pool rides out a dead connection
    try:
        channel = ScriptChannel(client)
        busy = client.register_script(BUSY_300_MS)
        await bounded(channel.call(busy, [], []), TIMEOUT, "connect")
        in_flight = asyncio.create_task(channel.call(busy, [], []))
        await bounded(_written(channel), TIMEOUT, "the call written")
        redis_server.stop(kill=True)  # with the call written and not answered
        with pytest.raises(RedisConnectionError):
            await bounded(in_flight, TIMEOUT, "in flight")
        redis_server.start()  # a new Redis process: it knows no script either
        echo = client.register_script(ECHO)
        assert await bounded(channel.call(echo, ["k"], [1, "z"]), TIMEOUT, "reconnected") == [
            b"k",
            b"1",
            b"z",
        ]
        channel.close()
    finally:
        await bounded(client.aclose(), 5, "closing the client")


async def test_the_channel_authenticates_as_the_client_does(redis_server: RedisServer) -> None:
    admin = aioredis.Redis.from_url(redis_server.url)
    await admin.config_set("requirepass", "s3cret/with?odd#chars")
    await admin.aclose()
    client = aioredis.Redis(host="127.0.0.1", port=redis_server.port, password="s3cret/with?odd#chars")
    try:
        channel = ScriptChannel(client)
        script = client.register_script(ECHO)
        assert await bounded(channel.call(script, ["k"], [1, "a"]), TIMEOUT, "authed") == [b"k", b"1", b"a"]
        channel.close()
    finally:
        await client.aclose()


async def test_without_a_takeable_connection_the_store_commits_through_redis_py(
    redis_client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def refuse(client: aioredis.Redis, protocol: asyncio.Protocol) -> Any:
        raise batcher.CannotTakeOver("not an asyncio stream (test)")

    monkeypatch.setattr("worker.script_channel.take_over", refuse)
    store = store_for(redis_client)
    sk = KEYS.session("s")
    entry = await start_session(redis_client, "s", "w1")
    await redis_client.xadd(sk.audio, p.frame_fields(0, bytes(640)))
    first = await store.acquire(sk, "w1", 5, entry)
    commit = store.commit(sk, first.epoch, Commit(0, 24, b"1-24"), final("s", 0, 24))
    assert await bounded(commit, TIMEOUT, "commit") == "ok"
    assert store.channel is not None and not store.channel.usable
    assert await redis_client.xlen(sk.results) >= 1
    assert await redis_client.hget(sk.state, "committed_seq") == b"24"
    # and fencing still holds on that path
    with pytest.raises(Fenced):
        await store.commit(sk, first.epoch + 1, Commit(25, 49, b"1-49"), final("s", 25, 49))


async def _written(channel: ScriptChannel) -> None:
    while not channel._inflight:
        await asyncio.sleep(0)


async def test_a_call_while_redis_is_down_fails_with_a_connection_error(redis_server: RedisServer) -> None:
    client = connect_redis(redis_server.url, retries=0)
    try:
        channel = ScriptChannel(client)
        script = client.register_script(ECHO)
        redis_server.stop(kill=True)
        with pytest.raises(RedisConnectionError):
            await bounded(channel.call(script, ["k"], [1, "a"]), TIMEOUT, "call with Redis down")
        assert channel.usable  # an outage is not a reason to give the channel up
        redis_server.start()
        assert await bounded(channel.call(script, ["k"], [2, "b"]), TIMEOUT, "after") == [b"k", b"2", b"b"]
        channel.close()
    finally:
        await bounded(client.aclose(), 5, "closing the client")


def test_a_channel_used_from_a_new_event_loop_connects_again(redis_server: RedisServer) -> None:
    """A connection belongs to the loop that opened it (pytest-asyncio gives every test its own)."""
    client = aioredis.Redis.from_url(redis_server.url)
    channel = ScriptChannel(client)
    script = client.register_script(ECHO)
    for run in range(2):
        reply = asyncio.run(asyncio.wait_for(channel.call(script, ["k"], [run, "x"]), TIMEOUT))
        assert reply == [b"k", b"%d" % run, b"x"]
    channel.close()


async def test_close_fails_the_calls_in_flight(redis_client: aioredis.Redis) -> None:
    channel = ScriptChannel(redis_client)
    busy = redis_client.register_script(BUSY_300_MS)
    await bounded(channel.call(busy, [], []), TIMEOUT, "connect")
    in_flight = asyncio.create_task(channel.call(busy, [], []))
    await bounded(_written(channel), TIMEOUT, "the call written")
    channel.close()
    with pytest.raises(RedisConnectionError):
        await bounded(in_flight, TIMEOUT, "in flight at close")


class HostileServer:
    """Answers redis-py's connection handshake with +OK, then every EVALSHA with `answer`:
    what a broken proxy or a corrupted stream could send."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.connections = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        parser = __import__("hiredis").Reader()
        try:
            while data := await reader.read(65536):
                parser.feed(data)
                while (command := parser.gets()) is not False:
                    writer.write(self.answer if command[0].upper() == b"EVALSHA" else b"+OK\r\n")
        finally:
            writer.close()


@pytest.mark.parametrize(
    "answer",
    # not RESP; a RESP3 map keyed by an array (hiredis raises TypeError: unhashable);
    # a reply more than the calls
    [b"?what\r\n", b"%1\r\n*1\r\n:1\r\n:2\r\n", b":1\r\n:2\r\n"],
    ids=["unreadable", "unhashable", "unsolicited"],
)
async def test_a_reply_that_breaks_the_protocol_drops_the_connection(answer: bytes) -> None:
    hostile = HostileServer(answer)
    server = await asyncio.start_server(hostile.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = aioredis.Redis(host="127.0.0.1", port=port)
    loop = asyncio.get_running_loop()
    loop_errors: list[str] = []  # the event loop's "Fatal error: protocol.data_received() failed"
    loop.set_exception_handler(lambda _, context: loop_errors.append(context["message"]))
    try:
        channel = ScriptChannel(client)
        script = client.register_script(ECHO)
        if not answer.startswith(b":"):
            with pytest.raises(RedisConnectionError):
                await bounded(channel.call(script, ["k"], [1, "a"]), TIMEOUT, "unreadable reply")
        else:  # the first reply is taken as the call's; the extra one drops the connection
            assert await bounded(channel.call(script, ["k"], [1, "a"]), TIMEOUT, "first") == 1
            await bounded(_dropped(channel), TIMEOUT, "the connection dropped")
        assert channel.transport is None
        with contextlib.suppress(RedisConnectionError):
            await bounded(channel.call(script, ["k"], [2, "b"]), TIMEOUT, "next call")
        assert hostile.connections == 2  # the next call connected again
        assert loop_errors == []  # dropped by the channel, not by the event loop's error handling
        channel.close()
    finally:
        loop.set_exception_handler(None)
        await bounded(client.aclose(), 5, "closing the client")
        server.close()
        await bounded(server.wait_closed(), 5, "closing the server")


async def _dropped(channel: ScriptChannel) -> None:
    while channel.transport is not None:
        await asyncio.sleep(0.01)


async def _close_once_queued(channel: ScriptChannel) -> None:
    """Closes the channel in the loop iteration where a call is queued, before its flush."""
    while not channel._pending:
        await asyncio.sleep(0)
    assert channel.transport is None
    channel.close()


async def test_close_fails_a_call_queued_after_its_connection_dropped(
    redis_client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection lost as soon as it is made (Redis going away right after the handshake): the
    caller that waited for it queues its call with no transport, and close() comes before the
    flush. The call must fail, not wait forever (nor be written later on another connection)."""
    real_take_over = batcher.take_over

    async def dropped_at_once(client: aioredis.Redis, protocol: asyncio.Protocol) -> Any:
        conn, transport = await real_take_over(client, protocol)
        transport.abort()
        return conn, transport

    monkeypatch.setattr("worker.script_channel.take_over", dropped_at_once)
    channel = ScriptChannel(redis_client)
    script = redis_client.register_script(ECHO)
    call = asyncio.create_task(channel.call(script, ["k"], [1, "a"]))
    await bounded(_close_once_queued(channel), TIMEOUT, "the call queued")
    with pytest.raises(RedisConnectionError):
        await bounded(call, 1, "the call queued at close")
    assert not channel._pending


async def _clients_back_to(redis_client: aioredis.Redis, count: int) -> None:
    while len(await redis_client.client_list()) != count:
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("iterations", [1, 4], ids=["connect-requested", "handshake-under-way"])
async def test_close_while_connecting_leaves_no_connection_open(
    redis_client: aioredis.Redis, iterations: int
) -> None:
    """close() while the connect is under way (a session cancelled at shutdown left it running):
    the connection it makes is nobody's any more. It is closed, and the call waiting for it fails
    as a call in flight at close does."""
    before = len(await redis_client.client_list())
    channel = ScriptChannel(redis_client)
    script = redis_client.register_script(ECHO)
    call = asyncio.create_task(channel.call(script, ["k"], [1, "a"]))
    for _ in range(iterations):
        await asyncio.sleep(0)
    assert channel._open_task is not None and not channel._open_task.done()
    channel.close()
    with pytest.raises(RedisConnectionError):
        await bounded(call, TIMEOUT, "the call waiting for the connect")
    assert channel.transport is None
    await bounded(_clients_back_to(redis_client, before), 1, "the connection closed")
    assert len(await redis_client.client_list()) == before


async def test_a_redis_that_stops_answering_times_the_calls_out_as_redis_py_does(
    redis_server: RedisServer,
) -> None:
    """With a socket timeout on the client, redis-py gives up on a reply after that long
    (TimeoutError, which the callers' retry loops wait out): so does the channel, rather than
    wait forever for a Redis that stopped answering (here: SIGSTOP; a network that drops packets
    looks the same). The next call connects again."""
    client = aioredis.Redis.from_url(redis_server.url, socket_timeout=0.3)
    assert redis_server.process is not None
    pid = redis_server.process.pid
    try:
        channel = ScriptChannel(client)
        script = client.register_script(ECHO)
        await bounded(channel.call(script, ["k"], [1, "a"]), TIMEOUT, "connect")
        os.kill(pid, signal.SIGSTOP)
        try:
            calls = [asyncio.create_task(channel.call(script, ["k"], [i, "b"])) for i in range(3)]
            for call in calls:
                with pytest.raises(RedisTimeoutError):
                    await bounded(call, 1.5, "a call Redis does not answer")
        finally:
            os.kill(pid, signal.SIGCONT)
        assert await bounded(channel.call(script, ["k"], [2, "c"]), TIMEOUT, "after") == [b"k", b"2", b"c"]
        channel.close()
    finally:
        await bounded(client.aclose(), 5, "closing the client")


async def test_a_reply_timeout_counts_from_the_last_reply_not_from_the_write(
    redis_server: RedisServer,
) -> None:
    """redis-py's socket_timeout bounds each wait for data, not a pipeline's whole round trip: two
    calls of 0.6 s each, written together, are both answered (at 0.6 and 1.2 s) within a timeout of
    1 s, because the first reply is progress."""
    client = aioredis.Redis.from_url(redis_server.url, socket_timeout=1.0)
    try:
        channel = ScriptChannel(client)
        busy = client.register_script(BUSY_300_MS.replace("300000", "600000"))
        await bounded(channel.call(client.register_script(ECHO), ["k"], [0, ""]), TIMEOUT, "connect")
        replies = await bounded(
            asyncio.gather(channel.call(busy, [], []), channel.call(busy, [], [])), TIMEOUT, "two slow calls"
        )
        assert replies == [1, 1]
        channel.close()
    finally:
        await bounded(client.aclose(), 5, "closing the client")


COUNTING = "redis.call('INCR', KEYS[1]); return ARGV[1]"


@pytest.mark.parametrize("written", [False, True], ids=["queued", "written"])
@pytest.mark.parametrize("step", [1, 2, 3], ids=["evalsha", "script-load", "evalsha-again"])
async def test_a_caller_cancelled_anywhere_in_the_reload_runs_at_most_once_and_shifts_nothing(
    redis_client: aioredis.Redis, step: int, written: bool
) -> None:
    """A forgotten script: the caller's EVALSHA (NOSCRIPT), SCRIPT LOAD, EVALSHA again, each a
    round trip of its own. Cancelled at any of them, queued or written, its call has run once or
    not at all (never twice), and the calls of the others, queued alongside, get their own
    replies."""
    channel = ScriptChannel(redis_client)
    script = redis_client.register_script(COUNTING)
    await bounded(channel.call(script, ["warm"], ["-"]), TIMEOUT, "connect")
    await redis_client.script_flush()
    sends: list[bytes] = []
    send = channel._send

    async def noted(packed: bytes) -> Any:  # the channel's own _send, its callers noted
        if asyncio.current_task() is cancelled:
            sends.append(packed)
        return await send(packed)

    channel._send = noted  # type: ignore[method-assign]
    cancelled = asyncio.create_task(channel.call(script, ["runs"], ["c"]))
    others = [asyncio.create_task(channel.call(script, [f"other{i}"], [i])) for i in range(3)]

    async def cancel_at_the_step() -> None:
        while len(sends) < step or (written and channel._pending):
            await asyncio.sleep(0)
        cancelled.cancel()

    await bounded(cancel_at_the_step(), TIMEOUT, "the step")
    assert await bounded(asyncio.gather(*others), TIMEOUT, "the others") == [b"0", b"1", b"2"]
    assert await bounded(channel.call(script, ["next"], ["n"]), TIMEOUT, "next") == b"n"
    runs = int(await redis_client.get("runs") or 0)
    # A call written runs (as with redis-py). One still queued when its caller is cancelled is
    # written all the same today, where redis-py would not have sent it: once either way.
    assert runs == 0 if step < 3 else runs == 1 if written else runs in (0, 1)
    for i in range(3):
        assert await redis_client.get(f"other{i}") == b"1"
    channel.close()


async def test_a_caller_cancelled_while_the_connect_is_shared_leaves_it_to_the_others(
    redis_client: aioredis.Redis,
) -> None:
    channel = ScriptChannel(redis_client)
    script = redis_client.register_script(ECHO)
    calls = [asyncio.create_task(channel.call(script, [f"k{i}"], [i, "x"])) for i in range(3)]
    await asyncio.sleep(0)  # all three wait for the one connect
    calls[0].cancel()
    assert await bounded(asyncio.gather(*calls[1:]), TIMEOUT, "the others") == [
        [b"k1", b"1", b"x"],
        [b"k2", b"2", b"x"],
    ]
    assert calls[0].cancelled()
    channel.close()


async def test_a_thousand_callers_of_a_forgotten_script_and_a_large_argument(
    redis_client: aioredis.Redis,
) -> None:
    """1000 calls at once, each through the NOSCRIPT reload, then one 8 MB argument among small
    calls: every reply reaches its own caller."""
    channel = ScriptChannel(redis_client)
    script = redis_client.register_script(ECHO)
    await redis_client.script_flush()
    calls = [channel.call(script, [f"k{i}"], [i, b"v" * (i % 7)]) for i in range(1000)]
    replies = await bounded(asyncio.gather(*calls), TIMEOUT, "1000 calls")
    assert replies == [[f"k{i}".encode(), b"%d" % i, b"v" * (i % 7)] for i in range(1000)]
    large = os.urandom(8 << 20)
    calls = [channel.call(script, ["k"], [i, large if i == 3 else b"s"]) for i in range(6)]
    replies = await bounded(asyncio.gather(*calls), TIMEOUT, "a large argument")
    assert replies == [[b"k", b"%d" % i, large if i == 3 else b"s"] for i in range(6)]
    channel.close()


async def test_a_resp3_client_gets_the_replies_redis_py_gets(redis_server: RedisServer) -> None:
    """protocol=3 in the URL: redis-py's handshake says HELLO 3, so Redis answers the channel in
    RESP3; a script's reply reads the same as through redis-py."""
    client = aioredis.Redis.from_url(redis_server.url + "?protocol=3")
    try:
        channel = ScriptChannel(client)
        await client.hset("h", mapping={"a": "1"})
        for source in [
            ECHO,
            "return redis.status_reply('FINE')",
            "return nil",
            "return {1, {2, {'x'}}, 3}",
            "redis.setresp(3); return redis.call('HGETALL', KEYS[1])",
        ]:
            script = client.register_script(source)
            ours = await bounded(channel.call(script, ["h"], [1, "x"]), TIMEOUT, source)
            assert ours == await script(keys=["h"], args=[1, "x"]), source
        refused = client.register_script("return redis.error_reply('MYERR no')")
        with pytest.raises(ResponseError, match="no"):
            await bounded(channel.call(refused, [], []), TIMEOUT, "an error in RESP3")
        channel.close()
    finally:
        await bounded(client.aclose(), 5, "closing the client")


class ReplyEater:
    """A TCP proxy to Redis that, once `eat` is set, forwards the next command but not its reply,
    and drops the client's connection instead: a COMMIT applied whose reply is lost."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.eat = False

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)

        async def upstream() -> None:
            while data := await reader.read(65536):
                up_writer.write(data)
            up_writer.close()

        async def downstream() -> None:
            while data := await up_reader.read(65536):
                if self.eat:
                    writer.transport.abort()
                    up_writer.close()
                    return
                writer.write(data)
            writer.close()

        await asyncio.gather(upstream(), downstream(), return_exceptions=True)


async def test_a_commit_whose_reply_is_lost_is_not_applied_twice(redis_client: aioredis.Redis) -> None:
    """The COMMIT ran, its reply never came: ConnectionError, and the call again (the runner's
    _retry_redis) is refused as `dup`: the final is in the results once, the commit point moved
    once, and the next commit goes on from there."""
    sk = KEYS.session("s")
    entry = await start_session(redis_client, "s", "w1")
    await redis_client.xadd(sk.audio, p.frame_fields(0, bytes(640)))
    port = redis_client.connection_pool.connection_kwargs["port"]
    eater = ReplyEater(port)
    proxy = await asyncio.start_server(eater.handle, "127.0.0.1", 0)
    client = aioredis.Redis(host="127.0.0.1", port=proxy.sockets[0].getsockname()[1])
    try:
        store = store_for(client)
        first = await store.acquire(sk, "w1", 5, entry)
        assert (
            await bounded(store.commit(sk, first.epoch, Commit(0, 9, b"1-9"), None), TIMEOUT, "warm") == "ok"
        )
        eater.eat = True
        with pytest.raises(RedisConnectionError):
            await bounded(
                store.commit(sk, first.epoch, Commit(10, 24, b"1-24"), final("s", 10, 24)), TIMEOUT, "lost"
            )
        eater.eat = False
        again = store.commit(sk, first.epoch, Commit(10, 24, b"1-24"), final("s", 10, 24))
        assert await bounded(again, TIMEOUT, "again") == "dup"
        assert await redis_client.hget(sk.state, "committed_seq") == b"24"
        assert await redis_client.xlen(sk.results) == 1
        following = store.commit(sk, first.epoch, Commit(25, 49, b"1-49"), final("s", 25, 49))
        assert await bounded(following, TIMEOUT, "the next") == "ok"
        assert await redis_client.xlen(sk.results) == 2
        store.close()
    finally:
        await bounded(client.aclose(), 5, "closing the client")
        proxy.close()
