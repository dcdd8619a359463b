/**
 * The request schema and the parameter table: everything the openai SDKs send is accepted, every field OpenAI defines
 * that we do not serve is refused with `param` naming it, and OpenAI's ranges are enforced.
 */
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import OpenAI from 'openai';
import { ApiError } from '../src/errors';
import { chatCompletionRequestSchema } from '../src/protocol/chat';
import { jobParamsSchema } from '../src/protocol/job';
import { MAX_RESPONSE_SCHEMA_CHARS, requestedMaxTokens, toChatJob } from '../src/services/chat-params';
import { parseOrThrow } from '../src/services/validation';

function convert(body: unknown) {
  const req = parseOrThrow(chatCompletionRequestSchema, body);
  return { req, ...toChatJob(req) };
}

function rejection(body: unknown): ApiError {
  try {
    convert(body);
  } catch (err) {
    if (err instanceof ApiError) return err;
    throw err;
  }
  throw new Error('expected a rejection');
}

const base = { model: 'm', messages: [{ role: 'user', content: 'hi' }] };

describe('what the official openai Node SDK sends', () => {
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
        res.end(
          JSON.stringify({
            id: 'chatcmpl-x',
            object: 'chat.completion',
            created: 1,
            model: 'm',
            choices: [{ index: 0, message: { role: 'assistant', content: 'ok', refusal: null }, finish_reason: 'stop', logprobs: null }],
            usage: { prompt_tokens: 1, completion_tokens: 1, total_tokens: 2 },
          }),
        );
      });
    });
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
    client = new OpenAI({ baseURL: `http://127.0.0.1:${(server.address() as AddressInfo).port}/v1`, apiKey: 'k', maxRetries: 0 });
  });
  afterAll(() => new Promise<void>((r) => server.close(() => r())));

  it('accepts a request using every supported field, and converts it once', async () => {
    await client.chat.completions.create({
      model: 'smollm2-135m-instruct',
      messages: [
        { role: 'developer', content: 'Be brief.' },
        { role: 'system', content: [{ type: 'text', text: 'S1' }, { type: 'text', text: 'S2' }] },
        { role: 'user', content: 'Hello', name: 'alice' },
        { role: 'assistant', content: 'Hi!' },
        { role: 'user', content: [{ type: 'text', text: 'Again' }] },
      ],
      max_completion_tokens: 7,
      temperature: 0.5,
      top_p: 0.9,
      seed: 42,
      stop: ['\n\n', 'END'],
      n: 2,
      presence_penalty: 0.5,
      frequency_penalty: -0.5,
      logit_bias: { '50256': -100 },
      logprobs: true,
      top_logprobs: 3,
      user: 'u-1',
      metadata: { a: 'b' },
      store: false,
      service_tier: 'auto',
      parallel_tool_calls: false,
      tool_choice: 'none',
      response_format: { type: 'text' },
      modalities: ['text'],
      // vLLM extensions arrive as extra body fields.
      // @ts-expect-error not in OpenAI's types
      top_k: 40,
      min_p: 0.05,
      repetition_penalty: 1.1,
      some_future_field: { anything: true },
    });
    const { req, params, messages } = convert(bodies.at(-1));
    expect(requestedMaxTokens(req)).toBe(7);
    expect(messages).toEqual([
      { role: 'system', content: 'Be brief.' },
      { role: 'system', content: 'S1\nS2' },
      { role: 'user', content: 'Hello' },
      { role: 'assistant', content: 'Hi!' },
      { role: 'user', content: 'Again' },
    ]);
    expect(params).toEqual({
      temperature: 0.5,
      top_p: 0.9,
      seed: 42,
      stop: ['\n\n', 'END'],
      n: 2,
      presence_penalty: 0.5,
      frequency_penalty: -0.5,
      logit_bias: { '50256': -100 },
      logprobs: true,
      top_logprobs: 3,
      top_k: 40,
      min_p: 0.05,
      repetition_penalty: 1.1,
      ignore_eos: false,
    });
    expect(jobParamsSchema.safeParse({ ...params, max_tokens: 7 }).success).toBe(true);
  });

  it('accepts a streaming request with stream_options and max_tokens', async () => {
    await client.chat.completions
      .create({ model: 'm', messages: [{ role: 'user', content: 'x' }], stream: true, stream_options: { include_usage: true }, max_tokens: 3 })
      .catch(() => undefined); // our fake server does not stream; only the body matters
    const { req } = convert(bodies.at(-1));
    expect(req.stream).toBe(true);
    expect(req.stream_options?.include_usage).toBe(true);
    expect(requestedMaxTokens(req)).toBe(3);
  });
});

describe('what the Python SDK sends (explicit nulls for unset optional fields)', () => {
  it('treats null as unset', () => {
    const { params } = convert({
      ...base,
      temperature: null,
      top_p: null,
      stop: null,
      n: null,
      seed: null,
      stream: null,
      stream_options: null,
      max_tokens: null,
      logit_bias: null,
      response_format: null,
      tools: null,
    });
    expect(params.temperature).toBe(1);
    expect(params.n).toBe(1);
    expect(params.stop).toEqual([]);
  });

  it('takes stop as a single string and drops empty ones', () => {
    expect(convert({ ...base, stop: 'END' }).params.stop).toEqual(['END']);
    expect(convert({ ...base, stop: ['', 'x'] }).params.stop).toEqual(['x']);
  });

  it('top_p 0 (OpenAI allows it) means greedy, which the worker gets as temperature 0', () => {
    expect(convert({ ...base, top_p: 0, temperature: 0.8 }).params).toMatchObject({ temperature: 0, top_p: 1 });
  });

  it('maps top_k -1 (vLLM "off") to 0', () => {
    expect(convert({ ...base, top_k: -1 }).params.top_k).toBe(0);
  });
});

describe('rejections name the field', () => {
  it.each<[string, Record<string, unknown>, string, string]>([
    ['missing model', { messages: base.messages }, 'model', 'missing_required_parameter'],
    ['missing messages', { model: 'm' }, 'messages', 'missing_required_parameter'],
    ['empty messages', { model: 'm', messages: [] }, 'messages', 'invalid_value'],
    ['messages not an array', { model: 'm', messages: 'hi' }, 'messages', 'invalid_type'],
    ['content a number', { model: 'm', messages: [{ role: 'user', content: 5 }] }, 'messages[0].content', 'invalid_type'],
    ['unknown role', { model: 'm', messages: [{ role: 'robot', content: 'x' }] }, 'messages[0].role', 'invalid_value'],
    ['tool result answering no call', { model: 'm', messages: [{ role: 'tool', content: 'x', tool_call_id: 'a' }] }, 'messages[0].tool_call_id', 'invalid_value'],
    ['function role (deprecated)', { model: 'm', messages: [{ role: 'function', content: 'x', name: 'f' }] }, 'messages[0].role', 'unsupported_value'],
    [
      'image part',
      { model: 'm', messages: [{ role: 'user', content: [{ type: 'text', text: 'a' }, { type: 'image_url', image_url: { url: 'x' } }] }] },
      'messages[0].content[1].type',
      'unsupported_value',
    ],
    ['content part without type', { model: 'm', messages: [{ role: 'user', content: [{ text: 'a' }] }] }, 'messages[0].content[0].type', 'missing_required_parameter'],
    ['stop with a number', { ...base, stop: ['a', 1] }, 'stop[1]', 'invalid_type'],
    ['empty model', { ...base, model: '' }, 'model', 'invalid_value'],
    ['user content null', { model: 'm', messages: [{ role: 'user', content: null }] }, 'messages[0].content', 'missing_required_parameter'],
    ['temperature > 2', { ...base, temperature: 3 }, 'temperature', 'invalid_value'],
    ['top_p > 1', { ...base, top_p: 1.5 }, 'top_p', 'invalid_value'],
    ['max_tokens 0', { ...base, max_tokens: 0 }, 'max_tokens', 'invalid_value'],
    ['max_tokens decimal', { ...base, max_tokens: 1.5 }, 'max_tokens', 'invalid_type'],
    ['max_tokens string', { ...base, max_tokens: '5' }, 'max_tokens', 'invalid_type'],
    ['max_completion_tokens != max_tokens', { ...base, max_tokens: 5, max_completion_tokens: 6 }, 'max_tokens', 'invalid_value'],
    ['n > 128', { ...base, n: 129 }, 'n', 'invalid_value'],
    ['five stop strings', { ...base, stop: ['a', 'b', 'c', 'd', 'e'] }, 'stop', 'invalid_value'],
    ['presence_penalty < -2', { ...base, presence_penalty: -3 }, 'presence_penalty', 'invalid_value'],
    ['logit_bias key', { ...base, logit_bias: { abc: 1 } }, 'logit_bias.abc', 'invalid_value'],
    ['logit_bias value', { ...base, logit_bias: { '1': 101 } }, 'logit_bias.1', 'invalid_value'],
    ['top_logprobs > 20', { ...base, logprobs: true, top_logprobs: 21 }, 'top_logprobs', 'invalid_value'],
    ['top_logprobs without logprobs', { ...base, top_logprobs: 2 }, 'top_logprobs', 'invalid_value'],
    ['stream_options without stream', { ...base, stream_options: { include_usage: true } }, 'stream_options', 'invalid_value'],
    ['include_usage not a boolean', { ...base, stream: true, stream_options: { include_usage: 'yes' } }, 'stream_options.include_usage', 'invalid_type'],
    ['repetition_penalty 0', { ...base, repetition_penalty: 0 }, 'repetition_penalty', 'invalid_value'],
    ['tools of another type', { ...base, tools: [{ type: 'retrieval' }] }, 'tools[0].type', 'invalid_value'],
    ['tool_choice auto without tools', { ...base, tool_choice: 'auto' }, 'tool_choice', 'invalid_value'],
    ['functions', { ...base, functions: [{ name: 'f' }] }, 'functions', 'unsupported_parameter'],
    ['response_format of an unknown type', { ...base, response_format: { type: 'grammar' } }, 'response_format.type', 'invalid_value'],
    ['json_schema without json_schema', { ...base, response_format: { type: 'json_schema' } }, 'response_format.json_schema', 'missing_required_parameter'],
    ['json_schema without a name', { ...base, response_format: { type: 'json_schema', json_schema: { schema: {} } } }, 'response_format.json_schema.name', 'missing_required_parameter'],
    ['json_schema name with a space', { ...base, response_format: { type: 'json_schema', json_schema: { name: 'a b', schema: {} } } }, 'response_format.json_schema.name', 'invalid_value'],
    ['json_schema schema an array', { ...base, response_format: { type: 'json_schema', json_schema: { name: 'a', schema: [1] } } }, 'response_format.json_schema.schema', 'invalid_type'],
    [
      'json_schema schema too long',
      { ...base, response_format: { type: 'json_schema', json_schema: { name: 'a', schema: { description: 'x'.repeat(MAX_RESPONSE_SCHEMA_CHARS) } } } },
      'response_format.json_schema.schema',
      'invalid_value',
    ],
    ['audio', { ...base, audio: { voice: 'alloy', format: 'mp3' } }, 'audio', 'unsupported_parameter'],
    ['modalities audio', { ...base, modalities: ['text', 'audio'] }, 'modalities', 'unsupported_value'],
    ['prediction', { ...base, prediction: { type: 'content', content: 'x' } }, 'prediction', 'unsupported_parameter'],
    ['reasoning_effort', { ...base, reasoning_effort: 'low' }, 'reasoning_effort', 'unsupported_parameter'],
  ])('%s', (_name, body, param, code) => {
    const err = rejection(body);
    expect(err.status).toBe(400);
    expect(err.type).toBe('invalid_request_error');
    expect({ param: err.param, code: err.code }).toEqual({ param, code });
    expect(err.message.length).toBeGreaterThan(10);
  });

  it('a body that is not an object is a 400 without a param', () => {
    for (const body of [[1, 2], 'x', 5, null]) {
      const err = rejection(body);
      expect(err.status).toBe(400);
      expect(err.param).toBeNull();
    }
  });

  it('response_format: text is free text; json_object and json_schema reach the job, the schema unwrapped', () => {
    expect(convert({ ...base, response_format: { type: 'text' } }).params.response_format).toBeUndefined();
    expect(convert({ ...base, response_format: { type: 'json_object' } }).params.response_format).toEqual({ type: 'json_object' });
    const schema = { type: 'object', properties: { b: { type: 'string' }, a: { type: 'integer' } }, required: ['b', 'a'] };
    const { params } = convert({ ...base, response_format: { type: 'json_schema', json_schema: { name: 'person', strict: true, schema } } });
    expect(params.response_format).toEqual({ type: 'json_schema', schema });
    // Property order is the order the model writes them in: it must survive the conversion.
    expect(Object.keys((params.response_format as unknown as { schema: { properties: object } }).schema.properties)).toEqual(['b', 'a']);
    expect(jobParamsSchema.parse({ ...params, max_tokens: 5 }).response_format).toEqual({ type: 'json_schema', schema });
    expect(convert({ ...base, response_format: { type: 'json_schema', json_schema: { name: 'any' } } }).params.response_format).toEqual({
      type: 'json_schema',
      schema: {},
    });
  });

  it('accepts unknown fields (and ignores them)', () => {
    expect(() => convert({ ...base, guided_json: { a: 1 }, foo: 'bar' })).not.toThrow();
  });
});
