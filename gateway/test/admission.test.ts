/**
 * Admission gives back what it took when a later step fails (issue 11): a Redis error after the concurrency slot was
 * taken must not leak the slot (or the token budget) for the whole lease. Real Redis and wiring, a FAKE worker
 * (helpers/fake-worker.ts). The error is a real one: the queue's wait list holds the wrong type (WRONGTYPE).
 */
import { randomUUID } from 'node:crypto';
import request from 'supertest';
import { queueName } from '../src/protocol/job';
import { FakeWorker } from './helpers/fake-worker';
import { startGateway, type TestGateway, waitFor } from './helpers/gateway';
import { useTestRedis } from './helpers/redis-server';

const ADMIN = 'admin-0123456789abcdef';
const MODEL = `m-${randomUUID().slice(0, 8)}`;
const redis = useTestRedis();
let gw: TestGateway;
let worker: FakeWorker;

beforeAll(async () => {
  gw = await startGateway(redis.url, { DEFAULT_MODEL: MODEL, ADMIN_API_KEY: ADMIN, MAX_QUEUE_DEPTH: '100' });
  worker = new FakeWorker({ redisUrl: redis.url, model: MODEL, contextLength: 1000 });
  await worker.start();
});
redis.beforeStop(async () => {
  await worker.close();
  await gw.close();
});

it('a Redis error while reading the queue depth releases the concurrency slot and refunds the tokens', async () => {
  const created = await request(gw.url).post('/admin/keys').set({ authorization: `Bearer ${ADMIN}` }).send({ name: 'one-slot', max_concurrent: 1, tpm: 1000 });
  const key = created.body.key as string;
  const send = (maxTokens: number) => request(gw.url).post('/v1/chat/completions').set({ authorization: `Bearer ${key}` })
    .send({ model: MODEL, messages: [{ role: 'user', content: 'Hi' }], max_tokens: maxTokens });
  const wait = `bull:${queueName(MODEL)}:wait`;
  await redis.client.set(wait, 'not a list'); // LLEN now fails with WRONGTYPE
  // An estimate of most of the budget (prompt + 900 of 1000 tokens): leaked, the next request would not fit.
  const failed = await send(900);
  expect(failed.status).toBe(500);
  await redis.client.del(wait);
  // The one slot is free again and the estimate was refunded: the next request is admitted at once.
  const sentAt = Date.now();
  const ok = await send(100);
  expect(ok.status).toBe(200);
  // The correction to real usage is written just after the response: wait for it. The bucket refills meanwhile (1000
  // per 60 s window, ~17 tokens/s), so the remainder may be up to that much above; the 900 a leak would hold back
  // take ~54 s to refill, far longer than this waits.
  const used = ok.body.usage.total_tokens as number;
  await waitFor(async () => {
    const models = await request(gw.url).get('/v1/models').set({ authorization: `Bearer ${key}` });
    const remaining = Number(models.headers['x-ratelimit-remaining-tokens']);
    const refill = Math.ceil(((Date.now() - sentAt) * 1000) / 60_000) + 1;
    return remaining >= 1000 - used && remaining <= 1000 - used + refill;
  }, 20_000, 'the refund and the real usage in the token budget');
});
