"""ops/bench --cluster: the bench's own readers find each partition on the node that serves it.

The bench follows results and session states with plain clients, one per node, instead of the
cluster client (ops/bench/__main__.py, Bench.partition_urls): a wrong partition-to-node map would
send those reads to a node that answers MOVED, and the per-shard session counts in BENCHMARKS.md
would be wrong. Checked here against a real local cluster; no load is run.
"""

from __future__ import annotations

from pathlib import Path

import redis

from ops.bench.__main__ import Bench
from worker.redis_server import RedisCluster


def test_partition_urls_name_the_node_serving_each_partition(
    redis_cluster: RedisCluster, tmp_path: Path
) -> None:
    bench = Bench(tmp_path, {}, partitions=16)
    bench.cluster = redis_cluster
    urls = bench.partition_urls()
    by_node = bench.partitions_by_node()
    assert sorted(i for parts in by_node.values() for i in parts) == list(range(16))
    assert len(set(urls)) > 1  # 16 partitions do not all hash to one of 3 shards
    for i, url in enumerate(urls):
        # A key of partition i, written through the plain client of the named node: any other
        # node would refuse it with MOVED.
        client = redis.Redis.from_url(url, socket_timeout=5)
        try:
            client.set(f"{bench.keys.tag(i)}:bench-probe", "1")
        finally:
            client.close()
    labels = bench.redis_nodes()
    for label, parts in by_node.items():
        port = labels[label].port
        assert all(urls[i].endswith(f":{port}/0") for i in parts)
