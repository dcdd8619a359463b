/**
 * The HTTP contract of the gateway, through the real wiring, real Redis and a FAKE worker (helpers/fake-worker.ts):
 * auth, request ids, the error shape and statuses, models, health/ready, and both chat response shapes.
 */
import { randomUUID } from 'node:crypto';
import request from 'supertest';
import { FakeWorker } from './helpers/fake-worker';
import { parseSse, startGateway, TEST_KEY, type TestGateway, waitFor } from './helpers/gateway';
import { useTestRedis } from './helpers/redis-server';
import { tokenizerFixture } from './helpers/tokenizer-fixture';

const DEFAULT_MODEL = `default-${randomUUID().slice(0, 8)}`;
const auth = { authorization: `Bearer ${TEST_KEY}` };

const redis = useTestRedis();
let gw: TestGateway;
let worker: FakeWorker;
const MODEL = `m-${randomUUID().slice(0, 8)}`;

beforeAll(async () => {
  gw = await startGateway(redis.url, { DEFAULT_MODEL, MAX_BODY_BYTES: '4096', DEFAULT_MAX_TOKENS: '64' });
  worker = new FakeWorker({ redisUrl: redis.url, model: MODEL, contextLength: 100 });
  await worker.start();
});
redis.beforeStop(async () => {
  await worker.close();
  await gw.close();
});

const chat = (body: unknown) => request(gw.url).post('/v1/chat/completions').set(auth).send(body as object);
const hello = { model: MODEL, messages: [{ role: 'user', content: 'Hello!' }] };

describe('probes', () => {
  it('/health answers without auth in the tutorial shape', async () => {
    const res = await request(gw.url).get('/health');
    expect(res.status).toBe(200);
    expect(res.body).toMatchObject({ status: 'healthy', service: 'llm-api' });
  });

  it('/ready is 503 while no worker serves DEFAULT_MODEL, 200 once one does', async () => {
    const before = await request(gw.url).get('/ready');
    expect(before.status).toBe(503);
    expect(before.body).toMatchObject({ status: 'not_ready', redis: true, workers: 0 });
    const w = new FakeWorker({ redisUrl: redis.url, model: DEFAULT_MODEL });
    await w.start();
    try {
      // Ready once the registry has seen the worker and the gateway has built the model's tokenizer.
      await waitFor(async () => (await request(gw.url).get('/ready')).status === 200, undefined, '/ready');
      const after = await request(gw.url).get('/ready');
      expect(after.body).toMatchObject({ status: 'ready', workers: 1, tokenizer: true });
    } finally {
      await w.close();
    }
  });
});

describe('auth and request ids', () => {
  it('401 without a key, with a wrong key, and with a non-Bearer scheme', async () => {
    for (const headers of [{}, { authorization: 'Bearer nope' }, { authorization: `Basic ${TEST_KEY}` }]) {
      const res = await request(gw.url).get('/v1/models').set(headers);
      expect(res.status).toBe(401);
      expect(res.body.error).toMatchObject({ type: 'invalid_request_error', code: 'invalid_api_key', param: null });
      expect(res.body.error.message).not.toContain(TEST_KEY);
    }
  });

  it('x-request-id on every response; a valid incoming one is echoed, a bad one replaced', async () => {
    const mine = await request(gw.url).get('/health').set('x-request-id', 'abc-123_X');
    expect(mine.headers['x-request-id']).toBe('abc-123_X');
    const bad = await request(gw.url).get('/health').set('x-request-id', 'has spaces and <tags>');
    expect(bad.headers['x-request-id']).toMatch(/^req_[0-9a-f]{32}$/);
    const err = await request(gw.url).get('/v1/nope');
    expect(err.headers['x-request-id']).toMatch(/^req_/);
  });
});

describe('error shapes', () => {
  it('unknown route → 404 in the OpenAI shape', async () => {
    const res = await request(gw.url).get('/v1/nope').set(auth);
    expect(res.status).toBe(404);
    expect(res.body).toEqual({
      error: { message: 'Invalid URL (GET /v1/nope)', type: 'invalid_request_error', param: null, code: 'unknown_url' },
    });
    expect((await request(gw.url).get('/elsewhere')).status).toBe(404);
  });

  it('malformed JSON → 400; a JSON array body → 400; no body → 400 naming what is missing', async () => {
    const bad = await request(gw.url).post('/v1/chat/completions').set(auth).set('content-type', 'application/json').send('{"model":');
    expect(bad.status).toBe(400);
    expect(bad.body.error.code).toBe('invalid_json');
    const arr = await request(gw.url).post('/v1/chat/completions').set(auth).set('content-type', 'application/json').send('[1]');
    expect(arr.status).toBe(400);
    const none = await request(gw.url).post('/v1/chat/completions').set(auth);
    expect(none.status).toBe(400);
    expect(none.body.error.type).toBe('invalid_request_error');
  });

  it('body over MAX_BODY_BYTES → 413', async () => {
    const res = await chat({ ...hello, messages: [{ role: 'user', content: 'x'.repeat(5000) }] });
    expect(res.status).toBe(413);
    expect(res.body.error.code).toBe('request_too_large');
  });

  it('validation → 400 with param', async () => {
    const res = await chat({ ...hello, temperature: 9 });
    expect(res.status).toBe(400);
    expect(res.body.error).toMatchObject({ type: 'invalid_request_error', param: 'temperature' });
    const tools = await chat({ ...hello, tools: [{ type: 'function', function: { name: 'f', parameters: { type: 'obj' } } }] });
    expect(tools.body.error).toMatchObject({ param: 'tools[0].function.parameters', code: 'invalid_value' });
    const functions = await chat({ ...hello, functions: [{ name: 'f' }] });
    expect(functions.body.error).toMatchObject({ param: 'functions', code: 'unsupported_parameter' });
  });

  it('unknown model → 404 model_not_found', async () => {
    const res = await chat({ ...hello, model: 'no-such-model' });
    expect(res.status).toBe(404);
    expect(res.body.error).toMatchObject({ code: 'model_not_found', param: 'model', type: 'invalid_request_error' });
  });

  it('known model without a live worker → 503 with retry-after', async () => {
    // The probe test's worker for DEFAULT_MODEL is gone: wait until the gateway's registry has seen that.
    await waitFor(async () => (await request(gw.url).get('/ready')).status === 503, undefined, 'no worker for DEFAULT_MODEL');
    const res = await chat({ ...hello, model: DEFAULT_MODEL });
    expect(res.status).toBe(503);
    expect(res.body.error.code).toBe('no_worker_available');
    expect(Number(res.headers['retry-after'])).toBeGreaterThanOrEqual(1);
    expect(res.headers['retry-after-ms']).toBeDefined();
  });

  it('prompt + max_tokens over the context → 400 context_length_exceeded, before anything is queued', async () => {
    const jobsBefore = worker.jobs.length;
    const res = await chat({ ...hello, max_tokens: 90 }); // prompt is 32 tokens, context 100
    expect(res.status).toBe(400);
    expect(res.body.error).toMatchObject({ code: 'context_length_exceeded', param: 'messages' });
    expect(res.body.error.message).toMatch(/maximum context length is 100 tokens/);
    const stream = await chat({ ...hello, stream: true, messages: [{ role: 'user', content: 'word '.repeat(200) }] });
    expect(stream.status).toBe(400);
    expect(stream.headers['content-type']).toMatch(/application\/json/);
    expect(worker.jobs.length).toBe(jobsBefore);
  });

  it('logit_bias outside the vocabulary → 400 naming logit_bias', async () => {
    const res = await chat({ ...hello, logit_bias: { [String(tokenizerFixture().vocabSize + 5)]: 1 } });
    expect(res.status).toBe(400);
    expect(res.body.error.param).toBe('logit_bias');
  });
});

describe('models', () => {
  it('lists the models of live workers, in OpenAI shape', async () => {
    const res = await request(gw.url).get('/v1/models').set(auth);
    expect(res.status).toBe(200);
    expect(res.body.object).toBe('list');
    expect(res.body.data).toContainEqual({ id: MODEL, object: 'model', created: 1764100000, owned_by: 'llm-gateway' });
  });

  it('retrieves one model, including ids with a slash; unknown → 404', async () => {
    const slashed = new FakeWorker({ redisUrl: redis.url, model: 'org/Some-Model_1.5', consume: false });
    await slashed.start();
    try {
      const one = await request(gw.url).get(`/v1/models/${MODEL}`).set(auth);
      expect(one.body).toEqual({ id: MODEL, object: 'model', created: 1764100000, owned_by: 'llm-gateway' });
      for (const path of ['/v1/models/org/Some-Model_1.5', '/v1/models/org%2FSome-Model_1.5']) {
        const res = await request(gw.url).get(path).set(auth);
        expect(res.status).toBe(200);
        expect(res.body.id).toBe('org/Some-Model_1.5');
      }
      const missing = await request(gw.url).get('/v1/models/nope').set(auth);
      expect(missing.status).toBe(404);
      expect(missing.body.error.code).toBe('model_not_found');
    } finally {
      await slashed.close();
    }
  });
});

describe('chat completions', () => {
  it('non-stream: the exact ChatCompletion object', async () => {
    const t0 = Date.now();
    const res = await chat({ ...hello, max_tokens: 5, some_unknown_field: true });
    const t1 = Date.now();
    expect(res.status).toBe(200);
    const body = res.body;
    expect(body.id).toMatch(/^chatcmpl-[0-9a-f]{32}$/);
    expect(body).toMatchObject({
      object: 'chat.completion',
      model: MODEL,
      choices: [
        {
          index: 0,
          message: { role: 'assistant', content: 'Hello from the fake worker!', refusal: null },
          finish_reason: 'stop',
          logprobs: null,
        },
      ],
      usage: { prompt_tokens: 32, completion_tokens: 7, total_tokens: 39 },
    });
    // Unix seconds of this request: between its sending and its answer, however long that took.
    expect(body.created).toBeGreaterThanOrEqual(Math.floor(t0 / 1000));
    expect(body.created).toBeLessThanOrEqual(Math.ceil(t1 / 1000));
    const job = worker.jobs.at(-1)!;
    expect(job).toMatchObject({ v: 1, model: MODEL, prompt_tokens: 32, stream: false, params: { max_tokens: 5, n: 1 } });
    expect(job.request_id).toBe(res.headers['x-request-id']);
  });

  it('max_tokens defaults to DEFAULT_MAX_TOKENS capped by what the context leaves', async () => {
    await chat(hello); // prompt 32 of 100 → 68 left, default 64
    expect(worker.jobs.at(-1)!.params.max_tokens).toBe(64);
    await chat({ ...hello, messages: [{ role: 'user', content: 'one two three four five six seven eight nine ten '.repeat(4) }] });
    const job = worker.jobs.at(-1)!;
    expect(job.params.max_tokens).toBe(100 - job.prompt_tokens);
  });

  it('developer role and text parts reach the worker normalised', async () => {
    await chat({ model: MODEL, messages: [{ role: 'developer', content: 'D' }, { role: 'user', content: [{ type: 'text', text: 'a' }, { type: 'text', text: 'b' }] }] });
    expect(worker.jobs.at(-1)!.messages).toEqual([
      { role: 'system', content: 'D' },
      { role: 'user', content: 'a\nb' },
    ]);
  });

  it('stream: role chunk, content chunks, finish chunk, usage chunk (include_usage), [DONE]', async () => {
    const res = await chat({ ...hello, stream: true, stream_options: { include_usage: true } });
    expect(res.status).toBe(200);
    expect(res.headers['content-type']).toBe('text/event-stream; charset=utf-8');
    const { data } = parseSse(res.text);
    expect(data.at(-1)).toBe('[DONE]');
    const chunks = data.slice(0, -1) as Array<Record<string, any>>;
    const id = chunks[0].id;
    for (const c of chunks) {
      expect(c).toMatchObject({ id, object: 'chat.completion.chunk', model: MODEL });
      expect(c).toHaveProperty('usage');
    }
    expect(chunks[0].choices).toEqual([
      { index: 0, delta: { role: 'assistant', content: '', refusal: null }, logprobs: null, finish_reason: null },
    ]);
    const text = chunks.flatMap((c) => c.choices).map((c) => c.delta.content ?? '').join('');
    expect(text).toBe('Hello from the fake worker!');
    const finish = chunks.at(-2)!;
    expect(finish.choices).toEqual([{ index: 0, delta: {}, logprobs: null, finish_reason: 'stop' }]);
    const usage = chunks.at(-1)!;
    expect(usage.choices).toEqual([]);
    expect(usage.usage).toMatchObject({ prompt_tokens: 32, completion_tokens: 7, total_tokens: 39 });
  });

  it('stream without include_usage: no usage chunk and no usage field', async () => {
    const res = await chat({ ...hello, stream: true });
    const chunks = parseSse(res.text).data.slice(0, -1) as Array<Record<string, any>>;
    expect(chunks.every((c) => c.choices.length === 1 && !('usage' in c))).toBe(true);
    expect(chunks.at(-1)!.choices[0].finish_reason).toBe('stop');
  });

  it('n = 2: every choice gets its own role chunk, text and finish_reason', async () => {
    const res = await chat({ ...hello, n: 2, stream: true });
    const chunks = parseSse(res.text).data.slice(0, -1) as Array<Record<string, any>>;
    const texts = ['', ''];
    const finish: string[] = [];
    for (const c of chunks) for (const ch of c.choices) {
      texts[ch.index] += ch.delta.content ?? '';
      if (ch.finish_reason) finish[ch.index] = ch.finish_reason;
    }
    expect(texts).toEqual(['Hello from the fake worker!', 'Hello from the fake worker, choice 1!']);
    expect(finish).toEqual(['stop', 'stop']);
    const nonStream = await chat({ ...hello, n: 2 });
    expect(nonStream.body.choices.map((c: any) => c.index)).toEqual([0, 1]);
  });
});
