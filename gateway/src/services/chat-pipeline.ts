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
 *
 * A /v1 stream is resumable (README "Resumable streams"): its events carry ids (streaming/event-ids.ts), its record
 * (resume/stream-record.ts) says who started it and how it renders, and `resume` renders it again on any replica from
 * the job's stored events (ChatService.attach), through the same renderers, sending only what the client lacks.
 */
import type { Response } from 'express';
import type { Principal } from '../auth/api-keys';
import type { Config } from '../config';
import type { OutputFilter } from '../filter/output-filter';
import { GenerationTimer } from '../metrics';
import type { JobResult } from '../protocol/job';
import { type CachedChoice, type StreamRecord, type StreamRecords, storedEventsMaxBytes } from '../resume/stream-record';
import { EventCursor, parseLastEventId } from '../streaming/event-ids';
import type { SseWriter } from '../streaming/sse';
import type { Admitted, ChatAdmission, GovernOptions } from './chat-admission';
import { toChatCompletion } from './chat-format';
import { type ChatService, completionNotFound, type RequestContext } from './chat-service';
import { ChatStream, CompletionStream, type StreamRenderer, TextStream } from './chat-stream';
import { type CompletionRender, mergeResults, toTextCompletion } from './completion-format';
import { parseCompletion } from './completion-params';
import { type PartRenderer, playParts, type StreamPart } from './stream-parts';
import { type Breakers, type Permit, sharePermit } from '../routing/breaker';
import { answerWithFallback } from '../routing/fallback';
import { toolCallsOf } from '../routing/upstream-tools';
import type { RoutingTable } from '../routing/table';

export interface ChatPipelineDeps {
  config: Config;
  admission: ChatAdmission;
  chat: ChatService;
  filter: OutputFilter;
  records: StreamRecords;
  /** Which source serves a model and what answers when it fails (routing/fallback.ts). */
  routing: RoutingTable;
  breakers: Breakers;
}

/** Which event shape a stream renders (see services/chat-stream.ts). */
export type StreamShape = 'chat' | 'text';

/** The route a resumable stream belongs to (its record says which; a resume on the other route is a 404). */
export type ResumableShape = StreamRecord['shape'];

export class ChatPipeline {
  constructor(private readonly deps: ChatPipelineDeps) {}

  /**
   * POST /v1/chat/completions: JSON or SSE, from the cache, a job or an upstream; a model of the routing table through
   * its fallback chain and breakers (routing/fallback.ts).
   */
  completions(body: unknown, res: Response, ctx: RequestContext, opts: GovernOptions): Promise<void> {
    return answerWithFallback(this.deps, body, res, ctx, (b, permit) => this.answer(b, res, ctx, opts, permit));
  }

  /** One model's answer; the run reports to `permit`, its model's breaker. */
  private async answer(body: unknown, res: Response, ctx: RequestContext, opts: GovernOptions, permit: Permit | null): Promise<void> {
    const a = await this.deps.admission.admit(body, res, ctx, opts);
    const p = a.prepared;
    if (permit) p.permit = permit;
    if (!p.stream) {
      res.json(toChatCompletion(p.meta, await this.result(a, ctx), p.wantLogprobs, p.parseToolCalls));
      return;
    }
    const record = this.record(opts.principal, 'chat', [a], p.data.params.n, { tools: p.parseToolCalls });
    await this.streamResumable(record, [a], res, ctx, (sse) => new ChatStream(sse, p.meta, p.includeUsage, p.parseToolCalls));
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
   * cache, a job or an upstream request), all of them run at once, and their results are rendered as one answer,
   * indexed prompt-major. One prompt refused refuses the request; one failing run cancels the others. A model of the
   * routing table is answered through its fallback chain and breakers, as a chat is (routing/fallback.ts): the
   * request is one use of the breaker, however many prompts it has.
   */
  textCompletions(body: unknown, res: Response, ctx: RequestContext, opts: GovernOptions): Promise<void> {
    return answerWithFallback(this.deps, body, res, ctx, (b, permit) => this.textAnswer(b, res, ctx, opts, permit));
  }

  private async textAnswer(body: unknown, res: Response, ctx: RequestContext, opts: GovernOptions, permit: Permit | null): Promise<void> {
    // Validated whole first (cheap: no tokenizing) so that a bad list is one 400; each admission parses its own prompt.
    const c = parseCompletion(body);
    const parts = await this.admitEach(c.prompts.map((prompt) => ({ ...c.req, prompt })), res, ctx, opts);
    if (permit) {
      const runs = parts.filter((a) => !a.cached);
      sharePermit(permit, runs.length).forEach((share, i) => (runs[i].prepared.permit = share));
    }
    const first = parts[0].prepared;
    const n = c.params.n;
    const render: CompletionRender = { meta: first.meta, prompts: c.prompts, n, echo: c.echo, logprobs: c.logprobs, includeUsage: first.includeUsage };
    if (!first.stream) {
      res.json(toTextCompletion(render, mergeResults(await this.results(parts, ctx), n)));
      return;
    }
    // The prompts are kept only when they are echoed: the renderer needs nothing else of them.
    const completion = { prompts: c.echo ? c.prompts : c.prompts.map(() => ''), echo: c.echo, logprobs: c.logprobs };
    const record = this.record(opts.principal, 'completion', parts, n, { completion });
    await this.streamResumable(record, parts, res, ctx, (sse) => new CompletionStream(sse, render));
  }

  /**
   * GET /v1/chat/completions/{id}/stream, GET /v1/completions/{id}/stream: the stream `id` again, for the caller who
   * started it, rendered from its jobs' stored events by the renderer it had, then live until its end; the events up
   * to `lastEventId` (the client's Last-Event-ID header) are not sent again. A resume generates nothing: it draws one
   * request from the caller's RPM budget and no tokens (docs/GOVERNANCE.md).
   */
  async resume(id: string, shape: ResumableShape, lastEventId: string | undefined, res: Response, ctx: RequestContext, principal: Principal): Promise<void> {
    const record = await this.deps.records.read(id);
    // Another caller's stream is answered as one that does not exist, as OpenAI answers ids it does not know.
    if (!record || record.owner !== principal.keyId || record.shape !== shape) throw completionNotFound(id);
    const seen = parseLastEventId(lastEventId, id, record.jobs.length);
    await this.deps.admission.admitResume(res, principal);
    const { meta } = record;
    const parts = record.jobs.map(
      (job): StreamPart => ({
        play: async (into, open, sub) => {
          const target = { jobId: job.id, model: meta.model, deadline_ms: job.deadline_ms, start_deadline_ms: job.start_deadline_ms };
          const outcome = await this.deps.chat.attach(target, sub, { onDelta: (index, raw, lp, seq) => into.delta(seq, index, raw, lp), onEnqueued: open });
          into.end(outcome.seq, outcome.rest, outcome.result);
          return outcome.result;
        },
        finish: async () => undefined, // the request that started the job accounts for it
      }),
    );
    const render =
      record.shape === 'chat'
        ? (sse: SseWriter) => new ChatStream(sse, meta, record.include_usage, record.tools)
        : (sse: SseWriter) => {
            const c = record.completion ?? { prompts: record.jobs.map(() => ''), echo: false, logprobs: null };
            return new CompletionStream(sse, { meta, prompts: c.prompts, n: record.n, echo: c.echo, logprobs: c.logprobs, includeUsage: record.include_usage });
          };
    ctx.log.info('stream resumed', { jobId: id, lastEventId: lastEventId ?? null });
    await playParts(this.deps, parts, record.n, res, ctx, render, { jobId: id, cursor: new EventCursor(id, record.jobs.length, seen) });
  }

  /**
   * An admitted request as server-sent events, not resumable (the tutorial's /chat/stream): a cached result replayed
   * whole, or a job's deltas as they arrive (through the streaming filter). Errors before the job is queued are thrown
   * (plain HTTP errors); after the headers they go into the stream. A reader too slow for SSE_MAX_BUFFER_BYTES ends
   * its stream and cancels the job.
   */
  stream(a: Admitted, res: Response, ctx: RequestContext, shape: StreamShape): Promise<void> {
    const p = a.prepared;
    const render = (sse: SseWriter) => (shape === 'text' ? new TextStream(sse) : new ChatStream(sse, p.meta, p.includeUsage, p.parseToolCalls));
    return playParts(this.deps, this.admittedParts([a], false), p.data.params.n, res, ctx, render, { jobId: p.meta.id, errorEvent: shape === 'text' ? 'error' : undefined });
  }

  /**
   * A /v1 stream: ids on its events, its record written (unless RESUME_EVENTS_MAX_BYTES is 0: no stream is
   * resumable then), its jobs asked to store their events, and the record shortened to the events' TTL at the end.
   */
  private async streamResumable(record: StreamRecord, parts: readonly Admitted[], res: Response, ctx: RequestContext, render: (sse: SseWriter) => StreamRenderer): Promise<void> {
    const { records, config } = this.deps;
    const id = record.meta.id;
    const resumable = storedEventsMaxBytes(config) > 0;
    const warn = (what: string) => (err: unknown) => ctx.log.warn(`${what} failed: the stream cannot be resumed`, { jobId: id, err: String(err) });
    // Not awaited: sent before the jobs' Queue.add on the same connection (resume/stream-record.ts).
    if (resumable) records.write(record).catch(warn('writing the stream record'));
    try {
      await playParts(this.deps, this.admittedParts(parts, resumable), record.n, res, ctx, render, { jobId: id, cursor: new EventCursor(id, parts.length) });
    } finally {
      if (resumable) records.ended(id).catch(warn('shortening the stream record'));
    }
  }

  /** The record of a /v1 stream about to start. */
  private record(principal: Principal, shape: ResumableShape, parts: readonly Admitted[], n: number, extra: { tools?: boolean; completion?: StreamRecord['completion'] }): StreamRecord {
    const first = parts[0].prepared;
    return {
      v: 1,
      owner: principal.keyId,
      shape,
      meta: first.meta,
      jobs: parts.map((a) => ({ id: a.prepared.meta.id, deadline_ms: a.prepared.data.deadline_ms, start_deadline_ms: a.prepared.data.start_deadline_ms ?? null })),
      n,
      include_usage: first.includeUsage,
      tools: extra.tools ?? false,
      completion: extra.completion,
    };
  }

  /** Admitted requests as stream parts: each runs its job (asking it to store its events when `resumable`) or replays its cached answer. */
  private admittedParts(parts: readonly Admitted[], resumable: boolean): StreamPart[] {
    return parts.map((a) => ({ play: (into, open, ctx) => this.streamPart(a, into, open, ctx, resumable), finish: (r, err) => a.finish(r, err) }));
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
          stop.abort('stopped');
          throw err;
        }),
      ),
    );
    if (failure) throw (failure as { err: unknown }).err;
    return settled.map((s) => (s as PromiseFulfilledResult<JobResult>).value);
  }

  /**
   * One admitted request's output into a stream: its cached answer, rendered from the two events a worker would have
   * sent (and stored as such, so that it resumes like a job), or its job, live.
   */
  private async streamPart(a: Admitted, into: PartRenderer, open: () => void, ctx: RequestContext, resumable: boolean): Promise<JobResult> {
    const p = a.prepared;
    if (a.cached) {
      const r = a.cached;
      const choices: CachedChoice[] = [...r.choices]
        .sort((x, y) => x.index - y.index)
        .map((c) => ({ index: c.index, text: c.text, logprobs: p.wantLogprobs ? (c.logprobs ?? []) : null }));
      if (resumable) this.deps.records.writeCachedEvents(p.meta.id, choices, r).catch((err) => ctx.log.warn('storing a cached stream failed: it cannot be resumed', { jobId: p.meta.id, err: String(err) }));
      open();
      for (const c of choices) into.delta(1, c.index, c.text, c.logprobs);
      into.end(2, [], r);
      return r;
    }
    const stamps = ctx.stamps;
    const timer = new GenerationTimer(p.meta.model, p.data.enqueued_at_ms, true);
    const outcome = await this.deps.chat.run(
      p,
      ctx,
      {
        // A fast worker can send its first delta before the enqueue's reply, i.e. before the headers went out:
        // SseWriter holds such events until open().
        onDelta: (index, raw, logprobs, seq) => {
          if (raw.length > 0) stamps?.mark('delta');
          const text = into.delta(seq, index, raw, logprobs);
          if (text.length > 0) {
            timer.text();
            stamps?.mark('written');
          }
        },
        onToolCall: (index, call, seq) => {
          into.toolCall(seq, index, call);
          timer.text(); // a call is the answer's first output as much as text is
        },
        onStarted: () => stamps?.mark('started'),
        onEnqueued: () => {
          stamps?.mark('enqueued');
          open();
          stamps?.mark('opened');
        },
      },
      { resumable },
    );
    const { result } = outcome;
    into.end(outcome.seq, outcome.rest, result);
    timer.finish(result.usage, result.choices.length, result.timing);
    return result;
  }

  private filtered(r: JobResult): JobResult {
    const { filter } = this.deps;
    if (!filter.active) return r;
    return {
      ...r,
      choices: r.choices.map((c) => {
        // An upstream's structured calls (routing/upstream-tools.ts): their arguments are model output as text is.
        const calls = toolCallsOf(c)?.map((t) => ({ ...t, function: { ...t.function, arguments: filter.apply(t.function.arguments) } }));
        return { ...c, text: filter.apply(c.text), ...(calls ? { tool_calls: calls } : {}) };
      }),
    };
  }
}
