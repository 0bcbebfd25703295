"""Thin Redis layer of the worker: each method is one fenced script call or one plain command."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio as aioredis
from redis.backoff import ExponentialWithJitterBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import AskError, ClusterDownError, ResponseError, SlotNotCoveredError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from producer import protocol as p
from producer.cluster import cluster_client, is_cluster, split_url
from worker import lua
from worker.events import now_ms
from worker.ledger import Commit
from worker.script_channel import ScriptChannel, Unusable

# A cluster mid-failover or mid-reshard (CLUSTERDOWN, TRYAGAIN, a slot no master serves yet,
# MOVED/ASK past the client's own retries) is an outage like a dropped connection: wait it out.
TRANSIENT_REDIS_ERRORS = (
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
    ClusterDownError,
    TryAgainError,
    AskError,
    SlotNotCoveredError,
)


class StaleCommitPoint(Exception):
    """Our commit point is behind Redis's (a commit applied whose reply we lost): replay from
    Redis's instead of publishing words again."""


class Fenced(Exception):
    """This worker no longer owns the session: another took it over (or it was released)."""


class StateLost(Fenced):
    """The session's state hash is gone from Redis (restarted without persistence, or the key was
    evicted): not a takeover, and no worker can publish for the session any more, since every
    fenced script compares against an epoch that no longer exists."""


MAX_CONNECTIONS = 128  # per client; commands queue for a free one rather than fail
CONNECTION_WAIT_SECONDS = 30.0
CLUSTER_MAX_CONNECTIONS = 1024  # per node
# A failover takes the cluster's node timeout plus an election (seconds): commands retry across it.
CLUSTER_RETRIES = 10


def connect_redis(
    url: str, *, blocking: bool = False, retries: int = 3, cluster: bool = False
) -> aioredis.Redis:
    """A client that rides out short blips itself; longer outages surface to our own retry loops.

    The pool blocks when all its connections are busy: redis-py's default pool raises
    MaxConnectionsError at its 100th concurrent command, which a drain releasing 100 leases at
    once, or a burst of commits from hundreds of sessions, reaches.

    `cluster` (or a redis+cluster:// URL): redis-py's asyncio RedisCluster, which routes each
    command by its keys' slot and follows MOVED/ASK and failovers itself (producer.cluster). Its
    per-node connection limit raises rather than waits, so it gets a larger one."""
    use_cluster, url = split_url(url, cluster)
    if use_cluster:
        return cluster_client(
            url,
            max_connections=CLUSTER_MAX_CONNECTIONS,
            retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), max(retries, CLUSTER_RETRIES)),
            socket_connect_timeout=5,
            socket_keepalive=True,
            health_check_interval=0 if blocking else 30,
            decode_responses=False,
        )
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=MAX_CONNECTIONS,
        timeout=CONNECTION_WAIT_SECONDS,
        retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), retries),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        socket_connect_timeout=5,
        socket_keepalive=True,
        health_check_interval=0 if blocking else 30,
        decode_responses=False,
    )
    return aioredis.Redis.from_pool(pool)


@dataclass(frozen=True, slots=True)
class Acquired:
    status: str  # ok | done | poison | duplicate
    epoch: int
    committed_seq: int
    committed_id: bytes
    frames: int
    finals: int
    takeovers: int  # every takeover so far
    stalled: int = 0  # takeovers in a row without committed progress: the crash-loop count


@dataclass(frozen=True, slots=True)
class Rejection:
    """One sessions entry to reject (lua.REJECT_SESSION). `audio`: the named sid's audio key in the
    partition the script runs in (only for a valid sid); `session`: the named session's keys when
    it belongs to that partition, with its `ended` event and the `reused` error for the case it
    exists already. `entry_id` b"": the entry sits in another partition (wrong_partition): only the
    session's side is written."""

    entry_id: bytes
    sid: bytes
    reason: str
    error: dict[str, Any]
    audio: str | None = None
    session: p.SessionKeys | None = None
    ended: dict[str, Any] | None = None
    reused: dict[str, Any] | None = None
    reused_reason: str = ""


class SessionStore:
    def __init__(self, redis: aioredis.Redis, keys: p.Keys, *, results_maxlen: int, retention: int) -> None:
        self.redis = redis
        self.keys = keys
        self.maxlen = str(results_maxlen)
        self.retention = str(retention)
        # The commit path (COMMIT, PUBLISH): pipelined on a connection of its own, except on a
        # cluster, whose routing redis-py does (worker/script_channel.py).
        self.channel = None if is_cluster(redis) else ScriptChannel(redis)
        self._acquire = redis.register_script(lua.ACQUIRE)
        self._commit = redis.register_script(lua.COMMIT)
        self._publish = redis.register_script(lua.PUBLISH)
        self._save_configure = redis.register_script(lua.SAVE_CONFIGURE)
        self._finish = redis.register_script(lua.FINISH)
        self._renew = redis.register_script(lua.RENEW)
        self._release = redis.register_script(lua.RELEASE)
        self._reject = redis.register_script(lua.REJECT_ENTRY)
        self._reject_session = redis.register_script(lua.REJECT_SESSION)
        self._retire = redis.register_script(lua.RETIRE)
        self._trim = redis.register_script(lua.TRIM_SESSIONS)

    # ----------------------------------------------------------------------------- groups

    async def ensure_group(self, stream: str, start: str = "0") -> None:
        try:
            await self.redis.xgroup_create(stream, p.WORKERS_GROUP, id=start, mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    # ----------------------------------------------------------------------------- leases

    async def acquire(self, sk: p.SessionKeys, owner: str, max_takeovers: int, entry_id: bytes) -> Acquired:
        args: list[Any] = [owner, max_takeovers, now_ms(), entry_id]
        raw = await self._acquire(keys=[sk.state, sk.sessions, sk.epochs], args=args)
        status, epoch, cseq, cid, frames, finals, takeovers, stalled = raw
        return Acquired(
            _s(status), int(epoch), int(cseq), _b(cid), int(frames), int(finals), int(takeovers), int(stalled)
        )

    async def renew(self, sessions_key: str, owner: str, leases: list[tuple[str, bytes, int]]) -> list[int]:
        """leases: (state key, sessions entry id, epoch). Returns indexes of the leases lost."""
        if not leases:
            return []
        args: list[Any] = [owner]
        for _, entry_id, epoch in leases:
            args += [entry_id, epoch]
        lost = await self._renew(keys=[sessions_key, *(state for state, _, _ in leases)], args=args)
        return [int(i) - 1 for i in lost]

    async def release(self, sk: p.SessionKeys, owner: str, entry_id: bytes, epoch: int) -> bool:
        keys = [sk.sessions, sk.state, sk.epochs]
        return _s(await self._release(keys=keys, args=[owner, entry_id, epoch])) == "ok"

    # ----------------------------------------------------------------------------- publishing

    async def commit(
        self, sk: p.SessionKeys, epoch: int, commit: Commit, event: dict[str, Any] | None
    ) -> str:
        return await self._run_commit(sk, _commit_args(epoch, commit, event, self.maxlen))

    async def _run_commit(self, sk: p.SessionKeys, args: list[Any]) -> str:
        result = _s(await self._hot(self._commit, [sk.state, sk.results, sk.partition_results], args))
        if result == "fenced":
            raise await self.fenced(sk)
        if result == "stale":
            raise StaleCommitPoint(sk.sid)
        return result

    async def _hot(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        """A script call of the commit path: through the pipelined channel when it can be used."""
        channel = self.channel
        if channel is not None and channel.usable:
            try:
                return await channel.call(script, keys, args)
            except Unusable:
                pass  # it said so once; `usable` is False from now on
        return await script(keys=keys, args=args)

    def close(self) -> None:
        """Closes the commit path's own connection (the client's pool is closed by its owner)."""
        if self.channel is not None:
            self.channel.close()

    async def commit_point(self, sk: p.SessionKeys, epoch: int) -> tuple[int, bytes, int]:
        """The session's commit point as Redis has it, and its count of published finals (fenced:
        raises if the session moved on, StateLost if its state vanished)."""
        epoch_now, seq, entry, finals = await self.redis.hmget(
            sk.state, ["epoch", "committed_seq", "committed_id", "finals"]
        )
        if epoch_now is None:
            raise await self.fenced(sk)
        if int(epoch_now) != epoch:
            raise Fenced(sk.sid)
        return int(seq or -1), _b(entry) if entry else b"0-0", int(finals or 0)

    async def save_configure(self, sk: p.SessionKeys, epoch: int, thresholds: dict[str, str]) -> None:
        """A Flux session's current thresholds, for its next connection or owner (fenced)."""
        text = json.dumps(thresholds, separators=(",", ":"), sort_keys=True)
        result = _s(await self._save_configure(keys=[sk.state], args=[epoch, text]))
        if result == "fenced":
            raise await self.fenced(sk)

    async def saved_configure(self, sk: p.SessionKeys) -> dict[str, str]:
        """The thresholds SAVE_CONFIGURE kept ({} if none). What is stored was checked when it was
        written; anything unreadable (an operator's edit) is ignored, not fatal."""
        raw = await self.redis.hget(sk.state, "configure")
        if not raw or len(raw) > p.MAX_CONFIGURE_BYTES:
            return {}
        try:
            value = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return {}
        if not isinstance(value, dict):
            return {}
        return {str(k): str(v) for k, v in value.items() if isinstance(v, str | int | float)}

    async def publish(self, sk: p.SessionKeys, epoch: int, event: dict[str, Any], once: str = "") -> str:
        fields = p.encode_event(event)
        args: list[Any] = [
            epoch,
            self.maxlen,
            once,
            fields[p.R_TYPE],
            fields[p.R_SID],
            fields[p.R_TEXT],
            fields[p.R_EVENT],
        ]
        result = _s(await self._hot(self._publish, [sk.state, sk.results, sk.partition_results], args))
        if result == "fenced":
            raise await self.fenced(sk)
        return result

    async def reject_entry(
        self, sk: p.SessionKeys, epoch: int, stream: str, entry_id: bytes, reason: str, event: dict[str, Any]
    ) -> str:
        fields = p.encode_event(event)
        flag = f"bad:{entry_id.decode()}"
        args: list[Any] = [
            epoch,
            self.maxlen,
            flag,
            stream,
            entry_id,
            reason,
            fields[p.R_TYPE],
            fields[p.R_SID],
            fields[p.R_TEXT],
            fields[p.R_EVENT],
        ]
        result = _s(await self._reject(keys=[sk.state, sk.results, sk.partition_results, sk.dead], args=args))
        if result == "fenced":
            raise await self.fenced(sk)
        return result

    async def finish(
        self,
        sk: p.SessionKeys,
        epoch: int,
        entry_id: bytes,
        *,
        status: str,
        reason: str,
        event: dict[str, Any],
        frames: int,
        dead_reason: str = "",
        expect_committed: int | None = None,
    ) -> str:
        fields = p.encode_event(event)
        args: list[Any] = [
            epoch,
            self.maxlen,
            entry_id,
            self.retention,
            status,
            reason,
            fields[p.R_TYPE],
            fields[p.R_SID],
            fields[p.R_TEXT],
            fields[p.R_EVENT],
            dead_reason,
            frames,
            "" if expect_committed is None else expect_committed,
        ]
        keys = [sk.state, sk.results, sk.partition_results, sk.audio, sk.sessions, sk.dead]
        result = _s(await self._finish(keys=keys, args=args))
        if result == "fenced":
            raise await self.fenced(sk)
        return result

    # ----------------------------------------------------------------------------- fencing

    async def state_exists(self, sk: p.SessionKeys) -> bool:
        return bool(await self.redis.exists(sk.state))

    async def fenced(self, sk: p.SessionKeys) -> Fenced:
        """What a 'fenced' reply means: the scripts cannot tell a missing state hash from another
        owner's epoch, so look once (only on this rare path). A state that reappeared meanwhile
        was re-created by a new owner: a takeover, which Fenced describes."""
        if await self.state_exists(sk):
            return Fenced(sk.sid)
        return StateLost(sk.sid)

    # ----------------------------------------------------------------------------- reading

    async def read_range(
        self, audio_key: str, after_id: bytes, count: int
    ) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """Audio entries strictly after `after_id` (XRANGE with an exclusive start, Redis >= 6.2)."""
        entries = await self.redis.xrange(audio_key, min=b"(" + after_id, max="+", count=count)
        return cast(list[tuple[bytes, dict[bytes, bytes]]], entries)

    # ----------------------------------------------------------------------------- intake

    async def reject_session(self, sessions_key: str, dead_key: str, results_key: str, r: Rejection) -> str:
        """Rejects a sessions entry in one script (lua.REJECT_SESSION), whose comment lists the
        outcomes: dup, duplicate, reused, rejected, dead, exists. `sessions_key`, `dead_key` and
        `results_key` are the partition's where the script runs (the entry's, or, with an empty
        `r.entry_id`, the named session's own partition)."""
        keys = [sessions_key, dead_key, results_key]
        if r.audio is not None:
            keys.append(r.audio)
            if r.session is not None:
                keys += [r.session.state, r.session.results]
        args: list[Any] = [r.entry_id, r.sid, r.reason, self.maxlen, self.retention]
        for event in (r.error, r.ended, r.reused):
            if event is None:
                args += ["", "", "", ""]
                continue
            fields = p.encode_event(event)
            args += [fields[p.R_TYPE], fields[p.R_SID], fields[p.R_TEXT], fields[p.R_EVENT]]
        args.append(r.reused_reason)
        return _s(await self._reject_session(keys=keys, args=args))

    async def retire_entry(self, sessions_key: str, entry_id: bytes) -> None:
        """Acknowledges and deletes a sessions entry that is no lease (a duplicate)."""
        await self._retire(keys=[sessions_key], args=[entry_id])

    async def ack_session_entry(self, sessions_key: str, entry_id: bytes) -> None:
        await self.retire_entry(sessions_key, entry_id)

    async def trim_sessions(self, sessions_key: str) -> int:
        """Drops entries below the oldest pending or undelivered one (lua.TRIM_SESSIONS)."""
        return int(await self._trim(keys=[sessions_key]))

    # ----------------------------------------------------------------------------- multichannel

    async def channel_marks(self, sk: p.SessionKeys, epoch: int, channels: int) -> list[int]:
        """Each channel's committed mark (`committed_seq:<c>`), -1 where a channel has none yet
        (the machine then takes the session's commit point). Fenced like `commit_point`."""
        names = ["epoch", *(f"committed_seq:{c}" for c in range(channels))]
        epoch_now, *marks = await self.redis.hmget(sk.state, names)
        if epoch_now is None:
            raise await self.fenced(sk)
        if int(epoch_now) != epoch:
            raise Fenced(sk.sid)
        return [int(m) if m is not None else -1 for m in marks]

    async def commit_channel(
        self, sk: p.SessionKeys, epoch: int, commit: Commit, event: dict[str, Any] | None, channels: int
    ) -> str:
        """`commit` of one channel's final in a multichannel session (lua.COMMIT's channel form):
        the channel's mark moves to seq_to, the session's commit point to the minimum of the marks."""
        args = _commit_args(epoch, commit, event, self.maxlen)
        return await self._run_commit(sk, [*args, commit.channel, channels, commit.session_point])


def _commit_args(epoch: int, commit: Commit, event: dict[str, Any] | None, maxlen: str) -> list[Any]:
    """lua.COMMIT's ARGV (the mono form; the channel form appends three more)."""
    fields = p.encode_event(event) if event else {"type": "", "sid": "", "text": "", "e": b""}
    return [
        epoch,
        commit.seq_to,
        commit.last_entry_id or b"",
        maxlen,
        "1" if event else "0",
        fields[p.R_TYPE],
        fields[p.R_SID],
        fields[p.R_TEXT],
        fields[p.R_EVENT],
        commit.seq_from,
    ]


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _b(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()
