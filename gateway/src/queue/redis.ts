/**
 * Redis connections. The gateway holds a fixed few, whatever the load: one for commands (shared by BullMQ queues,
 * the worker registry, cancels), one subscriber for job channels, and one blocking connection per model queue for
 * BullMQ QueueEvents. None is created per request.
 */
import Redis, { type RedisOptions } from 'ioredis';
import type { Logger } from '../logger';

export function createRedis(url: string, role: string, logger: Logger, extra: RedisOptions = {}): Redis {
  const client = new Redis(url, {
    // Reconnect forever, backing off to 2 s: Redis restarts must not need a gateway restart.
    retryStrategy: (times) => Math.min(100 * times, 2000),
    // A command issued while Redis is away fails after one reconnect attempt instead of hanging the request; routes
    // also check `status` first so most requests get their 503 at once.
    maxRetriesPerRequest: 1,
    connectionName: `llm-gateway:${role}`,
    lazyConnect: false,
    ...extra,
  });
  let down = false;
  client.on('error', (err: Error) => {
    if (!down) logger.warn('redis connection error', { role, err: err.message });
    down = true;
  });
  client.on('ready', () => {
    if (down) logger.info('redis connection restored', { role });
    down = false;
  });
  return client;
}

export const isReady = (client: Redis): boolean => client.status === 'ready';
