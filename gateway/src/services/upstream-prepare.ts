/**
 * The prepare step (services/chat-service.ts) for a request an external upstream answers (routing/upstream.ts): a
 * chat or one prompt of /v1/completions, checked by the same schema and parameter table as ours (so that the token
 * estimate and a cache key mean the same), but nothing is tokenized: there is no tokenizer of the upstream's model
 * here. The prompt is estimated at ~4 characters per token for the token budget; the upstream's reported usage
 * replaces the estimate when the answer is in (Admitted.finish).
 *
 * What the upstream is sent is the client's body, not the job below: the job only sizes the estimate and, with the
 * rest of the body (`cacheExtra`), keys the cache. Tools, tool_choice, parallel_tool_calls, response_format, tool
 * messages and fields OpenAI does not define go to the upstream as the client sent them: vLLM and hosted APIs render
 * their model's tools and parse its calls themselves, so none of gateway/src/tools/ (our workers' prompt, grammar and
 * parser) applies, and the upstream, not our grammar compiler, judges a tool's schema.
 */
import { randomBytes } from 'node:crypto';
import type { Config } from '../config';
import { ApiError } from '../errors';
import type { ChatCompletionRequest } from '../protocol/chat';
import { type JobData, type JobMessage, type JobParams, PROTOCOL_VERSION } from '../protocol/job';
import type { UpstreamRoute } from '../routing/upstream';
import { normaliseMessages, requestedMaxTokens, toJobParams } from './chat-params';
import type { PreparedChat, RequestContext } from './prepared';
import { COMPLETION_DEFAULT_MAX_TOKENS, type ParsedCompletion } from './completion-params';

type Body = Record<string, unknown>;

export function prepareUpstreamChat(config: Config, ctx: RequestContext, route: UpstreamRoute, body: Body, req: ChatCompletionRequest): PreparedChat {
  // No tools plan (tools/plan.ts): it builds our workers' grammar and prompt listing, which the upstream has no use for.
  const params = toJobParams(req);
  const messages = normaliseMessages(req.messages);
  const chars = messages.reduce((n, m) => n + m.content.length, 0) + (req.tools ? JSON.stringify(req.tools).length : 0);
  const promptTokens = Math.ceil(chars / 4) + 4 * messages.length;
  const stream = req.stream === true;
  const p = prepared(config, ctx, route, {
    id: `chatcmpl-${randomBytes(16).toString('hex')}`,
    input: { messages },
    params,
    maxTokens: requestedMaxTokens(req) ?? config.DEFAULT_MAX_TOKENS,
    stream,
    includeUsage: req.stream_options?.include_usage === true,
    promptTokens,
  });
  p.upstream = { route, endpoint: 'chat', body, stream, promptTokensEstimate: promptTokens };
  p.cacheExtra = sentBeyondJob(body, ['messages']);
  // A request offering tools is neither answered from the response cache nor stored in it:
  //  - the cache holds text per choice (a JobResult); a cached answer is replayed, streamed or resumed, as text
  //    deltas (services/chat-pipeline.ts streamPart, resume/stream-record.ts), so structured tool calls would come
  //    back as an empty message with finish_reason "tool_calls";
  //  - an agent executes the calls it gets: a repeated answer repeats the call ids of another conversation, and a
  //    hit is rare anyway, since every turn of an agent loop adds the previous call's result to the messages.
  if ((req.tools?.length ?? 0) > 0) p.noCache = true;
  return p;
}

/**
 * One prompt of /v1/completions (the pipeline admits each prompt of a list on its own, so a list is sent as one
 * upstream request per prompt, its choices indexed prompt-major as ours). `echo` is rendered here from the prompt
 * (services/completion-format.ts), so the upstream is not asked to echo; `logprobs` is refused: the legacy logprobs
 * an upstream sends (and their echoed prompt's tokens) are not read into our renderer.
 */
export function prepareUpstreamCompletion(config: Config, ctx: RequestContext, route: UpstreamRoute, body: Body, c: ParsedCompletion): PreparedChat {
  if (c.logprobs !== null) {
    throw new ApiError('unsupported_parameter', `'logprobs' is not supported for the model '${c.req.model}', which is served by an upstream: leave it out.`, { param: 'logprobs' });
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
  const { echo: _renderedHere, ...sent } = body;
  p.upstream = { route, endpoint: 'completion', body: { ...sent, prompt }, stream, promptTokensEstimate: promptTokens };
  p.cacheExtra = sentBeyondJob(sent, ['prompt']);
  return p;
}

/**
 * What the upstream is sent besides the job's input: the cache key includes it, since any field of the body may
 * change the upstream's answer (a vLLM extension such as `guided_choice`, `chat_template_kwargs`), while the job's
 * params hold only the fields our workers read. `stream` is left out (a hit is served either way), `model` too (the
 * key has it).
 */
function sentBeyondJob(body: Body, input: string[]): Body {
  const skip = new Set(['model', 'stream', 'stream_options', ...input]);
  return Object.fromEntries(Object.entries(body).filter(([k]) => !skip.has(k)));
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
  ctx.stamps?.mark('prepared');
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
