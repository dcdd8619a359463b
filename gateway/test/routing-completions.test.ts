/**
 * POST /v1/completions for an upstream model (routing/upstream.ts: POST {base}/completions), with the official openai
 * SDK's `client.completions.create` as the client: non-stream and stream answers in OpenAI's shapes under our model
 * name, a list of prompts, echo, the upstream's errors in our error shape, what is refused (logprobs), and the
 * fallback chain and breaker as for chat. The upstream is a real HTTP server on loopback speaking the protocol
 * (helpers/fake-upstream.ts; an external service cannot exist in a test here, so one is stood up); the fallback pool
 * is served by the FAKE worker (helpers/fake-worker.ts). The gateway is the real wiring on a real Redis.
 */
import { randomUUID } from 'node:crypto';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import OpenAI from 'openai';
import { FakeUpstream } from './helpers/fake-upstream';
import { FakeWorker } from './helpers/fake-worker';
import { startGateway, TEST_KEY, type TestGateway, waitFor, waitReady } from './helpers/gateway';
import { parsePrometheus, sumOf } from './helpers/prom-text';
import { useTestRedis } from './helpers/redis-server';

const redis = useTestRedis();
const LOCAL = `local-${randomUUID().slice(0, 8)}`;
const upstream = new FakeUpstream();
const flaky = new FakeUpstream();
let gw: TestGateway;
let worker: FakeWorker;
let client: OpenAI;
const TEXT = 'Hello from the upstream!';

beforeAll(async () => {
  await Promise.all([upstream.start(), flaky.start()]);
  const file = join(mkdtempSync(join(tmpdir(), 'routing-completions-')), 'routing.json');
  writeFileSync(
    file,
    JSON.stringify({
      upstreams: { vllm: { base_url: upstream.url, owned_by: 'vllm' }, flaky: { base_url: flaky.url, timeout_ms: 1000 } },
      models: {
        remote: { upstream: 'vllm', upstream_model: 'org/remote-7b' },
        shaky: { upstream: 'flaky', fallback: [LOCAL] },
        [LOCAL]: { pool: LOCAL },
      },
      breaker: { failure_threshold: 2, open_ms: 1500 },
    }),
  );
  gw = await startGateway(redis.url, { DEFAULT_MODEL: LOCAL, ROUTING_FILE: file });
  worker = new FakeWorker({ redisUrl: redis.url, model: LOCAL, contextLength: 200 });
  await worker.start();
  client = new OpenAI({ baseURL: `${gw.url}/v1`, apiKey: TEST_KEY, maxRetries: 0 });
  await waitReady(gw);
}, 180_000);
redis.beforeStop(async () => {
  await worker.close();
  await gw.close();
  await Promise.all([upstream.close(), flaky.close()]);
});
beforeEach(() => {
  upstream.mode = flaky.mode = { kind: 'ok' };
});

it('non-stream: the upstream’s /completions answers under our model name, with its usage', async () => {
  const { data, response } = await client.completions.create({ model: 'remote', prompt: 'Say hi', max_tokens: 8 }).withResponse();
  expect(data.object).toBe('text_completion');
  expect(data.model).toBe('remote');
  expect(data.id).toMatch(/^cmpl-/);
  expect(response.headers.get('x-routed-model')).toBe('remote');
  expect(data.choices).toEqual([{ index: 0, text: `${TEXT} (Say hi)`, logprobs: null, finish_reason: 'stop' }]);
  expect(data.usage).toEqual({ prompt_tokens: 7, completion_tokens: 6, total_tokens: 13 });
  const sent = upstream.requests.at(-1)!;
  expect(sent.path).toBe('/v1/completions');
  expect(sent.body).toMatchObject({ model: 'org/remote-7b', prompt: 'Say hi', max_tokens: 8, stream: false });
});

it('a list of prompts with n and echo: one upstream request per prompt, choices prompt-major, the echo rendered here', async () => {
  const asked = upstream.requests.length;
  const data = await client.completions.create({ model: 'remote', prompt: ['One.', 'Two.'], n: 2, echo: true, max_tokens: 8 });
  expect(data.choices.map((c) => [c.index, c.text])).toEqual([
    [0, `One.${TEXT} (One.)`],
    [1, `One.${TEXT} (One.)`],
    [2, `Two.${TEXT} (Two.)`],
    [3, `Two.${TEXT} (Two.)`],
  ]);
  expect(data.usage).toEqual({ prompt_tokens: 14, completion_tokens: 24, total_tokens: 38 });
  const sent = upstream.requests.slice(asked).map((r) => r.body);
  expect(sent.map((b) => b.prompt).sort()).toEqual(['One.', 'Two.']);
  for (const b of sent) {
    expect(b.n).toBe(2);
    expect(b.echo).toBeUndefined();
  }
});

it('stream: text_completion chunks as they come, usage last when asked for and not otherwise', async () => {
  for (const includeUsage of [true, false]) {
    const stream = await client.completions.create({ model: 'remote', prompt: 'Say hi', max_tokens: 8, stream: true, ...(includeUsage ? { stream_options: { include_usage: true } } : {}) });
    let text = '';
    let usage: OpenAI.CompletionUsage | undefined;
    let finish: string | null = null;
    let chunks = 0;
    for await (const chunk of stream) {
      chunks += 1;
      expect(chunk).toMatchObject({ object: 'text_completion', model: 'remote' });
      text += chunk.choices[0]?.text ?? '';
      finish = chunk.choices[0]?.finish_reason ?? finish;
      if (chunk.usage) usage = chunk.usage;
    }
    expect(text).toBe(`${TEXT} (Say hi)`);
    expect(finish).toBe('stop');
    expect(chunks).toBeGreaterThan(3); // streamed, not one whole answer
    expect(usage).toEqual(includeUsage ? { prompt_tokens: 7, completion_tokens: 6, total_tokens: 13 } : undefined);
    expect(upstream.requests.at(-1)!.body.stream_options).toEqual({ include_usage: true }); // always asked: the budget needs it
  }
});

it('upstream errors come back in our error shape, as for chat; logprobs is refused before the upstream is asked', async () => {
  upstream.mode = { kind: 'error', status: 400, message: 'max_tokens is too large', param: 'max_tokens' };
  const bad = await client.completions.create({ model: 'remote', prompt: 'Say hi' }).catch((e: unknown) => e);
  expect(bad).toBeInstanceOf(OpenAI.BadRequestError);
  expect((bad as InstanceType<typeof OpenAI.BadRequestError>).param).toBe('max_tokens');
  expect((bad as Error).message).toMatch(/max_tokens is too large/);
  upstream.mode = { kind: 'error', status: 500 };
  const down = await client.completions.create({ model: 'remote', prompt: 'Say hi', stream: true }).catch((e: unknown) => e);
  expect(down).toBeInstanceOf(OpenAI.InternalServerError);
  expect((down as InstanceType<typeof OpenAI.APIError>).status).toBe(502);
  expect((down as InstanceType<typeof OpenAI.APIError>).code).toBe('upstream_error');
  // A success between two failures of the upstream: two in a row would open its breaker (failure_threshold 2).
  upstream.mode = { kind: 'ok' };
  await client.completions.create({ model: 'remote', prompt: 'Say hi' });
  upstream.mode = { kind: 'error', status: 429 };
  const limited = await client.completions.create({ model: 'remote', prompt: 'Say hi' }).catch((e: unknown) => e);
  expect(limited).toBeInstanceOf(OpenAI.RateLimitError);
  expect((limited as InstanceType<typeof OpenAI.APIError>).code).toBe('upstream_rate_limited');

  upstream.mode = { kind: 'ok' };
  await client.completions.create({ model: 'remote', prompt: 'Say hi' }); // (the breaker again)
  // A 200 whose body is not JSON (a proxy's HTML page) is the upstream's error, not its being unreachable.
  upstream.mode = { kind: 'garbage' };
  const garbage = await client.completions.create({ model: 'remote', prompt: 'Say hi' }).catch((e: unknown) => e);
  expect(garbage).toBeInstanceOf(OpenAI.InternalServerError);
  expect((garbage as InstanceType<typeof OpenAI.APIError>).status).toBe(502);
  expect((garbage as InstanceType<typeof OpenAI.APIError>).code).toBe('upstream_error');

  upstream.mode = { kind: 'ok' };
  const asked = upstream.requests.length;
  const refused = await client.completions.create({ model: 'remote', prompt: 'Say hi', logprobs: 2 }).catch((e: unknown) => e);
  expect(refused).toBeInstanceOf(OpenAI.BadRequestError);
  expect((refused as InstanceType<typeof OpenAI.BadRequestError>).param).toBe('logprobs');
  expect((refused as InstanceType<typeof OpenAI.BadRequestError>).code).toBe('unsupported_parameter');
  expect(upstream.requests.length).toBe(asked);
  expect((await client.completions.create({ model: 'remote', prompt: 'Say hi' })).choices[0].text).toBe(`${TEXT} (Say hi)`);
});

it('a failing upstream falls back to the next model of its chain and opens its breaker; a probe closes it again', async () => {
  flaky.mode = { kind: 'error', status: 503 };
  // The second is a list of prompts: one request, one use of the breaker (its prompts' failures count once).
  for (const prompt of ['Say hi', ['Say hi', 'Say bye']]) {
    const { data, response } = await client.completions.create({ model: 'shaky', prompt, max_tokens: 8 }).withResponse();
    expect(data.model).toBe(LOCAL);
    expect(response.headers.get('x-routed-model')).toBe(LOCAL);
    expect(data.choices.map((c) => c.text)).toEqual((Array.isArray(prompt) ? prompt : [prompt]).map(() => 'Hello from the fake worker!'));
  }
  const metrics = async () => parsePrometheus(await (await fetch(`${gw.url}/metrics`)).text());
  expect(sumOf(await metrics(), 'llm_gateway_breaker_state', { breaker: 'upstream:flaky' })).toBe(2);
  // Open: the upstream is not asked; a stream is answered by the pool.
  const asked = flaky.requests.length;
  const stream = await client.completions.create({ model: 'shaky', prompt: 'Say hi', max_tokens: 8, stream: true });
  let text = '';
  for await (const chunk of stream) {
    expect(chunk.model).toBe(LOCAL);
    text += chunk.choices[0]?.text ?? '';
  }
  expect(text).toBe('Hello from the fake worker!');
  expect(flaky.requests.length).toBe(asked);
  expect(sumOf(await metrics(), 'llm_gateway_fallbacks_total', { model: 'shaky', to: LOCAL, reason: 'breaker_open' })).toBeGreaterThanOrEqual(1);

  flaky.mode = { kind: 'ok' };
  await waitFor(async () => (await client.completions.create({ model: 'shaky', prompt: 'Say hi' })).model === 'shaky', 20_000, 'a probe to reach the healthy upstream');
  expect(sumOf(await metrics(), 'llm_gateway_breaker_state', { breaker: 'upstream:flaky' })).toBe(0);
}, 60_000);

it('an upstream that hangs times out (timeout_ms) and the fallback answers the completion', async () => {
  flaky.mode = { kind: 'hang' };
  // A fresh breaker state is not needed: one timeout is below the threshold after the probe above closed it.
  const data = await client.completions.create({ model: 'shaky', prompt: 'Say hi', max_tokens: 8 });
  expect(data.model).toBe(LOCAL);
  const rec = flaky.requests.at(-1)!;
  expect(rec.path).toBe('/v1/completions');
  await waitFor(() => rec.aborted, undefined, 'the hung upstream request to be closed by the gateway');
}, 30_000);
