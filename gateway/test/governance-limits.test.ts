/**
 * Rate-limit arithmetic against a real Redis (limits/rate-limiter.ts, limits/admission.ts): the sliding-window log is
 * exact (no burst at a window's edge), retry-after is the real wait, costs are corrected, buckets admit all-or-nothing,
 * and concurrency slots are shared and released.
 */
import { randomUUID } from 'node:crypto';
import Redis from 'ioredis';
import { ConcurrencyLimiter, formatDuration } from '../src/limits/admission';
import { type Bucket, RateLimiter } from '../src/limits/rate-limiter';
import { sleep, waitFor } from './helpers/gateway';
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
    // Waiting for time itself: what is checked is that the retry-after is long enough (a slower machine waits longer).
    await sleep(refused.retryAfterMs + 20);
    expect((await rl.admit([b], id(), 1)).admitted).toBe(true);
  });

  it('never admits more than the limit in any window, even across the edge of a fixed window', async () => {
    const rl = new RateLimiter(redis.client, 1000);
    const b = bucket(5, 0);
    // Each admission happened (in Redis) at some time between sending the call and reading its answer; on a loaded
    // machine that span grows, so a check on the time read afterwards alone would see bursts that did not happen.
    const admitted: Array<{ sent: number; answered: number }> = [];
    const until = Date.now() + 2600;
    while (Date.now() < until) {
      const sent = Date.now();
      if ((await rl.admit([b], id(), 0)).admitted) admitted.push({ sent, answered: Date.now() });
      await sleep(15);
    }
    // The 6th admission after any one must come a whole window later: even taking its latest possible time against the
    // other's earliest, a burst at a fixed window's edge (6 within a few ms) shows. 10 ms: Redis' clock vs ours.
    for (let i = 0; i + 5 < admitted.length; i++) {
      expect(admitted[i + 5].answered - admitted[i].sent).toBeGreaterThanOrEqual(1000 - 10);
    }
    expect(admitted.length).toBeGreaterThanOrEqual(10);
  });

  it('counts tokens, refuses what does not fit, says when it will, and takes corrections', async () => {
    const rl = new RateLimiter(redis.client, 3000);
    const b = bucket(0, 100);
    const first = id();
    const t0 = Date.now();
    expect((await rl.admit([b], first, 60)).admitted).toBe(true);
    expect((await rl.admit([b], id(), 30)).states[0].remainingTokens).toBe(10);
    const refused = await rl.admit([b], id(), 50);
    expect(refused).toMatchObject({ admitted: false, limitedBy: 'tokens' });
    // The 60-token entry must leave: a window after it was admitted, whatever time has passed since.
    expect(refused.retryAfterMs).toBeGreaterThan(3000 - (Date.now() - t0) - 10);
    expect(refused.retryAfterMs).toBeLessThanOrEqual(3000);
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
    // The lease must outlast the calls below that expect both slots taken, however slow the machine: 2 s for a few
    // Redis round trips.
    const leaseMs = 2000;
    const c = new ConcurrencyLimiter(redis.client, leaseMs);
    const who = `p-${randomUUID()}`;
    const r1 = await c.acquire(who, 'a', 2);
    const bSent = Date.now();
    const r2 = await c.acquire(who, 'b', 2);
    expect(r1 && r2).toBeTruthy();
    expect(await c.acquire(who, 'c', 2)).toBeNull();
    await r1!();
    expect(await c.acquire(who, 'd', 2)).not.toBeNull();
    expect(await c.acquire(who, 'e', 2)).toBeNull();
    // Nothing releases b (a crashed gateway's slot): its lease frees it, and not before the lease has run out.
    let freedAt = 0;
    await waitFor(async () => {
      const got = await c.acquire(who, 'f', 2);
      freedAt = Date.now();
      return got !== null;
    }, undefined, "b's lease to expire");
    expect(freedAt - bSent).toBeGreaterThanOrEqual(leaseMs - 10);
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
