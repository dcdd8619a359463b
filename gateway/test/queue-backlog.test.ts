/**
 * Backlog admission against a real Redis (queue/backlog.ts, redis-scripts/backlog-*.lua): cold start admits; with a
 * measured drain rate a request is refused exactly when the work ahead of it takes longer than the queue timeout to
 * drain, and the excess wait is what retry-after says; the rate is the decayed drained charge per busy millisecond;
 * release is idempotent; entries of a dead gateway expire; every key carries the model's hash tag.
 *
 * The scripts take the test's clock (`now`) instead of Redis' TIME, so the decay arithmetic is checked exactly; one
 * test runs on Redis' own clock.
 */
import { randomUUID } from 'node:crypto';
import { backlogFullError, backlogKeys, QueueBacklog, TRANSIT_MS } from '../src/queue/backlog';
import { sleep } from './helpers/gateway';
import { useTestRedis } from './helpers/redis-server';

const redis = useTestRedis();

const TAU = 30_000;
const TIMEOUT = 10_000;
const TTL = 60_000;

/** A backlog on a clock the test moves by hand. */
function backlogAt(start = 1_700_000_000_000) {
  const clock = { t: start };
  const backlog = new QueueBacklog(redis.client, { queueTimeoutMs: TIMEOUT, entryTtlMs: TTL, tauMs: TAU, now: () => clock.t });
  return { backlog, clock };
}
const model = () => `m-${randomUUID().slice(0, 8)}`;

/** The decay of the scripts, written out again: busy time τ(1 − e^(−Δ/τ)) per Δ with a backlog, work × e^(−Δ/τ). */
const decay = (dt: number) => Math.exp(-dt / TAU);

/** One request of 3000 tokens that ran for 10 s on an empty queue: the first measurement of the drain rate. */
async function measured(backlog: QueueBacklog, clock: { t: number }, m: string) {
  expect(await backlog.reserve(m, 'warm-up', 3000)).toEqual({ admitted: true, backlogTokens: 0, drainPerS: null });
  clock.t += 10_000;
  expect(await backlog.release(m, 'warm-up', true)).toBe(true);
  const busy = TAU * (1 - decay(10_000));
  return { work: 3000, busy, perMs: 3000 / busy };
}

describe('QueueBacklog', () => {
  it('cold start: without a drain estimate every request is admitted, however much is queued', async () => {
    const { backlog } = backlogAt();
    const m = model();
    for (let i = 0; i < 5; i++) {
      expect(await backlog.reserve(m, `r${i}`, 1_000_000)).toEqual({ admitted: true, backlogTokens: i * 1_000_000, drainPerS: null });
    }
    expect(await backlog.snapshot(m)).toEqual({ entries: 5, backlogTokens: 5_000_000, drainPerS: null });
  });

  it('the first completion measures the rate over the busy time, not over τ (no cold bias)', async () => {
    const { backlog, clock } = backlogAt();
    const m = model();
    const { perMs } = await measured(backlog, clock, m);
    const snap = await backlog.snapshot(m);
    expect(snap).toMatchObject({ entries: 0, backlogTokens: 0 });
    expect(snap.drainPerS).toBeCloseTo(perMs * 1000, 6);
    // 3000 tokens in 10 s is 300/s; the decayed busy time of 10 s is a little shorter, so a little more.
    expect(snap.drainPerS).toBeGreaterThan(300);
    expect(snap.drainPerS).toBeLessThan(360);
  });

  it('refuses exactly when the backlog ahead takes longer than the queue timeout to drain', async () => {
    const { backlog, clock } = backlogAt();
    const m = model();
    const { perMs } = await measured(backlog, clock, m);
    // The clock stands still from here: nothing decays, the rate is exactly perMs.
    const fits = Math.floor(perMs * TIMEOUT); // the most backlog that drains within the timeout
    // Nothing ahead: admitted, even a request far larger than what drains within the timeout.
    expect(await backlog.reserve(m, 'big', fits)).toMatchObject({ admitted: true, backlogTokens: 0 });
    const at = await backlog.reserve(m, 'at-limit', 1); // `fits` ahead: drains in ≤ TIMEOUT
    expect(at).toMatchObject({ admitted: true, backlogTokens: fits });
    expect(at.drainPerS).toBeCloseTo(perMs * 1000, 3);
    const over = await backlog.reserve(m, 'over', 1); // fits + 1 ahead: a token too many
    expect(over).toMatchObject({ admitted: false, backlogTokens: fits + 1 });
    if (over.admitted) throw new Error('unreachable');
    expect(over.excessMs).toBe(Math.ceil((fits + 1) / perMs - TIMEOUT));
    expect(over.excessMs).toBeLessThanOrEqual(1);
    // A refusal holds nothing.
    expect(await backlog.snapshot(m)).toMatchObject({ entries: 2, backlogTokens: fits + 1 });
    expect(await backlog.release(m, 'over', false)).toBe(false);
  });

  it('while fewer requests hold entries than the workers have slots, a request is admitted whatever the backlog', async () => {
    const { backlog, clock } = backlogAt();
    const m = model();
    const { perMs } = await measured(backlog, clock, m);
    const huge = Math.round(perMs * TIMEOUT * 10); // ten timeouts' worth of work, running on the first slot
    expect((await backlog.reserve(m, 'long-1', huge, 2)).admitted).toBe(true);
    // One of two slots is taken: the second request starts at once on the other, so it is admitted.
    expect(await backlog.reserve(m, 'long-2', huge, 2)).toMatchObject({ admitted: true, backlogTokens: huge });
    // Both slots taken: the third waits for work ahead that takes far longer than the timeout, so it is refused.
    expect((await backlog.reserve(m, 'third', 10, 2)).admitted).toBe(false);
    // Unknown slots (a worker that does not report MAX_BATCH): the rate alone decides, as before.
    const n = model();
    await measured(backlog, clock, n);
    await backlog.reserve(n, 'long', huge, null);
    expect((await backlog.reserve(n, 'second', 10, null)).admitted).toBe(false);
    // A retried reservation does not count itself among the requests ahead of it.
    expect((await backlog.reserve(m, 'long-2', huge, 2)).admitted).toBe(true);
  });

  it('waiting jobs admitted within the transit time are on their way, not a sign that the workers are full', async () => {
    const { backlog, clock } = backlogAt();
    const m = model();
    const { perMs } = await measured(backlog, clock, m);
    const huge = Math.round(perMs * TIMEOUT * 10);
    // A burst at idle workers with 4 slots: each earlier job of the burst is still queued, not yet taken.
    expect((await backlog.reserve(m, 'b1', huge, 4, 0)).admitted).toBe(true);
    clock.t += 10;
    expect((await backlog.reserve(m, 'b2', huge, 4, 1)).admitted).toBe(true);
    clock.t += 10;
    expect((await backlog.reserve(m, 'b3', huge, 4, 2)).admitted).toBe(true);
    // More jobs waiting than were admitted within the transit time: one has waited longer, the workers are full.
    expect((await backlog.reserve(m, 'x', 10, 4, 4)).admitted).toBe(false);
    // Past the transit time one job still waiting means the same (a stuck worker): no shortcut, the rate decides.
    clock.t += TRANSIT_MS + 1;
    expect((await backlog.reserve(m, 'y', 10, 4, 1)).admitted).toBe(false);
    // ... and with nothing waiting there is room again.
    expect((await backlog.reserve(m, 'b4', 10, 4, 0)).admitted).toBe(true);
    // The queue's depth unknown: no shortcut.
    expect((await backlog.reserve(m, 'z', 10, 8, null)).admitted).toBe(false);
  });

  it('the excess wait is how much longer than the timeout the backlog takes to drain; retry-after is it, within 1–60 s', async () => {
    const { backlog, clock } = backlogAt();
    const m = model();
    const { perMs } = await measured(backlog, clock, m);
    const backlogTokens = Math.round(perMs * TIMEOUT * 5); // five timeouts' worth of work ahead
    await backlog.reserve(m, 'ahead', backlogTokens);
    const r = await backlog.reserve(m, 'late', 100);
    if (r.admitted) throw new Error('expected a refusal');
    expect(r.excessMs).toBe(Math.ceil(backlogTokens / perMs - TIMEOUT));
    expect(r.excessMs).toBeGreaterThan(4 * TIMEOUT - 3); // the backlog was rounded to whole tokens
    expect(r.excessMs).toBeLessThan(4 * TIMEOUT + 3);

    const e = backlogFullError(m, r);
    expect(e.toBody().error).toMatchObject({ type: 'server_error', code: 'queue_full', param: null });
    expect(e.status).toBe(503);
    expect(e.retryAfterMs).toBe(r.excessMs); // 40 s: retry-after 40 (setRetryHeaders rounds up)
    expect(Math.ceil(e.retryAfterMs! / 1000)).toBe(Math.ceil(r.excessMs / 1000));
    expect(backlogFullError(m, { ...r, excessMs: 3 }).retryAfterMs).toBe(1000);
    expect(backlogFullError(m, { ...r, excessMs: 400_000 }).retryAfterMs).toBe(60_000);
  });

  it('idle time does not wear the estimate away; busy time without completions does', async () => {
    const { backlog, clock } = backlogAt();
    const m = model();
    const { work, busy } = await measured(backlog, clock, m);
    clock.t += 3600_000; // an idle hour: no backlog, the clock of the estimate stands still
    const first = await backlog.reserve(m, 'a', 10);
    expect(first.drainPerS).toBeCloseTo((work / busy) * 1000, 6);
    clock.t += TAU; // τ with a backlog and nothing finishing: the workers look slower
    const d = decay(TAU);
    const second = await backlog.reserve(m, 'b', 10);
    expect(second.drainPerS).toBeCloseTo(((work * d) / (busy * d + TAU * (1 - d))) * 1000, 6);
    expect(second.drainPerS!).toBeLessThan(first.drainPerS! * 0.8);
  });

  it('release removes the entry once: idempotent, credited once, and only for a request that ran', async () => {
    const { backlog, clock } = backlogAt();
    const m = model();
    const { work, busy } = await measured(backlog, clock, m);
    await backlog.reserve(m, 'ran', 500);
    await backlog.reserve(m, 'cancelled', 700);
    await backlog.reserve(m, 'cancelled', 700); // sent again (a retried call): replaces, never counts twice
    expect(await backlog.snapshot(m)).toMatchObject({ entries: 2, backlogTokens: 1200 });
    // The clock stands still, so the busy time does not change: only credits move the rate.
    expect(await backlog.release(m, 'cancelled', false)).toBe(true);
    expect(await backlog.snapshot(m)).toEqual({ entries: 1, backlogTokens: 500, drainPerS: expect.closeTo((work / busy) * 1000, 6) });
    expect(await backlog.release(m, 'ran', true)).toBe(true);
    expect(await backlog.release(m, 'ran', true)).toBe(false);
    expect(await backlog.release(m, 'never-reserved', true)).toBe(false);
    expect(await backlog.snapshot(m)).toEqual({ entries: 0, backlogTokens: 0, drainPerS: expect.closeTo(((work + 500) / busy) * 1000, 6) });
    expect(await redis.client.hlen(backlogKeys(m).costs)).toBe(0);
  });

  it("a dead gateway's entries expire: the next reservation drops them and their tokens", async () => {
    const { backlog, clock } = backlogAt();
    const m = model();
    const { perMs } = await measured(backlog, clock, m);
    // The gateway that admitted these dies: they are never released.
    await backlog.reserve(m, 'orphan-1', Math.round(perMs * TIMEOUT));
    await backlog.reserve(m, 'orphan-2', 1000);
    expect((await backlog.reserve(m, 'refused', 10)).admitted).toBe(false);
    clock.t += TTL - 1;
    expect((await backlog.reserve(m, 'still-refused', 10)).admitted).toBe(false); // not before their time
    clock.t += 2;
    expect(await backlog.reserve(m, 'after', 10)).toMatchObject({ admitted: true, backlogTokens: 0 });
    expect(await backlog.snapshot(m)).toMatchObject({ entries: 1, backlogTokens: 10 });
    expect(await redis.client.hkeys(backlogKeys(m).costs)).toEqual(['after']);
    // And the keys themselves never outlive what they hold by much.
    const k = backlogKeys(m);
    for (const key of [k.entries, k.costs, k.state, k.recent]) expect(await redis.client.pttl(key)).toBeGreaterThan(0);
  });

  it("every key carries the model's hash tag (one Redis Cluster slot per model), for any model id", async () => {
    const { backlog, clock } = backlogAt();
    const m = `org/Model-${randomUUID().slice(0, 8)}:v1`;
    await measured(backlog, clock, m);
    await backlog.reserve(m, 'x', 10);
    const keys = (await redis.client.keys('llm:backlog:*')).filter((k) => k.includes(m));
    expect(keys.sort()).toEqual(Object.values(backlogKeys(m)).sort());
    for (const k of keys) expect(k.startsWith(`llm:backlog:{${m}}:`)).toBe(true);
  });

  it("on Redis' own clock (TIME): a completion measures a rate", async () => {
    const backlog = new QueueBacklog(redis.client, { queueTimeoutMs: TIMEOUT, entryTtlMs: TTL });
    const m = model();
    expect((await backlog.reserve(m, 'a', 1000)).admitted).toBe(true);
    // Not synchronisation: the fake job's duration, which the drain rate is measured over (it "runs" ≥ 50 ms).
    await sleep(50);
    expect(await backlog.release(m, 'a', true)).toBe(true);
    const snap = await backlog.snapshot(m);
    expect(snap).toMatchObject({ entries: 0, backlogTokens: 0 });
    expect(snap.drainPerS).toBeGreaterThan(0);
    expect(snap.drainPerS).toBeLessThanOrEqual(1000 / 0.049); // at most 1000 tokens in the ≥ 50 ms it took
  });
});
