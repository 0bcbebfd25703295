"""Redis Cluster support shared by the producer and the worker (README "Scaling past one Redis").

Cluster mode is chosen by the URL scheme, `redis+cluster://host:port` (`rediss+cluster://` with
TLS), or by `VOXQUEUE_REDIS_CLUSTER=1` with a plain `redis://`/`rediss://` URL. The URL names any
one node; the client discovers the rest. User, password and TLS options work as in a plain URL.

Every key of a partition carries the hash tag `{p<N>}` (docs/protocol.md), so a partition is one
slot: each fenced script and each multi-key command stays within one partition. The two hand-packed
hot paths (the producer's XADD pipeline, the worker's XREAD) group their commands per slot and send
one pipeline per node, here.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import Connection, SSLConnection
from redis.exceptions import AskError, ClusterDownError, SlotNotCoveredError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError

CLUSTER_SCHEMES = {"redis+cluster://": "redis://", "rediss+cluster://": "rediss://"}
CLUSTER_ENV = "VOXQUEUE_REDIS_CLUSTER"

# Replies that mean "this command went to a node that no longer serves the slot, or the slot is
# in flux" (MOVED, ASK, TRYAGAIN, CLUSTERDOWN): the command did nothing; refresh the slot map and
# send it again. MovedError is an AskError.
REDIRECTS: tuple[type[Exception], ...] = (AskError, TryAgainError, ClusterDownError)

T = TypeVar("T")


def env_says_cluster() -> bool:
    return os.environ.get(CLUSTER_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def split_url(url: str, cluster: bool | None = None) -> tuple[bool, str]:
    """(cluster mode?, the URL redis-py understands). `cluster` None: the scheme decides, then
    VOXQUEUE_REDIS_CLUSTER."""
    for scheme, plain in CLUSTER_SCHEMES.items():
        if url.startswith(scheme):
            return True, plain + url[len(scheme) :]
    if cluster is None:
        cluster = env_says_cluster()
    return cluster, url


class _ClosedUnderneath:
    """redis-py 8.1's cluster client disconnects a node's idle connections after a connection
    error on that node (a failover) while another task may just have taken one of them: that task
    then fails with AttributeError (`None.writelines`) instead of a connection error, which
    neither redis-py's retry nor our loops treat as an outage. Say what it is: ConnectionError."""

    async def send_packed_command(self, *args: Any, **kwargs: Any) -> None:
        try:
            await super().send_packed_command(*args, **kwargs)  # type: ignore[misc]
        except AttributeError as exc:
            raise RedisConnectionError("connection closed by a concurrent cluster refresh") from exc

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)  # type: ignore[misc]
        except AttributeError as exc:
            raise RedisConnectionError("connection closed by a concurrent cluster refresh") from exc


class _ClusterConnection(_ClosedUnderneath, Connection):
    pass


class _ClusterSSLConnection(_ClosedUnderneath, SSLConnection):
    pass


def cluster_client(url: str, **kwargs: Any) -> aioredis.Redis:
    """An asyncio RedisCluster for a plain redis:// or rediss:// URL naming one node.

    Typed as `Redis`: it offers the same commands the code uses; the few places that need a
    connection of their own (hand-packed pipelines, pub/sub) check `is_cluster` first."""
    client = RedisCluster.from_url(url, **kwargs)
    manager = client.nodes_manager
    # RedisCluster takes no connection_class: set ours where nodes are made from.
    tls = manager.connection_kwargs.get("connection_class") is SSLConnection
    safe = _ClusterSSLConnection if tls else _ClusterConnection
    manager.connection_kwargs["connection_class"] = safe
    for node in manager.startup_nodes.values():
        node.connection_class = safe
    return client  # type: ignore[return-value]


def is_cluster(client: Any) -> bool:
    return isinstance(client, RedisCluster)


def as_cluster(client: Any) -> RedisCluster:
    assert isinstance(client, RedisCluster)
    return client


async def ready(client: Any) -> RedisCluster:
    """The cluster client, with its slot map loaded (the first command does that otherwise)."""
    cluster = as_cluster(client)
    if not cluster.nodes_manager.slots_cache:
        await cluster.initialize()
    return cluster


def node_of(cluster: RedisCluster, key: bytes | str) -> ClusterNode:
    return cluster.nodes_manager.get_node_from_slot(cluster.keyslot(key))


def group_by_node(cluster: RedisCluster, items: Iterable[T], key_of: Any) -> dict[ClusterNode, list[T]]:
    """Items grouped by the master serving each one's key, in their original order per node."""
    out: dict[ClusterNode, list[T]] = {}
    for item in items:
        out.setdefault(node_of(cluster, key_of(item)), []).append(item)
    return out


def private_connection(node: ClusterNode) -> Connection:
    """A connection to `node` that only its creator uses (connected on first use, with the
    client's credentials and TLS settings). The hot paths keep one per node (or per partition)
    rather than borrowing from the cluster client's pools: redis-py recycles pooled connections
    on every topology refresh, which must not cut a pipeline or a blocking read in flight."""
    return node.connection_class(**node.connection_kwargs)


async def refresh(client: Any) -> None:
    """Reload the slot map (after MOVED, a failover, a dead node). Failing is fine: the next
    attempt tries again."""
    cluster = as_cluster(client)
    with contextlib.suppress(Exception):
        await cluster.nodes_manager.initialize()


__all__ = [
    "CLUSTER_ENV",
    "CLUSTER_SCHEMES",
    "REDIRECTS",
    "ClusterNode",
    "SlotNotCoveredError",
    "as_cluster",
    "cluster_client",
    "env_says_cluster",
    "group_by_node",
    "is_cluster",
    "node_of",
    "private_connection",
    "ready",
    "refresh",
    "split_url",
]
