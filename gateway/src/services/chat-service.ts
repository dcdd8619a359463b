/**
 * Two steps of the request path (services/chat-pipeline.ts drives them): `prepare` (a chat) and `prepareCompletion`
 * (one raw prompt of /v1/completions) parse a request and do everything that can fail before a job exists
 * (validation, live model, prompt tokens, context, KV budget), so those errors are plain HTTP statuses; `run` is the
 * source step for a request the cache did not answer (the job), `attach` the source of a resumed stream (following a
 * job another request started).
 *
 * A resumable run (a /v1 stream) asks the worker to store its events and holds a lease on the job while its client
 * is connected (resume/attachments.ts); when the client goes, the job is cancelled only after RESUME_GRACE_MS, and not
 * at all if a client has resumed the stream by then. Any other run is cancelled at once when its client goes.
 */
import { randomBytes } from 'node:crypto';
import type Redis from 'ioredis';
import type { Config } from '../config';
import { ApiError, toApiError } from '../errors';
import type { Logger } from '../logger';
import { chatCompletionRequestSchema, KNOWN_REQUEST_FIELDS, type ToolCallDelta } from '../protocol/chat';
import { KNOWN_COMPLETION_FIELDS } from '../protocol/completions';
import { eventsKey, type JobData, type JobMessage, type JobParams, PROTOCOL_VERSION, type TokenLogprob, tokenizerKey } from '../protocol/job';
import type { JobEventBus } from '../queue/job-events';
import type { JobQueues } from '../queue/job-queue';
import { JobRun, type RunDeps, type RunOutcome } from '../queue/job-run';
import { isReady } from '../queue/redis';
import type { StreamAttachments } from '../resume/attachments';
import { isTargetFailure } from '../routing/breaker';
import type { RoutingTable } from '../routing/table';
import { runUpstream } from '../routing/upstream';
import { storedEventsMaxBytes } from '../resume/stream-record';
import { requestedMaxTokens, toChatJob } from './chat-params';
import { COMPLETION_DEFAULT_MAX_TOKENS, parseCompletion } from './completion-params';
import type { PreparedChat, RequestContext } from './prepared';
import type { TokenizerCache } from './tokenizer';
import { prepareUpstreamChat, prepareUpstreamCompletion } from './upstream-prepare';
import { parseOrThrow } from './validation';
import type { ModelView, WorkerRegistry } from './worker-registry';

// The prepared request's types live apart so that services/upstream-prepare.ts can build one without importing us.
export type { PreparedChat, RequestContext } from './prepared';

export interface RunHooks {
  /** `seq`: the worker event that carried the text (a stream's event ids name it). */
  onDelta?(index: number, text: string, logprobs: TokenLogprob[] | null, seq: number): void;
  /** A fragment of an upstream's streamed tool call (routing/upstream-tools.ts); our workers' calls are parsed from text. */
  onToolCall?(index: number, call: ToolCallDelta, seq: number): void;
  onStarted?(workerId: string): void;
  /** The job is queued (run), or the resumed job's stored events are replayed (attach): the stream may open. */
  onEnqueued?(): void;
}

/** A job another request started, as a resumed stream follows it (from its stream record). */
export interface AttachTarget {
  jobId: string;
  model: string;
  deadline_ms: number | null;
  start_deadline_ms?: number | null;
}

/** A parsed request of either endpoint, as the shared preparation takes it. */
interface PromptRequest {
  /** The queue (the workers' model id), and the name the client asked for (the response's `model`). */
  model: string;
  publicName: string;
  /** The pool is an entry of the routing table: with no live worker it is unavailable (503), not unknown (404). */
  routed?: boolean;
  /** A chat (rendered with the model's template) or a raw prompt (sent as is): the job carries one of the two. */
  input: { messages: JobMessage[] } | { prompt: string };
  params: Omit<JobParams, 'max_tokens'>;
  /** max_tokens as asked (null: none asked), and the endpoint's default for that case. */
  requested: number | null;
  defaultMaxTokens: number;
  stream: boolean;
  includeUsage: boolean;
  /** The request offered tools: the answer is read for tool calls (tools/parser.ts). */
  parseToolCalls?: boolean;
}

export interface ChatServiceDeps {
  config: Config;
  redis: Redis;
  registry: WorkerRegistry;
  tokenizers: TokenizerCache;
  queues: JobQueues;
  bus: JobEventBus;
  attachments: StreamAttachments;
  /** Which source serves each public model name (routing/table.ts). */
  routing: RoutingTable;
  logger: Logger;
}

/**
 * Every choice of a request runs on one worker, each holding prompt + max_tokens of KV cache: a request whose
 * n × (prompt + max_tokens) exceeds the workers' KV budget could never be admitted there (issue 11: n=128 × 6.6k tokens
 * grew a worker to 22 GB until it was killed), so it is refused before a job exists. A max_tokens the caller did not
 * ask for is lowered to fit instead.
 */
export function fitKvBudget(model: ModelView, n: number, promptTokens: number, requested: number | null, maxTokens: number): number {
  const budget = model.kvTokenBudget;
  if (budget === null || n * (promptTokens + maxTokens) <= budget) return maxTokens;
  const fits = Math.floor(budget / n) - promptTokens;
  if (requested === null && fits >= 1) return fits;
  const param = requested === null || fits < 1 ? 'n' : 'max_tokens';
  throw new ApiError(
    'invalid_value',
    `Invalid '${param}': n × (prompt + max_tokens) = ${n} × (${promptTokens} + ${maxTokens}) = ${n * (promptTokens + maxTokens)} tokens of KV cache, but the workers serving this model hold at most ${budget}.` +
      (fits >= 1 ? ` With n=${n}, max_tokens may be at most ${fits}.` : ' Use a smaller n or a shorter prompt.'),
    { param },
  );
}

export class ChatService {
  constructor(private readonly deps: ChatServiceDeps) {}

  /** POST /v1/chat/completions: the chat schema and parameter table, then the shared preparation. */
  async prepare(body: unknown, ctx: RequestContext): Promise<PreparedChat> {
    const req = parseOrThrow(chatCompletionRequestSchema, body);
    logUnknown(ctx, req, KNOWN_REQUEST_FIELDS);
    const route = this.deps.routing.route(req.model);
    if (route.kind === 'upstream') return prepareUpstreamChat(this.deps.config, ctx, route, body as Record<string, unknown>, req);
    const { tools, params, messages } = toChatJob(req);
    return this.prepareInput(ctx, {
      model: route.queue,
      publicName: route.publicName,
      routed: route.breaker !== null,
      input: { messages },
      parseToolCalls: tools !== null,
      params,
      requested: requestedMaxTokens(req),
      defaultMaxTokens: this.deps.config.DEFAULT_MAX_TOKENS,
      stream: req.stream === true,
      includeUsage: req.stream_options?.include_usage === true,
    });
  }

  /**
   * POST /v1/completions, one prompt (the pipeline admits each prompt of a list on its own): the completions schema
   * and table (services/completion-params.ts), then the same preparation as a chat, with the prompt sent as is.
   */
  async prepareCompletion(body: unknown, ctx: RequestContext): Promise<PreparedChat> {
    const c = parseCompletion(body);
    if (c.prompts.length !== 1) throw new Error('prepareCompletion takes one prompt: lists are split by the pipeline');
    logUnknown(ctx, c.req, KNOWN_COMPLETION_FIELDS);
    const route = this.deps.routing.route(c.req.model);
    if (route.kind === 'upstream') return prepareUpstreamCompletion(this.deps.config, ctx, route, body as Record<string, unknown>, c);
    return this.prepareInput(ctx, {
      model: route.queue,
      publicName: route.publicName,
      routed: route.breaker !== null,
      input: { prompt: c.prompts[0] },
      params: c.params,
      requested: c.req.max_tokens ?? null,
      defaultMaxTokens: COMPLETION_DEFAULT_MAX_TOKENS,
      stream: c.req.stream === true,
      includeUsage: c.req.stream_options?.include_usage === true,
    });
  }

  /** Everything that can fail before a job exists, the same for a chat and a raw prompt. */
  private async prepareInput(ctx: RequestContext, r: PromptRequest): Promise<PreparedChat> {
    const { config } = this.deps;
    const { params } = r;
    const param = 'messages' in r.input ? 'messages' : 'prompt';
    const model = await this.liveModel(r.model, r.routed === true);
    if (model.maxBatch !== null && params.n > model.maxBatch) {
      // More choices than a worker's batch holds can never run as sized: refused before a job exists.
      throw new ApiError('invalid_value', `Invalid 'n': this model runs at most ${model.maxBatch} sequences at once, so n may be at most ${model.maxBatch}.`, {
        param: 'n',
      });
    }
    const tokenizer = await this.deps.tokenizers.get(model.id, model.tokenizerHash);

    for (const id of Object.keys(params.logit_bias)) {
      if (Number(id) >= tokenizer.vocabSize) {
        throw new ApiError('invalid_value', `Invalid 'logit_bias': token id ${id} is outside the vocabulary.`, {
          param: 'logit_bias',
        });
      }
    }
    // A prompt with more characters than the context can hold as tokens is refused before any tokenization: counting
    // megabytes of text costs seconds of CPU and hundreds of MB, for an answer known in advance.
    const chars = 'messages' in r.input ? r.input.messages.reduce((n, m) => n + m.content.length, 0) : r.input.prompt.length;
    if (chars > model.contextLength * tokenizer.maxTokenChars) {
      throw new ApiError(
        'context_length_exceeded',
        `This model's maximum context length is ${model.contextLength} tokens. However, your ${param === 'messages' ? 'messages hold' : 'prompt holds'} ${chars} characters, more than ${model.contextLength} tokens can carry. Please reduce the length of the ${param}.`,
        { param },
      );
    }
    const promptTokens = 'messages' in r.input ? await tokenizer.countPrompt(r.input.messages) : await tokenizer.countText(r.input.prompt);
    const maxTokens = fitKvBudget(model, params.n, promptTokens, r.requested,
      this.decideMaxTokens(r.requested, r.defaultMaxTokens, promptTokens, model.contextLength, param));

    const now = Date.now();
    const id = `${'messages' in r.input ? 'chatcmpl' : 'cmpl'}-${randomBytes(16).toString('hex')}`;
    const data: JobData = {
      v: PROTOCOL_VERSION,
      request_id: ctx.requestId,
      model: model.id,
      ...r.input,
      params: { ...params, max_tokens: maxTokens },
      stream: r.stream,
      prompt_tokens: promptTokens,
      enqueued_at_ms: now,
      deadline_ms: now + config.REQUEST_TIMEOUT_MS,
      start_deadline_ms: now + config.QUEUE_TIMEOUT_MS,
    };
    // Written once this turn of the event loop is over, i.e. while the request waits for its first Redis replies:
    // formatting and writing a log line took ~0.25 ms of the hot path (services/stamps.ts measured it).
    const accepted = { jobId: id, model: model.id, stream: data.stream, n: params.n, promptTokens, maxTokens };
    setImmediate(() => ctx.log.info('chat request accepted', { ...accepted, ...(config.LOG_PROMPTS ? r.input : {}) }));
    ctx.stamps?.mark('prepared');
    return {
      meta: { id, created: Math.floor(now / 1000), model: r.publicName },
      data,
      stream: data.stream,
      includeUsage: r.includeUsage,
      wantLogprobs: params.logprobs,
      slots: model.slots,
      promptParam: param,
      parseToolCalls: r.parseToolCalls === true,
    };
  }

  /**
   * Starts subscribing to the prepared job's channel now (queue/job-events.ts `reserve`), so that the SUBSCRIBE round
   * trip overlaps whatever the caller still reads before running the job; the run takes the subscription over, and
   * still enqueues only once Redis has acknowledged it. A caller that ends up not running the job calls releaseEvents.
   */
  reserveEvents(p: PreparedChat): void {
    this.deps.bus.reserve(p.meta.id);
  }

  releaseEvents(p: PreparedChat): void {
    this.deps.bus.release(p.meta.id);
  }

  /**
   * The source step for a request that missed the cache: runs its job (queue/job-run.ts) and resolves with the result.
   * Deltas go to `hooks.onDelta` as they arrive; `onEnqueued` fires once the job is queued (a stream's headers go out
   * then: anything that fails before is a plain HTTP error). The job is cancelled when `ctx.signal` aborts; for a
   * `resumable` run (a /v1 stream) only after the resume grace, and only if no client is attached to it by then.
   */
  async run(p: PreparedChat, ctx: RequestContext, hooks: RunHooks = {}, opts: { resumable?: boolean } = {}): Promise<RunOutcome> {
    if (!p.permit) return this.runSource(p, ctx, hooks, opts);
    // The breaker learns from this run: its time to the first output, or whether its failure was the target's.
    const permit = p.permit;
    const startedMs = Date.now();
    let firstMs: number | null = null;
    // Without deltas (a whole answer) the first output is the answer itself.
    const forward = hooks.onDelta;
    const onDelta: RunHooks['onDelta'] = forward
      ? (index, text, lp, seq) => {
          if (firstMs === null && text.length > 0) firstMs = Date.now();
          forward(index, text, lp, seq);
        }
      : undefined;
    // An upstream's tool call is first output as much as text is (an answer may be calls only).
    const forwardCall = hooks.onToolCall;
    const onToolCall: RunHooks['onToolCall'] = forwardCall
      ? (index, call, seq) => {
          firstMs ??= Date.now();
          forwardCall(index, call, seq);
        }
      : undefined;
    try {
      const outcome = await this.runSource(p, ctx, { ...hooks, onDelta, onToolCall }, opts);
      permit.success((firstMs ?? Date.now()) - startedMs);
      return outcome;
    } catch (err) {
      if (isTargetFailure(err)) permit.failure();
      else permit.release();
      throw err;
    }
  }

  /** The source itself: the upstream's answer, or the job. */
  private async runSource(p: PreparedChat, ctx: RequestContext, hooks: RunHooks, opts: { resumable?: boolean }): Promise<RunOutcome> {
    if (p.upstream) {
      try {
        const outcome = await runUpstream(p.upstream, ctx, hooks);
        this.logDone(ctx, p, outcome.result.usage.completion_tokens, outcome.result.choices.map((c) => c.finish_reason), outcome.result);
        return outcome;
      } catch (err) {
        throw clientError(err, ctx.signal, p.promptParam);
      }
    }
    const { config } = this.deps;
    const maxBytes = storedEventsMaxBytes(config);
    const resumable = opts.resumable === true && maxBytes > 0;
    const data: JobData = resumable ? { ...p.data, store_events: { ttl_ms: config.RESUME_EVENTS_TTL_MS, max_bytes: maxBytes } } : p.data;
    const run = new JobRun(this.runDeps(), p.meta.id, data, { onDelta: hooks.onDelta, onStarted: hooks.onStarted, placement: p.placement });
    await run.start(data);
    hooks.onEnqueued?.();
    try {
      const outcome = await this.follow(run, ctx, resumable);
      const { result } = outcome;
      this.logDone(ctx, p, result.usage.completion_tokens, result.choices.map((c) => c.finish_reason), result);
      return outcome;
    } catch (err) {
      throw clientError(err, ctx.signal, p.promptParam);
    }
  }

  /**
   * The source of a resumed stream: follows a job another request started (JobRun.attach: its stored events, then
   * live ones). Refused before `onEnqueued` (so as a plain HTTP status) when nothing can be replayed: 404 when the
   * job is gone, 409 when it ran without storing its events, 410 when they were cut at their bound. A resumed stream
   * holds a lease on its job and gives its job the same grace when its own client goes.
   */
  async attach(asked: AttachTarget, ctx: RequestContext, hooks: RunHooks = {}): Promise<RunOutcome> {
    const { redis, queues } = this.deps;
    // The record names the model as the client saw it (a public name of the routing table): its job is in that pool's queue.
    const route = this.deps.routing.route(asked.model);
    if (route.kind === 'upstream') {
      throw new ApiError('stream_not_resumable', `The model '${asked.model}' is served by an upstream, whose streams are not stored: this one cannot be resumed.`);
    }
    const target = { ...asked, model: route.queue };
    const run = new JobRun(this.runDeps(), target.jobId, { ...target, request_id: ctx.requestId }, { onDelta: hooks.onDelta, onStarted: hooks.onStarted });
    const stored = await run.attach(() => redis.lrange(eventsKey(target.jobId), 0, -1));
    if (stored.length === 0) {
      // Nothing stored: right for a job still waiting for a worker (all its events will be heard), not for one that
      // has ended (its worker stored nothing) or is gone. A running one is followed: if its first events were not
      // stored, the run sees the gap and fails with stream_not_resumable.
      const snap = await queues.snapshot(target.model, target.jobId).catch(() => undefined);
      if (snap === null || snap?.state === 'completed' || snap?.state === 'failed') {
        await run.detach();
        if (snap === null) throw completionNotFound(target.jobId);
        throw new ApiError('stream_not_resumable', 'The events of this stream were not stored (the worker that ran it does not keep them), so it cannot be resumed.');
      }
    }
    hooks.onEnqueued?.();
    try {
      return await this.follow(run, ctx, true);
    } catch (err) {
      throw clientError(err, ctx.signal, 'messages');
    }
  }

  /**
   * Waits for the run's outcome. The client leaving cancels the job at once, or for a resumable run, ends the
   * client's lease and cancels only after the grace when no client is attached then (resume/attachments.ts).
   */
  private async follow(run: JobRun, ctx: RequestContext, resumable: boolean): Promise<RunOutcome> {
    const { attachments } = this.deps;
    const endLease = resumable ? attachments.attach(run.jobId) : null;
    let dropGrace: (() => void) | null = null;
    const onAbort = () => {
      endLease?.();
      if (resumable && ctx.signal.reason === 'client') dropGrace = attachments.grace(run.jobId, () => run.cancel());
      else run.cancel();
    };
    if (ctx.signal.aborted) onAbort(); // the client left while we were preparing
    else ctx.signal.addEventListener('abort', onAbort, { once: true });
    try {
      return await run.outcome;
    } finally {
      ctx.signal.removeEventListener('abort', onAbort);
      endLease?.();
      (dropGrace as (() => void) | null)?.();
    }
  }

  private runDeps(): RunDeps {
    const { config, bus, queues, registry, logger } = this.deps;
    return {
      bus,
      queues,
      liveness: registry,
      logger,
      timings: {
        queueTimeoutMs: config.QUEUE_TIMEOUT_MS,
        requestTimeoutMs: config.REQUEST_TIMEOUT_MS,
        pollMs: config.JOB_POLL_MS,
        heartbeatCheckMs: config.WORKER_REFRESH_MS,
        // The worker cuts generation at the deadline itself; this only covers a worker that went silent.
        deadlineGraceMs: 5000,
      },
    };
  }

  /**
   * A live model, or: 503 when it is ours but no worker serves it right now (`routed`: a pool of the routing table is
   * ours by definition), 404 when we never heard of it.
   */
  private async liveModel(id: string, routed: boolean) {
    const { redis, registry, config } = this.deps;
    if (!isReady(redis)) throw redisUnavailable();
    const model = await registry.model(id);
    if (model) return model;
    const known = routed || id === config.DEFAULT_MODEL || (await redis.exists(tokenizerKey(id))) === 1;
    if (known) {
      throw new ApiError('no_worker_available', `No worker is serving the model '${id}' right now. Please retry shortly.`, {
        retryAfterMs: Math.min(config.HEARTBEAT_TTL_MS, 5000),
      });
    }
    throw new ApiError('model_not_found', `The model \`${id}\` does not exist or you do not have access to it.`, {
      param: 'model',
    });
  }

  /** max_tokens: the request's, else the endpoint's default, never more than the context leaves. */
  private decideMaxTokens(requested: number | null, byDefault: number, promptTokens: number, contextLength: number, param: string): number {
    const left = contextLength - promptTokens;
    if (requested !== null ? promptTokens + requested > contextLength : left < 1) {
      const asked = requested ?? 1;
      throw new ApiError(
        'context_length_exceeded',
        `This model's maximum context length is ${contextLength} tokens. However, you requested ${promptTokens + asked} tokens (${promptTokens} in the ${param}, ${asked} in the completion). Please reduce the length of the ${param} or completion.`,
        { param },
      );
    }
    return requested ?? Math.min(byDefault, left);
  }

  private logDone(ctx: RequestContext, p: PreparedChat, completionTokens: number, finish: string[], result: { choices: Array<{ text: string }> }): void {
    ctx.log.info('chat completion finished', {
      jobId: p.meta.id,
      model: p.meta.model,
      promptTokens: p.data.prompt_tokens,
      completionTokens,
      finishReasons: finish,
      ms: Date.now() - p.data.enqueued_at_ms,
      stamps: ctx.stamps?.toLog(),
      ...(this.deps.config.LOG_PROMPTS ? { output: result.choices.map((c) => c.text) } : {}),
    });
  }
}

/** Fields OpenAI does not define are ignored, as vLLM does; logged so that a misspelt one can be found. */
function logUnknown(ctx: RequestContext, req: object, known: ReadonlySet<string>): void {
  const unknown = Object.keys(req).filter((k) => !known.has(k));
  if (unknown.length > 0) ctx.log.debug('ignoring fields OpenAI does not define', { fields: unknown });
}

export function completionNotFound(id: string): ApiError {
  return new ApiError('completion_not_found', `No stream with id '${id}' was found: it does not exist, it is not yours, or it has expired.`);
}

function redisUnavailable(): ApiError {
  return new ApiError('redis_unavailable', 'The service is temporarily unavailable (queue store unreachable). Please retry.', {
    retryAfterMs: 1000,
  });
}

/**
 * A run's failure as the client should read it: cancelled because the gateway is shutting down is reported as such,
 * not as a client cancel; a worker's context error names the request's prompt field (the worker knows no fields).
 */
function clientError(err: unknown, signal: AbortSignal, promptParam: PreparedChat['promptParam']): ApiError {
  const apiErr = toApiError(err);
  if (apiErr.code === 'cancelled' && signal.aborted && signal.reason === 'shutdown') {
    return new ApiError('shutting_down', 'The server is restarting. Please retry.', { retryAfterMs: 1000 });
  }
  if (apiErr.code === 'context_length_exceeded' && apiErr.param !== promptParam) {
    return new ApiError('context_length_exceeded', apiErr.message, { param: promptParam });
  }
  return apiErr;
}

