/**
 * Model routing end to end (routing/): a gateway (real wiring, real Redis) with a routing table that puts an external
 * OpenAI-compatible upstream next to one of our pools. The upstream is a real HTTP server on loopback that speaks the
 * protocol (helpers/fake-upstream.ts: SSE with real chunk timing, usage, errors, and it records aborts); the pool is
 * served by the FAKE worker (helpers/fake-worker.ts). The client is the official openai SDK.
 */
import { randomUUID } from 'node:crypto';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import OpenAI from 'openai';
import { keyIdOf } from '../src/auth/api-keys';
import { usageKey } from '../src/auth/key-store';
import { FakeUpstream } from './helpers/fake-upstream';
import { FakeWorker } from './helpers/fake-worker';
import { completeEvents, openStream, parseSse, startGateway, TEST_KEY, type TestGateway, waitFor, waitReady } from './helpers/gateway';
import { parsePrometheus, sumOf } from './helpers/prom-text';
import { useTestRedis } from './helpers/redis-server';

const redis = useTestRedis();
const LOCAL = `local-${randomUUID().slice(0, 8)}`;
const SICK = `sick-${randomUUID().slice(0, 8)}`;
const upstream = new FakeUpstream();
const flaky = new FakeUpstream();
let gw: TestGateway;
let worker: FakeWorker;
let sickWorker: FakeWorker;
let client: OpenAI;
const messages: OpenAI.ChatCompletionMessageParam[] = [{ role: 'user', content: 'Hello!' }];
const UPSTREAM_KEY = `sk-upstream-${randomUUID()}`;

beforeAll(async () => {
  await Promise.all([upstream.start(), flaky.start()]);
  const file = join(mkdtempSync(join(tmpdir(), 'routing-')), 'routing.json');
  writeFileSync(
    file,
    JSON.stringify({
      upstreams: {
        vllm: { base_url: upstream.url, api_key_env: 'ROUTING_TEST_UPSTREAM_KEY', owned_by: 'vllm' },
        flaky: { base_url: flaky.url, timeout_ms: 1000 },
      },
      models: {
        remote: { upstream: 'vllm', upstream_model: 'org/remote-7b' },
        shaky: { upstream: 'flaky', fallback: [LOCAL] },
        [LOCAL]: { pool: LOCAL },
        'local-alias': { pool: LOCAL },
        // A pool whose worker fails every job.
        [SICK]: { pool: SICK, fallback: ['remote'] },
        // A pool with no worker (the 7B pool is down): its chain goes to the upstream, then to our small pool.
        'big-pool': { pool: `down-${LOCAL}`, fallback: ['remote', LOCAL] },
      },
      breaker: { failure_threshold: 2, open_ms: 1500 },
    }),
  );
  process.env.ROUTING_TEST_UPSTREAM_KEY = UPSTREAM_KEY;
  gw = await startGateway(redis.url, { DEFAULT_MODEL: LOCAL, ROUTING_FILE: file, LOG_LEVEL: 'info', DEFAULT_TPM: '60000' });
  worker = new FakeWorker({ redisUrl: redis.url, model: LOCAL, contextLength: 200 });
  await worker.start();
  sickWorker = new FakeWorker({ redisUrl: redis.url, model: SICK, contextLength: 200, script: { fail: { code: 'engine_error', message: 'CUDA error (scripted)' } } });
  await sickWorker.start();
  client = new OpenAI({ baseURL: `${gw.url}/v1`, apiKey: TEST_KEY, maxRetries: 0 });
  await waitReady(gw);
}, 180_000);
redis.beforeStop(async () => {
  await Promise.all([worker.close(), sickWorker.close()]);
  await gw.close();
  await Promise.all([upstream.close(), flaky.close()]);
});
beforeEach(() => {
  upstream.mode = flaky.mode = { kind: 'ok' };
  upstream.holdBeforeLast = null;
});

it('/v1/models lists our pool and the upstream models, owned_by telling them apart', async () => {
  const ids = new Map<string, string>();
  for await (const m of client.models.list()) ids.set(m.id, m.owned_by);
  expect(ids.get(LOCAL)).toBe('llm-gateway');
  expect(ids.get('remote')).toBe('vllm');
  expect(ids.get('shaky')).toBe('upstream');
  expect(ids.get('local-alias')).toBe('llm-gateway'); // a public name of our pool, listed while the pool is live
  expect((await client.models.retrieve('remote')).owned_by).toBe('vllm');
});

it('a public name of a pool is answered by that pool, under the public name', async () => {
  const { data, response } = await client.chat.completions.create({ model: 'local-alias', messages }).withResponse();
  expect(data.choices[0].message.content).toBe('Hello from the fake worker!');
  expect(data.model).toBe('local-alias');
  expect(response.headers.get('x-routed-model')).toBe('local-alias');
});

it('a pool with no live worker hands the request to the next model of its chain (an upstream here)', async () => {
  const { data, response } = await client.chat.completions.create({ model: 'big-pool', messages }).withResponse();
  expect(data.model).toBe('remote');
  expect(response.headers.get('x-routed-model')).toBe('remote');
  expect(data.choices[0].message.content).toBe('Hello from the upstream!');
  // The upstream down as well: the chain's last model, our small pool, answers the stream.
  upstream.mode = { kind: 'error', status: 502 };
  const stream = await client.chat.completions.create({ model: 'big-pool', messages, stream: true });
  let text = '';
  for await (const chunk of stream) {
    expect(chunk.model).toBe(LOCAL);
    text += chunk.choices[0]?.delta.content ?? '';
  }
  expect(text).toBe('Hello from the fake worker!');
});

it("a pool whose worker fails opens the pool's breaker; the upstream answers, and the pool is no longer sent jobs", async () => {
  for (let i = 0; i < 2; i++) {
    const data = await client.chat.completions.create({ model: SICK, messages });
    expect(data.model).toBe('remote');
  }
  const metrics = parsePrometheus(await (await fetch(`${gw.url}/metrics`)).text());
  expect(sumOf(metrics, 'llm_gateway_breaker_state', { breaker: `pool:${SICK}` })).toBe(2);
  const jobs = sickWorker.jobs.length;
  expect((await client.chat.completions.create({ model: SICK, messages })).model).toBe('remote');
  expect(sickWorker.jobs.length).toBe(jobs);
}, 60_000);

it('a stream of an upstream model is not resumable: 409, not a hang', async () => {
  const s = await openStream(`${gw.url}/v1/chat/completions`, { model: 'remote', messages, stream: true }, { authorization: `Bearer ${TEST_KEY}` });
  const body = await s.body;
  const id = (parseSse(body).data[0] as { id: string }).id;
  const resumed = await fetch(`${gw.url}/v1/chat/completions/${id}/stream`, { headers: { authorization: `Bearer ${TEST_KEY}` } });
  expect(resumed.status).toBe(409);
  expect(((await resumed.json()) as { error: { code: string } }).error.code).toBe('stream_not_resumable');
});

it('non-stream: the upstream answers under our model name, with its credential, and its usage is charged to the caller', async () => {
  const before = await redis.client.hgetall(usageKey(keyIdOf(TEST_KEY)));
  const { data, response } = await client.chat.completions.create({ model: 'remote', messages, temperature: 0.7 }).withResponse();
  expect(data.choices[0].message.content).toBe('Hello from the upstream!');
  expect(data.model).toBe('remote');
  expect(response.headers.get('x-routed-model')).toBe('remote');
  expect(data.usage).toMatchObject({ prompt_tokens: 11, completion_tokens: 5 });
  const sent = upstream.requests.at(-1)!;
  expect(sent.body.model).toBe('org/remote-7b');
  expect(sent.headers.authorization).toBe(`Bearer ${UPSTREAM_KEY}`);
  const after = await redis.client.hgetall(usageKey(keyIdOf(TEST_KEY)));
  expect(Number(after.prompt_tokens ?? 0) - Number(before.prompt_tokens ?? 0)).toBe(11);
  expect(Number(after.completion_tokens ?? 0) - Number(before.completion_tokens ?? 0)).toBe(5);
  expect(gw.logs.join('\n')).not.toContain(UPSTREAM_KEY);
});

it("the token budget is charged the upstream's usage, not the admission estimate", async () => {
  // Admitted at the estimate (prompt + max_tokens = 20000+), then adjusted to the upstream's 16: the budget gets the
  // difference back. Refill (1000 tokens/s at 60000/min) alone would take 20 s to give that much back.
  const { response } = await client.chat.completions.create({ model: 'remote', messages, max_tokens: 20_000 }).withResponse();
  const atAdmission = Number(response.headers.get('x-ratelimit-remaining-tokens'));
  const peek = await fetch(`${gw.url}/v1/models`, { headers: { authorization: `Bearer ${TEST_KEY}` } });
  const afterUsage = Number(peek.headers.get('x-ratelimit-remaining-tokens'));
  expect(afterUsage - atAdmission).toBeGreaterThan(10_000);
});

it('the response cache answers a repeated deterministic request to an upstream model without asking the upstream', async () => {
  const same: OpenAI.ChatCompletionMessageParam[] = [{ role: 'user', content: `cache me ${randomUUID()}` }];
  const first = await client.chat.completions.create({ model: 'remote', messages: same, temperature: 0 }).withResponse();
  const asked = upstream.requests.length;
  const second = await client.chat.completions.create({ model: 'remote', messages: same, temperature: 0 }).withResponse();
  expect(first.response.headers.get('x-cache')).toBe('miss');
  expect(second.response.headers.get('x-cache')).toBe('hit');
  expect(upstream.requests.length).toBe(asked);
  expect(second.data.model).toBe('remote');
  expect(second.data.choices[0].message.content).toBe('Hello from the upstream!');
});

it('stream: the first chunk reaches the SDK before the upstream has finished; usage is asked of the upstream and not shown unasked', async () => {
  let release!: () => void;
  upstream.holdBeforeLast = new Promise<void>((r) => (release = r));
  const stream = await client.chat.completions.create({ model: 'remote', messages, stream: true });
  let text = '';
  let sawUsage = false;
  for await (const chunk of stream) {
    expect(chunk.model).toBe('remote');
    if (chunk.usage) sawUsage = true;
    const piece = chunk.choices[0]?.delta.content ?? '';
    if (piece && text === '') {
      // The upstream is still holding its last chunk: nothing waited for the whole response.
      expect(upstream.requests.at(-1)!.finished).toBe(false);
      release();
    }
    text += piece;
  }
  expect(text).toBe('Hello from the upstream!');
  expect(sawUsage).toBe(false);
  expect(upstream.requests.at(-1)!.body.stream_options).toEqual({ include_usage: true });
});

it('stream with include_usage: the upstream usage comes last', async () => {
  const stream = await client.chat.completions.create({ model: 'remote', messages, stream: true, stream_options: { include_usage: true } });
  let usage: OpenAI.CompletionUsage | null | undefined;
  for await (const chunk of stream) usage = chunk.usage ?? usage;
  expect(usage).toMatchObject({ prompt_tokens: 11, completion_tokens: 5, total_tokens: 16 });
});

it("upstream errors come back in our error shape: its 400 as a 400 naming its param, its 500 as a 502", async () => {
  upstream.mode = { kind: 'error', status: 400, message: 'max_tokens is too large', param: 'max_tokens' };
  const bad = await client.chat.completions.create({ model: 'remote', messages }).catch((e: unknown) => e);
  expect(bad).toBeInstanceOf(OpenAI.BadRequestError);
  expect((bad as InstanceType<typeof OpenAI.BadRequestError>).param).toBe('max_tokens');
  expect((bad as Error).message).toMatch(/max_tokens is too large/);
  upstream.mode = { kind: 'error', status: 500 };
  const down = await client.chat.completions.create({ model: 'remote', messages }).catch((e: unknown) => e);
  expect(down).toBeInstanceOf(OpenAI.InternalServerError);
  expect((down as InstanceType<typeof OpenAI.APIError>).status).toBe(502);
  expect((down as InstanceType<typeof OpenAI.APIError>).code).toBe('upstream_error');
});

it('a client that disconnects mid-stream aborts the upstream request (seen by the upstream)', async () => {
  upstream.holdBeforeLast = new Promise(() => undefined); // the upstream stays mid-stream
  const s = await openStream(`${gw.url}/v1/chat/completions`, { model: 'remote', messages, stream: true }, { authorization: `Bearer ${TEST_KEY}` });
  await waitFor(() => parseSse(completeEvents(s.received())).data.some((d) => JSON.stringify(d).includes('Hello')), undefined, 'the first chunk');
  const rec = upstream.requests.at(-1)!;
  expect(rec.aborted).toBe(false);
  s.abort();
  await waitFor(() => rec.aborted, undefined, 'the upstream to see its request aborted');
});

it('an upstream that fails opens its breaker and the fallback answers; once healthy, a probe closes it again', async () => {
  flaky.mode = { kind: 'error', status: 503 };
  for (let i = 0; i < 2; i++) {
    const { data, response } = await client.chat.completions.create({ model: 'shaky', messages }).withResponse();
    expect(data.model).toBe(LOCAL);
    expect(response.headers.get('x-routed-model')).toBe(LOCAL);
    expect(data.choices[0].message.content).toBe('Hello from the fake worker!');
  }
  const metrics = async () => parsePrometheus(await (await fetch(`${gw.url}/metrics`)).text());
  expect(sumOf(await metrics(), 'llm_gateway_breaker_state', { breaker: 'upstream:flaky' })).toBe(2);
  // Open: the upstream is not even asked.
  const asked = flaky.requests.length;
  const skipped = await client.chat.completions.create({ model: 'shaky', messages, stream: true });
  let model = '';
  for await (const chunk of skipped) model = chunk.model;
  expect(model).toBe(LOCAL);
  expect(flaky.requests.length).toBe(asked);
  expect(sumOf(await metrics(), 'llm_gateway_fallbacks_total', { model: 'shaky', to: LOCAL, reason: 'breaker_open' })).toBeGreaterThanOrEqual(1);

  flaky.mode = { kind: 'ok' };
  await waitFor(async () => (await client.chat.completions.create({ model: 'shaky', messages })).model === 'shaky', 20_000, 'a probe to reach the healthy upstream');
  expect(sumOf(await metrics(), 'llm_gateway_breaker_state', { breaker: 'upstream:flaky' })).toBe(0);
}, 60_000);

it('an upstream that hangs times out (timeout_ms) and the fallback answers', async () => {
  flaky.mode = { kind: 'hang' };
  const { data } = await client.chat.completions.create({ model: 'shaky', messages }).withResponse();
  expect(data.model).toBe(LOCAL);
  const rec = flaky.requests.at(-1)!;
  expect(rec.finished).toBe(false);
  await waitFor(() => rec.aborted, undefined, 'the hung upstream request to be closed by the gateway');
}, 30_000);
