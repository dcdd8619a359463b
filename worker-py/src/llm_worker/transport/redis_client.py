"""The worker's Redis connections: one factory for plain Redis and Redis Cluster.

REDIS_URL selects which, the same way as the gateway's (gateway/src/queue/redis.ts): ``redis://``/``rediss://`` for
plain Redis, ``redis+cluster://host:port,host:port`` (``rediss+cluster://`` for TLS) for a cluster, the nodes being
seeds. On a cluster BullMQ's prefix is hash-tagged (``{bull}``: each queue's Lua scripts touch all its keys, which must
share a slot) and job channels go out with SPUBLISH (sharded pub/sub; the gateway SSUBSCRIBEs). Cancels stay on plain
PUBLISH/SUBSCRIBE, which a cluster broadcasts to every node.

The plain client:
- Blocking: redis-py's default pool raises "Too many connections" instead of waiting when many callers need a
  connection at once (every running job checks for cancellation and publishes).
- Retrying: a pooled connection to a Redis that restarted fails on its next command ("Connection closed by server").
  With a pool of our own redis-py does not retry at all, so the first PUBLISH after a restart — a job's `started` —
  was lost (a CI run of tests/e2e/faults.test.ts caught it). Now a command is retried a few times on a new connection.
  A retried PUBLISH whose first send did arrive repeats a seq number: the gateway takes that as a gap and finishes
  from the job's stored result, so the client's text stays right either way.
"""

from __future__ import annotations

import re
from typing import Any, Optional
from urllib.parse import unquote

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

# 50, 100, 200 ms: enough for a new connection to a Redis that is back; a Redis still down fails within ~0.4 s and
# the caller's own handling (heartbeat retry, logged lost publish) takes over.
RETRIES = 3

_CLUSTER_URL = re.compile(r"^(rediss?)\+cluster://(?:([^@/]*)@)?([^/?#]+)/?$")


def is_cluster_url(url: str) -> bool:
    return bool(re.match(r"^rediss?\+cluster://", url))


def bull_prefix(url: str) -> str:
    """BullMQ's key prefix; the gateway's bullPrefix gives the same."""
    return "{bull}" if is_cluster_url(url) else "bull"


def _cluster_parts(url: str) -> tuple[bool, Optional[str], Optional[str], list[tuple[str, int]]]:
    """(tls, username, password, seed nodes) of a ``redis+cluster://`` URL; a seed without a port is 6379."""
    m = _CLUSTER_URL.match(url)
    if not m:
        raise ValueError("REDIS_URL: expected redis+cluster://host:port[,host:port...]")
    nodes = []
    for hp in m.group(3).split(","):
        host, _, port = hp.rpartition(":")
        nodes.append((host, int(port)) if host else (hp, 6379))
    user = password = None
    if m.group(2):
        u, sep, p = m.group(2).partition(":")
        user, password = (unquote(u) or None, unquote(p)) if sep else (None, unquote(u))
    return m.group(1) == "rediss", user, password, nodes


def _cluster(url: str, **kwargs: Any) -> RedisCluster:
    tls, user, password, nodes = _cluster_parts(url)
    return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in nodes], decode_responses=True, username=user,
                        password=password, ssl=tls, **kwargs)


def redis_client(url: str, *, max_connections: int) -> Any:
    if is_cluster_url(url):
        # max_connections is per node here; a command waits for a free one instead of failing.
        return _cluster(url, max_connections=max_connections,
                        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), RETRIES))
    pool = aioredis.BlockingConnectionPool.from_url(
        url, decode_responses=True, max_connections=max_connections, timeout=30,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), RETRIES),
        retry_on_error=[RedisConnectionError, RedisTimeoutError])
    return aioredis.Redis(connection_pool=pool)


def bullmq_connection(url: str) -> Any:
    """What bullmq's ``connection`` option gets: the URL itself for plain Redis, a cluster client of its own."""
    return _cluster(url) if is_cluster_url(url) else url


def is_cluster(client: Any) -> bool:
    return isinstance(client, (RedisCluster, ClusterPipeline))


def publish(target: Any, channel: str, message: str) -> Any:
    """PUBLISH a job channel's message, or SPUBLISH on a cluster; ``target`` is a client or one of its pipelines."""
    return target.spublish(channel, message) if is_cluster(target) else target.publish(channel, message)


def cancel_listener_client(url: str, client: Any) -> Any:
    """The client to SUBSCRIBE to llm:cancel with: ``client`` itself on plain Redis; on a cluster a plain connection to
    the first seed node (a cluster's PUBLISH reaches every node). The caller closes it when it is not ``client``."""
    if not is_cluster_url(url):
        return client
    tls, user, password, nodes = _cluster_parts(url)
    host, port = nodes[0]
    return aioredis.Redis(host=host, port=port, username=user, password=password, ssl=tls, decode_responses=True)


def transaction_ok(client: Any) -> bool:
    """MULTI of keys in several slots is CROSSSLOT on a cluster: there the heartbeat's writes go unwrapped."""
    return not is_cluster(client)
