/**
 * Everything a caller's request must pass before it becomes a job, besides validation:
 * rate limits (limits/rate-limiter.ts), per-caller concurrency, and the model's queue depth; plus OpenAI's
 * x-ratelimit-* headers and the degradation decision (fallback model / max_tokens cap when a queue is saturated).
 */
import type { Response } from 'express';
import type Redis from 'ioredis';
import type { Principal } from '../auth/api-keys';
import type { Config } from '../config';
import { ApiError } from '../errors';
import { queueName } from '../protocol/job';
import type { JobPlacement } from '../queue/job-queue';
import { bullPrefix } from '../queue/redis';
import type { Tier } from './governance-config';
import { runScript } from '../redis-scripts';
import type { Admission, Bucket, BucketState, RateLimiter } from './rate-limiter';

/**
 * Queue placement per tier. BullMQ serves its wait list before its prioritized set, so: standard = plain FIFO (the
 * wait list, as with no governance), high = head of the wait list (lifo: ahead of every standard job; LIFO among
 * themselves), low = the prioritized set (served only when no high or standard job waits).
 */
export const TIER_PLACEMENT: Record<Tier, JobPlacement> = { high: { lifo: true }, standard: {}, low: { priority: 1 } };

export interface EffectiveLimits {
  models: string[] | null;
  rpm: number;
  tpm: number;
  maxConcurrent: number;
  tier: Tier;
}

export function effectiveLimits(config: Config, p: Principal): EffectiveLimits {
  const l = p.limits;
  return {
    models: l?.models ?? null,
    rpm: l?.rpm ?? config.DEFAULT_RPM,
    tpm: l?.tpm ?? config.DEFAULT_TPM,
    maxConcurrent: l?.max_concurrent ?? config.DEFAULT_MAX_CONCURRENT,
    tier: l?.tier ?? config.DEFAULT_TIER,
  };
}

/** The budgets a request draws on: the caller's own, and on the tutorial routes also the tutorial's per-caller RPM. */
export function bucketsFor(config: Config, p: Principal, limits: EffectiveLimits, tutorial: boolean): Bucket[] {
  const out: Bucket[] = [];
  if (limits.rpm > 0 || limits.tpm > 0) out.push({ scope: p.keyId, name: 'all', rpm: limits.rpm, tpm: limits.tpm });
  if (tutorial && config.TUTORIAL_RPM > 0) out.push({ scope: p.keyId, name: 'tutorial', rpm: config.TUTORIAL_RPM, tpm: 0 });
  return out;
}

/** OpenAI's duration format in x-ratelimit-reset-*: "20ms", "1.5s", "6m0s". */
export function formatDuration(ms: number): string {
  const v = Math.max(0, Math.ceil(ms));
  if (v < 1000) return `${v}ms`;
  const m = Math.floor(v / 60_000);
  const s = Number(((v % 60_000) / 1000).toFixed(3));
  return m > 0 ? `${m}m${s}s` : `${s}s`;
}

/** Sets the x-ratelimit-* headers: the tightest request budget and the token budget that apply. */
/** Where admission writes its headers: the response, or one item's own set (/chat/batch). */
export interface HeaderTarget {
  setHeader(name: string, value: string | number | readonly string[]): unknown;
  hasHeader(name: string): boolean;
}

export function setRateLimitHeaders(res: HeaderTarget, states: BucketState[]): void {
  const req = states.filter((s) => s.bucket.rpm > 0).sort((a, b) => a.remainingRequests - b.remainingRequests)[0];
  const tok = states.find((s) => s.bucket.tpm > 0);
  if (req) {
    res.setHeader('x-ratelimit-limit-requests', String(req.bucket.rpm));
    res.setHeader('x-ratelimit-remaining-requests', String(req.remainingRequests));
    res.setHeader('x-ratelimit-reset-requests', formatDuration(req.resetRequestsMs));
  }
  if (tok) {
    res.setHeader('x-ratelimit-limit-tokens', String(tok.bucket.tpm));
    res.setHeader('x-ratelimit-remaining-tokens', String(tok.remainingTokens));
    res.setHeader('x-ratelimit-reset-tokens', formatDuration(tok.resetTokensMs));
  }
}

/** The 429 for a refused admission (OpenAI's wording); a request larger than the whole token budget is never retried. */
export function rateLimitError(res: HeaderTarget, a: Admission, cost: number, windowMs: number): ApiError {
  const per = windowMs === 60_000 ? 'per minute' : `per ${windowMs / 1000} s`;
  const state = a.states.find((s) => (a.limitedBy === 'tokens' ? s.bucket.tpm > 0 : s.bucket.rpm > 0)) ?? a.states[0];
  if (a.retryAfterMs < 0) {
    res.setHeader('x-should-retry', 'false');
    return new ApiError(
      'rate_limit_exceeded',
      `Request too large: tokens ${per} (TPM): Limit ${state.bucket.tpm}, Requested ${cost}. Reduce the prompt or max_tokens.`,
    );
  }
  const wait = Math.max(1, a.retryAfterMs);
  const what =
    a.limitedBy === 'tokens'
      ? `tokens ${per} (TPM): Limit ${state.bucket.tpm}, Used ${state.usedTokens}, Requested ${cost}`
      : `requests ${per} (RPM): Limit ${state.bucket.rpm}, Used ${state.usedRequests}, Requested 1`;
  return new ApiError('rate_limit_exceeded', `Rate limit reached for ${what}. Please try again in ${formatDuration(wait)}.`, {
    retryAfterMs: wait,
  });
}

// ---- concurrency ---------------------------------------------------------------------------------------------------
/**
 * Per-caller concurrent requests, shared by replicas: a ZSET of in-flight request ids whose score is a lease expiry,
 * so a crashed gateway's slots free themselves after the lease (the request timeout plus a margin;
 * redis-scripts/concurrency-acquire.lua).
 */
export class ConcurrencyLimiter {
  constructor(
    private readonly redis: Redis,
    private readonly leaseMs: number,
  ) {}

  /** Returns the release function, or null when the caller is at its limit. */
  async acquire(principalId: string, member: string, max: number): Promise<(() => Promise<void>) | null> {
    if (max <= 0) return async () => undefined;
    const key = `llm:inflight:{${principalId}}`;
    const ok = await runScript(this.redis, 'concurrencyAcquire', [key], [member, max, this.leaseMs]);
    if (Number(ok) !== 1) return null;
    let released = false;
    return async () => {
      if (released) return;
      released = true;
      await this.redis.zrem(key, member);
    };
  }
}

/** Jobs of a model not yet taken by a worker: BullMQ's wait list plus its prioritized set (all of ours are). */
export async function queueDepth(redis: Redis, model: string): Promise<number> {
  const q = `${bullPrefix(redis)}:${queueName(model)}`;
  const res = await redis.multi().llen(`${q}:wait`).zcard(`${q}:prioritized`).llen(`${q}:paused`).exec();
  // A command's own error (WRONGTYPE …) is an error, not a depth of 0.
  for (const [err] of res ?? []) if (err) throw err;
  return (res ?? []).reduce((sum, [, v]) => sum + Number(v ?? 0), 0);
}
