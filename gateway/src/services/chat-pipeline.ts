/**
 * The request path of every chat request, top to bottom (/v1/chat/completions here; the tutorial's routes through
 * `result` and `stream`):
 *   admit  — services/chat-admission.ts (cheap checks, parse and count via ChatService.prepare, limits, cache lookup)
 *   source — the cached result, or the job (ChatService.run → queue/job-run.ts)
 *   filter — the output filter over the text, streamed or whole (filter/output-filter.ts)
 *   render — JSON (services/chat-format.ts) or SSE (services/chat-stream.ts), the same for a live job and a cached one
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
import { ChatStream, type StreamRenderer, TextStream } from './chat-stream';

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
    else res.json(toChatCompletion(p.meta, await this.result(a, ctx), p.wantLogprobs));
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
   * An admitted request as server-sent events: a cached result replayed whole, or a job's deltas as they arrive
   * (through the streaming filter). Errors before the job is queued are thrown (plain HTTP errors); after the
   * headers they go into the stream. A reader too slow for SSE_MAX_BUFFER_BYTES ends its stream and cancels the job.
   */
  async stream(a: Admitted, res: Response, ctx: RequestContext, shape: StreamShape): Promise<void> {
    const { config } = this.deps;
    const p = a.prepared;
    const stop = new AbortController();
    const sse = new SseWriter(res, {
      keepAliveMs: config.SSE_KEEPALIVE_MS,
      maxBufferedBytes: config.SSE_MAX_BUFFER_BYTES,
      onOverflow: () => stop.abort('client'),
      errorEvent: shape === 'text' ? 'error' : undefined,
    });
    const out: StreamRenderer = shape === 'text' ? new TextStream(sse) : new ChatStream(sse, p.meta, p.includeUsage);
    if (a.cached) {
      replay(out, this.filtered(a.cached), p.wantLogprobs);
      return;
    }

    const stamps = ctx.stamps;
    const filter = this.deps.filter.stream();
    const timer = new GenerationTimer(p.meta.model, p.data.enqueued_at_ms, true);
    let opened = false;
    let result: JobResult | null = null;
    try {
      const outcome = await this.deps.chat.run(p, { ...ctx, signal: AbortSignal.any([ctx.signal, stop.signal]) }, {
        // A fast worker can send its first delta before the enqueue's reply, i.e. before the headers went out:
        // SseWriter holds such events until open().
        onDelta: (index, raw, logprobs) => {
          if (raw.length > 0) stamps?.mark('delta');
          const text = filter.push(index, raw);
          if (text.length > 0) timer.text();
          out.content(index, text, logprobs);
          if (text.length > 0) stamps?.mark('written');
        },
        onStarted: () => stamps?.mark('started'),
        onEnqueued: () => {
          stamps?.mark('enqueued');
          opened = true;
          out.open();
          stamps?.mark('opened');
        },
      });
      result = outcome.result;
      for (const c of outcome.rest) out.content(c.index, filter.push(c.index, c.rest) + filter.flush(c.index), c.restLogprobs);
      for (const c of result.choices) {
        const held = filter.flush(c.index); // choices whose text all came as deltas
        if (held) out.content(c.index, held, null);
      }
      out.finish(result);
      timer.finish(result.usage, result.choices.length, result.timing);
      await a.finish(result);
    } catch (err) {
      await a.finish(result, err);
      if (!opened) throw err;
      const apiErr = toApiError(err);
      // Retryable conditions (busy, shutting down) are expected under load: info; anything else 5xx is a fault.
      if (apiErr.status >= 500 && apiErr.retryAfterMs === undefined) {
        ctx.log.error('stream failed', { jobId: p.meta.id, code: apiErr.code, err: apiErr.cause ?? apiErr });
      } else ctx.log.info('stream ended early', { jobId: p.meta.id, code: apiErr.code });
      out.fail(apiErr);
    } finally {
      out.end();
    }
  }

  private filtered(r: JobResult): JobResult {
    const { filter } = this.deps;
    if (!filter.active) return r;
    return { ...r, choices: r.choices.map((c) => ({ ...c, text: filter.apply(c.text) })) };
  }
}

/** A whole stored result, rendered as a live job's stream would have been. */
function replay(out: StreamRenderer, result: JobResult, wantLogprobs: boolean): void {
  out.open();
  for (const c of [...result.choices].sort((x, y) => x.index - y.index)) out.content(c.index, c.text, wantLogprobs ? (c.logprobs ?? []) : null);
  out.finish(result);
  out.end();
}
