/**
 * The upstream source (routing/table.ts): a chat (POST {base}/chat/completions) or one prompt of a legacy completion
 * (POST {base}/completions) answered by an external OpenAI-compatible server (vLLM, TGI, a hosted API) instead of a
 * job. It is one more source of the same result type as a job or a cached answer (STYLE.md habit 9): its deltas go
 * to the same hooks as a worker's, so the same renderers, output filter, usage accounting, cache and metrics apply,
 * and the response's `model` is ours (the public name), not the upstream's. A chat's tool calls come structured from
 * the upstream and are carried through as such (routing/upstream-tools.ts).
 *
 * Why not http-proxy-middleware: it pipes the upstream's bytes to the client, and rewriting them needs its
 * responseInterceptor, which hands over the whole body as one Buffer once the upstream has finished, i.e. no streaming.
 * We must read each event anyway (usage for the token budget, the usage chunk dropped when the client did not ask for
 * it, the `model` field, in-stream errors), so the request is made with Node's fetch (undici) and the stream read
 * event by event: each delta reaches the client as soon as it is parsed, nothing waits for the end.
 *
 * A client that goes away aborts the upstream request (ctx.signal → fetch's signal: the connection is closed).
 * `timeout_ms` bounds the wait for the response headers and then for each next chunk.
 */
import { ApiError } from '../errors';
import type { ToolCallDelta } from '../protocol/chat';
import type { JobResult, TokenLogprob } from '../protocol/job';
import type { RunOutcome } from '../queue/job-run';
import type { Logger } from '../logger';
import type { Route } from './table';
import { IdleTimeout, isObject, type Json, sseData } from './upstream-io';
import { messageToolCalls, ToolCallJoiner, toolCallDelta } from './upstream-tools';

/** What a run needs of its request (services/chat-service.ts RequestContext; not imported: the service imports us). */
export interface UpstreamContext {
  requestId: string;
  log: Logger;
  /** The client's leaving aborts it: the upstream request is aborted with it. */
  signal: AbortSignal;
}

/** The run hooks of services/chat-service.ts that an upstream's answer calls. */
export interface UpstreamHooks {
  onDelta?(index: number, text: string, logprobs: TokenLogprob[] | null, seq: number): void;
  /** A fragment of a streamed tool call, as the upstream sent it (routing/upstream-tools.ts). */
  onToolCall?(index: number, call: ToolCallDelta, seq: number): void;
  /** The upstream answered 200: a stream's headers may go out. */
  onEnqueued?(): void;
}

/** Which of the upstream's endpoints answers: POST {baseUrl}/chat/completions or POST {baseUrl}/completions. */
export type UpstreamEndpoint = 'chat' | 'completion';

export type UpstreamRoute = Extract<Route, { kind: 'upstream' }>;

export interface UpstreamRequest {
  route: UpstreamRoute;
  endpoint: UpstreamEndpoint;
  /** The client's request body as validated (unknown fields included): sent on with `model` rewritten. */
  body: Record<string, unknown>;
  stream: boolean;
  /** Our estimate of the prompt's tokens: the usage reported when the upstream reports none. */
  promptTokensEstimate: number;
}

interface Choice {
  text: string;
  finish: string | null;
  logprobs: TokenLogprob[] | null;
  /** The upstream's tool calls (chat only), joined from a stream's fragments. */
  tools: ToolCallJoiner | null;
}


/** Runs one request against its upstream; resolves as a job's run does (its result, nothing left to render). */
export async function runUpstream(u: UpstreamRequest, ctx: UpstreamContext, hooks: UpstreamHooks = {}): Promise<RunOutcome> {
  const { upstream } = u.route;
  const body: Json = { ...u.body, model: u.route.upstreamModel, stream: u.stream };
  // Usage is what the token budget is charged: always asked for; the renderer shows it only when the client asked.
  if (u.stream) body.stream_options = { ...(isObject(u.body.stream_options) ? u.body.stream_options : {}), include_usage: true };
  const idle = new IdleTimeout(upstream.timeoutMs);
  const signal = AbortSignal.any([ctx.signal, idle.signal]);
  const fail = (err: unknown): never => {
    throw upstreamFailure(err, ctx.signal, idle, upstream.name);
  };
  try {
    const path = u.endpoint === 'chat' ? 'chat/completions' : 'completions';
    const resp = await fetch(`${upstream.baseUrl}/${path}`, {
      method: 'POST',
      headers: {
        'content-type': 'application/json',
        accept: u.stream ? 'text/event-stream' : 'application/json',
        'x-request-id': ctx.requestId,
        ...(upstream.apiKey ? { authorization: `Bearer ${upstream.apiKey}` } : {}),
      },
      body: JSON.stringify(body),
      signal,
    }).catch(fail);
    idle.touch();
    if (!resp.ok) throw await refusal(resp, upstream.name);
    hooks.onEnqueued?.();
    const choices = new Map<number, Choice>();
    let usage: JobResult['usage'] | null = null;
    let seq = 0;
    if (!u.stream) {
      // Read, then parsed: a connection lost mid-body is the upstream unreachable, a body that is not JSON its error.
      const text = await resp.text().catch(fail);
      let json: unknown;
      try {
        json = JSON.parse(text);
      } catch {
        throw new ApiError('upstream_error', `The upstream '${upstream.name}' answered 200 with a body that is not JSON.`);
      }
      usage = readBody(json, choices, u.endpoint);
    } else {
      for await (const data of sseData(resp.body!, () => idle.touch())) {
        if (data === '[DONE]') break;
        let event: unknown;
        try {
          event = JSON.parse(data);
        } catch {
          throw new ApiError('upstream_error', `The upstream '${upstream.name}' sent an event that is not JSON.`);
        }
        if (isObject(event) && isObject(event.error)) throw inStreamError(event.error, upstream.name);
        seq += 1;
        const on: ChunkHooks = {
          delta: (index, text, lp) => hooks.onDelta?.(index, text, lp, seq),
          toolCall: (index, call) => hooks.onToolCall?.(index, call, seq),
        };
        usage = readChunk(event, choices, u.endpoint, on) ?? usage;
      }
    }
    const result: JobResult = {
      choices: [...choices.entries()].map(([index, c]) => {
        const calls = c.tools?.joined() ?? [];
        // A result choice is a loose object: the calls ride on it to the renderer (services/chat-format.ts).
        return { index, text: c.text, finish_reason: c.finish ?? (calls.length > 0 ? 'tool_calls' : 'stop'), logprobs: c.logprobs, ...(calls.length > 0 ? { tool_calls: calls } : {}) };
      }),
      usage: usage ?? estimatedUsage(u, choices),
    };
    if (!usage) ctx.log.warn('upstream reported no usage: estimated from characters', { upstream: upstream.name });
    return { result, rest: [], seq: seq + 1 };
  } catch (err) {
    return fail(err);
  } finally {
    idle.clear();
  }
}

const choiceOf = (choices: Map<number, Choice>, index: number): Choice => {
  let c = choices.get(index);
  if (!c) choices.set(index, (c = { text: '', finish: null, logprobs: null, tools: null }));
  return c;
};

const tokenLogprobs = (lp: unknown): TokenLogprob[] | null =>
  isObject(lp) && Array.isArray(lp.content) ? (lp.content as TokenLogprob[]) : null;

interface ChunkHooks {
  delta(index: number, text: string, lp: TokenLogprob[] | null): void;
  toolCall(index: number, call: ToolCallDelta): void;
}

/**
 * One chat.completion.chunk (or text_completion chunk): its deltas to `on.delta` (an empty one opens its choice), its
 * tool-call fragments to `on.toolCall` as they came, its usage when it has one. A legacy completion's logprobs are
 * not read: the gateway refuses `logprobs` for upstream completions (services/upstream-prepare.ts).
 */
function readChunk(event: unknown, choices: Map<number, Choice>, endpoint: UpstreamEndpoint, on: ChunkHooks): JobResult['usage'] | null {
  if (!isObject(event)) return null;
  for (const raw of Array.isArray(event.choices) ? event.choices : []) {
    if (!isObject(raw)) continue;
    const index = typeof raw.index === 'number' ? raw.index : 0;
    const c = choiceOf(choices, index);
    const delta = endpoint === 'chat' ? (isObject(raw.delta) ? raw.delta : {}) : { content: raw.text };
    const text = typeof delta.content === 'string' ? delta.content : '';
    const lp = endpoint === 'chat' ? tokenLogprobs(raw.logprobs) : null;
    c.text += text;
    if (lp) c.logprobs = [...(c.logprobs ?? []), ...lp];
    on.delta(index, text, lp);
    for (const [at, rawCall] of (Array.isArray(delta.tool_calls) ? delta.tool_calls : []).entries()) {
      const call = toolCallDelta(rawCall, at);
      if (!call) continue;
      (c.tools ??= new ToolCallJoiner()).add(call);
      on.toolCall(index, call);
    }
    if (typeof raw.finish_reason === 'string') c.finish = raw.finish_reason;
  }
  return usageOf(event.usage);
}

/** A whole chat.completion (its messages' text and tool calls) or text_completion: its choices, and its usage. */
function readBody(json: unknown, choices: Map<number, Choice>, endpoint: UpstreamEndpoint): JobResult['usage'] | null {
  if (!isObject(json) || !Array.isArray(json.choices)) {
    throw new ApiError('upstream_error', `The upstream answered with a body that is not a ${endpoint === 'chat' ? 'chat completion' : 'completion'}.`);
  }
  for (const raw of json.choices) {
    if (!isObject(raw)) continue;
    const c = choiceOf(choices, typeof raw.index === 'number' ? raw.index : 0);
    c.finish = typeof raw.finish_reason === 'string' ? raw.finish_reason : null;
    if (endpoint === 'completion') {
      c.text = typeof raw.text === 'string' ? raw.text : '';
      continue;
    }
    const message = isObject(raw.message) ? raw.message : {};
    c.text = typeof message.content === 'string' ? message.content : '';
    c.logprobs = tokenLogprobs(raw.logprobs);
    const calls = messageToolCalls(message.tool_calls);
    if (calls.length > 0) {
      c.tools = new ToolCallJoiner();
      calls.forEach((call, i) => c.tools!.add({ index: i, id: call.id, type: 'function', function: call.function }));
    }
  }
  return usageOf(json.usage);
}

function usageOf(u: unknown): JobResult['usage'] | null {
  if (!isObject(u)) return null;
  const int = (v: unknown) => (typeof v === 'number' && Number.isInteger(v) && v >= 0 ? v : null);
  const prompt = int(u.prompt_tokens);
  const completion = int(u.completion_tokens);
  return prompt === null || completion === null ? null : { prompt_tokens: prompt, completion_tokens: completion };
}

/** An upstream that reports no usage is still charged: our prompt estimate, and ~4 characters per generated token. */
function estimatedUsage(u: UpstreamRequest, choices: Map<number, Choice>): JobResult['usage'] {
  let chars = 0;
  for (const c of choices.values()) chars += c.text.length + (c.tools?.joined() ?? []).reduce((n, t) => n + t.function.name.length + t.function.arguments.length, 0);
  return { prompt_tokens: u.promptTokensEstimate, completion_tokens: Math.ceil(chars / 4) };
}

/** The upstream's error answer in our error shape, with its status where the status is about the request. */
async function refusal(resp: Response, name: string): Promise<ApiError> {
  const text = await resp.text().catch(() => '');
  let message = `The upstream '${name}' answered ${resp.status}.`;
  let param: string | null = null;
  try {
    const body = JSON.parse(text) as unknown;
    const e = isObject(body) && isObject(body.error) ? body.error : isObject(body) ? body : null;
    if (e && typeof e.message === 'string') message = `The upstream '${name}' answered ${resp.status}: ${e.message}`;
    if (e && typeof e.param === 'string') param = e.param;
  } catch {
    // not JSON: the status says enough (the body may be an HTML error page of a proxy)
  }
  const s = resp.status;
  const retryAfterMs = retryAfter(resp.headers);
  if (s === 429) return new ApiError('upstream_rate_limited', message, { retryAfterMs: retryAfterMs ?? 1000 });
  // 401/403: the upstream refused *our* credential: a fault of this server's configuration, not of the client's key.
  if (s === 401 || s === 403) return new ApiError('upstream_error', `The upstream '${name}' refused this server's credential (${s}).`);
  if (s >= 400 && s < 500) return new ApiError('upstream_invalid_request', message, { param, status: s });
  if (s === 503 || s === 504) return new ApiError(s === 503 ? 'upstream_unavailable' : 'upstream_timeout', message, { retryAfterMs: retryAfterMs ?? 1000 });
  return new ApiError('upstream_error', message);
}

function retryAfter(h: Headers): number | undefined {
  const ms = Number(h.get('retry-after-ms'));
  if (Number.isFinite(ms) && ms > 0) return ms;
  const s = Number(h.get('retry-after'));
  return Number.isFinite(s) && s > 0 ? s * 1000 : undefined;
}

function inStreamError(e: Json, name: string): ApiError {
  return new ApiError('upstream_error', `The upstream '${name}' failed mid-stream: ${typeof e.message === 'string' ? e.message : 'no message'}`);
}

/** Any failure of the exchange as the client reads it: its own leaving, our timeout, the upstream unreachable. */
function upstreamFailure(err: unknown, client: AbortSignal, idle: IdleTimeout, name: string): ApiError {
  if (err instanceof ApiError) return err;
  if (client.aborted) return new ApiError('cancelled', 'The client closed the request.', { cause: err });
  if (idle.fired) return new ApiError('upstream_timeout', `The upstream '${name}' did not answer within ${idle.ms} ms.`, { retryAfterMs: 1000, cause: err });
  return new ApiError('upstream_unavailable', `The upstream '${name}' could not be reached.`, { retryAfterMs: 1000, cause: err });
}
