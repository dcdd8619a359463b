/**
 * Backlog admission over HTTP (issue 11 item 5), through the real wiring, a real Redis and FAKE workers
 * (helpers/fake-worker.ts): a request that the model's backlog would keep waiting past QUEUE_TIMEOUT_MS is refused at
 * once with 503 queue_full and a retry-after from the backlog, keeping none of its rate-limit or concurrency
 * reservations; every admitted request leaves the backlog when it ends (result, queue timeout, client gone), and only
 * one with a result counts as drained work. The arithmetic itself: queue-backlog.test.ts.
 */
import { randomUUID } from 'node:crypto';
import http from 'node:http';
import request from 'supertest';
import { queueDepth } from '../src/limits/admission';
import { queueFullRejections } from '../src/metrics';
import { QueueBacklog, TRANSIT_MS } from '../src/queue/backlog';
import { FakeWorker } from './helpers/fake-worker';
import { sleep, startGateway, TEST_KEY, type TestGateway, waitFor } from './helpers/gateway';
import { useTestRedis } from './helpers/redis-server';

const HELD = `held-${randomUUID().slice(0, 8)}`; // a worker that never takes its jobs: they wait in the queue
const LIVE = `live-${randomUUID().slice(0, 8)}`;
const QUEUE_TIMEOUT_MS = 3000;
const MAX_TOKENS = 100;

const redis = useTestRedis();
let gw: TestGateway;
let held: FakeWorker;
let live: FakeWorker;
let backlog: QueueBacklog;

beforeAll(async () => {
  held = new FakeWorker({ redisUrl: redis.url, model: HELD, consume: false, contextLength: 400 });
  live = new FakeWorker({ redisUrl: redis.url, model: LIVE, contextLength: 400 });
  await Promise.all([held.start(), live.start()]);
  gw = await startGateway(redis.url, {
    DEFAULT_MODEL: HELD,
    QUEUE_TIMEOUT_MS: String(QUEUE_TIMEOUT_MS),
    // Budgets that a refused request would exhaust if it kept them (see the first test).
    DEFAULT_MAX_CONCURRENT: '2',
    DEFAULT_TPM: '300',
    CACHE_ENABLED: 'false',
  });
  backlog = new QueueBacklog(redis.client, { queueTimeoutMs: QUEUE_TIMEOUT_MS, entryTtlMs: 60_000 });
  await waitFor(async () => {
    const r = await request(gw.url).get('/v1/models').set('authorization', `Bearer ${TEST_KEY}`);
    return r.status === 200 && [HELD, LIVE].every((m) => r.body.data.some((d: { id: string }) => d.id === m));
  }, undefined, 'a gateway that lists both models');
});
redis.beforeStop(async () => {
  await gw.close();
  await Promise.all([held.close(), live.close()]);
});

const send = (model: string, content = 'Hi') =>
  request(gw.url).post('/v1/chat/completions').set('authorization', `Bearer ${TEST_KEY}`).send({ model, messages: [{ role: 'user', content }], max_tokens: MAX_TOKENS });

/**
 * The HELD model's workers have been measured draining 120 tokens in one long busy spell: 4 tokens/s (120 over the
 * decayed busy time, which tends to τ = 30 s). Done on a test clock far in the past, so the gateway's own reservations
 * (on Redis' clock) start from an empty, idle backlog.
 */
async function measureSlowDrain(): Promise<number> {
  const clock = { t: 1_000_000 };
  const seed = new QueueBacklog(redis.client, { queueTimeoutMs: QUEUE_TIMEOUT_MS, entryTtlMs: 60_000, now: () => clock.t });
  await seed.reserve(HELD, 'seed', 120);
  clock.t += 1000_000;
  await seed.release(HELD, 'seed', true);
  const { drainPerS } = await backlog.snapshot(HELD);
  expect(drainPerS).toBeCloseTo(4, 3);
  return drainPerS!;
}

describe('backlog admission', () => {
  it('503 queue_full at once, retry-after from the backlog, nothing kept; the queued request leaves the backlog when it times out', async () => {
    const rate = await measureSlowDrain();
    const rejected = async () => (await queueFullRejections.get()).values.find((v) => v.labels.model === HELD && v.labels.reason === 'backlog')?.value ?? 0;
    const before = await rejected();

    // Nothing ahead: admitted, and queued (its worker never takes it).
    const sentFirst = Date.now();
    const first = send(HELD, 'first').then((r) => r);
    await waitFor(async () => (await queueDepth(redis.client, HELD)) === 1, undefined, 'the first request to be queued');
    // Not synchronisation: the first job must have waited longer than a job's way to a worker (queue/backlog.ts), or
    // the second request would count it as still in transit and take the free room.
    await sleep(TRANSIT_MS + 50);
    const ahead = await backlog.snapshot(HELD);
    expect(ahead.entries).toBe(1);
    // prompt + max_tokens; 120–145 keeps the budgets below meaningful (two requests fit in 300 tokens, three do not).
    expect(ahead.backlogTokens).toBeGreaterThanOrEqual(120);
    expect(ahead.backlogTokens).toBeLessThanOrEqual(145);

    // ~130 tokens ahead at 4 tokens/s: ~33 s, far more than the 3 s it may wait. Refused now, not in 3 s.
    const t0 = Date.now();
    const second = await send(HELD, 'second');
    const busyMs = Date.now() - sentFirst; // the longest the backlog can have been non-empty before the refusal
    expect(Date.now() - t0).toBeLessThan(QUEUE_TIMEOUT_MS);
    expect(second.status).toBe(503);
    expect(second.body).toEqual({ error: { message: expect.stringMatching(/queue of model/), type: 'server_error', param: null, code: 'queue_full' } });
    // The backlog needs ahead/rate seconds to drain, of which the request could have waited QUEUE_TIMEOUT_MS:
    // retry-after is the rest. While nothing finishes the rate decays, by e^(−busy/τ) at most.
    const excessS = (r: number) => ahead.backlogTokens / r - QUEUE_TIMEOUT_MS / 1000;
    const retryAfter = Number(second.headers['retry-after']);
    expect(retryAfter).toBeGreaterThanOrEqual(Math.ceil(excessS(rate)));
    expect(retryAfter).toBeLessThanOrEqual(Math.ceil(excessS(rate * Math.exp(-busyMs / 30_000))));
    expect(retryAfter).toBeGreaterThan(20);
    expect(Number(second.headers['retry-after-ms'])).toBeGreaterThan((retryAfter - 1) * 1000);
    expect(await rejected()).toBe(before + 1);
    expect((await backlog.snapshot(HELD)).entries).toBe(1); // the refused request holds no entry

    // The refused request gave its concurrency slot and its tokens back: a third one is refused by the backlog again,
    // not by the key's limits (2 concurrent, 300 tokens: room for the third only if the refused one was refunded).
    const third = await send(HELD, 'third');
    expect(third.status).toBe(503);
    expect(third.body.error.code).toBe('queue_full');

    // The first request times out in the queue (503 queue_timeout): it leaves the backlog, crediting nothing.
    expect((await first).status).toBe(503);
    await waitFor(async () => (await backlog.snapshot(HELD)).entries === 0, undefined, 'the timed-out request to leave the backlog');
    const after = await backlog.snapshot(HELD);
    expect(after.backlogTokens).toBe(0);
    expect(after.drainPerS!).toBeLessThanOrEqual(rate);
  }, 60_000);

  it('a request that ran leaves the backlog and counts as drained work; one whose client left leaves it too', async () => {
    expect((await backlog.snapshot(LIVE)).drainPerS).toBeNull(); // cold: no estimate
    const ok = await send(LIVE);
    expect(ok.status).toBe(200);
    await waitFor(async () => (await backlog.snapshot(LIVE)).drainPerS !== null, undefined, 'the completion to be counted as drained');
    expect(await backlog.snapshot(LIVE)).toMatchObject({ entries: 0, backlogTokens: 0 });

    // A client that leaves while its request is queued (its own connection, closed by the client).
    const body = JSON.stringify({ model: HELD, messages: [{ role: 'user', content: 'leaving' }], max_tokens: MAX_TOKENS });
    const leaving = http.request(`${gw.url}/v1/chat/completions`, {
      method: 'POST',
      agent: false,
      headers: { authorization: `Bearer ${TEST_KEY}`, 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) },
    });
    leaving.on('error', () => undefined); // the hang-up is the point
    leaving.end(body);
    await waitFor(async () => (await backlog.snapshot(HELD)).entries === 1, undefined, 'the request to be admitted');
    leaving.destroy();
    await waitFor(async () => (await backlog.snapshot(HELD)).entries === 0, undefined, 'the cancelled request to leave the backlog');
  }, 60_000);
});
