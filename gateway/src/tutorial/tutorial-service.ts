/**
 * The tutorial's routes on the same request path as /v1 (services/chat-pipeline.ts): a tutorial request becomes an
 * OpenAI chat request (history pairs → user/assistant messages, max_length → max_tokens), is admitted by ChatAdmission
 * (limits, cache) and answered by the pipeline (job or cache, output filter, accounting); only the shape differs —
 * the whole answer as the tutorial's JSON, or the stream as plain-text events (TextStream).
 */
import type { Response } from 'express';
import type { Config } from '../config';
import { toApiError } from '../errors';
import type { HeaderTarget } from '../limits/admission';
import { type TutorialChatRequest, type TutorialChatResponse, tutorialChatRequestSchema } from '../protocol/tutorial';
import type { JobResult } from '../protocol/job';
import type { ChatAdmission, GovernOptions } from '../services/chat-admission';
import type { ChatPipeline } from '../services/chat-pipeline';
import type { RequestContext } from '../services/chat-service';
import { parseOrThrow } from '../services/validation';

export class TutorialService {
  constructor(
    private readonly config: Config,
    private readonly pipeline: ChatPipeline,
    private readonly admission: ChatAdmission,
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
    const a = await this.admission.admit(this.toChatBody(req, false), res, ctx, opts);
    return this.shape(req, await this.pipeline.result(a, ctx), t0);
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
    const a = await this.admission.admit(this.toChatBody(req, true), res, ctx, opts);
    await this.pipeline.stream(a, res, ctx, 'text');
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
