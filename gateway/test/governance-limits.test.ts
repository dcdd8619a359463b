/**
 * Rate-limit arithmetic against a real Redis (limits/rate-limiter.ts, limits/admission.ts): token buckets (GCRA) allow
 * a burst of the limit and then the limit's rate, never more; retry-after is the real wait; costs are corrected;
 * buckets admit all-or-nothing; the state is O(1) per bucket; concurrency slots are shared and released.
 */
import { randomUUID } from 'node:crypto';
import Redis from 'ioredis';
import { ConcurrencyLimiter, formatDuration } from '../src/limits/admission';
import { type Bucket, bucketKey, RateLimiter } from '../src/limits/rate-limiter';
import { sleep, WAIT_MS, waitFor } from './helpers/gateway';
import { useTestRedis } from './helpers/redis-server';

const redis = useTestRedis();

const bucket = (rpm: number, tpm: number): Bucket => ({ scope: `k-${randomUUID()}`, name: 'all', rpm, tpm });
const id = () => randomUUID();

describe('RateLimiter (GCRA token buckets)', () => {
  it('admits a burst of rpm requests, then one per window/rpm; the 429 wait is when one has refilled', async () => {
    const rl = new RateLimiter(redis.client, 3000); // 3 per 3 s: one refills every 1000 ms
    const b = bucket(3, 0);
    const t0 = Date.now();
    for (let i = 0; i < 3; i++) expect((await rl.admit([b], 1)).admitted).toBe(true);
    const refused = await rl.admit([b], 1);
    expect(refused).toMatchObject({ admitted: false, limitedBy: 'requests' });
    const elapsed = Date.now() - t0;
    expect(refused.retryAfterMs).toBeGreaterThan(1000 - elapsed - 50);
    expect(refused.retryAfterMs).toBeLessThanOrEqual(1000);
    expect(refused.states[0]).toMatchObject({ remainingRequests: 0, usedRequests: 3 });
    expect(refused.states[0].resetRequestsMs).toBeGreaterThan(3000 - elapsed - 50); // full again when all three refilled
    // Not synchronisation: the wait is the retry-after under test (a caller that waits as told is admitted), plus 20 ms
    // for timer granularity. A loaded machine only waits longer, which cannot make a too-short value pass.
    await sleep(refused.retryAfterMs + 20);
    expect((await rl.admit([b], 1)).admitted).toBe(true);
    expect((await rl.admit([b], 1)).admitted).toBe(false); // one refilled, one admitted: empty again
  });

  it('never admits more than the burst plus the rate over any span', async () => {
    const rl = new RateLimiter(redis.client, 1000);
    const b = bucket(5, 0); // burst 5, then one per 200 ms
    // Each admission happened (in Redis) at some time between sending the call and reading its answer; on a loaded
    // machine that span grows, so the bound is checked against the widest span the admissions can have had.
    // Calls for 2.6 s, and on until it has refilled well past the burst (a loaded machine may call too seldom within
    // 2.6 s to see it): fails if the bucket never admits 10.
    const admitted: Array<{ sent: number; answered: number }> = [];
    const t0 = Date.now();
    while (Date.now() - t0 < 2600 || admitted.length < 10) {
      if (Date.now() - t0 > WAIT_MS) throw new Error(`only ${admitted.length} admitted in ${WAIT_MS} ms: the bucket does not refill`);
      const sent = Date.now();
      if ((await rl.admit([b], 0)).admitted) admitted.push({ sent, answered: Date.now() });
      await sleep(15); // paces the calls, as a client's would be spread: not synchronisation, nothing is waited for
    }
    for (let i = 0; i < admitted.length; i++) {
      for (let j = i + 1; j < admitted.length; j++) {
        const span = admitted[j].answered - admitted[i].sent + 10; // 10 ms: Redis' clock vs ours
        expect(j - i + 1).toBeLessThanOrEqual(5 + Math.floor(span / 200));
      }
    }
  });

  it('counts tokens, refuses what does not fit, says when it will, and takes corrections', async () => {
    const rl = new RateLimiter(redis.client, 3000); // 100 tokens per 3 s: one refills every 30 ms
    const b = bucket(0, 100);
    const t0 = Date.now();
    expect((await rl.admit([b], 60)).admitted).toBe(true);
    const after = await rl.admit([b], 30);
    expect(after.states[0].remainingTokens).toBeGreaterThanOrEqual(10);
    expect(after.states[0].remainingTokens).toBeLessThanOrEqual(10 + Math.ceil((Date.now() - t0) / 30));
    const refused = await rl.admit([b], 50);
    expect(refused).toMatchObject({ admitted: false, limitedBy: 'tokens' });
    // 40 of the 90 used must refill first: 1200 ms after the admissions, whatever time has passed since.
    expect(refused.retryAfterMs).toBeGreaterThan(1200 - (Date.now() - t0) - 10);
    expect(refused.retryAfterMs).toBeLessThanOrEqual(1200);
    await rl.adjust([b], 60, 20); // real usage was lower than prompt + max_tokens
    expect((await rl.admit([b], 50)).admitted).toBe(true);
    await rl.adjust([b], 50, 400); // and higher: the bucket is over its budget until it has refilled
    const over = await rl.admit([b], 0, true);
    expect(over.limitedBy).toBe('tokens');
    expect(over.retryAfterMs).toBeGreaterThan(3000);
  });

  it('a request larger than the whole token budget can never pass (retry -1)', async () => {
    const rl = new RateLimiter(redis.client, 60_000);
    const a = await rl.admit([bucket(0, 100)], 101);
    expect(a).toMatchObject({ admitted: false, retryAfterMs: -1, limitedBy: 'tokens' });
  });

  it('is all-or-nothing across buckets, and refunds give back the request and its tokens', async () => {
    const rl = new RateLimiter(redis.client, 60_000);
    const key = bucket(10, 100);
    const route = { ...bucket(1, 0), scope: key.scope, name: 'tutorial' };
    expect((await rl.admit([key, route], 40)).admitted).toBe(true);
    const refused = await rl.admit([key, route], 40);
    expect(refused.admitted).toBe(false);
    expect(refused.states[0]).toMatchObject({ usedRequests: 1, usedTokens: 40 }); // the key did not record the refused one
    await rl.adjust([key, route], 40, null);
    const again = await rl.admit([key, route], 0);
    expect(again.admitted).toBe(true);
    expect(again.states[0]).toMatchObject({ usedRequests: 1, usedTokens: 0 });
  });

  it('keeps O(1) state: one small hash per bucket, however many requests it admitted', async () => {
    const rl = new RateLimiter(redis.client, 3_600_000); // per hour: what refills while the test runs is a few at most
    const b = bucket(1000, 10_000);
    const t0 = Date.now();
    for (let i = 0; i < 300; i++) await rl.admit([b], 10);
    expect(await redis.client.type(bucketKey(b))).toBe('hash');
    expect(await redis.client.hlen(bucketKey(b))).toBe(2);
    const { usedRequests, usedTokens } = (await rl.admit([b], 0, true)).states[0];
    const refilled = (Date.now() - t0) / 3_600_000;
    expect(usedRequests).toBeLessThanOrEqual(300);
    expect(usedRequests).toBeGreaterThanOrEqual(300 - Math.ceil(refilled * 1000));
    expect(usedTokens).toBeLessThanOrEqual(3000);
    expect(usedTokens).toBeGreaterThanOrEqual(3000 - Math.ceil(refilled * 10_000));
  });

  it('is exact under concurrency from many connections (one budget)', async () => {
    const conns = Array.from({ length: 4 }, () => new Redis(redis.url));
    try {
      const b = bucket(50, 0);
      const limiters = conns.map((c) => new RateLimiter(c, 600_000)); // one refills every 12 s: none during the test
      const results = await Promise.all(Array.from({ length: 200 }, (_, i) => limiters[i % 4].admit([b], 0)));
      expect(results.filter((r) => r.admitted)).toHaveLength(50);
    } finally {
      for (const c of conns) c.disconnect();
    }
  });

  it('dry runs read without recording', async () => {
    const rl = new RateLimiter(redis.client, 600_000);
    const b = bucket(2, 0);
    await rl.admit([b], 0);
    const peek = await rl.admit([b], 0, true);
    expect(peek.admitted).toBe(false);
    expect(peek.states[0]).toMatchObject({ usedRequests: 1, remainingRequests: 1 });
    expect((await rl.admit([b], 0)).states[0].usedRequests).toBe(2);
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
