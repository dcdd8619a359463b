/**
 * The legacy completions' schema and parameter table (services/completion-params.ts) and their rendering
 * (services/completion-format.ts): what the official openai SDK sends is accepted and converted once, every field we
 * refuse is a 400 naming it, and the response objects have OpenAI's `text_completion` shapes.
 */
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import OpenAI from 'openai';
import { ApiError } from '../src/errors';
import { textCompletionChunkSchema, textCompletionSchema } from '../src/protocol/completions';
import { jobParamsSchema, type JobResult } from '../src/protocol/job';
import { PARAM_TABLE, SAMPLING_RULES } from '../src/services/chat-params';
import { CompletionChunks, legacyLogprobs, mergeResults, toTextCompletion, type CompletionRender } from '../src/services/completion-format';
import { COMPLETION_PARAM_TABLE, MAX_PROMPTS, parseCompletion } from '../src/services/completion-params';

function rejection(body: unknown): ApiError {
  try {
    parseCompletion(body);
  } catch (err) {
    if (err instanceof ApiError) return err;
    throw err;
  }
  throw new Error('expected a rejection');
}

const base = { model: 'm', prompt: 'Once upon a time' };

describe('what the official openai Node SDK sends to /v1/completions', () => {
  let server: Server;
  const bodies: unknown[] = [];
  let client: OpenAI;

  beforeAll(async () => {
    server = createServer((req, res) => {
      let raw = '';
      req.on('data', (c) => (raw += c));
      req.on('end', () => {
        bodies.push(JSON.parse(raw));
        res.setHeader('content-type', 'application/json');
        res.end(JSON.stringify({ id: 'cmpl-x', object: 'text_completion', created: 1, model: 'm', choices: [], usage: { prompt_tokens: 1, completion_tokens: 0, total_tokens: 1 } }));
      });
    });
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
    client = new OpenAI({ baseURL: `http://127.0.0.1:${(server.address() as AddressInfo).port}/v1`, apiKey: 'k', maxRetries: 0 });
  });
  afterAll(() => new Promise<void>((r) => server.close(() => r())));

  it('accepts every supported field and converts it once into job params', async () => {
    await client.completions.create({
      model: 'm',
      prompt: ['one', 'two'],
      max_tokens: 7,
      temperature: 0.5,
      top_p: 0.9,
      n: 2,
      best_of: 2,
      stop: ['\n', 'END'],
      seed: 3,
      echo: false,
      logprobs: 2,
      presence_penalty: 0.1,
      frequency_penalty: 0.2,
      logit_bias: { '50256': -100 },
      suffix: '',
      user: 'u-1',
      // vLLM's extensions go through the SDK's untyped fields, as for chat.
      ...({ top_k: 40, min_p: 0.05, repetition_penalty: 1.1, ignore_eos: true } as object),
    });
    const c = parseCompletion(bodies.at(-1));
    expect(c.prompts).toEqual(['one', 'two']);
    expect(c.logprobs).toBe(2);
    expect(c.echo).toBe(false);
    expect(c.params).toEqual({
      temperature: 0.5,
      top_p: 0.9,
      seed: 3,
      stop: ['\n', 'END'],
      n: 2,
      presence_penalty: 0.1,
      frequency_penalty: 0.2,
      logit_bias: { '50256': -100 },
      // The legacy integer k: logprobs on, k alternatives per token.
      logprobs: true,
      top_logprobs: 2,
      top_k: 40,
      min_p: 0.05,
      repetition_penalty: 1.1,
      ignore_eos: true,
    });
    expect(jobParamsSchema.safeParse({ ...c.params, max_tokens: 7 }).success).toBe(true);
  });

  it('a stream with include_usage', async () => {
    const stream = await client.completions.create({ model: 'm', prompt: 'x', stream: true, stream_options: { include_usage: true } });
    await stream.controller.abort();
    const c = parseCompletion(bodies.at(-1));
    expect(c.req.stream).toBe(true);
    expect(c.req.stream_options?.include_usage).toBe(true);
  });
});

describe('defaults and the shared table', () => {
  it('a bare request gets OpenAI defaults; logprobs 0 asks for the sampled token only', () => {
    const c = parseCompletion(base);
    expect(c.prompts).toEqual(['Once upon a time']);
    expect(c.params).toMatchObject({ temperature: 1, top_p: 1, n: 1, logprobs: false, top_logprobs: 0, stop: [] });
    expect(c.logprobs).toBeNull();
    expect(parseCompletion({ ...base, logprobs: 0 }).params).toMatchObject({ logprobs: true, top_logprobs: 0 });
    expect(parseCompletion({ ...base, suffix: null, best_of: null, echo: true }).echo).toBe(true);
    // Echo with logprobs scores the prompt too (its k); either alone does not.
    expect(parseCompletion({ ...base, echo: true, logprobs: 2 }).params.prompt_logprobs).toBe(2);
    expect(parseCompletion({ ...base, logprobs: 2 }).params.prompt_logprobs).toBeUndefined();
    expect(parseCompletion({ ...base, echo: true }).params.prompt_logprobs).toBeUndefined();
  });

  it('the sampling rows are one list, shared by chat and completions', () => {
    for (const rule of SAMPLING_RULES) {
      expect(COMPLETION_PARAM_TABLE).toContain(rule);
      expect(PARAM_TABLE).toContain(rule);
    }
    // top_p 0 means greedy in both (the shared row's conversion).
    expect(parseCompletion({ ...base, top_p: 0 }).params).toMatchObject({ temperature: 0, top_p: 1 });
  });
});

describe('refusals name the field', () => {
  it.each([
    ['a non-empty suffix', { suffix: ' the end.' }, 'suffix', 'unsupported_value'],
    ['best_of other than n', { best_of: 3, n: 2 }, 'best_of', 'unsupported_value'],
    ['best_of 2 with the default n', { best_of: 2 }, 'best_of', 'unsupported_value'],
    ['token ids', { prompt: [1, 2, 3] }, 'prompt', 'unsupported_value'],
    ['lists of token ids', { prompt: [[1, 2], [3]] }, 'prompt', 'unsupported_value'],
    ['an empty list', { prompt: [] }, 'prompt', 'invalid_value'],
    ['an empty prompt', { prompt: '' }, 'prompt', 'invalid_value'],
    ['too many prompts', { prompt: Array.from({ length: MAX_PROMPTS + 1 }, (_, i) => `p${i}`) }, 'prompt', 'invalid_value'],
    ['no prompt', { prompt: undefined }, 'prompt', 'missing_required_parameter'],
    ['a null prompt', { prompt: null }, 'prompt', 'invalid_type'],
    ['logprobs above 5', { logprobs: 6 }, 'logprobs', 'invalid_value'],
    ['logprobs as chat\'s boolean', { logprobs: true }, 'logprobs', 'invalid_type'],
    ['stream_options without stream', { stream_options: { include_usage: true } }, 'stream_options', 'invalid_value'],
    ['temperature out of range', { temperature: 3 }, 'temperature', 'invalid_value'],
    ['max_tokens 0', { max_tokens: 0 }, 'max_tokens', 'invalid_value'],
    ['more than 4 stop strings', { stop: ['a', 'b', 'c', 'd', 'e'] }, 'stop', 'invalid_value'],
  ])('%s', (_what, extra, param, code) => {
    const err = rejection({ ...base, ...extra });
    expect({ status: err.status, param: err.param, code: err.code }).toEqual({ status: 400, param, code });
  });
});

describe('rendering: text_completion objects', () => {
  const meta = { id: 'cmpl-abc', created: 1764100000, model: 'm' };
  const render = (over: Partial<CompletionRender> = {}): CompletionRender => ({ meta, prompts: ['P0', 'P1'], n: 2, echo: false, logprobs: null, includeUsage: false, ...over });
  const result = (tag: string): JobResult => ({
    choices: [1, 0].map((index) => ({ index, text: `${tag}-${index}`, finish_reason: index === 0 ? 'stop' : 'length', logprobs: null })),
    usage: { prompt_tokens: 3, completion_tokens: 4 },
  });

  it('several prompts: choices indexed prompt × n + choice, usage summed, OpenAI shape', () => {
    const merged = mergeResults([result('a'), result('b')], 2);
    const body = toTextCompletion(render({ echo: true }), merged);
    expect(textCompletionSchema.parse(body)).toEqual(body);
    expect(body.object).toBe('text_completion');
    expect(body.choices.map((c) => [c.index, c.text, c.finish_reason])).toEqual([
      [0, 'P0a-0', 'stop'],
      [1, 'P0a-1', 'length'],
      [2, 'P1b-0', 'stop'],
      [3, 'P1b-1', 'length'],
    ]);
    expect(body.usage).toEqual({ prompt_tokens: 6, completion_tokens: 8, total_tokens: 14 });
  });

  it('legacy logprobs: parallel lists, the sampled token always in top_logprobs, offsets in code points', () => {
    const entries = [
      { token: 'Hé', logprob: -0.1, top_logprobs: [{ token: 'Ha', logprob: -0.05 }] },
      { token: '🤗', logprob: -2, top_logprobs: [{ token: '🤗', logprob: -2 }, { token: '__proto__', logprob: -3 }] },
      { token: '!', logprob: -0.5, top_logprobs: [] },
    ];
    const lp = legacyLogprobs(entries, 4);
    expect(lp.tokens).toEqual(['Hé', '🤗', '!']);
    expect(lp.token_logprobs).toEqual([-0.1, -2, -0.5]);
    expect(lp.top_logprobs.map((t) => ({ ...t }))).toEqual([{ Ha: -0.05, Hé: -0.1 }, { '🤗': -2, ['__proto__']: -3 }, { '!': -0.5 }]);
    expect(lp.text_offset).toEqual([4, 6, 7]);
    expect(JSON.parse(JSON.stringify(lp.top_logprobs[1]))).toEqual({ '🤗': -2, ['__proto__']: -3 });
  });

  it('echo with logprobs: the prompt\'s entries spell the echo from offset 0 (the first without a logprob), then the generated ones', () => {
    const prompt = [
      { token: 'P', logprob: null, top_logprobs: [], prompt: true },
      { token: '0', logprob: -1.5, top_logprobs: [{ token: '1', logprob: -0.5 }], prompt: true },
    ];
    const r: JobResult = {
      choices: [{ index: 0, text: 'ab', finish_reason: 'length', logprobs: [...prompt, { token: 'ab', logprob: -0.25, top_logprobs: [] }] }],
      usage: { prompt_tokens: 2, completion_tokens: 1 },
    };
    const body = toTextCompletion(render({ prompts: ['P0'], n: 1, echo: true, logprobs: 1 }), r);
    expect(textCompletionSchema.parse(body)).toEqual(body);
    const [c] = body.choices;
    expect(c.text).toBe('P0ab');
    expect({ ...c.logprobs!, top_logprobs: c.logprobs!.top_logprobs.map((t) => (t ? { ...t } : t)) }).toEqual({
      tokens: ['P', '0', 'ab'],
      token_logprobs: [null, -1.5, -0.25],
      top_logprobs: [null, { '1': -0.5, '0': -1.5 }, { ab: -0.25 }],
      text_offset: [0, 1, 2],
    });
  });

  it('chunks: text, finish and usage chunks in the chunk shape', () => {
    const chunks = new CompletionChunks(render({ includeUsage: true }));
    const all = [chunks.text(3, 'hi', null), chunks.finish(3, 'length'), chunks.usage(result('a'))];
    for (const c of all) expect(textCompletionChunkSchema.parse(c)).toEqual(c);
    expect(all[0]).toMatchObject({ object: 'text_completion', id: 'cmpl-abc', usage: null, choices: [{ index: 3, text: 'hi', finish_reason: null, logprobs: null }] });
    expect(all[1].choices[0]).toEqual({ index: 3, text: '', finish_reason: 'length', logprobs: null });
    expect(all[2]).toMatchObject({ choices: [], usage: { prompt_tokens: 3, completion_tokens: 4, total_tokens: 7 } });
  });
});
