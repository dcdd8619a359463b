/**
 * The official openai Node SDK against the gateway (real wiring, real Redis, FAKE worker): the SDK parses our
 * responses and raises its typed errors, as a user would see them. The real-worker version of this is tests/e2e.
 */
import { randomUUID } from 'node:crypto';
import OpenAI from 'openai';
import { FakeWorker } from './helpers/fake-worker';
import { startGateway, TEST_KEY, type TestGateway, waitReady } from './helpers/gateway';
import { useTestRedis } from './helpers/redis-server';

const redis = useTestRedis();
let gw: TestGateway;
let worker: FakeWorker;
let client: OpenAI;
const MODEL = `m-${randomUUID().slice(0, 8)}`;

beforeAll(async () => {
  gw = await startGateway(redis.url, { DEFAULT_MODEL: MODEL });
  worker = new FakeWorker({ redisUrl: redis.url, model: MODEL, contextLength: 200 });
  await worker.start();
  client = new OpenAI({ baseURL: `${gw.url}/v1`, apiKey: TEST_KEY, maxRetries: 0 });
  await waitReady(gw);
}, 180_000);
redis.beforeStop(async () => {
  await worker.close();
  await gw.close();
});

const messages: OpenAI.ChatCompletionMessageParam[] = [{ role: 'user', content: 'Hello!' }];

it('non-stream: a ChatCompletion with its request id', async () => {
  const { data, response } = await client.chat.completions.create({ model: MODEL, messages, max_tokens: 5 }).withResponse();
  expect(data.choices[0].message.content).toBe('Hello from the fake worker!');
  expect(data.usage?.total_tokens).toBe(data.usage!.prompt_tokens + data.usage!.completion_tokens);
  expect(response.headers.get('x-request-id')).toMatch(/^req_/);
});

it('stream with include_usage: the deltas add up to the text, usage comes last', async () => {
  const stream = await client.chat.completions.create({ model: MODEL, messages, stream: true, stream_options: { include_usage: true } });
  let text = '';
  let usage: OpenAI.CompletionUsage | null | undefined;
  let finish: string | null = null;
  for await (const chunk of stream) {
    for (const c of chunk.choices) {
      text += c.delta.content ?? '';
      finish = c.finish_reason ?? finish;
    }
    if (chunk.usage) usage = chunk.usage;
  }
  expect(text).toBe('Hello from the fake worker!');
  expect(finish).toBe('stop');
  expect(usage?.completion_tokens).toBe(7);
});

it('the helper streaming API (chat.completions.stream) assembles the same message', async () => {
  const runner = client.chat.completions.stream({ model: MODEL, messages });
  const final = await runner.finalChatCompletion();
  expect(final.choices[0].message.content).toBe('Hello from the fake worker!');
});

it('models.list and models.retrieve', async () => {
  const ids: string[] = [];
  for await (const m of client.models.list()) ids.push(m.id);
  expect(ids).toContain(MODEL);
  expect((await client.models.retrieve(MODEL)).owned_by).toBe('llm-gateway');
});

it('typed errors: AuthenticationError, NotFoundError, BadRequestError (with param and code)', async () => {
  const bad = new OpenAI({ baseURL: `${gw.url}/v1`, apiKey: 'wrong', maxRetries: 0 });
  await expect(bad.chat.completions.create({ model: MODEL, messages })).rejects.toBeInstanceOf(OpenAI.AuthenticationError);
  await expect(client.chat.completions.create({ model: 'nope', messages })).rejects.toBeInstanceOf(OpenAI.NotFoundError);
  const err = await client.chat.completions.create({ model: MODEL, messages, temperature: 5 }).catch((e) => e);
  expect(err).toBeInstanceOf(OpenAI.BadRequestError);
  expect(err.param).toBe('temperature');
  expect(err.code).toBe('invalid_value');
  const ctx = await client.chat.completions.create({ model: MODEL, messages, max_tokens: 500 }).catch((e) => e);
  expect(ctx).toBeInstanceOf(OpenAI.BadRequestError);
  expect(ctx.code).toBe('context_length_exceeded');
});

it('an in-stream error surfaces as an APIError while iterating', async () => {
  worker.script = { fail: { code: 'internal_error', message: 'boom' }, failAfterDeltas: 1 };
  try {
    const stream = await client.chat.completions.create({ model: MODEL, messages, stream: true });
    let text = '';
    const err = await (async () => {
      for await (const chunk of stream) text += chunk.choices[0]?.delta.content ?? '';
    })().catch((e) => e);
    expect(err).toBeInstanceOf(OpenAI.APIError);
    expect(text).toBe('Hell');
  } finally {
    worker.script = {};
  }
});
