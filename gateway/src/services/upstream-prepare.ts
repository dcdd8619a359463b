/**
 * The prepare step (services/chat-service.ts) for a request an external upstream answers (routing/upstream.ts): a
 * chat or one prompt of /v1/completions, checked by the same schema and parameter table as ours (so that a cache key
 * and the token estimate mean the same), but nothing is tokenized: there is no tokenizer of the upstream's model here.
 * The prompt is estimated at ~4 characters per token for the token budget; the upstream's reported usage replaces the
 * estimate when the answer is in (Admitted.finish).
 *
 * What the upstream is sent is the client's body (services/chat-service.ts passes it on), not the job below: the job
 * only sizes the estimate and keys the cache. Tools, tool_choice, parallel_tool_calls and tool messages go to the
 * upstream as the client sent them (vLLM and hosted APIs parse their model's calls themselves).
 */
import { randomBytes } from 'node:crypto';
import type { Config } from '../config';
import { ApiError } from '../errors';
import { type JobData, type JobMessage, type JobParams, PROTOCOL_VERSION } from '../protocol/job';
import type { UpstreamRoute } from '../routing/upstream';
import type { PreparedChat, RequestContext } from './chat-service';
import { COMPLETION_DEFAULT_MAX_TOKENS, type ParsedCompletion } from './completion-params';

export interface UpstreamChatInput {
  messages: JobMessage[];
  params: Omit<JobParams, 'max_tokens'>;
  requested: number | null;
  stream: boolean;
  includeUsage: boolean;
  /** The request offered tools: its answer may carry tool calls, which the response cache does not store. */
  offersTools: boolean;
}

export function prepareUpstreamChat(config: Config, ctx: RequestContext, route: UpstreamRoute, body: Record<string, unknown>, r: UpstreamChatInput): PreparedChat {
  const chars = r.messages.reduce((n, m) => n + m.content.length, 0);
  const promptTokens = Math.ceil(chars / 4) + 4 * r.messages.length;
  const p = prepared(config, ctx, route, {
    id: `chatcmpl-${randomBytes(16).toString('hex')}`,
    input: { messages: r.messages },
    params: r.params,
    maxTokens: r.requested ?? config.DEFAULT_MAX_TOKENS,
    stream: r.stream,
    includeUsage: r.includeUsage,
    promptTokens,
  });
  p.upstream = { route, endpoint: 'chat', body, stream: r.stream, promptTokensEstimate: promptTokens };
  // A cached answer is its text (JobResult choices): an upstream's structured tool calls would be lost from it.
  if (r.offersTools) p.noCache = true;
  return p;
}

/**
 * One prompt of /v1/completions (the pipeline admits each prompt of a list on its own, so a list is sent as one
 * upstream request per prompt). `echo` is rendered here from the prompt (services/completion-format.ts), so the
 * upstream is not asked to echo; `logprobs` is refused: the upstream's legacy logprobs are not read yet.
 */
export function prepareUpstreamCompletion(config: Config, ctx: RequestContext, route: UpstreamRoute, body: Record<string, unknown>, c: ParsedCompletion): PreparedChat {
  if (c.logprobs !== null) {
    throw new ApiError('unsupported_parameter', `'logprobs' is not passed to upstream models yet; the model '${c.req.model}' is served by an upstream.`, { param: 'logprobs' });
  }
  const prompt = c.prompts[0];
  const promptTokens = Math.ceil(prompt.length / 4);
  const stream = c.req.stream === true;
  const p = prepared(config, ctx, route, {
    id: `cmpl-${randomBytes(16).toString('hex')}`,
    input: { prompt },
    params: c.params,
    maxTokens: c.req.max_tokens ?? COMPLETION_DEFAULT_MAX_TOKENS,
    stream,
    includeUsage: c.req.stream_options?.include_usage === true,
    promptTokens,
  });
  const { echo: _rendered, ...sent } = body;
  p.upstream = { route, endpoint: 'completion', body: { ...sent, prompt }, stream, promptTokensEstimate: promptTokens };
  return p;
}

interface Prepared {
  id: string;
  input: { messages: JobMessage[] } | { prompt: string };
  params: Omit<JobParams, 'max_tokens'>;
  /** Only sizes the estimate: the upstream gets the client's own max_tokens (none: its default). */
  maxTokens: number;
  stream: boolean;
  includeUsage: boolean;
  promptTokens: number;
}

function prepared(config: Config, ctx: RequestContext, route: UpstreamRoute, r: Prepared): PreparedChat {
  const now = Date.now();
  const data: JobData = {
    v: PROTOCOL_VERSION,
    request_id: ctx.requestId,
    model: route.publicName,
    ...r.input,
    params: { ...r.params, max_tokens: r.maxTokens },
    stream: r.stream,
    prompt_tokens: r.promptTokens,
    enqueued_at_ms: now,
    deadline_ms: now + config.REQUEST_TIMEOUT_MS,
  };
  const accepted = { jobId: r.id, model: route.publicName, upstream: route.upstream.name, stream: r.stream, promptTokensEstimate: r.promptTokens };
  setImmediate(() => ctx.log.info('chat request accepted', { ...accepted, ...(config.LOG_PROMPTS ? r.input : {}) }));
  return {
    meta: { id: r.id, created: Math.floor(now / 1000), model: route.publicName },
    data,
    stream: r.stream,
    includeUsage: r.includeUsage,
    wantLogprobs: r.params.logprobs,
    slots: null,
    promptParam: 'messages' in r.input ? 'messages' : 'prompt',
    parseToolCalls: false,
  };
}
