/**
 * Structured logs and Prometheus metrics through the real wiring, real Redis and a FAKE worker (helpers/fake-worker.ts):
 * what a request logs (ids, key id, status, latency, tokens; never the key, text only with LOG_PROMPTS), what /metrics
 * counts, the queue-depth gauge the autoscalers read, and METRICS_PATH / METRICS_AUTH.
 * The same metrics against the real Python worker: tests/e2e/metrics.test.ts.
 */
import { randomUUID } from 'node:crypto';
import request from 'supertest';
import { loadConfig } from '../src/config';
import { FakeWorker } from './helpers/fake-worker';
import { startGateway, TEST_KEY, type TestGateway, waitFor } from './helpers/gateway';
import { parsePrometheus, select, sumOf } from './helpers/prom-text';
import { useTestRedis } from './helpers/redis-server';

const auth = { authorization: `Bearer ${TEST_KEY}` };
const MODEL = `m-${randomUUID().slice(0, 8)}`;
const IDLE_MODEL = `idle-${randomUUID().slice(0, 8)}`;
const SECRET_PROMPT = `prompt-${randomUUID()}`;

const redis = useTestRedis();
let gw: TestGateway;
let worker: FakeWorker;
let idle: FakeWorker;

beforeAll(async () => {
  gw = await startGateway(redis.url, { DEFAULT_MODEL: MODEL, LOG_LEVEL: 'info', QUEUE_TIMEOUT_MS: '20000' });
  worker = new FakeWorker({ redisUrl: redis.url, model: MODEL, script: { reply: () => 'one two three four five six', pieceChars: 4, delayMs: 5 } });
  // Registers and heartbeats but never takes a job: what is sent to it stays queued.
  idle = new FakeWorker({ redisUrl: redis.url, model: IDLE_MODEL, consume: false });
  await Promise.all([worker.start(), idle.start()]);
  await waitFor(async () => (await request(gw.url).get('/ready')).status === 200, undefined, '/ready');
});
redis.beforeStop(async () => {
  await Promise.all([worker.close(), idle.close()]);
  await gw.close();
});

const scrape = async (url = gw.url, path = '/metrics', headers: Record<string, string> = {}) => {
  const res = await request(url).get(path).set(headers);
  expect(res.status).toBe(200);
  expect(res.headers['content-type']).toMatch(/^text\/plain/);
  return parsePrometheus(res.text);
};
const chat = (body: object) => request(gw.url).post('/v1/chat/completions').set(auth).send(body);
const hello = (extra: object = {}) => ({ model: MODEL, messages: [{ role: 'user', content: SECRET_PROMPT }], ...extra });

describe('metrics', () => {
  beforeAll(async () => {
    expect((await chat(hello())).status).toBe(200);
    const s = await chat(hello({ stream: true }));
    expect(s.status).toBe(200);
    expect((await request(gw.url).post('/v1/chat/completions').send(hello())).status).toBe(401);
    expect((await request(gw.url).get('/v1/models/nope/at-all').set(auth)).status).toBe(404);
    expect((await request(gw.url).get('/no/such/route')).status).toBe(404);
  });

  it('counts requests by route pattern, method and status, with a latency histogram', async () => {
    const m = await scrape();
    const chatRoute = { route: '/v1/chat/completions', method: 'POST' };
    expect(sumOf(m, 'llm_gateway_requests_total', { ...chatRoute, status: '200' })).toBe(2);
    // Refused by the auth middleware before any route ran: still labelled with the route it was aimed at.
    expect(sumOf(m, 'llm_gateway_requests_total', { ...chatRoute, status: '401' })).toBe(1);
    // The pattern, never the raw URL (label values stay bounded).
    expect(sumOf(m, 'llm_gateway_requests_total', { route: '/v1/models/{id}', status: '404' })).toBe(1);
    expect(sumOf(m, 'llm_gateway_requests_total', { route: 'unmatched', status: '404' })).toBe(1);
    expect(select(m, 'llm_gateway_requests_total').some((s) => s.labels.route.includes('nope'))).toBe(false);
    expect(sumOf(m, 'llm_gateway_request_duration_seconds_count', { ...chatRoute, status: '200' })).toBe(2);
    const inf = select(m, 'llm_gateway_request_duration_seconds_bucket', { ...chatRoute, status: '200', le: '+Inf' });
    expect(inf[0].value).toBe(2);
  });

  it('observes TTFT and inter-token latency for streams and non-streams, and tokens by model', async () => {
    const m = await scrape();
    for (const stream of ['true', 'false']) {
      expect(sumOf(m, 'llm_gateway_time_to_first_token_seconds_count', { model: MODEL, stream })).toBe(1);
      expect(sumOf(m, 'llm_gateway_inter_token_latency_seconds_count', { model: MODEL, stream })).toBe(1);
    }
    // The fake worker counts one token per delta: 7 deltas of 4 characters, twice.
    expect(sumOf(m, 'llm_gateway_completion_tokens_total', { model: MODEL })).toBe(14);
    expect(sumOf(m, 'llm_gateway_prompt_tokens_total', { model: MODEL })).toBeGreaterThan(2);
  });

  it('exports the rate-limit and cache counters, and process metrics', async () => {
    const m = await scrape();
    expect(select(m, 'llm_gateway_rate_limit_rejections_total')).toHaveLength(1);
    expect(select(m, 'llm_gateway_cache_lookups_total', { result: 'hit' })).toHaveLength(1);
    expect(select(m, 'llm_gateway_cache_lookups_total', { result: 'miss' })).toHaveLength(1);
    expect(select(m, 'process_resident_memory_bytes')).toHaveLength(1);
  });

  it('reports queue depth per model and state (waiting, prioritized, active, delayed) and live workers', async () => {
    const queued = request(gw.url)
      .post('/v1/chat/completions')
      .set(auth)
      .send({ model: IDLE_MODEL, messages: [{ role: 'user', content: 'hi' }] })
      .then((r) => r.status);
    // Queued = waiting + prioritized: BullMQ keeps a job with a priority (per-key priorities) out of the wait list.
    const queuedJobs = (m: ReturnType<typeof parsePrometheus>) =>
      sumOf(m, 'llm_queue_jobs', { model: IDLE_MODEL, state: 'waiting' }) + sumOf(m, 'llm_queue_jobs', { model: IDLE_MODEL, state: 'prioritized' });
    await waitFor(async () => queuedJobs(await scrape()) === 1, undefined, 'a queued job');
    const m = await scrape();
    for (const state of ['waiting', 'prioritized', 'active', 'delayed']) {
      expect(select(m, 'llm_queue_jobs', { model: IDLE_MODEL, state })).toHaveLength(1);
    }
    expect(sumOf(m, 'llm_queue_jobs', { model: IDLE_MODEL, state: 'active' })).toBe(0);
    expect(sumOf(m, 'llm_queue_jobs', { model: MODEL, state: 'waiting' })).toBe(0);
    expect(sumOf(m, 'llm_gateway_live_workers', { model: IDLE_MODEL })).toBe(1);
    expect(sumOf(m, 'llm_gateway_open_requests')).toBeGreaterThanOrEqual(1);
    // The queued request stays open until the gateway closes (afterAll), which cancels its job.
    void queued.catch(() => undefined);
  });
});

describe('logs', () => {
  it('one request line with requestId, keyId, status and latency; one completion line with jobId, model and tokens', async () => {
    gw.logs.length = 0;
    const res = await chat(hello({ user: 'u1' })).set('x-request-id', 'req-logs-1');
    expect(res.status).toBe(200);
    await waitFor(() => gw.logs.some((l) => l.includes('"msg":"request"') && l.includes('req-logs-1')), undefined, 'the request log');
    const lines = gw.logs.map((l) => JSON.parse(l) as Record<string, unknown>).filter((l) => l.requestId === 'req-logs-1');
    const done = lines.find((l) => l.msg === 'chat completion finished')!;
    expect(done).toMatchObject({ level: 'info', model: MODEL, promptTokens: expect.any(Number), completionTokens: 7 });
    expect(done.jobId).toBe(res.body.id);
    expect(done.keyId).toMatch(/^key_[0-9a-f]{12}$/);
    const req = lines.find((l) => l.msg === 'request')!;
    expect(req).toMatchObject({ method: 'POST', path: '/v1/chat/completions', status: 200, keyId: done.keyId });
    expect(typeof req.ms).toBe('number');
    expect(typeof req.ts).toBe('string');
    // Never the key; no prompt or output text while LOG_PROMPTS is off.
    const all = gw.logs.join('\n');
    expect(all).not.toContain(TEST_KEY);
    expect(all).not.toContain(SECRET_PROMPT);
    expect(all).not.toContain('one two three');
  });

  it('LOG_PROMPTS=true logs prompt and output text; LOG_LEVEL=warn drops info lines', async () => {
    const verbose = await startGateway(redis.url, { DEFAULT_MODEL: MODEL, LOG_LEVEL: 'info', LOG_PROMPTS: 'true' });
    const quiet = await startGateway(redis.url, { DEFAULT_MODEL: MODEL, LOG_LEVEL: 'warn' });
    try {
      for (const g of [verbose, quiet]) {
        await waitFor(async () => (await request(g.url).get('/ready')).status === 200, undefined, '/ready');
        const r = await request(g.url).post('/v1/chat/completions').set(auth).send(hello());
        expect(r.status).toBe(200);
      }
      await waitFor(() => verbose.logs.some((l) => l.includes('"msg":"request"')), undefined, 'the request log');
      const all = verbose.logs.join('\n');
      expect(all).toContain(SECRET_PROMPT);
      expect(all).toContain('one two three');
      expect(quiet.logs.filter((l) => JSON.parse(l).level === 'info')).toEqual([]);
    } finally {
      await Promise.all([verbose.close(), quiet.close()]);
    }
  });

  it('/ready polls are not logged at info; each change of its answer is, once', async () => {
    const model = `late-${randomUUID().slice(0, 8)}`;
    const g = await startGateway(redis.url, { DEFAULT_MODEL: model, LOG_LEVEL: 'info' });
    const late = new FakeWorker({ redisUrl: redis.url, model, script: { reply: () => 'ok' } });
    try {
      // Polled as a start-up script polls it, before any worker serves the model: "not yet", many times.
      for (let i = 0; i < 5; i++) expect((await request(g.url).get('/ready')).status).toBe(503);
      await late.start();
      await waitFor(async () => (await request(g.url).get('/ready')).status === 200, undefined, '/ready');
      for (let i = 0; i < 3; i++) expect((await request(g.url).get('/ready')).status).toBe(200);
      const info = g.logs.map((l) => JSON.parse(l) as Record<string, unknown>).filter((l) => l.level === 'info');
      expect(info.filter((l) => l.path === '/ready')).toEqual([]);
      expect(info.filter((l) => l.module === 'health').map((l) => [l.msg, l.workers])).toEqual([
        ['not ready', 0],
        ['ready', 1],
      ]);
    } finally {
      await late.close();
      await g.close();
    }
  });
});

describe('METRICS_PATH and METRICS_AUTH', () => {
  it('token: served only at METRICS_PATH, only with the Bearer token', async () => {
    const token = `mt-${randomUUID()}`;
    const g = await startGateway(redis.url, { DEFAULT_MODEL: MODEL, METRICS_PATH: '/internal/prom', METRICS_AUTH: 'token', METRICS_TOKEN: token });
    try {
      expect((await request(g.url).get('/metrics')).status).toBe(404);
      const refused = await request(g.url).get('/internal/prom');
      expect(refused.status).toBe(401);
      expect(refused.body.error.code).toBe('invalid_api_key');
      expect((await request(g.url).get('/internal/prom').set(auth)).status).toBe(401);
      const m = await scrape(g.url, '/internal/prom', { authorization: `Bearer ${token}` });
      expect(select(m, 'llm_queue_jobs', { model: MODEL, state: 'prioritized' })).toHaveLength(1);
    } finally {
      await g.close();
    }
  });

  it('api_key: any API key reads it', async () => {
    const g = await startGateway(redis.url, { DEFAULT_MODEL: MODEL, METRICS_AUTH: 'api_key' });
    try {
      expect((await request(g.url).get('/metrics')).status).toBe(401);
      await scrape(g.url, '/metrics', auth);
    } finally {
      await g.close();
    }
  });

  it('refuses to start with METRICS_AUTH=token and no token, or a path that is not one', () => {
    expect(() => loadConfig({ METRICS_AUTH: 'token' })).toThrow(/METRICS_TOKEN/);
    expect(() => loadConfig({ METRICS_PATH: 'metrics' })).toThrow(/METRICS_PATH/);
    expect(loadConfig({})).toMatchObject({ METRICS_PATH: '/metrics', METRICS_AUTH: 'none' });
  });
});
