/**
 * Rate-limit arithmetic against a real Redis (limits/rate-limiter.ts, limits/admission.ts): the sliding-window log is
 * exact (no burst at a window's edge), retry-after is the real wait, costs are corrected, buckets admit all-or-nothing,
 * and concurrency slots are shared and released.
 */
import { randomUUID } from 'node:crypto';
import Redis from 'ioredis';
import { ConcurrencyLimiter, formatDuration } from '../src/limits/admission';
import { type Bucket, RateLimiter } from '../src/limits/rate-limiter';
import { sleep } from './helpers/gateway';
import { useTestRedis } from './helpers/redis-server';

const redis = useTestRedis();

const bucket = (rpm: number, tpm: number): Bucket => ({ id: `k-${randomUUID()}`, rpm, tpm });
const id = () => randomUUID();

describe('RateLimiter (sliding-window log)', () => {
  it('admits exactly rpm requests per window, and the 429 wait is when the oldest leaves', async () => {
    const rl = new RateLimiter(redis.client, 2000);
    const b = bucket(3, 0);
    const t0 = Date.now();
    for (let i = 0; i < 3; i++) expect((await rl.admit([b], id(), 1)).admitted).toBe(true);
    const refused = await rl.admit([b], id(), 1);
    expect(refused).toMatchObject({ admitted: false, limitedBy: 'requests' });
    const elapsed = Date.now() - t0;
    expect(refused.retryAfterMs).toBeGreaterThan(2000 - elapsed - 50);
    expect(refused.retryAfterMs).toBeLessThanOrEqual(2000);
    expect(refused.states[0]).toMatchObject({ remainingRequests: 0, usedRequests: 3 });
    await sleep(refused.retryAfterMs + 20);
    expect((await rl.admit([b], id(), 1)).admitted).toBe(true);
  });

  it('never admits more than the limit in any window, even across the edge of a fixed window', async () => {
    const rl = new RateLimiter(redis.client, 1000);
    const b = bucket(5, 0);
    const admittedAt: number[] = [];
    const until = Date.now() + 2600;
    while (Date.now() < until) {
      if ((await rl.admit([b], id(), 0)).admitted) admittedAt.push(Date.now());
      await sleep(15);
    }
    for (const t of admittedAt) {
      // Local clock vs Redis clock: allow a few ms of slack at the window's end.
      expect(admittedAt.filter((u) => u >= t && u < t + 990).length).toBeLessThanOrEqual(5);
    }
    expect(admittedAt.length).toBeGreaterThanOrEqual(10);
  });

  it('counts tokens, refuses what does not fit, says when it will, and takes corrections', async () => {
    const rl = new RateLimiter(redis.client, 3000);
    const b = bucket(0, 100);
    const first = id();
    expect((await rl.admit([b], first, 60)).admitted).toBe(true);
    expect((await rl.admit([b], id(), 30)).states[0].remainingTokens).toBe(10);
    const refused = await rl.admit([b], id(), 50);
    expect(refused).toMatchObject({ admitted: false, limitedBy: 'tokens' });
    expect(refused.retryAfterMs).toBeGreaterThan(2500); // the 60-token entry must leave
    await rl.adjust([b], first, 20); // real usage was lower than prompt + max_tokens
    expect((await rl.admit([b], id(), 50)).admitted).toBe(true);
  });

  it('a request larger than the whole token budget can never pass (retry -1)', async () => {
    const rl = new RateLimiter(redis.client, 60_000);
    const a = await rl.admit([bucket(0, 100)], id(), 101);
    expect(a).toMatchObject({ admitted: false, retryAfterMs: -1, limitedBy: 'tokens' });
  });

  it('is all-or-nothing across buckets, and refunds remove a request', async () => {
    const rl = new RateLimiter(redis.client, 60_000);
    const key = bucket(10, 0);
    const route = bucket(1, 0);
    const m = id();
    expect((await rl.admit([key, route], m, 0)).admitted).toBe(true);
    const refused = await rl.admit([key, route], id(), 0);
    expect(refused.admitted).toBe(false);
    expect(refused.states[0].usedRequests).toBe(1); // the key's bucket did not record the refused one
    await rl.adjust([key, route], m, null);
    expect((await rl.admit([key, route], id(), 0)).admitted).toBe(true);
  });

  it('is exact under concurrency from many connections (one budget)', async () => {
    const conns = Array.from({ length: 4 }, () => new Redis(redis.url));
    try {
      const b = bucket(50, 0);
      const limiters = conns.map((c) => new RateLimiter(c, 60_000));
      const results = await Promise.all(Array.from({ length: 200 }, (_, i) => limiters[i % 4].admit([b], id(), 0)));
      expect(results.filter((r) => r.admitted)).toHaveLength(50);
    } finally {
      for (const c of conns) c.disconnect();
    }
  });

  it('dry runs read without recording', async () => {
    const rl = new RateLimiter(redis.client, 60_000);
    const b = bucket(2, 0);
    await rl.admit([b], id(), 0);
    const peek = await rl.admit([b], 'peek', 0, true);
    expect(peek.admitted).toBe(false);
    expect(peek.states[0]).toMatchObject({ usedRequests: 1, remainingRequests: 1 });
    expect((await rl.admit([b], id(), 0)).states[0].usedRequests).toBe(2);
  });
});

describe('ConcurrencyLimiter', () => {
  it('shares slots and releases them; an expired lease frees itself', async () => {
    const c = new ConcurrencyLimiter(redis.client, 300);
    const who = `p-${randomUUID()}`;
    const r1 = await c.acquire(who, 'a', 2);
    const r2 = await c.acquire(who, 'b', 2);
    expect(r1 && r2).toBeTruthy();
    expect(await c.acquire(who, 'c', 2)).toBeNull();
    await r1!();
    expect(await c.acquire(who, 'd', 2)).not.toBeNull();
    expect(await c.acquire(who, 'e', 2)).toBeNull();
    await sleep(350); // leases of b and d expired (a crashed gateway's slots)
    expect(await c.acquire(who, 'f', 2)).not.toBeNull();
  });
});

describe('formatDuration (OpenAI x-ratelimit-reset-*)', () => {
  it.each([
    [0, '0ms'],
    [20, '20ms'],
    [1500, '1.5s'],
    [60_000, '1m0s'],
    [361_000, '6m1s'],
  ])('%d ms → %s', (ms, s) => expect(formatDuration(ms)).toBe(s));
});
