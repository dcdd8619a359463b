/**
 * Two steps of the request path (services/chat-pipeline.ts drives them): `prepare` parses a chat request and does
 * everything that can fail before a job exists (validation, live model, prompt tokens, context, KV budget), so those
 * errors are plain HTTP statuses; `run` is the source step for a request the cache did not answer (the job).
 */
import { randomBytes } from 'node:crypto';
import type Redis from 'ioredis';
import type { Config } from '../config';
import { ApiError, toApiError } from '../errors';
import type { Logger } from '../logger';
import { chatCompletionRequestSchema, KNOWN_REQUEST_FIELDS } from '../protocol/chat';
import { type JobData, PROTOCOL_VERSION, type TokenLogprob, tokenizerKey } from '../protocol/job';
import type { JobEventBus } from '../queue/job-events';
import type { JobQueues } from '../queue/job-queue';
import type { JobPlacement } from '../queue/job-queue';
import { JobRun, type RunDeps, type RunOutcome } from '../queue/job-run';
import { isReady } from '../queue/redis';
import type { CompletionMeta } from './chat-format';
import { normaliseMessages, requestedMaxTokens, toJobParams } from './chat-params';
import type { Stamps } from './stamps';
import type { TokenizerCache } from './tokenizer';
import { parseOrThrow } from './validation';
import type { ModelView, WorkerRegistry } from './worker-registry';

export interface RequestContext {
  requestId: string;
  log: Logger;
  /** Aborted when the client goes away (reason "client") or the gateway shuts down (reason "shutdown"). */
  signal: AbortSignal;
  /** Where the time goes (services/stamps.ts): logged with the finished request. */
  stamps?: Stamps;
}

export interface RunHooks {
  onDelta?(index: number, text: string, logprobs: TokenLogprob[] | null): void;
  onStarted?(workerId: string): void;
  onEnqueued?(): void;
}

export interface PreparedChat {
  meta: CompletionMeta;
  data: JobData;
  stream: boolean;
  includeUsage: boolean;
  wantLogprobs: boolean;
  /** Sequences the model's live workers run at once (ModelView.slots): backlog admission's free-room check. */
  slots: number | null;
  /** Where the job goes in the queue (the caller's tier); absent = FIFO. */
  placement?: JobPlacement;
}

export interface ChatServiceDeps {
  config: Config;
  redis: Redis;
  registry: WorkerRegistry;
  tokenizers: TokenizerCache;
  queues: JobQueues;
  bus: JobEventBus;
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

  async prepare(body: unknown, ctx: RequestContext): Promise<PreparedChat> {
    const { config } = this.deps;
    const req = parseOrThrow(chatCompletionRequestSchema, body);
    const unknown = Object.keys(req).filter((k) => !KNOWN_REQUEST_FIELDS.has(k));
    if (unknown.length > 0) ctx.log.debug('ignoring fields OpenAI does not define', { fields: unknown });

    const params = toJobParams(req);
    const messages = normaliseMessages(req.messages);
    const model = await this.liveModel(req.model);
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
    const chars = messages.reduce((n, m) => n + m.content.length, 0);
    if (chars > model.contextLength * tokenizer.maxTokenChars) {
      throw new ApiError(
        'context_length_exceeded',
        `This model's maximum context length is ${model.contextLength} tokens. However, your messages hold ${chars} characters, more than ${model.contextLength} tokens can carry. Please reduce the length of the messages.`,
        { param: 'messages' },
      );
    }
    const promptTokens = await tokenizer.countPrompt(messages);
    const maxTokens = fitKvBudget(model, params.n, promptTokens, requestedMaxTokens(req),
      this.decideMaxTokens(requestedMaxTokens(req), promptTokens, model.contextLength));

    const now = Date.now();
    const id = `chatcmpl-${randomBytes(16).toString('hex')}`;
    const data: JobData = {
      v: PROTOCOL_VERSION,
      request_id: ctx.requestId,
      model: model.id,
      messages,
      params: { ...params, max_tokens: maxTokens },
      stream: req.stream === true,
      prompt_tokens: promptTokens,
      enqueued_at_ms: now,
      deadline_ms: now + config.REQUEST_TIMEOUT_MS,
      start_deadline_ms: now + config.QUEUE_TIMEOUT_MS,
    };
    // Written once this turn of the event loop is over, i.e. while the request waits for its first Redis replies:
    // formatting and writing a log line took ~0.25 ms of the hot path (services/stamps.ts measured it).
    const accepted = { jobId: id, model: model.id, stream: data.stream, n: params.n, promptTokens, maxTokens };
    setImmediate(() => ctx.log.info('chat request accepted', { ...accepted, ...(config.LOG_PROMPTS ? { messages } : {}) }));
    ctx.stamps?.mark('prepared');
    return {
      meta: { id, created: Math.floor(now / 1000), model: model.id },
      data,
      stream: data.stream,
      includeUsage: req.stream_options?.include_usage === true,
      wantLogprobs: params.logprobs,
      slots: model.slots,
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
   * then: anything that fails before is a plain HTTP error). The job is cancelled when `ctx.signal` aborts.
   */
  async run(p: PreparedChat, ctx: RequestContext, hooks: RunHooks = {}): Promise<RunOutcome> {
    const run = new JobRun(this.runDeps(), p.meta.id, p.data, { onDelta: hooks.onDelta, onStarted: hooks.onStarted, placement: p.placement });
    await run.start();
    hooks.onEnqueued?.();
    const onAbort = () => run.cancel();
    ctx.signal.addEventListener('abort', onAbort, { once: true });
    if (ctx.signal.aborted) run.cancel(); // the client left while we were preparing
    try {
      const outcome = await run.outcome;
      const { result } = outcome;
      this.logDone(ctx, p, result.usage.completion_tokens, result.choices.map((c) => c.finish_reason), result);
      return outcome;
    } catch (err) {
      throw shutdownAware(err, ctx.signal);
    } finally {
      ctx.signal.removeEventListener('abort', onAbort);
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

  /** A live model, or: 503 when it is ours but no worker serves it right now, 404 when we never heard of it. */
  private async liveModel(id: string) {
    const { redis, registry, config } = this.deps;
    if (!isReady(redis)) throw redisUnavailable();
    const model = await registry.model(id);
    if (model) return model;
    const known = id === config.DEFAULT_MODEL || (await redis.exists(tokenizerKey(id))) === 1;
    if (known) {
      throw new ApiError('no_worker_available', `No worker is serving the model '${id}' right now. Please retry shortly.`, {
        retryAfterMs: Math.min(config.HEARTBEAT_TTL_MS, 5000),
      });
    }
    throw new ApiError('model_not_found', `The model \`${id}\` does not exist or you do not have access to it.`, {
      param: 'model',
    });
  }

  /** max_tokens: the request's, else the configured default, never more than the context leaves. */
  private decideMaxTokens(requested: number | null, promptTokens: number, contextLength: number): number {
    const left = contextLength - promptTokens;
    if (requested !== null ? promptTokens + requested > contextLength : left < 1) {
      const asked = requested ?? 1;
      throw new ApiError(
        'context_length_exceeded',
        `This model's maximum context length is ${contextLength} tokens. However, you requested ${promptTokens + asked} tokens (${promptTokens} in the messages, ${asked} in the completion). Please reduce the length of the messages or completion.`,
        { param: 'messages' },
      );
    }
    return requested ?? Math.min(this.deps.config.DEFAULT_MAX_TOKENS, left);
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

function redisUnavailable(): ApiError {
  return new ApiError('redis_unavailable', 'The service is temporarily unavailable (queue store unreachable). Please retry.', {
    retryAfterMs: 1000,
  });
}

/** A run cancelled because the gateway is shutting down is reported as such, not as a client cancel. */
function shutdownAware(err: unknown, signal: AbortSignal): ApiError {
  const apiErr = toApiError(err);
  if (apiErr.code === 'cancelled' && signal.aborted && signal.reason === 'shutdown') {
    return new ApiError('shutting_down', 'The server is restarting. Please retry.', { retryAfterMs: 1000 });
  }
  return apiErr;
}

