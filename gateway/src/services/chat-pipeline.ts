/**
 * The request path of every generation request, top to bottom (/v1/chat/completions and /v1/completions here; the
 * tutorial's routes through `result` and `stream`):
 *   admit  — services/chat-admission.ts (cheap checks, parse and count via ChatService.prepare, limits, cache lookup)
 *   source — the cached result, or the job (ChatService.run → queue/job-run.ts)
 *   filter — the output filter over the text, streamed or whole (filter/output-filter.ts)
 *   render — JSON (services/chat-format.ts, completion-format.ts) or SSE (services/chat-stream.ts), the same for a
 *            live job and a cached one
 *   finish — the accounting (Admitted.finish), always, with the result when there is one.
 * Each step only calls down into the next; nothing below calls back up.
 */
import type { Response } from 'express';
import type { Config } from '../config';
import { toApiError } from '../errors';
import type { OutputFilter } from '../filter/output-filter';
import { GenerationTimer } from '../metrics';
import type { JobResult } from '../protocol/job';
import { SseWriter } from '../streaming/sse';
import type { Admitted, ChatAdmission, GovernOptions } from './chat-admission';
import { toChatCompletion } from './chat-format';
import type { ChatService, RequestContext } from './chat-service';
import { ChatStream, CompletionStream, type StreamRenderer, TextStream } from './chat-stream';
import { type CompletionRender, mergeResults, toTextCompletion } from './completion-format';
import { parseCompletion } from './completion-params';

export interface ChatPipelineDeps {
  config: Config;
  admission: ChatAdmission;
  chat: ChatService;
  filter: OutputFilter;
}

/** Which event shape a stream renders (see services/chat-stream.ts). */
export type StreamShape = 'chat' | 'text';

export class ChatPipeline {
  constructor(private readonly deps: ChatPipelineDeps) {}

  /** POST /v1/chat/completions: JSON or SSE, from the cache or a job. */
  async completions(body: unknown, res: Response, ctx: RequestContext, opts: GovernOptions): Promise<void> {
    const a = await this.deps.admission.admit(body, res, ctx, opts);
    const p = a.prepared;
    if (p.stream) await this.stream(a, res, ctx, 'chat');
    else res.json(toChatCompletion(p.meta, await this.result(a, ctx), p.wantLogprobs, p.parseToolCalls));
  }

  /** An admitted request's whole result, filtered: from the cache or a job. */
  async result(a: Admitted, ctx: RequestContext): Promise<JobResult> {
    if (a.cached) return this.filtered(a.cached);
    const p = a.prepared;
    const timer = new GenerationTimer(p.meta.model, p.data.enqueued_at_ms, false);
    let result: JobResult;
    try {
      ({ result } = await this.deps.chat.run(p, ctx));
    } catch (err) {
      await a.finish(null, err);
      throw err;
    }
    timer.finish(result.usage, result.choices.length, result.timing);
    await a.finish(result);
    return this.filtered(result);
  }

  /**
   * POST /v1/completions. Each prompt of the request is admitted as a request of its own (prompt counted, limits,
   * cache, a job), all of them run at once, and their results are rendered as one answer, indexed prompt-major. One
   * prompt refused refuses the request; one failing run cancels the others.
   */
  async textCompletions(body: unknown, res: Response, ctx: RequestContext, opts: GovernOptions): Promise<void> {
    // Validated whole first (cheap: no tokenizing) so that a bad list is one 400; each admission parses its own prompt.
    const c = parseCompletion(body);
    const parts = await this.admitEach(c.prompts.map((prompt) => ({ ...c.req, prompt })), res, ctx, opts);
    const first = parts[0].prepared;
    const n = c.params.n;
    const render: CompletionRender = { meta: first.meta, prompts: c.prompts, n, echo: c.echo, logprobs: c.logprobs, includeUsage: first.includeUsage };
    if (first.stream) await this.streamParts(parts, n, res, ctx, (sse) => new CompletionStream(sse, render));
    else res.json(toTextCompletion(render, mergeResults(await this.results(parts, ctx), n)));
  }

  /**
   * An admitted request as server-sent events: a cached result replayed whole, or a job's deltas as they arrive
   * (through the streaming filter). Errors before the job is queued are thrown (plain HTTP errors); after the
   * headers they go into the stream. A reader too slow for SSE_MAX_BUFFER_BYTES ends its stream and cancels the job.
   */
  stream(a: Admitted, res: Response, ctx: RequestContext, shape: StreamShape): Promise<void> {
    const p = a.prepared;
    return this.streamParts([a], p.data.params.n, res, ctx, (sse) => (shape === 'text' ? new TextStream(sse) : new ChatStream(sse, p.meta, p.includeUsage, p.parseToolCalls)), shape === 'text' ? 'error' : undefined);
  }

  /** Admits every body; when one is refused, the others are given back as requests turned away for that reason. */
  private async admitEach(bodies: unknown[], res: Response, ctx: RequestContext, opts: GovernOptions): Promise<Admitted[]> {
    const settled = await Promise.allSettled(bodies.map((b) => this.deps.admission.admit(b, res, ctx, opts, 'completion')));
    const refused = settled.find((s): s is PromiseRejectedResult => s.status === 'rejected');
    if (!refused) return settled.map((s) => (s as PromiseFulfilledResult<Admitted>).value);
    await Promise.all(
      settled.map(async (s) => {
        if (s.status !== 'fulfilled') return;
        if (!s.value.cached) this.deps.chat.releaseEvents(s.value.prepared);
        await s.value.finish(null, refused.reason);
      }),
    );
    throw refused.reason;
  }

  /** The whole results of several admitted requests, in order; the first failure cancels the others and is thrown. */
  private async results(parts: readonly Admitted[], ctx: RequestContext): Promise<JobResult[]> {
    const stop = new AbortController();
    const sub = { ...ctx, signal: AbortSignal.any([ctx.signal, stop.signal]) };
    let failure: { err: unknown } | null = null;
    const settled = await Promise.allSettled(
      parts.map((a) =>
        this.result(a, sub).catch((err: unknown) => {
          failure ??= { err };
          stop.abort('client');
          throw err;
        }),
      ),
    );
    if (failure) throw (failure as { err: unknown }).err;
    return settled.map((s) => (s as PromiseFulfilledResult<JobResult>).value);
  }

  /**
   * Admitted requests as one stream, their choices at `part × n + index`. Every part runs at once; the headers go out
   * with the first one queued (or cached); the first failure cancels the others and ends the stream with its error.
   */
  private async streamParts(parts: readonly Admitted[], n: number, res: Response, ctx: RequestContext, render: (sse: SseWriter) => StreamRenderer, errorEvent?: string): Promise<void> {
    const { config } = this.deps;
    const stop = new AbortController();
    const sse = new SseWriter(res, {
      keepAliveMs: config.SSE_KEEPALIVE_MS,
      maxBufferedBytes: config.SSE_MAX_BUFFER_BYTES,
      onOverflow: () => stop.abort('client'),
      errorEvent,
    });
    const out = render(sse);
    let opened = false;
    const open = () => {
      if (opened) return;
      opened = true;
      out.open();
    };
    const sub = { ...ctx, signal: AbortSignal.any([ctx.signal, stop.signal]) };
    let failure: { err: unknown } | null = null;
    const settled = await Promise.allSettled(
      parts.map((a, i) =>
        this.streamPart(a, i * n, out, open, sub).catch((err: unknown) => {
          failure ??= { err };
          stop.abort('client');
          throw err;
        }),
      ),
    );
    const results = settled.map((s) => (s.status === 'fulfilled' ? s.value : null));
    try {
      if (!failure) out.finish(mergeResults(results as JobResult[], n));
      await Promise.all(parts.map((a, i) => a.finish(results[i], settled[i].status === 'rejected' ? (settled[i] as PromiseRejectedResult).reason : undefined)));
      if (!failure) return;
      const { err } = failure as { err: unknown };
      if (!opened) throw err;
      const apiErr = toApiError(err);
      // Retryable conditions (busy, shutting down) are expected under load: info; anything else 5xx is a fault.
      const jobId = parts[0].prepared.meta.id;
      if (apiErr.status >= 500 && apiErr.retryAfterMs === undefined) {
        ctx.log.error('stream failed', { jobId, code: apiErr.code, err: apiErr.cause ?? apiErr });
      } else ctx.log.info('stream ended early', { jobId, code: apiErr.code });
      out.fail(apiErr);
    } finally {
      out.end();
    }
  }

  /** One admitted request's output into a stream, its choices shifted by `base`: replayed from the cache, or live. */
  private async streamPart(a: Admitted, base: number, out: StreamRenderer, open: () => void, ctx: RequestContext): Promise<JobResult> {
    const p = a.prepared;
    if (a.cached) {
      // A whole stored result, rendered as a live job's stream would have been.
      const r = this.filtered(a.cached);
      open();
      for (const c of [...r.choices].sort((x, y) => x.index - y.index)) out.content(base + c.index, c.text, p.wantLogprobs ? (c.logprobs ?? []) : null);
      return r;
    }
    const stamps = ctx.stamps;
    const filter = this.deps.filter.stream();
    const timer = new GenerationTimer(p.meta.model, p.data.enqueued_at_ms, true);
    const outcome = await this.deps.chat.run(p, ctx, {
      // A fast worker can send its first delta before the enqueue's reply, i.e. before the headers went out:
      // SseWriter holds such events until open().
      onDelta: (index, raw, logprobs) => {
        if (raw.length > 0) stamps?.mark('delta');
        const text = filter.push(index, raw);
        if (text.length > 0) timer.text();
        out.content(base + index, text, logprobs);
        if (text.length > 0) stamps?.mark('written');
      },
      onStarted: () => stamps?.mark('started'),
      onEnqueued: () => {
        stamps?.mark('enqueued');
        open();
        stamps?.mark('opened');
      },
    });
    const { result } = outcome;
    for (const c of outcome.rest) out.content(base + c.index, filter.push(c.index, c.rest) + filter.flush(c.index), c.restLogprobs);
    for (const c of result.choices) {
      const held = filter.flush(c.index); // choices whose text all came as deltas
      if (held) out.content(base + c.index, held, null);
    }
    timer.finish(result.usage, result.choices.length, result.timing);
    return result;
  }

  private filtered(r: JobResult): JobResult {
    const { filter } = this.deps;
    if (!filter.active) return r;
    return { ...r, choices: r.choices.map((c) => ({ ...c, text: filter.apply(c.text) })) };
  }
}
