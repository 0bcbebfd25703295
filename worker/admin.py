"""`voxqueue status`, `voxqueue sessions` and `voxqueue dead [requeue ID]`: a deployment as Redis
holds it, for operators (docs/operations.md).

Everything is read from Redis, nothing from the workers: the sessions streams' consumer group
(`workers`) lists every worker that ever claimed a session, with its pending entries (its leases)
and its idle time (a live worker talks to Redis at least every renew_seconds: its renewals and its
blocking XREADGROUP both reset it). A worker idle longer than the lease is `gone`: its leases are
expired and any live worker takes its sessions over. Output: rich tables on a terminal, JSON lines
otherwise (or with --json), one object per line, for scripts.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, cast

import click
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from producer import protocol as p
from producer.cli import BadInput, SessionIdTaken, _run, redis_options, rerun_session

LEASE_OPTION = click.option(
    "--lease-seconds",
    envvar="VOXQUEUE_LEASE_SECONDS",
    type=click.FloatRange(min=0.1),
    default=5.0,
    show_default=True,
    help="The workers' lease: a worker silent this long is shown as gone [env VOXQUEUE_LEASE_SECONDS].",
)
JSON_OPTION = click.option("--json", "as_json", is_flag=True, help="JSON lines even on a terminal.")
SCAN_COUNT = 500
SESSION_STATES = ("active", "orphaned", "ended", "failed")


def _s(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _int(value: Any, default: int = 0) -> int:
    try:
        return int(_s(value))
    except (TypeError, ValueError):
        return default


# ------------------------------------------------------------------------------ reading Redis


@dataclass
class WorkerRow:
    name: str
    state: str  # alive | gone
    sessions: int  # leases held (pending entries), over all partitions
    idle_seconds: float  # since the worker last talked to Redis: its last renewal or read


@dataclass
class PartitionRow:
    partition: int
    unclaimed: int  # entries never delivered to a worker (XINFO GROUPS lag)
    leased: int  # entries pending: held by a worker, or awaiting takeover
    sessions_stream: int
    results_stream: int
    dead_letters: int


async def _group(client: aioredis.Redis, key: str) -> dict[str, Any] | None:
    try:
        groups = cast(list[dict[Any, Any]], await client.xinfo_groups(key))
    except ResponseError:  # no such key yet: no session was ever opened in this partition
        return None
    for group in groups:
        if _s(group.get("name")) == p.WORKERS_GROUP:
            return group
    return None


async def read_workers(client: aioredis.Redis, keys: p.Keys, lease_seconds: float) -> list[WorkerRow]:
    seen: dict[str, WorkerRow] = {}
    for key in keys.all_sessions():
        try:
            consumers = cast(list[dict[Any, Any]], await client.xinfo_consumers(key, p.WORKERS_GROUP))
        except ResponseError:
            continue
        for consumer in consumers:
            name = _s(consumer.get("name"))
            idle = _int(consumer.get("idle")) / 1000.0
            row = seen.setdefault(name, WorkerRow(name, "alive", 0, idle))
            row.sessions += _int(consumer.get("pending"))
            row.idle_seconds = min(row.idle_seconds, idle)
    for row in seen.values():
        row.state = "gone" if row.idle_seconds > lease_seconds else "alive"
    return sorted(seen.values(), key=lambda r: (r.state != "alive", r.name))


async def read_partitions(client: aioredis.Redis, keys: p.Keys) -> list[PartitionRow]:
    rows = []
    for n in range(keys.partitions):
        group = await _group(client, keys.sessions(n))
        rows.append(
            PartitionRow(
                partition=n,
                unclaimed=_int(group.get("lag")) if group else 0,
                leased=_int(group.get("pending")) if group else 0,
                sessions_stream=await client.xlen(keys.sessions(n)),
                results_stream=await client.xlen(keys.results(n)),
                dead_letters=await client.xlen(keys.dead(n)),
            )
        )
    return rows


@dataclass
class SessionRow:
    sid: str
    state: str  # active | orphaned (its owner is gone or it awaits takeover) | ended | failed
    owner: str
    epoch: int
    frames: int  # frames committed so far (all frames once ended)
    committed_seq: int
    lag_frames: int  # frames in Redis past the commit point (active sessions)
    takeovers: int
    age_seconds: float  # since the first claim
    reason: str  # why it ended


async def read_sessions(client: aioredis.Redis, keys: p.Keys, lease_seconds: float) -> list[SessionRow]:
    """Every session whose state hash still exists (ended ones until their retention runs out).
    SCAN walks the keyspace: an operator's tool, not something to run every second."""
    alive = {w.name for w in await read_workers(client, keys, lease_seconds) if w.state == "alive"}
    now = time.time()
    prefix = f"{keys.namespace}:{{p"
    rows = []
    async for raw_key in client.scan_iter(match=f"{keys.namespace}:{{p*}}:s:*:state", count=SCAN_COUNT):
        key = _s(raw_key)
        sid = key.split("}:s:", 1)[-1].removesuffix(":state")
        if not key.startswith(prefix) or keys.session(sid).state != key:
            continue  # another partition count's key, or not ours
        state = {_s(k): _s(v) for k, v in cast(dict[bytes, bytes], await client.hgetall(key)).items()}
        if not state:
            continue
        status, owner = state.get("status", ""), state.get("owner", "")
        committed = _int(state.get("committed_seq"), -1)
        lag = 0
        if status == p.STATUS_ACTIVE:
            shown = "active" if owner in alive else "orphaned"
            lag = await _frames_after(client, keys.session(sid).audio, committed)
        else:
            shown = status or "unknown"
        started = _int(state.get("started_at")) / 1000.0
        rows.append(
            SessionRow(
                sid=sid,
                state=shown,
                owner=owner,
                epoch=_int(state.get("epoch")),
                frames=_int(state.get("frames")),
                committed_seq=committed,
                lag_frames=lag,
                takeovers=_int(state.get("takeovers")),
                age_seconds=round(now - started, 1) if started else 0.0,
                reason=state.get("reason", ""),
            )
        )
    return sorted(
        rows, key=lambda r: (SESSION_STATES.index(r.state) if r.state in SESSION_STATES else 9, r.sid)
    )


async def _frames_after(client: aioredis.Redis, audio: str, committed: int) -> int:
    """Frames produced past the commit point: the newest frame's seq minus committed_seq (the last
    two entries, as the newest may be the end marker)."""
    for _, fields in cast(list[tuple[bytes, dict[bytes, bytes]]], await client.xrevrange(audio, count=2)):
        seq = fields.get(b"seq")
        if seq is not None:
            return max(0, _int(seq) - committed)
    return 0


@dataclass
class DeadRow:
    id: str
    partition: int
    sid: str
    reason: str
    stream: str
    entry: str


async def read_dead(client: aioredis.Redis, keys: p.Keys, limit: int) -> list[DeadRow]:
    rows = []
    for n in range(keys.partitions):
        entries = cast(
            list[tuple[bytes, dict[bytes, bytes]]], await client.xrevrange(keys.dead(n), count=limit)
        )
        for entry_id, fields in entries:
            rows.append(
                DeadRow(
                    id=_s(entry_id),
                    partition=n,
                    sid=_s(fields.get(b"sid", b"")),
                    reason=_s(fields.get(b"reason", b"")),
                    stream=_s(fields.get(b"stream", b"")),
                    entry=_s(fields.get(b"entry", b"")),
                )
            )
    return rows


# ------------------------------------------------------------------------------ output


def _tty() -> bool:
    return sys.stdout.isatty()


def _emit(kind: str | None, rows: list[Any], as_json: bool, title: str, empty: str) -> None:
    """JSON lines (each row a dict, with `kind` when given), or one rich table on a terminal."""
    if as_json or not _tty():
        for row in rows:
            data = asdict(row)
            click.echo(json.dumps({"kind": kind, **data} if kind else data, sort_keys=False))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not rows:
        console.print(f"[dim]{title}: {empty}[/dim]")
        return
    table = Table(title=title, title_justify="left")
    names = list(asdict(rows[0]))
    for name in names:
        table.add_column(name.replace("_", " "))
    for row in rows:
        data = asdict(row)
        style = "red" if data.get("state") in ("gone", "orphaned", "failed") else None
        table.add_row(*(str(data[name]) for name in names), style=style)
    console.print(table)


# ------------------------------------------------------------------------------ commands


@click.command("status")
@LEASE_OPTION
@JSON_OPTION
@redis_options
def status(lease_seconds: float, as_json: bool, redis_url: str, namespace: str, partitions: int) -> None:
    """The deployment: workers (sessions held, last seen; gone = silent longer than the lease),
    then per partition unclaimed and leased sessions, stream lengths and dead letters."""

    async def main(client: aioredis.Redis) -> None:
        keys = p.Keys(namespace, partitions)
        workers = await read_workers(client, keys, lease_seconds)
        parts = await read_partitions(client, keys)
        _emit("worker", workers, as_json, "workers", "none has claimed a session yet")
        _emit("partition", parts, as_json, "partitions", "none")

    _run(redis_url, main)


@click.command("sessions")
@click.option("--state", type=click.Choice(SESSION_STATES), help="Only sessions in this state.")
@LEASE_OPTION
@JSON_OPTION
@redis_options
def sessions(
    state: str | None, lease_seconds: float, as_json: bool, redis_url: str, namespace: str, partitions: int
) -> None:
    """One line per session Redis still holds: state, owner, epoch, frames, commit point, lag
    (frames past the commit point), takeovers, age. `orphaned`: active, but its owner is gone."""

    async def main(client: aioredis.Redis) -> None:
        rows = await read_sessions(client, p.Keys(namespace, partitions), lease_seconds)
        if state:
            rows = [r for r in rows if r.state == state]
        _emit(None, rows, as_json, "sessions", "none")

    _run(redis_url, main)


@click.group("dead", invoke_without_command=True)
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True, help="Per partition.")
@JSON_OPTION
@redis_options
@click.pass_context
def dead(
    ctx: click.Context, limit: int, as_json: bool, redis_url: str, namespace: str, partitions: int
) -> None:
    """Dead letters, newest first: rejected session entries, bad audio entries, failed sessions.
    `voxqueue dead requeue ID` runs one again."""
    if ctx.invoked_subcommand is not None:
        return

    async def main(client: aioredis.Redis) -> None:
        rows = await read_dead(client, p.Keys(namespace, partitions), limit)
        _emit(None, rows, as_json, "dead letters", "none")

    _run(redis_url, main)


@dead.command("requeue")
@click.argument("dead_id", metavar="ID")
@click.option(
    "--speed",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Times real time; 0 = at once.",
)
@click.option(
    "--again",
    is_flag=True,
    help="Run it again even if it was requeued before (a new random session id).",
)
@click.option(
    "--partition",
    "only_partition",
    type=click.IntRange(min=0),
    help="The dead letter's partition, when the same id is in several (each has its own stream).",
)
@redis_options
def requeue(
    dead_id: str,
    speed: float,
    again: bool,
    only_partition: int | None,
    redis_url: str,
    namespace: str,
    partitions: int,
) -> None:
    """Run a dead letter's session again as a NEW session, from its audio still retained in Redis
    (as `voxqueue replay` does; labels requeue_of and dead_letter say where it came from). Prints the
    new session id. The new session's id is `rq-ID` (`rq-pN-ID` for a letter of partition N > 0),
    so asking twice (a retried script, two operators) runs it once: the second time prints that id
    and says so. --again runs it anyway."""

    async def main(client: aioredis.Redis) -> None:
        keys = p.Keys(namespace, partitions)
        if only_partition is not None and only_partition >= partitions:
            raise BadInput(f"--partition {only_partition}: the deployment has {partitions} partition(s)")
        matches: list[tuple[int, str, dict[bytes, bytes]]] = []
        for n in range(partitions) if only_partition is None else [only_partition]:
            found = cast(
                list[tuple[bytes, dict[bytes, bytes]]], await client.xrange(keys.dead(n), dead_id, dead_id)
            )
            if found:
                # Its exact id: an incomplete one (`1764115200000`) also finds an entry
                matches.append((n, _s(found[0][0]), found[0][1]))
        if not matches:
            raise BadInput(f"no dead letter {dead_id} (see `voxqueue dead`)")
        if len(matches) > 1:
            where = ", ".join(str(n) for n, _, _ in matches)
            raise BadInput(f"dead letter {dead_id} is in partitions {where}: choose one with --partition")
        partition, letter_id, letter = matches[0]
        old_sid = _s(letter.get(b"sid", b""))
        try:
            p.validate_sid(old_sid)
        except p.ProtocolError:
            raise BadInput(f"dead letter {dead_id} names no valid session: nothing to run again") from None
        labels = {"requeue_of": old_sid, "dead_letter": letter_id}
        new_sid = None if again else requeue_sid(partition, letter_id)
        try:
            await rerun_session(
                client, namespace, partitions, old_sid, new_sid, {}, labels, speed, False, False
            )
        except SessionIdTaken as taken:
            click.echo(taken.sid)
            click.echo(
                f"dead letter {letter_id} was requeued already as {taken.sid}: not running it again "
                "(--again runs it anyway)",
                err=True,
            )

    _run(redis_url, main)


def requeue_sid(partition: int, letter_id: str) -> str:
    """The session a dead letter is requeued as: one per letter, so a repeated requeue finds it.
    Each partition's dead letters are a stream of their own, so two partitions can hold the same
    entry id: the partition is part of the name (left out for partition 0, the only one of most
    deployments). An entry id is digits and a dash, valid in a session id."""
    return f"rq-{letter_id}" if partition == 0 else f"rq-p{partition}-{letter_id}"


ADMIN_COMMANDS = (status, sessions, dead)


def add_admin_commands(group: click.Group) -> click.Group:
    for command in ADMIN_COMMANDS:
        group.add_command(command)
    return group
