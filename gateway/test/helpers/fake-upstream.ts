/**
 * A small OpenAI-compatible server on loopback (node:http), the external upstream of the routing tests: what a vLLM
 * or hosted API looks like from the gateway. It is a real HTTP server speaking the real protocol (chat.completion and
 * chat.completion.chunk over SSE with real chunk timing, usage when asked, OpenAI error bodies), not a mock of our
 * code: the gateway's fetch, SSE parsing and aborts all run for real against it. It records each request (body,
 * headers) and whether its client (the gateway) went away before the answer ended.
 */
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';

export type UpstreamMode =
  /** Answers: `words` as text, one chunk per word when streaming. */
  | { kind: 'ok' }
  /** Answers this status with an OpenAI error body. */
  | { kind: 'error'; status: number; message?: string; param?: string }
  /** Accepts the request and never answers. */
  | { kind: 'hang' };

export interface RecordedRequest {
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
    if (req.method !== 'POST' || req.url !== '/v1/chat/completions') {
      res.writeHead(404, { 'content-type': 'application/json' }).end(JSON.stringify({ error: { message: 'no such route', type: 'invalid_request_error', param: null, code: null } }));
      return;
    }
    const body = JSON.parse(raw) as Record<string, unknown>;
    const rec: RecordedRequest = { body, headers: req.headers, aborted: false, finished: false };
    this.requests.push(rec);
    res.on('close', () => {
      if (!res.writableFinished) rec.aborted = true;
    });
    const mode = this.mode;
    if (mode.kind === 'hang') return;
    if (mode.kind === 'error') {
      const error = { message: mode.message ?? `upstream failure ${mode.status}`, type: mode.status < 500 ? 'invalid_request_error' : 'server_error', param: mode.param ?? null, code: null };
      res.writeHead(mode.status, { 'content-type': 'application/json' }).end(JSON.stringify({ error }));
      rec.finished = true;
      return;
    }
    const model = String(body.model);
    const text = this.words.join('');
    const usage = { prompt_tokens: 11, completion_tokens: this.words.length, total_tokens: 11 + this.words.length };
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
    const pause = () => new Promise((r) => setTimeout(r, this.chunkDelayMs));
    send(chunk({ role: 'assistant', content: '' }));
    for (const [i, word] of this.words.entries()) {
      if (res.destroyed) return;
      if (i === this.words.length - 1 && this.holdBeforeLast) await this.holdBeforeLast;
      await pause();
      if (res.destroyed) return;
      send(chunk({ content: word }));
    }
    send(chunk({}, 'stop'));
    const options = body.stream_options as { include_usage?: boolean } | undefined;
    if (options?.include_usage) send({ ...base, object: 'chat.completion.chunk', choices: [], usage });
    res.end('data: [DONE]\n\n');
    rec.finished = true;
  }
}
