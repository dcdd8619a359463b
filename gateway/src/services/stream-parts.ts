/**
 * How the pipeline (services/chat-pipeline.ts) plays the parts of one stream into SSE: every job of it (a chat: one;
 * a list of prompts: one per prompt) at once, each rendered by a PartRenderer, then the closing events, or the first
 * failure as the stream's error. The same for a live job, a cached answer and a resumed job (its stored events), so
 * that a resume renders exactly the events the stream had (streaming/event-ids.ts positions them).
 */
import type { Response } from 'express';
import type { Config } from '../config';
import { toApiError } from '../errors';
import type { OutputFilter, StreamFilter } from '../filter/output-filter';
import type { ToolCallDelta } from '../protocol/chat';
import type { JobResult, TokenLogprob } from '../protocol/job';
import type { FinalChoice } from '../queue/job-run';
import type { EventCursor } from '../streaming/event-ids';
import { SseWriter } from '../streaming/sse';
import type { RequestContext } from './chat-service';
import type { StreamRenderer } from './chat-stream';
import { mergeResults } from './completion-format';

/**
 * One job of a stream, as the pipeline renders it: a job it runs or a cached answer (an admitted request), or a job
 * it follows (a resumed stream). `play` renders its events and resolves with its result.
 */
export interface StreamPart {
  play(into: PartRenderer, open: () => void, ctx: RequestContext): Promise<JobResult>;
  finish(result: JobResult | null, err?: unknown): Promise<void>;
}

export interface StreamOptions {
  /** The stream's completion id (logs). */
  jobId: string;
  /** The tutorial's text stream: errors after the headers as `event: <name>`. */
  errorEvent?: string;
  /** Event ids (a /v1 stream), and what a resume skips. */
  cursor?: EventCursor;
}

/**
 * Renders one job's events into a stream, its choices moved to `base`, through the streaming output filter: the same
 * for a live job, a cached answer (its two events) and a resumed job, so that a resume renders the same events. Each
 * event is positioned at the worker event it comes from (its id names it).
 */
export class PartRenderer {
  private readonly filter: StreamFilter;
  /** The arguments of an upstream's streamed tool calls, filtered as text is: one buffer per call (`calls`). */
  private readonly argsFilter: StreamFilter;
  /** Each call seen, by "choice:call", as its argsFilter buffer and where its held-back arguments go at the end. */
  private readonly calls = new Map<string, { key: number; index: number; call: number }>();
  private seq = 0;

  constructor(
    private readonly sse: SseWriter,
    private readonly out: StreamRenderer,
    private readonly part: number,
    private readonly base: number,
    filter: OutputFilter,
  ) {
    this.filter = filter.stream();
    this.argsFilter = filter.stream();
  }

  /** Text of one choice from delta `seq`; returns what went out (the filter may hold some back). */
  delta(seq: number, index: number, raw: string, logprobs: TokenLogprob[] | null): string {
    this.at(seq);
    const text = this.filter.push(index, raw);
    this.out.content(this.base + index, text, logprobs);
    return text;
  }

  /**
   * A fragment of an upstream's tool call from event `seq`, as it came, its arguments through the output filter as
   * text is (our workers' calls are parsed from filtered text: an upstream's must not be a way around the filter).
   * The filter may hold a piece of the arguments back; a fragment that names the call still goes out at once.
   */
  toolCall(seq: number, index: number, call: ToolCallDelta): void {
    this.at(seq);
    const args = call.function.arguments;
    if (args === undefined) {
      this.out.toolCall?.(this.base + index, call);
      return;
    }
    const id = `${index}:${call.index}`;
    let c = this.calls.get(id);
    if (!c) this.calls.set(id, (c = { key: this.calls.size, index, call: call.index }));
    const sent = this.argsFilter.push(c.key, args);
    if (sent.length === 0 && args.length > 0 && call.id === undefined && call.function.name === undefined) return;
    this.out.toolCall?.(this.base + index, { ...call, function: { ...call.function, arguments: sent } });
  }

  /** The job's end (its `done` is event `seq`): the text not given as deltas, then what the filter held back. */
  end(seq: number, rest: readonly FinalChoice[], result: JobResult): void {
    this.at(seq);
    const { filter, out, base } = this;
    for (const c of rest) out.content(base + c.index, filter.push(c.index, c.rest) + filter.flush(c.index), c.restLogprobs);
    for (const c of result.choices) {
      const held = filter.flush(c.index); // choices whose text all came as deltas
      if (held) out.content(base + c.index, held, null);
    }
    for (const c of this.calls.values()) {
      const held = this.argsFilter.flush(c.key);
      if (held) out.toolCall?.(base + c.index, { index: c.call, function: { arguments: held } });
    }
  }

  /** Back at this job's last event: the stream's closing events (finish chunks, usage, [DONE]) go with it. */
  reposition(): void {
    this.sse.position(this.part, this.seq);
  }

  private at(seq: number): void {
    this.seq = seq;
    this.sse.position(this.part, seq);
  }
}

/**
 * Parts as one stream, their choices at `part × n + index`. Every part plays at once; the headers go out with the
 * first one queued (or cached, or attached); the first failure stops the others (their jobs are cancelled at once)
 * and ends the stream with its error.
 */
export async function playParts(
  deps: { config: Config; filter: OutputFilter },
  parts: readonly StreamPart[],
  n: number,
  res: Response,
  ctx: RequestContext,
  render: (sse: SseWriter) => StreamRenderer,
  opts: StreamOptions,
): Promise<void> {
  const { config } = deps;
  const stop = new AbortController();
  const sse = new SseWriter(res, {
    keepAliveMs: config.SSE_KEEPALIVE_MS,
    maxBufferedBytes: config.SSE_MAX_BUFFER_BYTES,
    onOverflow: () => stop.abort('stopped'),
    errorEvent: opts.errorEvent,
    cursor: opts.cursor,
  });
  const out = render(sse);
  let opened = false;
  const open = () => {
    if (opened) return;
    opened = true;
    out.open();
  };
  // 'stopped' (a failed part, an overflowed stream) cancels jobs at once; the client's own leaving ('client') may not.
  const sub = { ...ctx, signal: AbortSignal.any([ctx.signal, stop.signal]) };
  const renderers = parts.map((_, i) => new PartRenderer(sse, out, i, i * n, deps.filter));
  let failure: { err: unknown } | null = null;
  const settled = await Promise.allSettled(
    parts.map((part, i) =>
      part.play(renderers[i], open, sub).catch((err: unknown) => {
        failure ??= { err };
        stop.abort('stopped');
        throw err;
      }),
    ),
  );
  const results = settled.map((s) => (s.status === 'fulfilled' ? s.value : null));
  try {
    if (!failure) {
      renderers[renderers.length - 1].reposition();
      out.finish(mergeResults(results as JobResult[], n));
    }
    await Promise.all(parts.map((part, i) => part.finish(results[i], settled[i].status === 'rejected' ? (settled[i] as PromiseRejectedResult).reason : undefined)));
    if (!failure) return;
    const { err } = failure as { err: unknown };
    if (!opened) throw err;
    const apiErr = toApiError(err);
    // Retryable conditions (busy, shutting down) are expected under load: info; anything else 5xx is a fault.
    const { jobId } = opts;
    if (apiErr.status >= 500 && apiErr.retryAfterMs === undefined) {
      ctx.log.error('stream failed', { jobId, code: apiErr.code, err: apiErr.cause ?? apiErr });
    } else ctx.log.info('stream ended early', { jobId, code: apiErr.code });
    out.fail(apiErr);
  } finally {
    // Not opened: the error is thrown to the error middleware, which writes it as a plain HTTP status.
    if (opened) out.end();
  }
}
