/**
 * Governance over HTTP, through the real wiring and a real Redis, with a FAKE worker (helpers/fake-worker.ts):
 * admin API and stored keys (hash-only, prefix, revocation, usage), JWT (HS256/ES256, pinned algorithm, exp/nbf/aud,
 * limit claims), per-key limits and headers, cache (hit/miss, no job, streamable, no-store), the output filter on
 * streams, input limits, queue depth and degradation, and the tutorial's routes.
 */
import { randomUUID } from 'node:crypto';
import { exportSPKI, generateKeyPair, SignJWT } from 'jose';
import request from 'supertest';
import { FakeWorker } from './helpers/fake-worker';
import { queueDepth } from '../src/limits/admission';
import { parseSse, pollUntil, sleep, startGateway, TEST_KEY, type TestGateway, waitFor } from './helpers/gateway';
import { useTestRedis } from './helpers/redis-server';

const ADMIN = 'admin-0123456789abcdef';
const SECRET = 'a-test-secret-of-at-least-32-characters!!';
const MODEL = `m-${randomUUID().slice(0, 8)}`;
const OTHER = `o-${randomUUID().slice(0, 8)}`;
const admin = { authorization: `Bearer ${ADMIN}` };
const bearer = (k: string) => ({ authorization: `Bearer ${k}` });

const redis = useTestRedis();
let gw: TestGateway;
let worker: FakeWorker;
let other: FakeWorker;

beforeAll(async () => {
  gw = await startGateway(redis.url, {
    DEFAULT_MODEL: MODEL,
    ADMIN_API_KEY: ADMIN,
    JWT_SECRET: SECRET,
    JWT_AUDIENCE: 'llm-gateway',
    RATE_LIMIT_WINDOW_MS: '3000',
    TUTORIAL_RPM: '100',
    MAX_MESSAGES: '4',
    OUTPUT_FILTER_BLOCKLIST: 'secret plan',
    OUTPUT_FILTER_PATTERNS: '\\d{3}-\\d{4}',
    OUTPUT_FILTER_MAX_MATCH_CHARS: '16',
  });
  worker = new FakeWorker({
    redisUrl: redis.url,
    model: MODEL,
    contextLength: 400,
    script: { reply: (d) => (d.messages?.at(-1)?.content.startsWith('leak') ? 'the secret plan is 555-1234 ok' : 'Hello from the fake worker!'), pieceChars: 3 },
  });
  other = new FakeWorker({ redisUrl: redis.url, model: OTHER, contextLength: 400 });
  await Promise.all([worker.start(), other.start()]);
});
redis.beforeStop(async () => {
  await Promise.all([worker.close(), other.close()]);
  await gw.close();
});

const body = (extra: Record<string, unknown> = {}) => ({ model: MODEL, messages: [{ role: 'user', content: 'Hi' }], max_tokens: 5, ...extra });
const chat = (key: string, b: object = body()) => request(gw.url).post('/v1/chat/completions').set(bearer(key)).send(b);
/** A fresh gateway answers once its Redis connection is up and its registry has seen the workers. */
const settle = (g: TestGateway, model = MODEL) =>
  waitFor(async () => {
    const r = await request(g.url).get('/v1/models').set(bearer(TEST_KEY));
    return r.status === 200 && r.body.data.some((m: { id: string }) => m.id === model);
  }, undefined, `a gateway that lists ${model}`);
const createKey = async (fields: Record<string, unknown>) => {
  const r = await request(gw.url).post('/admin/keys').set(admin).send({ name: 'test', ...fields });
  expect(r.status).toBe(201);
  return r.body as { id: string; key: string; prefix: string };
};
/**
 * A completion's accounting (usage counters, the cache store, the real token cost) runs after its response has gone out
 * (chat-admission.ts `finish`): wait until the key's counters show `requests` requests before reading what follows them.
 */
const accounted = (id: string, requests: number) =>
  waitFor(async () => (await request(gw.url).get(`/admin/keys/${id}`).set(admin)).body.usage.requests >= requests, undefined, `usage of ${requests} request(s)`);

describe('admin API and stored keys', () => {
  it('refuses without the admin key', async () => {
    expect((await request(gw.url).get('/admin/keys')).status).toBe(401);
    expect((await request(gw.url).get('/admin/keys').set(bearer(TEST_KEY))).status).toBe(401);
  });

  it('creates a key shown once, stores only its hash, lists it with its prefix, and reports usage', async () => {
    const k = await createKey({ name: 'alice', rpm: 100, tier: 'high' });
    expect(k.key.startsWith(k.prefix)).toBe(true);
    const dump = JSON.stringify(await redis.client.hgetall(`llm:key:${k.id}`)) + JSON.stringify(await redis.client.keys('*'));
    expect(dump).not.toContain(k.key);
    expect((await chat(k.key)).status).toBe(200);
    await accounted(k.id, 1);
    const list = await request(gw.url).get('/admin/keys').set(admin);
    const rec = list.body.data.find((r: { id: string }) => r.id === k.id);
    expect(rec).toMatchObject({ name: 'alice', prefix: k.prefix, rpm: 100, tier: 'high', revoked_at: null });
    expect(rec).not.toHaveProperty('key');
    expect(rec.usage).toMatchObject({ requests: 1, completion_tokens: expect.any(Number) });
    expect(rec.usage.prompt_tokens).toBeGreaterThan(0);
  });

  it('updates limits and models; a model outside the list is a 404', async () => {
    const k = await createKey({ models: [OTHER] });
    expect((await chat(k.key)).body.error.code).toBe('model_not_found');
    const patched = await request(gw.url).patch(`/admin/keys/${k.id}`).set(admin).send({ models: null, rpm: 7 });
    expect(patched.body).toMatchObject({ models: null, rpm: 7 });
    // The old record stays cached in the gateway for up to KEY_CACHE_MS: poll until the new one is seen.
    const r = await pollUntil(() => chat(k.key), (x) => x.status !== 404, 'the patched key to be seen');
    expect(r.status).toBe(200);
    expect(r.headers['x-ratelimit-limit-requests']).toBe('7');
  });

  it('a revoked key is refused within KEY_CACHE_MS', async () => {
    const k = await createKey({});
    expect((await chat(k.key)).status).toBe(200);
    // The gateway's cached lookup was made during that request, so it expires by `stale` at the latest. The bound under
    // test is that one, measured against when each probe was *sent*: a slow machine sends fewer probes, never a
    // wrong one. Every probe sent after `stale` must be refused; one is (the poll ends on a 401 or times out).
    const stale = Date.now() + gw.config.KEY_CACHE_MS;
    expect((await request(gw.url).delete(`/admin/keys/${k.id}`).set(admin)).body.revoked_at).toEqual(expect.any(Number));
    const probes: Array<{ sentAt: number; status: number }> = [];
    await waitFor(async () => {
      const sentAt = Date.now();
      const status = (await request(gw.url).get('/v1/models').set(bearer(k.key))).status;
      probes.push({ sentAt, status });
      return status !== 200;
    }, undefined, 'the revoked key to be refused');
    expect(probes.at(-1)!.status).toBe(401);
    expect(probes.filter((p) => p.sentAt > stale && p.status !== 401)).toEqual([]);
  });
});

describe('JWT', () => {
  const sign = (claims: Record<string, unknown>, opts: { alg?: string; exp?: string | number; aud?: string; nbf?: number } = {}) => {
    let jwt = new SignJWT(claims).setProtectedHeader({ alg: opts.alg ?? 'HS256' }).setSubject('user-1').setIssuedAt();
    jwt = jwt.setAudience(opts.aud ?? 'llm-gateway').setExpirationTime(opts.exp ?? '5m');
    if (opts.nbf) jwt = jwt.setNotBefore(opts.nbf);
    return jwt.sign(new TextEncoder().encode(SECRET));
  };

  it('accepts a valid HS256 token and applies its limit claims', async () => {
    const r = await chat(await sign({ rpm: 9, jti: randomUUID() }));
    expect(r.status).toBe(200);
    expect(r.headers['x-ratelimit-limit-requests']).toBe('9');
  });

  it('refuses expired, not-yet-valid, wrong-audience and missing-exp tokens', async () => {
    const now = Math.floor(Date.now() / 1000);
    for (const token of [
      await sign({}, { exp: now - 60 }),
      await sign({}, { nbf: now + 600 }),
      await sign({}, { aud: 'someone-else' }),
      await new SignJWT({}).setProtectedHeader({ alg: 'HS256' }).setSubject('x').setAudience('llm-gateway').sign(new TextEncoder().encode(SECRET)),
    ]) {
      const r = await chat(token);
      expect(r.status).toBe(401);
      expect(r.body.error.code).toBe('invalid_api_key');
    }
  });

  it('pins the algorithm: alg none and HS512 are refused', async () => {
    const header = Buffer.from(JSON.stringify({ alg: 'none', typ: 'JWT' })).toString('base64url');
    const payload = Buffer.from(JSON.stringify({ sub: 'x', aud: 'llm-gateway', exp: Math.floor(Date.now() / 1000) + 60 })).toString('base64url');
    expect((await chat(`${header}.${payload}.`)).status).toBe(401);
    expect((await chat(await sign({}, { alg: 'HS512' }))).status).toBe(401);
  });

  it('limits models by claim, and a revoked jti is refused', async () => {
    expect((await chat(await sign({ models: [OTHER] }))).body.error.code).toBe('model_not_found');
    const jti = randomUUID();
    const token = await sign({ jti });
    expect((await chat(token)).status).toBe(200);
    expect((await request(gw.url).post('/admin/jwt/revocations').set(admin).send({ jti })).status).toBe(200);
    expect((await chat(token)).status).toBe(401);
  });

  it('ES256 with a public key (separate gateway)', async () => {
    const { publicKey, privateKey } = await generateKeyPair('ES256');
    const g = await startGateway(redis.url, { DEFAULT_MODEL: MODEL, JWT_ALGORITHM: 'ES256', JWT_PUBLIC_KEY: await exportSPKI(publicKey) });
    try {
      await settle(g);
      const token = await new SignJWT({}).setProtectedHeader({ alg: 'ES256' }).setSubject('svc').setExpirationTime('1m').sign(privateKey);
      const ok = await request(g.url).post('/v1/chat/completions').set(bearer(token)).send(body());
      expect(ok.status).toBe(200);
      // An HS256 token signed with the public key as secret (the classic confusion attack) is refused.
      const forged = await new SignJWT({}).setProtectedHeader({ alg: 'HS256' }).setSubject('svc').setExpirationTime('1m')
        .sign(new TextEncoder().encode(await exportSPKI(publicKey)));
      expect((await request(g.url).post('/v1/chat/completions').set(bearer(forged)).send(body())).status).toBe(401);
    } finally {
      await g.close();
    }
  });
});

describe('limits', () => {
  it('RPM: headers on every response, then 429 rate_limit_exceeded with retry-after and retry-after-ms', async () => {
    const k = await createKey({ rpm: 2 });
    const r1 = await chat(k.key);
    expect(r1.headers).toMatchObject({ 'x-ratelimit-limit-requests': '2', 'x-ratelimit-remaining-requests': '1' });
    expect(r1.headers['x-ratelimit-reset-requests']).toMatch(/^\d+(\.\d+)?s$|ms$/);
    const models = await request(gw.url).get('/v1/models').set(bearer(k.key));
    expect(models.headers['x-ratelimit-remaining-requests']).toBe('1');
    await chat(k.key);
    const r3 = await chat(k.key);
    expect(r3.status).toBe(429);
    expect(r3.body.error).toMatchObject({ code: 'rate_limit_exceeded', type: 'rate_limit_error' });
    const ms = Number(r3.headers['retry-after-ms']);
    expect(ms).toBeGreaterThan(0);
    expect(ms).toBeLessThanOrEqual(3000);
    expect(r3.headers['retry-after']).toBe(String(Math.ceil(ms / 1000)));
    // Not synchronisation: the wait is the retry-after-ms under test (a client that waits as told is served), plus
    // 30 ms for timer granularity. A loaded machine only waits longer, which cannot make a too-short value pass.
    await sleep(ms + 30);
    expect((await chat(k.key)).status).toBe(200);
  });

  it('TPM: admission counts prompt + max_tokens; a request above the whole budget is not retried', async () => {
    // Its own gateway with a one-minute window: with the suite's 3 s window the charge could expire before the poll
    // below sees the corrected figure on a loaded machine, and "back to the full budget" is not what is checked.
    const g = await startGateway(redis.url, { DEFAULT_MODEL: MODEL, RATE_LIMIT_WINDOW_MS: '60000' });
    try {
      await settle(g);
      const send = (key: string, b: object) => request(g.url).post('/v1/chat/completions').set(bearer(key)).send(b);
      const k = await createKey({ tpm: 60 });
      const big = await send(k.key, body({ max_tokens: 100 }));
      expect(big.status).toBe(429);
      expect(big.headers['x-should-retry']).toBe('false');
      const ok = await send(k.key, body({ max_tokens: 20 }));
      expect(ok.status).toBe(200);
      expect(ok.headers['x-ratelimit-limit-tokens']).toBe('60');
      // After completion the estimate (prompt + 20) is replaced by real usage (prompt + 5 fake tokens or fewer). That
      // happens after the response has gone out, so poll for it; a budget that keeps the estimate times out.
      const used = ok.body.usage.total_tokens;
      expect(used).toBeLessThan(ok.body.usage.prompt_tokens + 20);
      await pollUntil(
        () => request(g.url).get('/v1/models').set(bearer(k.key)),
        (m) => Number(m.headers['x-ratelimit-remaining-tokens']) === 60 - used,
        'the real usage to replace the estimate',
      );
    } finally {
      await g.close();
    }
  });

  it('input limits: too many messages', async () => {
    const r = await chat(TEST_KEY, { model: MODEL, messages: Array.from({ length: 5 }, () => ({ role: 'user', content: 'x' })) });
    expect(r.status).toBe(400);
    expect(r.body.error.param).toBe('messages');
  });
});

describe('cache', () => {
  it('a deterministic request is answered from the cache: same body, x-cache hit, no job', async () => {
    const k = await createKey({}); // a stored key: its usage counters show when the answer has been stored
    const b = body({ temperature: 0, messages: [{ role: 'user', content: `cache ${randomUUID()}` }] });
    const first = await chat(k.key, b);
    expect(first.headers['x-cache']).toBe('miss');
    await accounted(k.id, 1);
    const jobs = worker.jobs.length;
    const second = await chat(k.key, b);
    expect(second.headers['x-cache']).toBe('hit');
    expect(worker.jobs.length).toBe(jobs);
    const strip = (x: Record<string, unknown>) => ({ ...x, id: undefined, created: undefined });
    expect(strip(second.body)).toEqual(strip(first.body));
    // Streamed from the cache too.
    const s = await chat(k.key, { ...b, stream: true });
    expect(s.headers['x-cache']).toBe('hit');
    const text = parseSse(s.text).data.filter((d): d is { choices: Array<{ delta: { content?: string } }> } => typeof d === 'object')
      .map((d) => d.choices[0]?.delta.content ?? '').join('');
    expect(text).toBe(first.body.choices[0].message.content);
    expect(worker.jobs.length).toBe(jobs);
  });

  it('is bypassed by cache-control: no-store, and sampled requests are never cached', async () => {
    // A stored key: its usage counters show when a request's accounting (and cache store, if any) is done, so each
    // request below is checked against a cache that would already hold the answer. Neither consults the cache (no
    // x-cache header); each is answered by a job.
    const k = await createKey({});
    const b = body({ temperature: 0, messages: [{ role: 'user', content: `nostore ${randomUUID()}` }] });
    await chat(k.key, b);
    await accounted(k.id, 1);
    let jobs = worker.jobs.length;
    const r = await request(gw.url).post('/v1/chat/completions').set(bearer(k.key)).set('cache-control', 'no-store').send(b);
    expect(r.status).toBe(200);
    expect(r.headers['x-cache']).toBeUndefined();
    expect(worker.jobs.length).toBe(jobs + 1);
    const sampled = body({ temperature: 0.9, messages: [{ role: 'user', content: `sampled ${randomUUID()}` }] });
    await chat(k.key, sampled);
    await accounted(k.id, 3);
    jobs = worker.jobs.length;
    const again = await chat(k.key, sampled);
    expect(again.status).toBe(200);
    expect(again.headers['x-cache']).toBeUndefined();
    expect(worker.jobs.length).toBe(jobs + 1);
  });

  it('a hit counts as a request and a cache hit, charged the usage its body reports', async () => {
    const k = await createKey({});
    const b = body({ seed: 7, messages: [{ role: 'user', content: `usage ${randomUUID()}` }] });
    const first = await chat(k.key, b);
    await accounted(k.id, 1);
    const hit = await chat(k.key, b);
    expect(hit.headers['x-cache']).toBe('hit');
    expect(hit.body.usage).toEqual(first.body.usage);
    const rec = (await request(gw.url).get(`/admin/keys/${k.id}`).set(admin)).body;
    expect(rec.usage).toEqual({
      requests: 2,
      cache_hits: 1,
      prompt_tokens: 2 * first.body.usage.prompt_tokens,
      completion_tokens: 2 * first.body.usage.completion_tokens,
    });
  });
});

describe('output filter', () => {
  it('replaces blocked phrases and patterns in JSON answers', async () => {
    const r = await chat(TEST_KEY, body({ messages: [{ role: 'user', content: 'leak it' }], max_tokens: 30 }));
    expect(r.body.choices[0].message.content).toBe('the [filtered] is [filtered] ok');
  });

  it('never sends a blocked phrase split across stream chunks', async () => {
    const r = await chat(TEST_KEY, body({ messages: [{ role: 'user', content: 'leak it' }], max_tokens: 30, stream: true }));
    const pieces = parseSse(r.text).data.filter((d): d is { choices: Array<{ delta: { content?: string } }> } => typeof d === 'object')
      .map((d) => d.choices[0]?.delta.content ?? '');
    expect(pieces.join('')).toBe('the [filtered] is [filtered] ok');
    expect(r.text).not.toMatch(/secret|555/);
  });

  it('refuses logprobs while filtering (they would reveal the text)', async () => {
    expect((await chat(TEST_KEY, body({ logprobs: true }))).body.error.param).toBe('logprobs');
  });
});

describe('queue depth and degradation', () => {
  // Starts two more gateways and a fake worker: minutes, not seconds, on a machine loaded twice over.
  it('503 queue_full with retry-after when the model queue is at MAX_QUEUE_DEPTH; degraded to a fallback model before', async () => {
    const idle = `idle-${randomUUID().slice(0, 8)}`;
    const w = new FakeWorker({ redisUrl: redis.url, model: idle, consume: false, contextLength: 400 });
    await w.start();
    const g = await startGateway(redis.url, {
      DEFAULT_MODEL: idle,
      MAX_QUEUE_DEPTH: '2',
      DEGRADE_QUEUE_DEPTH: '1',
      DEGRADE_FALLBACK_MODEL: OTHER,
      DEGRADE_MAX_TOKENS: '3',
      QUEUE_TIMEOUT_MS: '20000',
    });
    try {
      await settle(g, idle);
      const send = (b: object) => request(g.url).post('/v1/chat/completions').set(bearer(TEST_KEY)).send(b);
      const held = send({ model: idle, messages: [{ role: 'user', content: 'wait' }] }).then((r) => r.status, () => 0);
      await waitFor(async () => (await queueDepth(redis.client, idle)) === 1, undefined, 'the held request to be queued');
      const degraded = await send({ model: idle, messages: [{ role: 'user', content: 'Hi' }], max_tokens: 50 });
      expect(degraded.status).toBe(200);
      expect(degraded.body.model).toBe(OTHER);
      expect(degraded.headers['x-degraded']).toBe(`model=${OTHER}, max_tokens=3`);
      const g2 = await startGateway(redis.url, { DEFAULT_MODEL: idle, MAX_QUEUE_DEPTH: '1' });
      try {
        await settle(g2, idle);
        const full = await request(g2.url).post('/v1/chat/completions').set(bearer(TEST_KEY)).send({ model: idle, messages: [{ role: 'user', content: 'x' }] });
        expect(full.status).toBe(503);
        expect(full.body.error.code).toBe('queue_full');
        expect(Number(full.headers['retry-after'])).toBeGreaterThan(0);
      } finally {
        await g2.close();
      }
      // Per-key concurrency: the held request occupies this key's only slot until it ends.
      const k = await createKey({ max_concurrent: 1, models: [idle] }); // no fallback allowed: it stays queued
      const first = request(g.url).post('/v1/chat/completions').set(bearer(k.key))
        .send({ model: idle, messages: [{ role: 'user', content: 'hold' }] }).then((r) => r.status, () => 0);
      // Queued means admitted: it holds the key's only slot now.
      await waitFor(async () => (await queueDepth(redis.client, idle)) === 2, undefined, "the key's first request to be queued");
      const second = await request(g.url).post('/v1/chat/completions').set(bearer(k.key)).send({ model: idle, messages: [{ role: 'user', content: 'Hi' }] });
      expect(second.status).toBe(429);
      expect(second.body.error.message).toMatch(/concurrent/);
      void held;
      void first;
    } finally {
      await g.close();
      await w.close();
    }
  }, 180_000);
});

describe("the tutorial's routes", () => {
  it('/chat: {prompt, max_length, temperature, history} → {response, history, tokens_used, processing_time}', async () => {
    const r = await request(gw.url).post('/chat').set(bearer(TEST_KEY)).send({ prompt: 'Hi', max_length: 5, temperature: 0.7, history: [['a', 'b']] });
    expect(r.status).toBe(200);
    expect(r.body).toEqual({
      response: 'Hello from the fake worker!',
      history: [['a', 'b'], ['Hi', 'Hello from the fake worker!']],
      tokens_used: expect.any(Number),
      processing_time: expect.any(Number),
    });
    expect(worker.jobs.at(-1)!.messages!.map((m) => m.role)).toEqual(['user', 'assistant', 'user']);
    expect(worker.jobs.at(-1)!.params.max_tokens).toBe(5);
  });

  it('/chat/stream: data: <text> events, then data: [DONE]', async () => {
    const r = await request(gw.url).post('/chat/stream').set(bearer(TEST_KEY)).send({ prompt: 'Hi', max_length: 5 });
    expect(r.headers['content-type']).toMatch(/text\/event-stream/);
    const events = r.text.split('\n\n').filter(Boolean).map((e) => e.replace(/^data: /, ''));
    expect(events.at(-1)).toBe('[DONE]');
    expect(events.slice(0, -1).join('')).toBe('Hello from the fake worker!');
  });

  it('/chat/batch: a list → {results: [...]}, run concurrently; a bad item is an error entry', async () => {
    const r = await request(gw.url).post('/chat/batch').set(bearer(TEST_KEY)).send([{ prompt: 'a', max_length: 3 }, { prompt: 'b' }, { prompt: '' }]);
    expect(r.status).toBe(200);
    expect(r.body.results).toHaveLength(3);
    expect(r.body.results[0].response).toBe('Hello from the fake worker!');
    expect(r.body.results[2].error.param).toBe('prompt');
  });

  it('/chat/secure needs auth and answers {response, history}', async () => {
    expect((await request(gw.url).post('/chat/secure').send({ prompt: 'Hi' })).status).toBe(401);
    const r = await request(gw.url).post('/chat/secure').set(bearer(TEST_KEY)).send({ prompt: 'Hi', max_length: 5 });
    expect(Object.keys(r.body).sort()).toEqual(['history', 'response']);
  });

  it('the tutorial budget (TUTORIAL_RPM) applies per caller on these routes', async () => {
    const g = await startGateway(redis.url, { DEFAULT_MODEL: MODEL, TUTORIAL_RPM: '2', RATE_LIMIT_WINDOW_MS: '60000' });
    try {
      const k = `sk-tut-${randomUUID()}`;
      const g2 = await startGateway(redis.url, { DEFAULT_MODEL: MODEL, API_KEYS: `${TEST_KEY},${k}`, TUTORIAL_RPM: '2' });
      try {
        await settle(g2);
        const send = () => request(g2.url).post('/chat').set(bearer(k)).send({ prompt: 'Hi', max_length: 2 });
        const started = Date.now();
        const a = await send();
        expect(a.headers['x-ratelimit-limit-requests']).toBe('2');
        await send();
        const third = await send();
        expect(third.status).toBe(429);
        expect(third.body.error.code).toBe('rate_limit_exceeded');
        // Two per minute refill one every 30 s: the wait is until the next one has, i.e. 30 s after the first
        // request less the time the three took (seconds on a loaded machine).
        const elapsed = (Date.now() - started) / 1000;
        expect(Number(third.headers['retry-after'])).toBeGreaterThanOrEqual(Math.floor(30 - elapsed));
        expect(Number(third.headers['retry-after'])).toBeLessThanOrEqual(30);
        // /v1 is not limited by the tutorial budget.
        expect((await request(g2.url).post('/v1/chat/completions').set(bearer(k)).send(body())).status).toBe(200);
      } finally {
        await g2.close();
      }
    } finally {
      await g.close();
    }
  });
});
