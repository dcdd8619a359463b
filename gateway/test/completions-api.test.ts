/**
 * POST /v1/completions through the real gateway wiring (real Redis, FAKE worker) with the official openai Node SDK:
 * the raw prompt reaches the job as `prompt` (no messages, counted as the worker counts it), lists become one job per
 * prompt with choices indexed prompt × n + choice, echo and legacy logprobs are rendered in JSON and SSE, and the
 * request path is chat's (auth, cache, rate limits). The real-worker version is tests/e2e/completions.test.ts.
 */
import { randomUUID } from 'node:crypto';
import OpenAI from 'openai';
import type { JobData } from '../src/protocol/job';
import { FakeWorker } from './helpers/fake-worker';
import { startGateway, TEST_KEY, type TestGateway, waitReady } from './helpers/gateway';
import { useTestRedis } from './helpers/redis-server';
import { tokenizerFixture } from './helpers/tokenizer-fixture';

const redis = useTestRedis();
const MODEL = `m-${randomUUID().slice(0, 8)}`;
let gw: TestGateway;
let worker: FakeWorker;
let client: OpenAI;

/** The fake's reply names the prompt it continued and the choice, so tests can see where each choice came from. */
const reply = (d: JobData, i: number) => (d.prompt !== undefined ? ` after "${d.prompt}" #${i}` : 'a chat');

beforeAll(async () => {
  gw = await startGateway(redis.url, { DEFAULT_MODEL: MODEL });
  worker = new FakeWorker({ redisUrl: redis.url, model: MODEL, contextLength: 200, script: { reply, pieceChars: 5 } });
  await worker.start();
  client = new OpenAI({ baseURL: `${gw.url}/v1`, apiKey: TEST_KEY, maxRetries: 0, defaultHeaders: { 'cache-control': 'no-store' } });
  await waitReady(gw);
}, 180_000);
redis.beforeStop(async () => {
  await worker.close();
  await gw.close();
});

describe('non-stream', () => {
  it('a text_completion; the job carries the raw prompt (no messages), counted as the worker counts it, max_tokens 16 by default', async () => {
    const fx = tokenizerFixture().prompts[3]; // control tokens' text, which stays text
    const { data, response } = await client.completions.create({ model: MODEL, prompt: fx.text }).withResponse();
    expect(data).toEqual({
      id: expect.stringMatching(/^cmpl-[0-9a-f]{32}$/),
      object: 'text_completion',
      created: expect.any(Number),
      model: MODEL,
      system_fingerprint: null,
      choices: [{ index: 0, text: ` after "${fx.text}" #0`, logprobs: null, finish_reason: 'stop' }],
      usage: { prompt_tokens: fx.ids.length, completion_tokens: expect.any(Number), total_tokens: expect.any(Number) },
    });
    expect(response.headers.get('x-request-id')).toMatch(/^req_/);
    const job = worker.jobs.at(-1)!;
    expect(job.prompt).toBe(fx.text);
    expect(job.messages).toBeUndefined();
    expect(job.prompt_tokens).toBe(fx.ids.length);
    expect(job.params.max_tokens).toBe(16);
  });

  it('a list of prompts with n=2: one job per prompt, choices indexed prompt × n + choice, usage summed', async () => {
    const before = worker.jobs.length;
    const r = await client.completions.create({ model: MODEL, prompt: ['first', 'second'], n: 2, max_tokens: 5, stop: ['\n'] });
    expect(r.choices.map((c) => [c.index, c.text])).toEqual([
      [0, ' after "first" #0'],
      [1, ' after "first" #1'],
      [2, ' after "second" #0'],
      [3, ' after "second" #1'],
    ]);
    const jobs = worker.jobs.slice(before);
    expect(jobs.map((j) => j.prompt).sort()).toEqual(['first', 'second']);
    for (const j of jobs) expect(j.params).toMatchObject({ n: 2, max_tokens: 5, stop: ['\n'] });
    expect(r.usage!.prompt_tokens).toBe(jobs.reduce((s, j) => s + j.prompt_tokens, 0));
  });

  it('echo puts the prompt before each choice\'s text', async () => {
    const r = await client.completions.create({ model: MODEL, prompt: ['A', 'B'], echo: true, max_tokens: 3 });
    expect(r.choices.map((c) => c.text)).toEqual(['A after "A" #0', 'B after "B" #0']);
  });

  it('legacy logprobs: tokens spell the text, one top map per token holding the sampled one', async () => {
    const r = await client.completions.create({ model: MODEL, prompt: 'lp', logprobs: 2, max_tokens: 8 });
    const [c] = r.choices;
    const lp = c.logprobs!;
    expect(lp.tokens!.join('')).toBe(c.text);
    expect(lp.token_logprobs).toHaveLength(lp.tokens!.length);
    expect(lp.top_logprobs).toHaveLength(lp.tokens!.length);
    lp.tokens!.forEach((t, i) => expect(lp.top_logprobs![i][t]).toBe(lp.token_logprobs![i]));
    expect(lp.text_offset![0]).toBe(0);
    expect(lp.text_offset![1]).toBe(lp.tokens![0].length);
    expect(worker.jobs.at(-1)!.params).toMatchObject({ logprobs: true, top_logprobs: 2 });
  });
});

describe('stream', () => {
  it('chunks reassemble to the text, finish per choice, usage chunk last with include_usage; echo comes first', async () => {
    const stream = await client.completions.create({
      model: MODEL, prompt: ['x', 'y'], echo: true, n: 2, max_tokens: 4, stream: true, stream_options: { include_usage: true },
    });
    const chunks: OpenAI.Completion[] = [];
    for await (const ch of stream) chunks.push(ch);
    const texts = new Map<number, string>();
    const finish = new Map<number, string>();
    for (const ch of chunks) {
      expect(ch.object).toBe('text_completion');
      expect(ch.id).toBe(chunks[0].id);
      for (const c of ch.choices) {
        texts.set(c.index, (texts.get(c.index) ?? '') + c.text);
        if (c.finish_reason) finish.set(c.index, c.finish_reason);
      }
    }
    // The echoed prompts are the first chunk of each choice.
    expect(chunks.slice(0, 4).map((ch) => [ch.choices[0].index, ch.choices[0].text])).toEqual([[0, 'x'], [1, 'x'], [2, 'y'], [3, 'y']]);
    expect([...texts].sort((a, b) => a[0] - b[0]).map(([, t]) => t)).toEqual(['x after "x" #0', 'x after "x" #1', 'y after "y" #0', 'y after "y" #1']);
    expect([...finish.keys()].sort()).toEqual([0, 1, 2, 3]);
    const last = chunks.at(-1)!;
    expect(last.choices).toEqual([]);
    expect(last.usage!.total_tokens).toBe(last.usage!.prompt_tokens + last.usage!.completion_tokens);
    expect(chunks.slice(0, -1).every((ch) => ch.usage === null)).toBe(true);
  });

  it('logprobs in the stream: each chunk\'s tokens spell its text, offsets run on across chunks', async () => {
    const stream = await client.completions.create({ model: MODEL, prompt: 'slp', logprobs: 1, max_tokens: 8, stream: true });
    let text = '';
    const offsets: number[] = [];
    for await (const ch of stream) {
      for (const c of ch.choices) {
        if (c.text) expect(c.logprobs!.tokens!.join('')).toBe(c.text);
        if (c.logprobs) offsets.push(...c.logprobs.text_offset!);
        text += c.text;
      }
    }
    expect(text).toBe(' after "slp" #0');
    expect(offsets[0]).toBe(0);
    expect(offsets.at(-1)).toBeLessThan(text.length);
    expect([...offsets].sort((a, b) => a - b)).toEqual(offsets);
  });

  it('a worker error after text is an APIError in the stream', async () => {
    worker.script = { reply, pieceChars: 5, fail: { code: 'internal_error', message: 'boom' }, failAfterDeltas: 1 };
    try {
      const stream = await client.completions.create({ model: MODEL, prompt: ['e1', 'e2'], stream: true });
      const err = await (async () => {
        for await (const _ of stream) void _;
      })().catch((e) => e);
      expect(err).toBeInstanceOf(OpenAI.APIError);
    } finally {
      worker.script = { reply, pieceChars: 5 };
    }
  });
});

describe('the request path is chat\'s', () => {
  it('no key → 401; a prompt too long for the context → 400 context_length_exceeded naming prompt', async () => {
    const anon = new OpenAI({ baseURL: `${gw.url}/v1`, apiKey: 'sk-wrong', maxRetries: 0 });
    await expect(anon.completions.create({ model: MODEL, prompt: 'hi' })).rejects.toBeInstanceOf(OpenAI.AuthenticationError);
    const long = await client.completions.create({ model: MODEL, prompt: 'word '.repeat(300) }).catch((e) => e);
    expect(long).toBeInstanceOf(OpenAI.BadRequestError);
    expect([long.code, long.param]).toEqual(['context_length_exceeded', 'prompt']);
    const big = await client.completions.create({ model: MODEL, prompt: 'short', max_tokens: 500 }).catch((e) => e);
    expect([big.code, big.param]).toEqual(['context_length_exceeded', 'prompt']);
    const ids = await client.completions.create({ model: MODEL, prompt: [1, 2, 3] }).catch((e) => e);
    expect([ids.status, ids.param]).toEqual([400, 'prompt']);
  });

  it('a worker that finds the prompt too long: 400 context_length_exceeded naming prompt, not messages', async () => {
    worker.script = { reply, fail: { code: 'context_length_exceeded', message: 'prompt has 300 tokens' }, failAfterDeltas: 0 };
    try {
      const err = await client.completions.create({ model: MODEL, prompt: 'fits in the gateway' }).catch((e) => e);
      expect(err).toBeInstanceOf(OpenAI.BadRequestError);
      expect([err.code, err.param]).toEqual(['context_length_exceeded', 'prompt']);
    } finally {
      worker.script = { reply, pieceChars: 5 };
    }
  });

  it('the response cache answers a repeated deterministic completion (and echo is rendered on the hit)', async () => {
    const cached = new OpenAI({ baseURL: `${gw.url}/v1`, apiKey: TEST_KEY, maxRetries: 0 });
    const prompt = `cache me ${randomUUID()}`;
    const first = await cached.completions.create({ model: MODEL, prompt, temperature: 0 }).withResponse();
    expect(first.response.headers.get('x-cache')).toBe('miss');
    const jobs = worker.jobs.length;
    const again = await cached.completions.create({ model: MODEL, prompt, temperature: 0, echo: true }).withResponse();
    expect(again.response.headers.get('x-cache')).toBe('hit');
    expect(worker.jobs.length).toBe(jobs);
    expect(again.data.choices[0].text).toBe(prompt + first.data.choices[0].text);
    // A chat with the same text is another request: not answered from the completion's entry.
    const chat = await cached.chat.completions.create({ model: MODEL, messages: [{ role: 'user', content: prompt }], temperature: 0 }).withResponse();
    expect(chat.response.headers.get('x-cache')).toBe('miss');
  });

  it('OpenAPI lists the route; /v1/models is unchanged', async () => {
    const doc = (await (await fetch(`${gw.url}/openapi.json`)).json()) as { paths: Record<string, object> };
    expect(Object.keys(doc.paths['/v1/completions'])).toEqual(['post']);
    const ids: string[] = [];
    for await (const m of client.models.list()) ids.push(m.id);
    expect(ids).toEqual([MODEL]);
  });
});

describe('rate limits count each prompt of a list as a request', () => {
  let limited: TestGateway;
  beforeAll(async () => {
    limited = await startGateway(redis.url, { DEFAULT_MODEL: MODEL, DEFAULT_RPM: '2' });
    await waitReady(limited);
  }, 180_000);
  afterAll(() => limited.close());

  it('three prompts against 2 requests a minute: 429 with retry-after, and no job ran', async () => {
    const c = new OpenAI({ baseURL: `${limited.url}/v1`, apiKey: TEST_KEY, maxRetries: 0, defaultHeaders: { 'cache-control': 'no-store' } });
    const jobs = worker.jobs.length;
    const err = await c.completions.create({ model: MODEL, prompt: ['a', 'b', 'c'] }).catch((e) => e);
    expect(err).toBeInstanceOf(OpenAI.RateLimitError);
    expect(Number(err.headers.get('retry-after'))).toBeGreaterThan(0);
    expect(worker.jobs.length).toBe(jobs);
  });
});
