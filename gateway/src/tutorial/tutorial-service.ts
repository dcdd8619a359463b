/**
 * The tutorial's routes on the same machinery as /v1: a tutorial request becomes an OpenAI chat request (history pairs
 * → user/assistant messages, max_length → max_tokens) and goes through GovernedChat (auth, limits, cache, filter)
 * and the queue; the answer is turned back into the tutorial's shape.
 */
import type { Response } from 'express';
import type { Config } from '../config';
import { toApiError } from '../errors';
import { type TutorialChatRequest, type TutorialChatResponse, tutorialChatRequestSchema } from '../protocol/tutorial';
import type { JobResult } from '../protocol/job';
import { SseWriter } from '../streaming/sse';
import type { ChatService, RequestContext } from '../services/chat-service';
import type { HeaderTarget } from '../limits/admission';
import type { Admitted, GovernedChat, GovernOptions } from '../services/governed-chat';
import { parseOrThrow } from '../services/validation';

export class TutorialService {
  constructor(
    private readonly config: Config,
    private readonly chat: ChatService,
    private readonly governed: GovernedChat,
  ) {}

  /** The OpenAI request a tutorial request stands for. */
  toChatBody(req: TutorialChatRequest, stream: boolean): Record<string, unknown> {
    const messages: Array<{ role: string; content: string }> = [];
    for (const [user, assistant] of req.history ?? []) {
      messages.push({ role: 'user', content: user }, { role: 'assistant', content: assistant });
    }
    messages.push({ role: 'user', content: req.prompt });
    return {
      model: req.model ?? this.config.DEFAULT_MODEL,
      messages,
      max_tokens: req.max_length,
      temperature: req.temperature,
      stream,
    };
  }

  /** POST /chat (and each item of /chat/batch, with that item's own headers). */
  async chatOnce(body: unknown, res: HeaderTarget, ctx: RequestContext, opts: GovernOptions): Promise<TutorialChatResponse> {
    const t0 = performance.now();
    const req = parseOrThrow(tutorialChatRequestSchema, body);
    const a = await this.governed.admit(this.toChatBody(req, false), res, ctx, opts);
    const result = await this.resultOf(a);
    return this.shape(req, result, t0);
  }

  /**
   * POST /chat/batch: every item runs concurrently through the queue; one failure does not fail the others. Each item
   * is admitted with headers of its own; the response then says what holds for the batch: `x-cache` lists every
   * item's in order (`-` where the cache was not consulted), `x-ratelimit-*` are the tightest seen.
   */
  async batch(items: unknown[], res: Response, ctx: RequestContext, opts: GovernOptions) {
    const itemHeaders = items.map(() => new ItemHeaders());
    const results = await Promise.all(
      items.map((item, i) =>
        this.chatOnce(item, itemHeaders[i], { ...ctx, log: ctx.log.child({ item: i }) }, opts).catch((err) => {
          const apiErr = toApiError(err);
          ctx.log.info('batch item failed', { item: i, code: apiErr.code });
          return apiErr.toBody();
        }),
      ),
    );
    ItemHeaders.merge(res, itemHeaders);
    return { results };
  }

  /** POST /chat/stream: `data: <text>` per piece of new text, then `data: [DONE]`; an error after the headers is
   * `event: error` with the OpenAI error object, then `data: [DONE]`. */
  async stream(body: unknown, res: Response, ctx: RequestContext, opts: GovernOptions): Promise<void> {
    const req = parseOrThrow(tutorialChatRequestSchema, body);
    const a = await this.governed.admit(this.toChatBody(req, true), res, ctx, opts);
    // A reader too slow for SSE_MAX_BUFFER_BYTES ends its stream; `stop` then cancels the job like a disconnect.
    const stop = new AbortController();
    const sse = new SseWriter(res, {
      keepAliveMs: this.config.SSE_KEEPALIVE_MS,
      maxBufferedBytes: this.config.SSE_MAX_BUFFER_BYTES,
      onOverflow: () => stop.abort('client'),
    });
    if (a.cached) {
      sse.open();
      const text = a.cached.choices.find((c) => c.index === 0)?.text ?? '';
      if (text) sse.text(text);
      sse.done();
      return;
    }
    const out = a.ctx.output!;
    let opened = false;
    try {
      const runCtx = { ...a.ctx, signal: AbortSignal.any([a.ctx.signal, stop.signal]) };
      const { result, rest } = await this.chat.run(a.prepared, runCtx, {
        onDelta: (index, raw) => {
          const text = index === 0 ? out.text(0, raw) : '';
          if (text) sse.text(text);
        },
        onEnqueued: () => {
          opened = true;
          sse.open();
        },
      });
      const tail = out.text(0, rest.find((c) => c.index === 0)?.rest ?? '') + out.flush(0);
      if (tail) sse.text(tail);
      out.done(result);
      sse.done();
      await a.finish();
    } catch (err) {
      await a.finish(err);
      if (!opened) throw err;
      const apiErr = toApiError(err);
      ctx.log.info('tutorial stream ended early', { code: apiErr.code });
      if (sse.writable) res.write(`event: error\ndata: ${JSON.stringify(apiErr.toBody())}\n\n`);
      sse.done();
    } finally {
      sse.end();
    }
  }

  private async resultOf(a: Admitted): Promise<JobResult> {
    if (a.cached) return a.cached;
    try {
      const { result } = await this.chat.run(a.prepared, a.ctx);
      a.ctx.output!.done(result);
      await a.finish();
      return a.ctx.output!.final(result);
    } catch (err) {
      await a.finish(err);
      throw err;
    }
  }

  private shape(req: TutorialChatRequest, result: JobResult, t0: number): TutorialChatResponse {
    const response = result.choices.find((c) => c.index === 0)?.text ?? '';
    return {
      response,
      history: [...(req.history ?? []), [req.prompt, response]],
      tokens_used: result.usage.prompt_tokens + result.usage.completion_tokens,
      processing_time: Math.round(performance.now() - t0) / 1000,
    };
  }
}

/** One /chat/batch item's response headers, merged into the batch's response afterwards. */
class ItemHeaders implements HeaderTarget {
  private readonly headers = new Map<string, string>();

  setHeader(name: string, value: string | number | readonly string[]): this {
    this.headers.set(name.toLowerCase(), String(value));
    return this;
  }

  hasHeader(name: string): boolean {
    return this.headers.has(name.toLowerCase());
  }

  static merge(res: Response, items: ItemHeaders[]): void {
    if (items.some((h) => h.headers.has('x-cache'))) res.setHeader('x-cache', items.map((h) => h.headers.get('x-cache') ?? '-').join(', '));
    for (const dim of ['requests', 'tokens']) {
      // The item that saw the least left speaks for the batch (its limit, remaining and reset belong together).
      const seen = items.filter((h) => h.headers.has(`x-ratelimit-remaining-${dim}`));
      if (seen.length === 0) continue;
      const tightest = seen.reduce((a, b) => (Number(b.headers.get(`x-ratelimit-remaining-${dim}`)) < Number(a.headers.get(`x-ratelimit-remaining-${dim}`)) ? b : a));
      for (const f of ['limit', 'remaining', 'reset']) res.setHeader(`x-ratelimit-${f}-${dim}`, tightest.headers.get(`x-ratelimit-${f}-${dim}`)!);
    }
    const degraded = [...new Set(items.map((h) => h.headers.get('x-degraded')).filter((d): d is string => !!d))];
    if (degraded.length > 0) res.setHeader('x-degraded', degraded.join(', '));
  }
}
