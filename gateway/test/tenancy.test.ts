/**
 * One tenant must not learn about another (issue 11, items 3 and 8), through the real wiring, real Redis and a FAKE
 * worker (helpers/fake-worker.ts): the response cache is scoped to the caller unless CACHE_SCOPE=shared, a cached body
 * is charged what it reports, /v1/models lists only what the key may use, and smaller leaks of the HTTP surface.
 */
import { randomUUID } from 'node:crypto';
import http from 'node:http';
import request from 'supertest';
import { clientAddress } from '../src/limits/auth-failures';
import { FakeWorker } from './helpers/fake-worker';
import { startGateway, TEST_KEY, type TestGateway, waitFor } from './helpers/gateway';
import { useTestRedis } from './helpers/redis-server';

const ADMIN = 'admin-0123456789abcdef';
const admin = { authorization: `Bearer ${ADMIN}` };
const bearer = (k: string) => ({ authorization: `Bearer ${k}` });
const MODEL = `m-${randomUUID().slice(0, 8)}`;
const OTHER = `o-${randomUUID().slice(0, 8)}`;

const redis = useTestRedis();
let gw: TestGateway;
let worker: FakeWorker;
let other: FakeWorker;

beforeAll(async () => {
  // Budgets per hour: the buckets refill continuously, so a short window would refill between the reads compared here.
  gw = await startGateway(redis.url, { DEFAULT_MODEL: MODEL, ADMIN_API_KEY: ADMIN, RATE_LIMIT_WINDOW_MS: '3600000' });
  worker = new FakeWorker({ redisUrl: redis.url, model: MODEL, contextLength: 400 });
  other = new FakeWorker({ redisUrl: redis.url, model: OTHER, contextLength: 400 });
  await Promise.all([worker.start(), other.start()]);
});
redis.beforeStop(async () => {
  await Promise.all([worker.close(), other.close()]);
  await gw.close();
});

const createKey = async (fields: Record<string, unknown> = {}) => {
  const r = await request(gw.url).post('/admin/keys').set(admin).send({ name: 'tenant', ...fields });
  expect(r.status).toBe(201);
  return r.body as { id: string; key: string };
};
const deterministic = (content: string) => ({ model: MODEL, temperature: 0, max_tokens: 5, messages: [{ role: 'user', content }] });

describe('response cache scope', () => {
  it("key B never gets key A's cached answer; A gets its own", async () => {
    const [a, b] = [await createKey(), await createKey()];
    const body = deterministic(`private question ${randomUUID()}`);
    const first = await request(gw.url).post('/v1/chat/completions').set(bearer(a.key)).send(body);
    expect(first.headers['x-cache']).toBe('miss');
    const jobs = worker.jobs.length;
    const fromB = await request(gw.url).post('/v1/chat/completions').set(bearer(b.key)).send(body);
    expect(fromB.status).toBe(200);
    expect(fromB.headers['x-cache']).toBe('miss');
    expect(worker.jobs.length).toBe(jobs + 1); // B's answer was generated for B
    const again = await request(gw.url).post('/v1/chat/completions').set(bearer(a.key)).send(body);
    expect(again.headers['x-cache']).toBe('hit');
  });

  it('CACHE_SCOPE=shared shares entries between callers (documented opt-in)', async () => {
    const shared = await startGateway(redis.url, { DEFAULT_MODEL: MODEL, ADMIN_API_KEY: ADMIN, CACHE_SCOPE: 'shared' });
    try {
      const [a, b] = [await createKey(), await createKey()];
      const body = deterministic(`public question ${randomUUID()}`);
      expect((await request(shared.url).post('/v1/chat/completions').set(bearer(a.key)).send(body)).headers['x-cache']).toBe('miss');
      expect((await request(shared.url).post('/v1/chat/completions').set(bearer(b.key)).send(body)).headers['x-cache']).toBe('hit');
    } finally {
      await shared.close();
    }
  });

  it('a hit is charged the usage its body reports (budget and usage counters agree with the body)', async () => {
    const k = await createKey({ tpm: 2000 });
    const body = deterministic(`charged ${randomUUID()}`);
    const t0 = Date.now();
    const first = await request(gw.url).post('/v1/chat/completions').set(bearer(k.key)).send(body);
    const hit = await request(gw.url).post('/v1/chat/completions').set(bearer(k.key)).send(body);
    expect(hit.headers['x-cache']).toBe('hit');
    expect(hit.body.usage).toEqual(first.body.usage);
    // Accounting is written just after each response goes out: wait for both requests' share.
    let rec: { usage: { requests: number } } = { usage: { requests: 0 } };
    await waitFor(async () => {
      rec = (await request(gw.url).get(`/admin/keys/${k.id}`).set(admin)).body;
      return rec.usage.requests === 2;
    }, undefined, 'the usage of both requests');
    expect(rec.usage).toEqual({
      requests: 2,
      cache_hits: 1,
      prompt_tokens: first.body.usage.prompt_tokens + hit.body.usage.prompt_tokens,
      completion_tokens: first.body.usage.completion_tokens + hit.body.usage.completion_tokens,
    });
    const expected = 2000 - first.body.usage.total_tokens - hit.body.usage.total_tokens;
    await waitFor(async () => {
      const models = await request(gw.url).get('/v1/models').set(bearer(k.key));
      const remaining = Number(models.headers['x-ratelimit-remaining-tokens']);
      // What refilled since the first charge (2000 per hour: a token or two) is all the slack there is.
      return remaining >= expected && remaining <= expected + Math.ceil(((Date.now() - t0) * 2000) / 3_600_000);
    }, undefined, 'the token budget to show both charges');
  });

  it('no x-cache header when the cache was not consulted (cache-control: no-store)', async () => {
    const r = await request(gw.url).post('/v1/chat/completions').set(bearer(TEST_KEY)).set('cache-control', 'no-store')
      .send(deterministic(`nostore ${randomUUID()}`));
    expect(r.status).toBe(200);
    expect(r.headers['x-cache']).toBeUndefined();
  });
});

describe('what a key may see', () => {
  it('/v1/models lists only the models the key may use; /v1/models/{id} of another is a 404', async () => {
    const k = await createKey({ models: [OTHER] });
    const list = await request(gw.url).get('/v1/models').set(bearer(k.key));
    expect(list.body.data.map((m: { id: string }) => m.id)).toEqual([OTHER]);
    expect((await request(gw.url).get(`/v1/models/${MODEL}`).set(bearer(k.key))).status).toBe(404);
    expect((await request(gw.url).get(`/v1/models/${OTHER}`).set(bearer(k.key))).status).toBe(200);
    const all = await request(gw.url).get('/v1/models').set(bearer(TEST_KEY));
    expect(all.body.data.map((m: { id: string }) => m.id).sort()).toEqual([MODEL, OTHER].sort());
  });

  it('revoking a revoked key keeps the first revocation time', async () => {
    const k = await createKey();
    const first = await request(gw.url).delete(`/admin/keys/${k.id}`).set(admin);
    expect(first.body.revoked_at).toEqual(expect.any(Number));
    // Wait until the clock has moved on, so a rewrite would be visible.
    const t = Date.now();
    while (Date.now() <= first.body.revoked_at + 1 || Date.now() === t) await new Promise((r) => setImmediate(r));
    const second = await request(gw.url).delete(`/admin/keys/${k.id}`).set(admin);
    expect(second.status).toBe(200);
    expect(second.body.revoked_at).toBe(first.body.revoked_at);
  });

  it('an oversized Authorization header gets 431 in the OpenAI error shape, not an empty body', async () => {
    const url = new URL('/v1/models', gw.url);
    const res = await new Promise<{ status: number; type: string; body: string }>((resolve, reject) => {
      const req = http.get(url, { headers: { authorization: `Bearer ${'x'.repeat(20_000)}` } }, (r) => {
        let body = '';
        r.on('data', (c) => (body += c));
        r.on('end', () => resolve({ status: r.statusCode ?? 0, type: String(r.headers['content-type']), body }));
      });
      req.on('error', reject);
    });
    expect(res.status).toBe(431);
    expect(res.type).toMatch(/application\/json/);
    expect(JSON.parse(res.body).error).toMatchObject({ code: 'request_header_too_large', type: 'invalid_request_error' });
  });
});

describe('key guessing', () => {
  const clearAuthFailures = async () => {
    const keys = await redis.client.keys('llm:authfail:*');
    if (keys.length > 0) await redis.client.del(...keys);
  };

  it('failed authentications are limited per address, across replicas, before the key is looked at', async () => {
    const env = { DEFAULT_MODEL: MODEL, AUTH_FAILURE_LIMIT: '3', AUTH_FAILURE_WINDOW_MS: '60000' };
    const [g1, g2] = [await startGateway(redis.url, env), await startGateway(redis.url, env)];
    try {
      const guess = (g: TestGateway) => request(g.url).get('/v1/models').set(bearer(`sk-guess-${randomUUID()}`));
      expect((await guess(g1)).status).toBe(401);
      expect((await guess(g2)).status).toBe(401);
      expect((await guess(g1)).status).toBe(401);
      const blocked = await guess(g2); // the fourth failure from this address, on the other replica
      expect(blocked.status).toBe(429);
      expect(blocked.body.error.code).toBe('rate_limit_exceeded');
      expect(Number(blocked.headers['retry-after'])).toBeGreaterThan(0);
      // Blocked before the key is looked at: even a right guess gets nothing from this address now.
      expect((await request(g1.url).get('/v1/models').set(bearer(TEST_KEY))).status).toBe(429);
    } finally {
      await Promise.all([g1.close(), g2.close()]);
      await clearAuthFailures();
    }
  });

  it('concurrent guesses: at most the limit is ever checked, the rest wait and are refused', async () => {
    // Counting failures only after each check let every guess of a burst through before the first was counted.
    const env = { DEFAULT_MODEL: MODEL, AUTH_FAILURE_LIMIT: '3', AUTH_FAILURE_WINDOW_MS: '60000' };
    const [g1, g2] = [await startGateway(redis.url, env), await startGateway(redis.url, env)];
    try {
      const guesses = Array.from({ length: 60 }, (_, i) =>
        request((i % 2 ? g1 : g2).url).get('/v1/models').set(bearer(`sk-guess-${randomUUID()}`)).then((r) => r.status),
      );
      const statuses = await Promise.all(guesses);
      expect(statuses.filter((st) => st === 401).length).toBeLessThanOrEqual(3);
      expect(statuses.every((st) => st === 401 || st === 429)).toBe(true);
      expect(Number(await redis.client.get('llm:authfail:{127.0.0.1}'))).toBeLessThanOrEqual(3);
    } finally {
      await Promise.all([g1.close(), g2.close()]);
      await clearAuthFailures();
    }
  });

  it('a legitimate burst from one address with a key this gateway has not seen yet is not refused', async () => {
    const env = { DEFAULT_MODEL: MODEL, AUTH_FAILURE_LIMIT: '3', AUTH_FAILURE_WINDOW_MS: '60000' };
    const g = await startGateway(redis.url, env);
    try {
      const k = await createKey();
      const statuses = await Promise.all(
        Array.from({ length: 40 }, () => request(g.url).get('/v1/models').set(bearer(k.key)).then((r) => r.status)),
      );
      expect(statuses.filter((st) => st !== 200)).toEqual([]);
      expect(await redis.client.get('llm:authfail:{127.0.0.1}')).toBeNull(); // nothing failed
    } finally {
      await g.close();
      await clearAuthFailures();
    }
  });

  it('counts IPv4 addresses one by one and IPv6 addresses by /64', () => {
    const at = (ip: string) => clientAddress({ ip, socket: {} as never });
    expect(at('203.0.113.7')).toBe('203.0.113.7');
    expect(at('::ffff:203.0.113.7')).toBe('203.0.113.7');
    expect(at('2001:db8:1:2::1')).toBe('2001:db8:1:2::/64');
    expect(at('2001:db8:1:2:ffff:eeee:dddd:cccc')).toBe('2001:db8:1:2::/64');
    expect(at('2001:0DB8:0001:0002:0:0:0:9')).toBe('2001:db8:1:2::/64');
    expect(at('2001:db8::5')).toBe('2001:db8:0:0::/64');
    expect(at('fe80::1%eth0')).toBe('fe80:0:0:0::/64');
    expect(at('::1')).toBe('0:0:0:0::/64');
    expect(at('2001:db8:1:3::1')).not.toBe(at('2001:db8:1:2::1'));
  });

  it('guessing the admin key or the metrics token counts the same way', async () => {
    const env = { DEFAULT_MODEL: MODEL, ADMIN_API_KEY: ADMIN, METRICS_AUTH: 'token', METRICS_TOKEN: 'a-metrics-token-0123456789', AUTH_FAILURE_LIMIT: '3' };
    const [g1, g2] = [await startGateway(redis.url, env), await startGateway(redis.url, env)];
    try {
      expect((await request(g1.url).get('/admin/keys').set(bearer('admin-guess-1'))).status).toBe(401);
      expect((await request(g2.url).get('/metrics').set(bearer('metrics-guess'))).status).toBe(401);
      expect((await request(g1.url).get('/admin/keys').set(bearer('admin-guess-2'))).status).toBe(401);
      expect((await request(g2.url).get('/admin/keys').set(bearer(ADMIN))).status).toBe(429);
    } finally {
      await Promise.all([g1.close(), g2.close()]);
      await clearAuthFailures();
    }
  });
});

describe('/chat/batch headers', () => {
  it("say what holds for the batch, not whichever item finished last", async () => {
    // A gateway whose tutorial budget is wide, so the key's own RPM is the tightest budget the headers report.
    const g = await startGateway(redis.url, { DEFAULT_MODEL: MODEL, ADMIN_API_KEY: ADMIN, TUTORIAL_RPM: '1000', RATE_LIMIT_WINDOW_MS: '3600000' });
    try {
      const k = await createKey({ rpm: 50 });
      const prompt = `batch cached ${randomUUID()}`;
      const once = await request(g.url).post('/chat').set(bearer(k.key)).send({ prompt, max_length: 5, temperature: 0 });
      expect(once.headers['x-cache']).toBe('miss');
      await waitFor(async () => (await request(g.url).post('/chat').set(bearer(k.key)).send({ prompt, max_length: 5, temperature: 0 })).headers['x-cache'] === 'hit', undefined, 'the answer to be cached');
      const r = await request(g.url).post('/chat/batch').set(bearer(k.key)).send([
        { prompt, max_length: 5, temperature: 0 }, // answered from the cache
        { prompt: 'sampled', max_length: 5, temperature: 0.7 }, // not cacheable: no lookup
        { prompt: `fresh ${randomUUID()}`, max_length: 5, temperature: 0 }, // looked up, missed
      ]);
      expect(r.status).toBe(200);
      expect(r.headers['x-cache']).toBe('hit, -, miss');
      // Each item drew one request from the key's budget; the header shows the least left, i.e. after all three.
      const after = await request(g.url).get('/v1/models').set(bearer(k.key));
      expect(Number(r.headers['x-ratelimit-remaining-requests'])).toBe(Number(after.headers['x-ratelimit-remaining-requests']));
    } finally {
      await g.close();
    }
  });
});
