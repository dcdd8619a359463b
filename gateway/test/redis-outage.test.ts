/** Redis going away: fast 503s with retry-after (never a hang or a 500), and recovery without a gateway restart. */
import { randomUUID } from 'node:crypto';
import request from 'supertest';
import { FakeWorker } from './helpers/fake-worker';
import { startGateway, TEST_KEY, type TestGateway, waitFor } from './helpers/gateway';
import { useTestRedis } from './helpers/redis-server';

const redis = useTestRedis();
let gw: TestGateway;
let worker: FakeWorker;
const MODEL = `m-${randomUUID().slice(0, 8)}`;

beforeAll(async () => {
  gw = await startGateway(redis.url, { DEFAULT_MODEL: MODEL });
  worker = new FakeWorker({ redisUrl: redis.url, model: MODEL });
  await worker.start();
});
redis.beforeStop(async () => {
  await worker.close();
  await gw.close();
});

const chat = () =>
  request(gw.url)
    .post('/v1/chat/completions')
    .set('authorization', `Bearer ${TEST_KEY}`)
    .send({ model: MODEL, messages: [{ role: 'user', content: 'Hi' }] });

it('answers 503 + retry-after while Redis is down, and serves again once it is back', async () => {
  expect((await chat()).status).toBe(200);

  await redis.kill();
  await waitFor(() => gw.gateway.redis.status !== 'ready', undefined, 'the gateway to notice');
  const started = Date.now();
  const down = await chat();
  expect(down.status).toBe(503);
  expect(down.body.error).toMatchObject({ code: 'redis_unavailable', type: 'server_error' });
  expect(Number(down.headers['retry-after'])).toBeGreaterThanOrEqual(1);
  // "Fast" is what is tested: answered from the connection's status at once (well under a second, even loaded), not
  // after a reconnect attempt per Redis command (up to 2 s each) or never (a hang). 5 s: loose, yet below the former.
  expect(Date.now() - started).toBeLessThan(5000);
  expect((await request(gw.url).get('/ready')).status).toBe(503);
  expect((await request(gw.url).get('/health')).status).toBe(200);
  const models = await request(gw.url).get('/v1/models').set('authorization', `Bearer ${TEST_KEY}`);
  expect([200, 503]).toContain(models.status); // the last known list, or a 503: never a 500 or a hang

  await redis.restart();
  // The worker re-registers with its next heartbeat (the tokenizer stays cached in the gateway by hash).
  await waitFor(async () => (await request(gw.url).get('/ready')).status === 200, undefined, '/ready after the restart');
  const back = await chat();
  expect(back.status).toBe(200);
  expect(back.body.choices[0].message.content).toBe('Hello from the fake worker!');
});
