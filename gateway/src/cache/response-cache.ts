/**
 * Response cache (the tutorial's lru_cache, done right): L1 in-process LRU, L2 in Redis shared by replicas.
 * Keyed by a hash of the caller's scope, the model, the normalised messages and every generation parameter (so one
 * tenant's entries never answer another's, unless CACHE_SCOPE=shared); only deterministic requests
 * (temperature 0, or a seed) are cached. The value is the worker's JobResult, so a hit can be answered as JSON or
 * streamed, on /v1 or the tutorial routes alike.
 *
 * Redis runs with `noeviction`, so L2 keeps itself inside CACHE_L2_MAX_BYTES: an index ZSET (entry → expiry) and a
 * byte counter are updated in the same Lua call as each write, evicting the entries closest to expiry first.
 */
import { createHash } from 'node:crypto';
import type Redis from 'ioredis';
import type { Config } from '../config';
import type { Logger } from '../logger';
import { type JobData, type JobResult, jobResultSchema } from '../protocol/job';
import { LRUCache } from 'lru-cache';

const PREFIX = 'llm:cache:';
const INDEX = 'llm:cache:index';
const SIZES = 'llm:cache:sizes';
const BYTES = 'llm:cache:bytes';
/** Rough per-key overhead of Redis (dict entry, key object, index and size entries) counted against the budget. */
const ENTRY_OVERHEAD = 200;

// KEYS: entry, index, sizes, bytes.  ARGV: value, ttlMs, budget, size
const PUT = `
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function drop(k)
  local s = tonumber(redis.call('HGET', KEYS[3], k)) or 0
  redis.call('DECRBY', KEYS[4], s)
  redis.call('HDEL', KEYS[3], k)
  redis.call('ZREM', KEYS[2], k)
  redis.call('DEL', k)
end
for _, k in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)) do drop(k) end
drop(KEYS[1])
local size, budget = tonumber(ARGV[4]), tonumber(ARGV[3])
while (tonumber(redis.call('GET', KEYS[4])) or 0) + size > budget do
  local victim = redis.call('ZRANGE', KEYS[2], 0, 0)[1]
  if not victim then break end
  drop(victim)
end
if (tonumber(redis.call('GET', KEYS[4])) or 0) + size > budget then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), KEYS[1])
redis.call('HSET', KEYS[3], KEYS[1], size)
redis.call('INCRBY', KEYS[4], size)
return 1
`;

/** Deterministic requests only: a sampled answer is not "the" answer to repeat. */
export function isCacheable(data: JobData): boolean {
  return data.params.temperature === 0 || data.params.seed !== null;
}

function canonical(v: unknown): unknown {
  if (Array.isArray(v)) return v.map(canonical);
  if (v && typeof v === 'object') {
    return Object.fromEntries(Object.keys(v).sort().map((k) => [k, canonical((v as Record<string, unknown>)[k])]));
  }
  return v;
}

/**
 * Same scope + model + messages + parameters → same key; `stream` is not part of it (a hit can be streamed either
 * way). `scope` is the caller (CACHE_SCOPE=caller: its key id or JWT subject) or "shared".
 */
export function cacheKey(data: JobData, scope: string): string {
  const basis = JSON.stringify(canonical({ scope, model: data.model, messages: data.messages, params: data.params }));
  return PREFIX + createHash('sha256').update(basis, 'utf8').digest('hex');
}

export class ResponseCache {
  /** In-process L1: entries, bytes and per-entry TTL bounded by lru-cache (null when CACHE_L1_MAX_ENTRIES is 0). */
  private readonly l1: LRUCache<string, JobResult> | null;

  constructor(
    private readonly config: Config,
    private readonly redis: Redis,
    private readonly log: Logger,
  ) {
    this.l1 =
      config.CACHE_L1_MAX_ENTRIES > 0 && config.CACHE_L1_MAX_BYTES > 0
        ? new LRUCache<string, JobResult>({ max: config.CACHE_L1_MAX_ENTRIES, maxSize: config.CACHE_L1_MAX_BYTES })
        : null;
  }

  get enabled(): boolean {
    return this.config.CACHE_ENABLED;
  }

  async get(key: string): Promise<JobResult | null> {
    const local = this.l1?.get(key);
    if (local) return local;
    if (this.config.CACHE_L2_MAX_BYTES <= 0) return null;
    try {
      const [[, raw], [, pttl]] = (await this.redis.multi().get(key).pttl(key).exec()) as [[null, string | null], [null, number]];
      if (!raw) return null;
      const parsed = jobResultSchema.safeParse(JSON.parse(raw));
      if (!parsed.success) return null;
      if (pttl > 0) this.setL1(key, parsed.data, raw.length, pttl);
      return parsed.data;
    } catch (err) {
      this.log.warn('cache read failed; answering without it', { err: String(err) });
      return null;
    }
  }

  async put(key: string, result: JobResult): Promise<void> {
    const { worker_id: _w, timing: _t, ...kept } = result;
    const raw = JSON.stringify(kept);
    if (raw.length > this.config.CACHE_MAX_ENTRY_BYTES) return;
    this.setL1(key, kept as JobResult, raw.length, this.config.CACHE_TTL_MS);
    if (this.config.CACHE_L2_MAX_BYTES <= 0) return;
    const size = raw.length + key.length + ENTRY_OVERHEAD;
    try {
      await this.redis.eval(PUT, 4, key, INDEX, SIZES, BYTES, raw, String(this.config.CACHE_TTL_MS), String(this.config.CACHE_L2_MAX_BYTES), String(size));
    } catch (err) {
      this.log.warn('cache write failed', { err: String(err) });
    }
  }

  /** lru-cache refuses an entry larger than maxSize by throwing unless told its size fits: such answers stay L2-only. */
  private setL1(key: string, value: JobResult, bytes: number, ttl: number): void {
    if (!this.l1 || bytes > this.config.CACHE_L1_MAX_BYTES) return;
    this.l1.set(key, value, { size: Math.max(1, bytes), ttl });
  }
}
