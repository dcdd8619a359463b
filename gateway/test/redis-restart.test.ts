/**
 * A Redis restart that loses a running request's job (a Redis without persistence): the client gets a retryable 503,
 * never a 500 (issue 11, item 7). Real Redis (killed and restarted empty), real wiring, a FAKE worker
 * (helpers/fake-worker.ts) that holds the job (after its first token, until it is cancelled) while Redis restarts.
 */
import { randomUUID } from 'node:crypto';
import request from 'supertest';
import { FakeWorker } from './helpers/fake-worker';
import { startGateway, TEST_KEY, type TestGateway, waitFor } from './helpers/gateway';
import { useTestRedis } from './helpers/redis-server';

const MODEL = `m-${randomUUID().slice(0, 8)}`;
const redis = useTestRedis();
let gw: TestGateway;
let worker: FakeWorker;

beforeAll(async () => {
  gw = await startGateway(redis.url, { DEFAULT_MODEL: MODEL });
  worker = new FakeWorker({ redisUrl: redis.url, model: MODEL, contextLength: 400, script: { reply: () => 'abc', pieceChars: 1, holdAfterDeltas: 1 } });
  await worker.start();
});
redis.beforeStop(async () => {
  await worker.close();
  await gw.close();
});

it('a non-stream request whose job the restart wiped: 503 with retry-after, not 500', async () => {
  const pending = request(gw.url).post('/v1/chat/completions').set({ authorization: `Bearer ${TEST_KEY}` })
    .send({ model: MODEL, messages: [{ role: 'user', content: 'Hi' }], max_tokens: 40 });
  const res = pending.then((r) => r);
  await waitFor(() => worker.jobs.length === 1, 30_000, 'the worker to pick the job up');
  await redis.kill();
  await redis.restart(); // empty: the job, its lock and the worker's registration are gone
  const r = await res;
  expect(r.status).toBe(503);
  expect(r.body.error).toMatchObject({ type: 'server_error' });
  expect(['redis_unavailable', 'queue_timeout', 'no_worker_available']).toContain(r.body.error.code);
  expect(Number(r.headers['retry-after'])).toBeGreaterThan(0);
});
