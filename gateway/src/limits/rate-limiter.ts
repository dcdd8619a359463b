/**
 * Requests and tokens per window, shared by every gateway replica through Redis: a token bucket per caller and
 * dimension, kept as GCRA time stamps (redis-scripts/rate-admit.lua), so one admission is one O(1) script call
 * however much traffic the window holds, with Redis' own clock so replicas with skewed clocks share one budget.
 *
 * A full bucket admits a burst of `rpm` requests (and `tpm` tokens); it refills continuously, `rpm` per window. The
 * wait until a refused request fits is exact (when enough has refilled), and so is the time until the bucket is full
 * again (OpenAI's x-ratelimit-reset-*). Tokens are charged on admission (the estimate: prompt + n × max_tokens) and
 * corrected when the real usage is known (`adjust`).
 */
import type Redis from 'ioredis';
import { runScript } from '../redis-scripts';

export interface Bucket {
  /** Whose budget: the Redis hash tag, so all buckets of one caller live in one slot (Redis Cluster). */
  scope: string;
  /** Which budget of that caller (e.g. "all", "tutorial"). */
  name: string;
  /** Requests per window; 0 = unlimited. */
  rpm: number;
  /** Tokens per window; 0 = unlimited. */
  tpm: number;
}

export interface BucketState {
  bucket: Bucket;
  remainingRequests: number;
  remainingTokens: number;
  /** Until the bucket is full again (OpenAI's x-ratelimit-reset-*). */
  resetRequestsMs: number;
  resetTokensMs: number;
  /** What the bucket is short of full, in requests and tokens. */
  usedRequests: number;
  usedTokens: number;
}

export interface Admission {
  admitted: boolean;
  /** When refused: ms until this request would fit; -1 when it never can (cost above the token limit). */
  retryAfterMs: number;
  /** Which limit refused it. */
  limitedBy: 'requests' | 'tokens' | null;
  states: BucketState[];
}

export const bucketKey = (b: Pick<Bucket, 'scope' | 'name'>) => `llm:rl:{${b.scope}}:${b.name}`;

/** What `ms` of a bucket's time stamp ahead of now is, in units of a limit per window (rounded up: never under). */
const units = (ms: number, limit: number, windowMs: number) => (limit > 0 ? Math.max(0, Math.ceil((ms * limit) / windowMs - 1e-6)) : 0);

export class RateLimiter {
  constructor(
    private readonly redis: Redis,
    readonly windowMs: number,
  ) {}

  /** Admits one request of `cost` tokens into every bucket, or into none. `dry`: only reads the state. */
  async admit(buckets: Bucket[], cost: number, dry = false): Promise<Admission> {
    if (buckets.length === 0) return { admitted: !dry, retryAfterMs: 0, limitedBy: null, states: [] };
    const argv = [this.windowMs, Math.max(0, Math.round(cost)), dry ? '1' : '0', ...buckets.flatMap((b) => [b.rpm, b.tpm])];
    const raw = (await runScript(this.redis, 'rateAdmit', buckets.map(bucketKey), argv)) as Array<number | string>;
    const states = buckets.map((bucket, i): BucketState => {
      const [aheadReq, aheadTok] = raw.slice(3 + 2 * i, 5 + 2 * i).map(Number);
      const usedRequests = units(aheadReq, bucket.rpm, this.windowMs);
      const usedTokens = units(aheadTok, bucket.tpm, this.windowMs);
      return {
        bucket,
        usedRequests,
        usedTokens,
        remainingRequests: Math.max(0, bucket.rpm - usedRequests),
        remainingTokens: Math.max(0, bucket.tpm - usedTokens),
        resetRequestsMs: Math.max(0, aheadReq),
        resetTokensMs: Math.max(0, aheadTok),
      };
    });
    const limitedBy = raw[2] === 'requests' || raw[2] === 'tokens' ? raw[2] : null;
    return { admitted: Number(raw[0]) === 1, retryAfterMs: Number(raw[1]), limitedBy, states };
  }

  /**
   * Corrects an admission that charged `charged` tokens: `used` is the real usage, or `null` when the request is given
   * back altogether (nothing was generated: its request and its tokens are refunded).
   */
  async adjust(buckets: Bucket[], charged: number, used: number | null): Promise<void> {
    if (buckets.length === 0) return;
    const delta = (used === null ? 0 : Math.max(0, Math.round(used))) - Math.max(0, Math.round(charged));
    if (delta === 0 && used !== null) return;
    const argv = [this.windowMs, delta, used === null ? '1' : '0', ...buckets.flatMap((b) => [b.rpm, b.tpm])];
    await runScript(this.redis, 'rateAdjust', buckets.map(bucketKey), argv);
  }
}
