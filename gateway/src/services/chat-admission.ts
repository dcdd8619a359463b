/**
 * The admit step of the request path (services/chat-pipeline.ts): what a caller may ask for and how much, before a
 * job exists, and the accounting once its run is over. The same for /v1/chat/completions and the tutorial's routes:
 *   input limits → allowed models → degradation (fallback model) → prepare (ChatService: validation, tokens) →
 *   max_tokens cap → cache lookup (scoped to the caller) → rate limits (RPM + TPM, prompt + max_tokens) →
 *   concurrency → queue depth → queue backlog in tokens (queue/backlog.ts) → placement by tier;
 *   finish: cache store, real usage replaces the estimate in the token budget, usage counters.
 */
import type { RequestHandler, Response } from 'express';
import type Redis from 'ioredis';
import type { Principal } from '../auth/api-keys';
import { addUsage } from '../auth/key-store';
import { cacheKey, isCacheable, type ResponseCache } from '../cache/response-cache';
import type { Config } from '../config';
import { ApiError, toApiError } from '../errors';
import {
  bucketsFor,
  type ConcurrencyLimiter,
  effectiveLimits,
  type HeaderTarget,
  queueDepth,
  rateLimitError,
  setRateLimitHeaders,
  TIER_PLACEMENT,
} from '../limits/admission';
import type { BucketState, RateLimiter } from '../limits/rate-limiter';
import { cacheLookups, queueFullRejections, rateLimitRejections } from '../metrics';
import type { JobResult } from '../protocol/job';
import { backlogFullError, type QueueBacklog, type Reservation } from '../queue/backlog';
import { toolCallsOf } from '../routing/upstream-tools';
import type { ChatService, PreparedChat, RequestContext } from './chat-service';

export interface GovernanceDeps {
  config: Config;
  redis: Redis;
  chat: ChatService;
  limiter: RateLimiter;
  concurrency: ConcurrencyLimiter;
  backlog: QueueBacklog;
  cache: ResponseCache;
  /** The output filter is on: logprobs are refused (they would reveal the text it replaces). */
  filterActive: boolean;
}

/** Which request a body is: a chat (/v1/chat/completions, the tutorial's routes) or one prompt of /v1/completions. */
export type Endpoint = 'chat' | 'completion';

export interface GovernOptions {
  principal: Principal;
  /** `cache-control: no-store` from the client: neither read nor write the cache. */
  noStore: boolean;
  /** Rate-limit states already drawn for this HTTP request (the tutorial's per-route budget), merged into headers. */
  extraStates?: BucketState[];
}

/** A request that passed admission: answer it from `cached` or run its job, then call `finish` (always). */
export interface Admitted {
  prepared: PreparedChat;
  /** Set when the answer comes from the cache (unfiltered, as stored): answer with it, no job. */
  cached: JobResult | null;
  /**
   * Accounting once the run is over: `result` when it produced one (real usage, cache store), else `err` decides
   * between a refund (the server turned it away) and the prompt's cost.
   */
  finish(result: JobResult | null, err?: unknown): Promise<void>;
}

export class ChatAdmission {
  /** Large prompts being counted per caller on this gateway (countedPrepare). */
  private readonly largeCounts = new Map<string, number>();

  constructor(private readonly deps: GovernanceDeps) {}

  /** Sets x-ratelimit-* from a read-only look at the caller's budgets (responses that admit nothing). */
  async peekHeaders(res: HeaderTarget, principal: Principal, tutorial = false): Promise<void> {
    const { config, limiter } = this.deps;
    const buckets = bucketsFor(config, principal, effectiveLimits(config, principal), tutorial);
    if (buckets.length === 0) return;
    const a = await limiter.admit(buckets, 0, true);
    setRateLimitHeaders(res, a.states);
  }

  /** Draws one request from the tutorial routes' own budget (the tutorial's 10/minute). */
  async admitTutorialCall(res: Response, principal: Principal): Promise<BucketState[]> {
    const { config, limiter } = this.deps;
    const buckets = bucketsFor(config, principal, { models: null, rpm: 0, tpm: 0, maxConcurrent: 0, tier: 'standard' }, true);
    const a = await limiter.admit(buckets, 0);
    setRateLimitHeaders(res, a.states);
    if (!a.admitted) {
      rateLimitRejections.inc();
      throw rateLimitError(res, a, 0, limiter.windowMs);
    }
    return a.states;
  }

  /**
   * A resumed stream (ChatPipeline.resume): one request from the caller's RPM budget, no tokens (the tokens were
   * charged when the stream started; a resume generates nothing), no concurrency slot (its job holds the one it took).
   * It is still a request the gateway serves: without the RPM draw, resumes would be a free way to poll.
   */
  async admitResume(res: HeaderTarget, principal: Principal): Promise<void> {
    const { config, limiter } = this.deps;
    const buckets = bucketsFor(config, principal, effectiveLimits(config, principal), false);
    if (buckets.length === 0) return;
    const a = await limiter.admit(buckets, 0);
    setRateLimitHeaders(res, a.states);
    if (!a.admitted) {
      rateLimitRejections.inc();
      throw rateLimitError(res, a, 0, limiter.windowMs);
    }
  }

  /** `endpoint`: which request the body is (a chat, or one prompt of /v1/completions): only parsing differs. */
  async admit(body: unknown, res: HeaderTarget, ctx: RequestContext, opts: GovernOptions, endpoint: Endpoint = 'chat'): Promise<Admitted> {
    try {
      return await this.admitInner(body, res, ctx, opts, endpoint);
    } catch (err) {
      if (!res.hasHeader('x-ratelimit-limit-requests') && !res.hasHeader('x-ratelimit-limit-tokens')) {
        await this.peekHeaders(res, opts.principal).catch(() => undefined);
      }
      throw err;
    }
  }

  private async admitInner(body: unknown, res: HeaderTarget, ctx: RequestContext, opts: GovernOptions, endpoint: Endpoint): Promise<Admitted> {
    const { config, chat, filterActive, redis } = this.deps;
    const limits = effectiveLimits(config, opts.principal);
    const raw = (typeof body === 'object' && body !== null ? body : {}) as Record<string, unknown>;
    if (Array.isArray(raw.messages) && raw.messages.length > config.MAX_MESSAGES) {
      throw new ApiError('invalid_value', `Too many messages: ${raw.messages.length} (at most ${config.MAX_MESSAGES}).`, { param: 'messages' });
    }
    if (typeof raw.model === 'string' && !allowed(limits.models, raw.model)) throw modelDenied(raw.model);

    // Degradation, decided on the requested model's queue before anything is tokenized.
    // When the requested model's queue is saturated, every configured remedy applies: fallback model, max_tokens cap.
    let saturated = false;
    const degraded: string[] = [];
    let effectiveBody = body;
    if (config.DEGRADE_QUEUE_DEPTH > 0 && typeof raw.model === 'string') {
      const depth = await queueDepth(redis, raw.model);
      saturated = depth >= config.DEGRADE_QUEUE_DEPTH;
      const fb = config.DEGRADE_FALLBACK_MODEL;
      if (saturated && fb && fb !== raw.model && allowed(limits.models, fb)) {
        effectiveBody = { ...raw, model: fb };
        degraded.push(`model=${fb}`);
      }
    }
    const p = await this.countedPrepare(effectiveBody, raw, res, ctx, opts, limits, endpoint);
    if (config.MAX_PROMPT_TOKENS > 0 && p.data.prompt_tokens > config.MAX_PROMPT_TOKENS) {
      throw new ApiError(
        'invalid_value',
        `The prompt is ${p.data.prompt_tokens} tokens; this server accepts at most ${config.MAX_PROMPT_TOKENS}.`,
        { param: p.promptParam },
      );
    }
    if (filterActive && p.wantLogprobs) {
      throw new ApiError('unsupported_parameter', "'logprobs' is not available while the output filter is on: it would reveal filtered text.", { param: 'logprobs' });
    }
    if (saturated && config.DEGRADE_MAX_TOKENS > 0 && p.data.params.max_tokens > config.DEGRADE_MAX_TOKENS) {
      p.data.params.max_tokens = config.DEGRADE_MAX_TOKENS;
      degraded.push(`max_tokens=${config.DEGRADE_MAX_TOKENS}`);
    }
    if (degraded.length > 0) {
      res.setHeader('x-degraded', degraded.join(', '));
      ctx.log.info('request degraded: queue saturated', { degraded });
    }
    // From here on the reads are Redis round trips: the job's SUBSCRIBE goes out now, alongside them (it is still
    // acknowledged before Queue.add, see queue/job-events.ts), and is dropped again if no job is run.
    chat.reserveEvents(p);
    try {
      const admitted = await this.admitPrepared(p, res, ctx, opts, limits);
      if (admitted.cached) chat.releaseEvents(p);
      return admitted;
    } catch (err) {
      chat.releaseEvents(p);
      throw err;
    }
  }

  /**
   * ChatService.prepare (validation, prompt count) with what a large prompt costs accounted for: a caller over its
   * budget is refused before counting (refuseIfOverBudget), one caller counts at most LARGE_COUNTS_PER_CALLER large
   * prompts at a time on this gateway, and a large prompt that was counted only to be refused (too long for the
   * context) still draws one request from the caller's budget, so such prompts cannot be sent for free.
   */
  private async countedPrepare(
    body: unknown,
    raw: Record<string, unknown>,
    res: HeaderTarget,
    ctx: RequestContext,
    opts: GovernOptions,
    limits: ReturnType<typeof effectiveLimits>,
    endpoint: Endpoint,
  ): Promise<PreparedChat> {
    const prepare = () => (endpoint === 'chat' ? this.deps.chat.prepare(body, ctx) : this.deps.chat.prepareCompletion(body, ctx));
    const chars = endpoint === 'chat' ? contentChars(raw.messages) : typeof raw.prompt === 'string' ? raw.prompt.length : 0;
    if (chars < PEEK_BEFORE_COUNT_CHARS) return prepare();
    await this.refuseIfOverBudget(raw, res, opts, limits);
    const who = opts.principal.keyId;
    const counting = this.largeCounts.get(who) ?? 0;
    if (counting >= LARGE_COUNTS_PER_CALLER) {
      throw new ApiError('rate_limit_exceeded', `Too many large prompts from this key are being counted at once (at most ${LARGE_COUNTS_PER_CALLER}). Please retry shortly.`, {
        retryAfterMs: 1000,
      });
    }
    this.largeCounts.set(who, counting + 1);
    try {
      return await prepare();
    } catch (err) {
      if (err instanceof ApiError && err.code === 'context_length_exceeded') {
        const buckets = bucketsFor(this.deps.config, opts.principal, limits, false);
        await this.deps.limiter.admit(buckets, 0).catch(() => undefined);
      }
      throw err;
    } finally {
      const left = (this.largeCounts.get(who) ?? 1) - 1;
      if (left > 0) this.largeCounts.set(who, left);
      else this.largeCounts.delete(who);
    }
  }

  /**
   * Counting a large prompt costs CPU (on the tokenizer threads): a caller that is already over its budget is refused
   * before that, from a read-only look at its buckets. Small prompts skip the look: counting them is cheaper than the
   * round trip, and the real admission after counting refuses them just the same.
   */
  private async refuseIfOverBudget(raw: Record<string, unknown>, res: HeaderTarget, opts: GovernOptions, limits: ReturnType<typeof effectiveLimits>) {
    const { config, limiter } = this.deps;
    const buckets = bucketsFor(config, opts.principal, limits, false);
    if (buckets.length === 0) return;
    const peek = await limiter.admit(buckets, 0, true);
    if (peek.limitedBy === null) return;
    setRateLimitHeaders(res, peek.states);
    rateLimitRejections.inc();
    throw rateLimitError(res, peek, 0, limiter.windowMs);
  }

  private async admitPrepared(
    p: PreparedChat,
    res: HeaderTarget,
    ctx: RequestContext,
    opts: GovernOptions,
    limits: ReturnType<typeof effectiveLimits>,
  ): Promise<Admitted> {
    const { config, limiter, cache, redis } = this.deps;
    // The queue depth is read now, with the cache lookup (one round trip for both), and checked below.
    // An upstream's request has no queue here (routing/upstream.ts): neither the depth nor the backlog applies to it.
    const queued = p.upstream === undefined;
    const depth = queued && config.MAX_QUEUE_DEPTH > 0 ? queueDepth(redis, p.data.model) : null;
    depth?.catch(() => undefined); // awaited below unless the request ends before; never an unhandled rejection

    // Cache, then the budgets: a hit costs its prompt only (no completion tokens are generated again).
    const cacheable = cache.enabled && !opts.noStore && p.noCache !== true && isCacheable(p.data);
    const key = cacheable ? cacheKey(p.data, config.CACHE_SCOPE === 'shared' ? 'shared' : opts.principal.keyId, p.cacheExtra) : null;
    const cached = key ? await cache.get(key) : null;
    if (key) {
      cacheLookups.inc({ result: cached ? 'hit' : 'miss' });
      res.setHeader('x-cache', cached ? 'hit' : 'miss'); // only when the cache was consulted (not for no-store)
    }
    const prompt = p.data.prompt_tokens;
    // A hit is charged what its body reports (the usage of the answer it repeats), so a client's own token accounting
    // and its budget agree.
    const estimate = cached ? cached.usage.prompt_tokens + cached.usage.completion_tokens : prompt + p.data.params.max_tokens * p.data.params.n;
    const buckets = bucketsFor(config, opts.principal, limits, false);
    const member = p.meta.id;
    const a = await limiter.admit(buckets, estimate);
    setRateLimitHeaders(res, [...a.states, ...(opts.extraStates ?? [])]);
    if (!a.admitted) {
      rateLimitRejections.inc();
      throw rateLimitError(res, a, estimate, limiter.windowMs);
    }
    const principalId = opts.principal.keyId;
    if (cached) {
      const { prompt_tokens, completion_tokens } = cached.usage;
      await addUsage(redis, principalId, { requests: 1, prompt_tokens, completion_tokens, cache_hits: 1 });
      return { prepared: p, cached, finish: async () => undefined };
    }

    const refund = () => limiter.adjust(buckets, estimate, null).catch(() => undefined);
    const release = await this.deps.concurrency.acquire(principalId, member, limits.maxConcurrent);
    if (!release) {
      rateLimitRejections.inc();
      await refund();
      throw new ApiError('rate_limit_exceeded', `Too many concurrent requests: at most ${limits.maxConcurrent} at a time for this key.`, {
        retryAfterMs: 1000,
      });
    }
    let waiting: number | null = null;
    if (depth) {
      // Anything that fails from here until the run owns them (a Redis error reading the depth) gives the slot and the
      // token budget back: leaked, they would stay taken for the whole lease.
      let d: number;
      try {
        d = await depth;
      } catch (err) {
        await Promise.all([refund(), release().catch(() => undefined)]);
        throw err;
      }
      waiting = d;
      if (d >= config.MAX_QUEUE_DEPTH) {
        queueFullRejections.inc({ model: p.data.model, reason: 'depth' });
        await Promise.all([refund(), release()]);
        throw new ApiError('queue_full', `The queue of model '${p.data.model}' is full (${d} waiting). Please retry shortly.`, {
          retryAfterMs: 2000,
        });
      }
    }
    // Last of the admission steps: nothing after it can fail and leave its backlog entry behind.
    const inBacklog = queued && config.BACKLOG_ADMISSION;
    if (inBacklog) {
      // Free room counts only while no job waits longer than its way to a worker (queue/backlog.ts); the script
      // judges that from the queue's waiting count. Unknown: no shortcut.
      if (waiting === null && p.slots !== null) waiting = await queueDepth(redis, p.data.model).catch(() => null);
      await this.reserveBacklog(p, estimate, p.slots, waiting, () => Promise.all([refund(), release().catch(() => undefined)]));
    }
    p.placement = TIER_PLACEMENT[limits.tier];

    ctx.stamps?.mark('admitted');
    const finish = async (r: JobResult | null, err?: unknown) => {
      await Promise.all([
        release().catch(() => undefined),
        // Every end leaves the backlog; only a run that produced a result counts as drained work (queue/backlog.ts).
        inBacklog ? this.deps.backlog.release(p.data.model, member, r !== null).catch((e) => ctx.log.warn('backlog release failed', { err: String(e) })) : undefined,
      ]);
      if (r) {
        const used = r.usage.prompt_tokens + r.usage.completion_tokens;
        await Promise.all([
          limiter.adjust(buckets, estimate, used),
          addUsage(redis, principalId, { requests: 1, prompt_tokens: r.usage.prompt_tokens, completion_tokens: r.usage.completion_tokens }),
          // Structured tool calls are never stored, whatever the request offered (services/upstream-prepare.ts says why).
          key && !r.choices.some((c) => toolCallsOf(c)) ? cache.put(key, r) : undefined,
        ]).catch((e) => ctx.log.warn('post-completion accounting failed', { err: String(e) }));
      } else {
        // Nothing was generated for a request the server turned away (busy, no worker): it costs nothing.
        const busy = err !== undefined && toApiError(err).status === 503;
        await (busy ? refund() : limiter.adjust(buckets, estimate, prompt)).catch(() => undefined);
      }
    };
    return { prepared: p, cached: null, finish };
  }

  /**
   * Backlog admission (queue/backlog.ts): 503 queue_full now for a request that would otherwise wait out
   * QUEUE_TIMEOUT_MS. A refusal or a Redis error first gives back what admission had taken (`giveBack`).
   */
  private async reserveBacklog(p: PreparedChat, cost: number, slots: number | null, waiting: number | null, giveBack: () => Promise<unknown>): Promise<void> {
    let r: Reservation;
    try {
      r = await this.deps.backlog.reserve(p.data.model, p.meta.id, cost, slots, waiting);
    } catch (err) {
      await giveBack();
      throw err;
    }
    if (r.admitted) return;
    queueFullRejections.inc({ model: p.data.model, reason: 'backlog' });
    await giveBack();
    throw backlogFullError(p.data.model, r);
  }
}

/** Prompts above this many characters are checked against the caller's budget before they are counted. */
const PEEK_BEFORE_COUNT_CHARS = 16_384;
/** Large prompts one caller may have counted at once on one gateway (each can take a tokenizer thread for seconds). */
const LARGE_COUNTS_PER_CALLER = 2;

/** Characters of message content in a body not yet validated (strings only; the schema judges the rest later). */
function contentChars(messages: unknown): number {
  if (!Array.isArray(messages)) return 0;
  let n = 0;
  for (const m of messages) {
    const c = (m as { content?: unknown } | null)?.content;
    if (typeof c === 'string') n += c.length;
    else if (Array.isArray(c)) {
      for (const part of c) n += (typeof part?.text === 'string' ? part.text.length : 0) + (typeof part?.refusal === 'string' ? part.refusal.length : 0);
    }
  }
  return n;
}

const allowed = (models: string[] | null, model: string) => models === null || models.includes(model);

function modelDenied(model: string): ApiError {
  return new ApiError('model_not_found', `The model \`${model}\` does not exist or you do not have access to it.`, { param: 'model' });
}

/** The /v1 routes whose requests go through admission (which sets x-ratelimit-* itself). */
const ADMITTING_PATHS = new Set(['/chat/completions', '/completions']);
/** A resumed stream (admitResume sets them). */
const RESUME_PATH = /^\/(chat\/)?completions\/[^/]+\/stream$/;

/** x-ratelimit-* on authenticated responses that admit nothing (GET /v1/models …); chat requests set their own. */
export function rateLimitHeaders(admission: ChatAdmission): RequestHandler {
  return async (req, res, next) => {
    const admits = (req.method === 'POST' && ADMITTING_PATHS.has(req.path)) || (req.method === 'GET' && RESUME_PATH.test(req.path));
    if (!admits && res.locals.principal) {
      await admission.peekHeaders(res, res.locals.principal).catch(() => undefined);
    }
    next();
  };
}
