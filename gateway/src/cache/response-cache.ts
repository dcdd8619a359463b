/**
 * Response cache (the tutorial's lru_cache, done right): L1 in-process LRU, L2 in Redis shared by replicas.
 * Keyed by a hash of the caller's scope, the model, the normalised messages (or raw prompt) and every generation parameter (so one
 * tenant's entries never answer another's, unless CACHE_SCOPE=shared); only deterministic requests
 * (temperature 0, or a seed) are cached. The value is the worker's JobResult, so a hit can be answered as JSON or
 * streamed, on /v1 or the tutorial routes alike.
 *
 * Redis runs with `noeviction`, so L2 keeps itself inside CACHE_L2_MAX_BYTES: before each write one Lua call reserves
 * the entry's bytes in an index ZSET (entry → expiry) and a byte counter, evicting the entries closest to expiry
 * first; the entry is then written and the evicted ones deleted (the script touches only its own keys).
 */
import { createHash } from 'node:crypto';
import type Redis from 'ioredis';
import type { Config } from '../config';
import type { Logger } from '../logger';
import { type JobData, type JobResult, jobResultSchema } from '../protocol/job';
import { LRUCache } from 'lru-cache';
import { runScript } from '../redis-scripts';

const PREFIX = 'llm:cache:';
// The bookkeeping keys share one hash tag (one slot in Redis Cluster): redis-scripts/cache-reserve.lua updates them in
// one call. Entries themselves are spread over the cluster, so the script never touches them.
export const CACHE_INDEX = 'llm:cache:{meta}:index';
export const CACHE_SIZES = 'llm:cache:{meta}:sizes';
export const CACHE_BYTES = 'llm:cache:{meta}:bytes';
/** Rough per-key overhead of Redis (dict entry, key object, index and size entries) counted against the budget. */
const ENTRY_OVERHEAD = 200;

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
 * Same scope + model + messages (or prompt) + parameters → same key; `stream` is not part of it (a hit can be streamed either
 * way). `scope` is the caller (CACHE_SCOPE=caller: its key id or JWT subject) or "shared". `sent`: for an upstream's
 * request, the rest of the body it is sent (services/upstream-prepare.ts), since any of it may change its answer.
 */
export function cacheKey(data: JobData, scope: string, sent?: Record<string, unknown>): string {
  // A raw prompt (/v1/completions) is keyed by its text; JSON.stringify leaves absent ones out, so chat keys are as before.
  const basis = JSON.stringify(canonical({ scope, model: data.model, messages: data.messages, prompt: data.prompt, params: data.params, sent }));
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
      const [reserved, ...evicted] = (await runScript(this.redis, 'cacheReserve', [CACHE_INDEX, CACHE_SIZES, CACHE_BYTES], [
        key,
        this.config.CACHE_TTL_MS,
        this.config.CACHE_L2_MAX_BYTES,
        size,
      ])) as [number, ...string[]];
      // Evicted entries go first: the budget already counts them as gone. Deleted one by one (each key may live on
      // another cluster node).
      await Promise.all(evicted.map((k) => this.redis.del(k)));
      // Not reserved (larger than the whole budget): an earlier version of it is no longer counted, so it goes too.
      if (Number(reserved) === 1) await this.redis.set(key, raw, 'PX', this.config.CACHE_TTL_MS);
      else await this.redis.del(key);
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
