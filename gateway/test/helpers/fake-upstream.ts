/**
 * A small OpenAI-compatible server on loopback (node:http), the external upstream of the routing tests: what a vLLM
 * or hosted API looks like from the gateway (an external service cannot exist in a test here, so one is stood up). It
 * is a real HTTP server speaking the real protocol (chat.completion and chat.completion.chunk over SSE with real chunk
 * timing, tool calls as OpenAI streams them, text_completion on /v1/completions, usage when asked, OpenAI error
 * bodies), not a mock of our code: the gateway's fetch, SSE parsing and aborts all run for real against it. It records
 * each request (path, body, headers) and whether its client (the gateway) went away before the answer ended.
 *
 * Tools: a chat request offering tools whose last message is not a tool result is answered with calls (one per tool,
 * at most two, or only the first when parallel_tool_calls is false), arguments `toolArguments`, streamed in three
 * pieces; once the last message is a tool result, the answer is text quoting it ("The tool said: …"), as a model
 * would answer after its call.
 */
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';

export type UpstreamMode =
  /** Answers: `words` as text, one chunk per word when streaming. */
  | { kind: 'ok' }
  /** Answers this status with an OpenAI error body. */
  | { kind: 'error'; status: number; message?: string; param?: string }
  /** Accepts the request and never answers. */
  | { kind: 'hang' }
  /** Answers 200 with an HTML page (a proxy's), not a completion. */
  | { kind: 'garbage' };

export interface RecordedRequest {
  /** /v1/chat/completions or /v1/completions. */
  path: string;
  body: Record<string, unknown>;
  headers: IncomingMessage['headers'];
  /** The gateway closed the connection before the answer ended. */
  aborted: boolean;
  /** The answer was written to its end. */
  finished: boolean;
}

export class FakeUpstream {
  mode: UpstreamMode = { kind: 'ok' };
  words = ['Hello', ' from', ' the', ' upstream', '!'];
  /** Pause between two chunks of a stream (the upstream's pace). */
  chunkDelayMs = 5;
  /** When set, a stream holds before its last content chunk until this settles: the test decides when it ends. */
  holdBeforeLast: Promise<unknown> | null = null;
  /** The arguments of the calls it makes when offered tools (a JSON text). */
  toolArguments = '{"city": "Paris", "unit": "celsius"}';
  readonly requests: RecordedRequest[] = [];
  private server: Server | null = null;
  url = '';

  async start(): Promise<void> {
    this.server = createServer((req, res) => void this.handle(req, res));
    await new Promise<void>((resolve) => this.server!.listen(0, '127.0.0.1', resolve));
    const { port } = this.server.address() as AddressInfo;
    this.url = `http://127.0.0.1:${port}/v1`;
  }

  async close(): Promise<void> {
    this.server?.closeAllConnections();
    await new Promise<void>((r) => (this.server ? this.server.close(() => r()) : r()));
  }

  private async handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    let raw = '';
    for await (const chunk of req) raw += chunk;
    if (req.method !== 'POST' || (req.url !== '/v1/chat/completions' && req.url !== '/v1/completions')) {
      res.writeHead(404, { 'content-type': 'application/json' }).end(JSON.stringify({ error: { message: 'no such route', type: 'invalid_request_error', param: null, code: null } }));
      return;
    }
    const body = JSON.parse(raw) as Record<string, unknown>;
    const rec: RecordedRequest = { path: req.url, body, headers: req.headers, aborted: false, finished: false };
    this.requests.push(rec);
    res.on('close', () => {
      if (!res.writableFinished) rec.aborted = true;
    });
    const mode = this.mode;
    if (mode.kind === 'hang') return;
    if (mode.kind === 'garbage') {
      res.writeHead(200, { 'content-type': 'text/html' }).end('<html><body>502 Bad Gateway</body></html>');
      rec.finished = true;
      return;
    }
    if (mode.kind === 'error') {
      const error = { message: mode.message ?? `upstream failure ${mode.status}`, type: mode.status < 500 ? 'invalid_request_error' : 'server_error', param: mode.param ?? null, code: null };
      res.writeHead(mode.status, { 'content-type': 'application/json' }).end(JSON.stringify({ error }));
      rec.finished = true;
      return;
    }
    if (req.url === '/v1/completions') return this.completion(body, res, rec);
    const calls = toolCallsFor(body, this.toolArguments, this.requests.length);
    if (calls) return this.toolCalls(body, calls, res, rec);
    const model = String(body.model);
    const messages = Array.isArray(body.messages) ? (body.messages as Array<{ role?: string; content?: unknown }>) : [];
    const last = messages.at(-1);
    const words = last?.role === 'tool' ? ['The tool said: ', String(last.content)] : this.words;
    const text = words.join('');
    const usage = { prompt_tokens: 11, completion_tokens: words.length, total_tokens: 11 + words.length };
    const base = { id: 'chatcmpl-upstream', created: Math.floor(Date.now() / 1000), model };
    if (body.stream !== true) {
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ ...base, object: 'chat.completion', choices: [{ index: 0, message: { role: 'assistant', content: text }, finish_reason: 'stop', logprobs: null }], usage }));
      rec.finished = true;
      return;
    }
    res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache' });
    const send = (payload: unknown) => res.write(`data: ${JSON.stringify(payload)}\n\n`);
    const chunk = (delta: Record<string, unknown>, finish: string | null = null) => ({ ...base, object: 'chat.completion.chunk', choices: [{ index: 0, delta, finish_reason: finish, logprobs: null }] });
    send(chunk({ role: 'assistant', content: '' }));
    for (const [i, word] of words.entries()) {
      if (res.destroyed) return;
      if (i === words.length - 1 && this.holdBeforeLast) await this.holdBeforeLast;
      await this.pause();
      if (res.destroyed) return;
      send(chunk({ content: word }));
    }
    send(chunk({}, 'stop'));
    this.end(body, res, rec, { ...base, object: 'chat.completion.chunk', choices: [], usage });
  }

  private pause(): Promise<void> {
    return new Promise((r) => setTimeout(r, this.chunkDelayMs));
  }

  /** The usage chunk when asked for, [DONE], and the request marked finished. */
  private end(body: Record<string, unknown>, res: ServerResponse, rec: RecordedRequest, usageChunk: unknown): void {
    const options = body.stream_options as { include_usage?: boolean } | undefined;
    if (options?.include_usage) res.write(`data: ${JSON.stringify(usageChunk)}\n\n`);
    res.end('data: [DONE]\n\n');
    rec.finished = true;
  }

  /** Tool calls, as OpenAI sends them: whole in the message, or streamed (id, type and name first, then arguments in pieces). */
  private async toolCalls(body: Record<string, unknown>, calls: UpstreamToolCall[], res: ServerResponse, rec: RecordedRequest): Promise<void> {
    const base = { id: 'chatcmpl-upstream-tools', created: Math.floor(Date.now() / 1000), model: String(body.model) };
    const usage = { prompt_tokens: 40, completion_tokens: 9 * calls.length, total_tokens: 40 + 9 * calls.length };
    if (body.stream !== true) {
      const message = { role: 'assistant', content: null, refusal: null, tool_calls: calls };
      res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ ...base, object: 'chat.completion', choices: [{ index: 0, message, finish_reason: 'tool_calls', logprobs: null }], usage }));
      rec.finished = true;
      return;
    }
    res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache' });
    const chunk = (delta: Record<string, unknown>, finish: string | null = null) => ({ ...base, object: 'chat.completion.chunk', choices: [{ index: 0, delta, finish_reason: finish, logprobs: null }] });
    const send = (payload: unknown) => res.write(`data: ${JSON.stringify(payload)}\n\n`);
    for (const [i, fragment] of streamedFragments(calls).entries()) {
      if (i > 0) await this.pause();
      if (res.destroyed) return;
      send(chunk(i === 0 ? { role: 'assistant', content: null, tool_calls: [fragment] } : { tool_calls: [fragment] }));
    }
    send(chunk({}, 'tool_calls'));
    this.end(body, res, rec, { ...base, object: 'chat.completion.chunk', choices: [], usage });
  }

  /** /v1/completions: `n` choices of `words` then " (<prompt>)", streamed one piece per chunk. */
  private async completion(body: Record<string, unknown>, res: ServerResponse, rec: RecordedRequest): Promise<void> {
    const pieces = [...this.words, ` (${String(body.prompt)})`];
    const n = typeof body.n === 'number' ? body.n : 1;
    const usage = { prompt_tokens: 7, completion_tokens: pieces.length * n, total_tokens: 7 + pieces.length * n };
    const base = { id: 'cmpl-upstream', object: 'text_completion', created: Math.floor(Date.now() / 1000), model: String(body.model) };
    const choices = (f: (i: number) => Record<string, unknown>) => Array.from({ length: n }, (_, i) => ({ index: i, logprobs: null, ...f(i) }));
    if (body.stream !== true) {
      res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ ...base, choices: choices(() => ({ text: pieces.join(''), finish_reason: 'stop' })), usage }));
      rec.finished = true;
      return;
    }
    res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache' });
    const send = (payload: unknown) => res.write(`data: ${JSON.stringify(payload)}\n\n`);
    for (const piece of pieces) {
      await this.pause();
      if (res.destroyed) return;
      send({ ...base, choices: choices(() => ({ text: piece, finish_reason: null })) });
    }
    send({ ...base, choices: choices(() => ({ text: '', finish_reason: 'stop' })) });
    this.end(body, res, rec, { ...base, choices: [], usage });
  }
}

export interface UpstreamToolCall {
  id: string;
  type: 'function';
  function: { name: string; arguments: string };
}

/** The calls a chat request gets (see the header), or null when it is answered with text. */
function toolCallsFor(body: Record<string, unknown>, args: string, nth: number): UpstreamToolCall[] | null {
  const tools = Array.isArray(body.tools) ? (body.tools as Array<{ function?: { name?: string } }>) : [];
  const messages = Array.isArray(body.messages) ? (body.messages as Array<{ role?: string }>) : [];
  if (tools.length === 0 || body.tool_choice === 'none' || messages.at(-1)?.role === 'tool') return null;
  const called = body.parallel_tool_calls === false ? tools.slice(0, 1) : tools.slice(0, 2);
  return called.map((t, i) => ({ id: `call_up${nth}_${i}`, type: 'function', function: { name: String(t.function?.name), arguments: args } }));
}

/** The `delta.tool_calls` entries a stream of these calls carries, one per chunk, in order (OpenAI's shapes). */
export function streamedFragments(calls: UpstreamToolCall[]): Array<Record<string, unknown>> {
  return calls.flatMap((call, index) => [
    { index, id: call.id, type: 'function', function: { name: call.function.name, arguments: '' } },
    ...thirds(call.function.arguments).map((piece) => ({ index, function: { arguments: piece } })),
  ]);
}

/** A text in three pieces (a call's arguments as a model streams them). */
function thirds(text: string): string[] {
  const a = Math.ceil(text.length / 3);
  return [text.slice(0, a), text.slice(a, 2 * a), text.slice(2 * a)].filter((p) => p.length > 0);
}
