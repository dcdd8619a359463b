/**
 * Redis connections. The gateway holds a fixed few, whatever the load: one for commands (shared by BullMQ queues,
 * the worker registry, cancels), one subscriber for job channels, and one blocking connection per model queue for
 * BullMQ QueueEvents. None is created per request.
 *
 * REDIS_URL selects plain Redis (`redis://`, `rediss://`) or Redis Cluster (`redis+cluster://host:port,host:port`,
 * `rediss+cluster://` for TLS; the nodes are seeds, the rest are discovered). The difference between the two stays
 * here: on a cluster the client is an ioredis Cluster, BullMQ's prefix is hash-tagged (`{bull}`) so that each queue's
 * keys share one slot, and job channels use sharded pub/sub (SSUBSCRIBE, which the worker's SPUBLISH reaches on
 * whichever node owns the channel's slot; a plain SUBSCRIBE on a cluster hears only PUBLISH).
 */
import Redis, { Cluster, type RedisOptions } from 'ioredis';
import type { Logger } from '../logger';

const CLUSTER_URL = /^(rediss?)\+cluster:\/\/(?:([^@/]*)@)?([^/?#]+)\/?$/;

export const isClusterUrl = (url: string): boolean => /^rediss?\+cluster:\/\//.test(url);


function clusterNodes(url: string): { nodes: { host: string; port: number }[]; tls: boolean; username?: string; password?: string } {
  const m = CLUSTER_URL.exec(url);
  if (!m) throw new Error('REDIS_URL: expected redis+cluster://host:port[,host:port...]');
  const nodes = m[3].split(',').map((hp) => {
    const i = hp.lastIndexOf(':');
    return i < 0 ? { host: hp, port: 6379 } : { host: hp.slice(0, i), port: Number(hp.slice(i + 1)) };
  });
  const [user, pass] = m[2] ? m[2].split(':').map(decodeURIComponent) : [];
  return { nodes, tls: m[1] === 'rediss', username: pass === undefined ? undefined : user || undefined, password: pass ?? user };
}

/**
 * A plain client or a Cluster, as REDIS_URL says. The Cluster is typed as Redis for the rest of the gateway (and the
 * tests): it answers the same commands, keys routed by slot; what differs (pub/sub, multi-key commands) goes through
 * the helpers below.
 */
export function connectRedis(url: string, options: RedisOptions = {}, { sharded = false } = {}): Redis {
  if (!isClusterUrl(url)) return new Redis(url, options);
  const { nodes, tls, username, password } = clusterNodes(url);
  const cluster = new Cluster(nodes, {
    redisOptions: { ...options, username, password, ...(tls ? { tls: {} } : {}) },
    clusterRetryStrategy: options.retryStrategy,
    // Sharded subscriptions follow their slot's node (ioredis keeps one subscriber per shard).
    shardedSubscribers: sharded,
    lazyConnect: options.lazyConnect,
  });
  return cluster as unknown as Redis;
}

export function createRedis(url: string, role: string, logger: Logger, extra: RedisOptions = {}): Redis {
  const client = connectRedis(url, {
    // Reconnect forever, backing off to 2 s: Redis restarts must not need a gateway restart.
    retryStrategy: (times) => Math.min(100 * times, 2000),
    // A command issued while Redis is away fails after one reconnect attempt instead of hanging the request; routes
    // also check `status` first so most requests get their 503 at once.
    maxRetriesPerRequest: 1,
    connectionName: `llm-gateway:${role}`,
    lazyConnect: false,
    ...extra,
  }, { sharded: role === 'subscriber' });
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

export const isCluster = (client: Redis): boolean => (client as unknown) instanceof Cluster;

/** BullMQ's key prefix: hash-tagged on a cluster (a queue's Lua scripts touch all its keys); the worker uses the same. */
export const bullPrefix = (client: Redis): string => (isCluster(client) ? '{bull}' : 'bull');

export const isReady = (client: Redis): boolean => client.status === 'ready';

/** Job-channel pub/sub on either kind: SSUBSCRIBE/SPUBLISH on a cluster, SUBSCRIBE/PUBLISH on plain Redis. */
export interface Channels {
  subscribe(channel: string): Promise<unknown>;
  unsubscribe(channel: string): Promise<unknown>;
  /** Calls `handler` for every message of a subscribed channel. */
  onMessage(handler: (channel: string, message: string) => void): void;
  publish(channel: string, message: string): Promise<unknown>;
}

export function channels(client: Redis): Channels {
  if (isCluster(client)) {
    return {
      subscribe: (c) => client.ssubscribe(c),
      unsubscribe: (c) => client.sunsubscribe(c),
      onMessage: (h) => void client.on('smessage', h),
      publish: (c, m) => client.spublish(c, m),
    };
  }
  return {
    subscribe: (c) => client.subscribe(c),
    unsubscribe: (c) => client.unsubscribe(c),
    onMessage: (h) => void client.on('message', h),
    publish: (c, m) => client.publish(c, m),
  };
}

/**
 * MGET that works across slots: on a cluster one GET per key, sent together (an ioredis Cluster pipeline must stay in
 * one slot, and MGET of keys in several slots is CROSSSLOT).
 */
export async function mgetAny(client: Redis, keys: string[]): Promise<(string | null)[]> {
  if (!isCluster(client)) return client.mget(keys);
  return Promise.all(keys.map((k) => client.get(k)));
}

/**
 * Commands of keys in several slots, run in order: one MULTI on plain Redis, one after another on a cluster (MULTI
 * there is CROSSSLOT). Callers order them so that every intermediate state is safe to read.
 */
export async function inOrder(client: Redis, commands: [string, ...(string | number)[]][]): Promise<void> {
  if (!isCluster(client)) {
    const res = await client.multi(commands.map(([c, ...a]) => [c, ...a.map(String)])).exec();
    for (const [err] of res ?? []) if (err) throw err;
    return;
  }
  for (const [c, ...a] of commands) await client.call(c, ...a.map(String));
}

type Pipeline = ReturnType<Redis['pipeline']>;

/**
 * A pipeline over many items whose keys are in different slots: one pipeline on plain Redis; on a cluster (where a
 * pipeline must stay in one slot) one per item, sent together. `add` queues one item's commands, all in one slot.
 */
export async function pipelineEach<T>(client: Redis, items: readonly T[], add: (pipe: Pipeline, item: T) => void): Promise<void> {
  if (!isCluster(client)) {
    const pipe = client.pipeline();
    for (const item of items) add(pipe, item);
    await pipe.exec();
    return;
  }
  await Promise.all(items.map((item) => {
    const pipe = client.pipeline();
    add(pipe, item);
    return pipe.exec();
  }));
}
