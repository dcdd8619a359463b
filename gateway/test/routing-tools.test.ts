/**
 * Tool calling through an upstream model (routing/upstream.ts, routing/upstream-tools.ts), with the official openai
 * SDK as the client, as an agent framework pointed at the gateway would use it. The upstream is a real HTTP server on
 * loopback speaking the protocol (helpers/fake-upstream.ts): an external OpenAI-compatible service cannot exist in a
 * test here, so one is stood up; it answers a request offering tools with calls, streamed as OpenAI streams them,
 * and a tool result with text. Everything between the SDK and that server is the real gateway (real wiring, real
 * Redis, the response cache and the output filter on).
 */
import { randomUUID } from 'node:crypto';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import OpenAI from 'openai';
import { chatCompletionChunkSchema } from '../src/protocol/chat';
import { FakeUpstream, streamedFragments, type UpstreamToolCall } from './helpers/fake-upstream';
import { openStream, parseSse, startGateway, TEST_KEY, type TestGateway } from './helpers/gateway';
import { parsePrometheus, sumOf } from './helpers/prom-text';
import { useTestRedis } from './helpers/redis-server';

const redis = useTestRedis();
const upstream = new FakeUpstream();
/** An upstream that sends a call's first fragment at once, then each next one 2 s later (a slow model's arguments). */
const slow = new FakeUpstream();
const ARGS = upstream.toolArguments;
let gw: TestGateway;
/** A second gateway with the output filter on (a blocked phrase), on the same Redis and routing file. */
let filtered: TestGateway;
/** A third, whose routing file has a breaker with latency_ms. */
let latencyGw: TestGateway;
let client: OpenAI;

const weather: OpenAI.ChatCompletionFunctionTool = {
  type: 'function',
  function: {
    name: 'get_weather',
    description: 'The weather in a city',
    parameters: { type: 'object', properties: { city: { type: 'string' }, unit: { type: 'string', enum: ['celsius', 'fahrenheit'] } }, required: ['city'] },
  },
};
const time: OpenAI.ChatCompletionFunctionTool = { type: 'function', function: { name: 'get_time', parameters: { type: 'object', properties: { city: { type: 'string' } } } } };
const tools = [weather, time];
const ask: OpenAI.ChatCompletionMessageParam[] = [{ role: 'user', content: 'Weather and time in Paris?' }];
const call = (id: string, name: string, args = ARGS) => ({ id, type: 'function', function: { name, arguments: args } });

beforeAll(async () => {
  await Promise.all([upstream.start(), slow.start()]);
  slow.chunkDelayMs = 2000;
  const dir = mkdtempSync(join(tmpdir(), 'routing-tools-'));
  const file = join(dir, 'routing.json');
  writeFileSync(file, JSON.stringify({ upstreams: { vllm: { base_url: upstream.url } }, models: { remote: { upstream: 'vllm', upstream_model: 'org/remote-7b' } } }));
  // Its own gateway: one slow first output opens a breaker there (what the latency test checks does not happen).
  const slowFile = join(dir, 'routing-slow.json');
  writeFileSync(
    slowFile,
    JSON.stringify({ upstreams: { slowup: { base_url: slow.url } }, models: { 'slow-remote': { upstream: 'slowup' } }, breaker: { failure_threshold: 1, open_ms: 60_000, latency_ms: 3000 } }),
  );
  gw = await startGateway(redis.url, { ROUTING_FILE: file });
  filtered = await startGateway(redis.url, { ROUTING_FILE: file, OUTPUT_FILTER_BLOCKLIST: 'ACME-42', CACHE_ENABLED: 'false' });
  latencyGw = await startGateway(redis.url, { ROUTING_FILE: slowFile });
  client = new OpenAI({ baseURL: `${gw.url}/v1`, apiKey: TEST_KEY, maxRetries: 0 });
}, 60_000);
redis.beforeStop(async () => {
  await Promise.all([gw.close(), filtered.close(), latencyGw.close()]);
  await Promise.all([upstream.close(), slow.close()]);
});
beforeEach(() => {
  upstream.mode = { kind: 'ok' };
  upstream.toolArguments = ARGS;
});

it('non-stream: tools, tool_choice and parallel_tool_calls reach the upstream as sent; its tool_calls come back structured; the tool results go back', async () => {
  const { data, response } = await client.chat.completions.create({ model: 'remote', messages: ask, tools, tool_choice: 'auto', parallel_tool_calls: true }).withResponse();
  const sent = upstream.requests.at(-1)!;
  const nth = upstream.requests.length;
  expect(sent.path).toBe('/v1/chat/completions');
  expect(sent.body).toMatchObject({ model: 'org/remote-7b', tools, tool_choice: 'auto', parallel_tool_calls: true, messages: ask });
  expect(response.headers.get('x-routed-model')).toBe('remote');
  expect(data.model).toBe('remote');
  const choice = data.choices[0];
  expect(choice.finish_reason).toBe('tool_calls');
  expect(choice.message.content).toBeNull();
  // The upstream's calls, ids included (a client answers each by its id).
  expect(choice.message.tool_calls).toEqual([call(`call_up${nth}_0`, 'get_weather'), call(`call_up${nth}_1`, 'get_time')]);
  expect(data.usage).toMatchObject({ prompt_tokens: 40, completion_tokens: 18 });

  const calls = choice.message.tool_calls! as OpenAI.ChatCompletionMessageFunctionToolCall[];
  const followUp: OpenAI.ChatCompletionMessageParam[] = [
    ...ask,
    { role: 'assistant', content: null, tool_calls: calls },
    { role: 'tool', tool_call_id: calls[0].id, content: '18 °C' },
    { role: 'tool', tool_call_id: calls[1].id, content: '12:00' },
  ];
  const answer = await client.chat.completions.create({ model: 'remote', messages: followUp, tools });
  expect(answer.choices[0].message.content).toBe('The tool said: 12:00');
  expect(answer.choices[0].finish_reason).toBe('stop');
  // The assistant's calls and the tool messages are sent as the client wrote them, not rendered into text.
  expect(upstream.requests.at(-1)!.body.messages).toEqual(followUp);
});

it('runTools (non-stream and stream): the SDK calls the function with the upstream’s arguments and gets the final answer', async () => {
  for (const stream of [false, true]) {
    const seen: unknown[] = [];
    const fn = (args: { city: string }) => {
      seen.push(args);
      return `sunny in ${args.city}`;
    };
    const runnable = [{ type: 'function' as const, function: { name: 'get_weather', description: 'weather', parameters: weather.function.parameters!, parse: JSON.parse, function: fn } }];
    const runner = stream
      ? client.chat.completions.runTools({ model: 'remote', messages: ask, tools: runnable, stream: true })
      : client.chat.completions.runTools({ model: 'remote', messages: ask, tools: runnable });
    expect(await runner.finalContent()).toBe('The tool said: sunny in Paris');
    expect(seen).toEqual([{ city: 'Paris', unit: 'celsius' }]);
    expect(upstream.requests.at(-1)!.body.stream).toBe(stream);
  }
});

it('stream: the SDK stream helper assembles the calls from the fragments, which arrive as the upstream sent them', async () => {
  const stream = client.chat.completions.stream({ model: 'remote', messages: ask, tools });
  const deltas: string[] = [];
  stream.on('tool_calls.function.arguments.delta', (e) => deltas.push(`${e.index}:${e.arguments_delta}`));
  const final = await stream.finalChatCompletion();
  const nth = upstream.requests.length;
  expect(final.model).toBe('remote');
  expect(final.choices[0].finish_reason).toBe('tool_calls');
  expect(final.choices[0].message.tool_calls).toEqual([call(`call_up${nth}_0`, 'get_weather'), call(`call_up${nth}_1`, 'get_time')]);
  expect(deltas.filter((d) => d.startsWith('0:')).length).toBeGreaterThan(1); // pieces, not one whole call
});

it('stream: each chunk has the exact OpenAI shape, the tool_calls fragments are the upstream’s own, finish_reason tool_calls last', async () => {
  const s = await openStream(`${gw.url}/v1/chat/completions`, { model: 'remote', messages: ask, tools, stream: true }, { authorization: `Bearer ${TEST_KEY}` });
  const events = parseSse(await s.body).data;
  expect(events.at(-1)).toBe('[DONE]');
  const chunks = events.slice(0, -1).map((e) => chatCompletionChunkSchema.parse(e));
  const nth = upstream.requests.length;
  const expected = streamedFragments([call(`call_up${nth}_0`, 'get_weather'), call(`call_up${nth}_1`, 'get_time')] as UpstreamToolCall[]);
  expect(chunks.flatMap((c) => c.choices.flatMap((x) => x.delta.tool_calls ?? []))).toEqual(expected);
  // One fragment per chunk, as OpenAI sends them; the role opens the choice; nothing finishes before the end.
  for (const c of chunks) expect(c).toMatchObject({ object: 'chat.completion.chunk', model: 'remote', id: chunks[0].id });
  expect(chunks[0].choices[0].delta.role).toBe('assistant');
  expect(chunks.slice(0, -1).every((c) => c.choices[0].finish_reason === null)).toBe(true);
  expect(chunks.at(-1)!.choices[0]).toEqual({ index: 0, delta: {}, logprobs: null, finish_reason: 'tool_calls' });
});

it('response_format (json_schema) reaches the upstream as sent', async () => {
  const response_format = { type: 'json_schema' as const, json_schema: { name: 'weather', strict: true, schema: { type: 'object', properties: { c: { type: 'number' } }, required: ['c'] } } };
  await client.chat.completions.create({ model: 'remote', messages: ask, response_format });
  expect(upstream.requests.at(-1)!.body.response_format).toEqual(response_format);
});

it('the response cache never answers with, nor stores, a tool answer; a field only the upstream reads keys the cache', async () => {
  const same: OpenAI.ChatCompletionMessageParam[] = [{ role: 'user', content: `cache and tools ${randomUUID()}` }];
  const asked = upstream.requests.length;
  const first = await client.chat.completions.create({ model: 'remote', messages: same, tools, temperature: 0 }).withResponse();
  const again = await client.chat.completions.create({ model: 'remote', messages: same, tools, temperature: 0 }).withResponse();
  expect(upstream.requests.length).toBe(asked + 2); // both asked the upstream
  expect(first.response.headers.get('x-cache')).toBeNull(); // the cache was not consulted
  expect(again.data.choices[0].message.tool_calls?.[0].id).toBe(`call_up${asked + 2}_0`); // a fresh answer, not a copy

  // The same messages without tools: the upstream's text, not the tool answer; then that text from the cache.
  const plain = await client.chat.completions.create({ model: 'remote', messages: same, temperature: 0 }).withResponse();
  expect(plain.response.headers.get('x-cache')).toBe('miss');
  expect(plain.data.choices[0].message).toMatchObject({ content: 'Hello from the upstream!' });
  expect(plain.data.choices[0].message.tool_calls).toBeUndefined();
  const hit = await client.chat.completions.create({ model: 'remote', messages: same, temperature: 0 }).withResponse();
  expect(hit.response.headers.get('x-cache')).toBe('hit');

  // A stream offering tools after all that: the calls, from the upstream.
  const streamed = await client.chat.completions.stream({ model: 'remote', messages: same, tools, temperature: 0 }).finalChatCompletion();
  expect(streamed.choices[0].message.tool_calls).toHaveLength(2);
  expect(upstream.requests.length).toBe(asked + 4);

  // A vLLM extension the gateway does not read changes the upstream's answer: not the cached one.
  const extended = await client.chat.completions
    .create({ model: 'remote', messages: same, temperature: 0, guided_choice: ['yes', 'no'] } as OpenAI.ChatCompletionCreateParamsNonStreaming)
    .withResponse();
  expect(extended.response.headers.get('x-cache')).toBe('miss');
  expect(upstream.requests.at(-1)!.body.guided_choice).toEqual(['yes', 'no']);
});

it('the output filter applies to an upstream’s tool-call arguments, non-stream and stream', async () => {
  upstream.toolArguments = '{"city": "ACME-42 HQ"}';
  const viaFilter = new OpenAI({ baseURL: `${filtered.url}/v1`, apiKey: TEST_KEY, maxRetries: 0 });
  const whole = await viaFilter.chat.completions.create({ model: 'remote', messages: ask, tools: [weather] });
  const wholeCall = whole.choices[0].message.tool_calls![0] as OpenAI.ChatCompletionMessageFunctionToolCall;
  expect(wholeCall.function.arguments).toBe('{"city": "[filtered] HQ"}');
  const streamed = await viaFilter.chat.completions.stream({ model: 'remote', messages: ask, tools: [weather] }).finalChatCompletion();
  const streamedCall = streamed.choices[0].message.tool_calls![0] as OpenAI.ChatCompletionMessageFunctionToolCall;
  expect(streamedCall.function.arguments).toBe('{"city": "[filtered] HQ"}');
  expect(streamedCall.function.name).toBe('get_weather');
});

it('an upstream refusing a tool request: its 400 is ours, naming its param; the gateway still serves', async () => {
  upstream.mode = { kind: 'error', status: 400, message: "'tools[0].function.parameters' is not a valid schema", param: 'tools[0].function.parameters' };
  const bad = await client.chat.completions.create({ model: 'remote', messages: ask, tools }).catch((e: unknown) => e);
  expect(bad).toBeInstanceOf(OpenAI.BadRequestError);
  expect((bad as InstanceType<typeof OpenAI.BadRequestError>).param).toBe('tools[0].function.parameters');
  expect((bad as InstanceType<typeof OpenAI.BadRequestError>).code).toBe('upstream_invalid_request');
  upstream.mode = { kind: 'ok' };
  expect((await client.chat.completions.create({ model: 'remote', messages: ask, tools })).choices[0].finish_reason).toBe('tool_calls');
});

it('breaker latency_ms: a call is a stream’s first output, so an answer of calls only is judged by its first fragment', async () => {
  // The first fragment comes at once, the whole answer after ~6 s (over latency_ms 3000).
  const viaLatency = new OpenAI({ baseURL: `${latencyGw.url}/v1`, apiKey: TEST_KEY, maxRetries: 0 });
  const final = await viaLatency.chat.completions.stream({ model: 'slow-remote', messages: ask, tools: [weather] }).finalChatCompletion();
  expect(final.choices[0].finish_reason).toBe('tool_calls');
  const metrics = parsePrometheus(await (await fetch(`${latencyGw.url}/metrics`)).text());
  expect(sumOf(metrics, 'llm_gateway_breaker_state', { breaker: 'upstream:slowup' })).toBe(0); // closed: not counted as slow
}, 30_000);
