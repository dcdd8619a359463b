"""The worker's own Redis client (everything but bullmq's connections): a blocking pool that retries a lost connection.

- Blocking: redis-py's default pool raises "Too many connections" instead of waiting when many callers need a
  connection at once (every running job checks for cancellation and publishes).
- Retrying: a pooled connection to a Redis that restarted fails on its next command ("Connection closed by server").
  With a pool of our own redis-py does not retry at all, so the first PUBLISH after a restart — a job's `started` —
  was lost (a CI run of tests/e2e/faults.test.ts caught it). Now a command is retried a few times on a new connection.
  A retried PUBLISH whose first send did arrive repeats a seq number: the gateway takes that as a gap and finishes
  from the job's stored result, so the client's text stays right either way.
"""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

# 50, 100, 200 ms: enough for a new connection to a Redis that is back; a Redis still down fails within ~0.4 s and
# the caller's own handling (heartbeat retry, logged lost publish) takes over.
RETRIES = 3


def redis_client(url: str, *, max_connections: int) -> aioredis.Redis:
    pool = aioredis.BlockingConnectionPool.from_url(
        url, decode_responses=True, max_connections=max_connections, timeout=30,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), RETRIES),
        retry_on_error=[RedisConnectionError, RedisTimeoutError])
    return aioredis.Redis(connection_pool=pool)
