/**
 * The render step for streams: what one chat run looks like as server-sent events. The pipeline
 * (services/chat-pipeline.ts) drives a StreamRenderer the same way for a live job (deltas as they arrive) and for a
 * cached result (replayed whole); the renderer only decides the events' shape:
 *   - ChatStream: OpenAI's chat.completion.chunk events (role chunk on a choice's first output, content chunks, every
 *     finish chunk in index order, the usage chunk when asked for, [DONE]);
 *   - TextStream: the tutorial's /chat/stream (`data: <text>` of the first choice, [DONE]; errors as `event: error`);
 *   - CompletionStream: /v1/completions' `text_completion` chunks (the echoed prompts first, text chunks, every
 *     finish chunk in index order, the usage chunk when asked for, [DONE]).
 * Events written before open() wait inside SseWriter.
 */
import type { ApiError } from '../errors';
import type { ToolCallDelta } from '../protocol/chat';
import type { JobResult, TokenLogprob } from '../protocol/job';
import { toolCallsOf } from '../routing/upstream-tools';
import type { SseWriter } from '../streaming/sse';
import { type ToolEvent, ToolCallParser, toolCallId } from '../tools/parser';
import { ChunkFactory, type CompletionMeta } from './chat-format';
import { CompletionChunks, type CompletionRender, codePoints, legacyLogprobs, promptOf, splitPromptLogprobs } from './completion-format';

export interface StreamRenderer {
  /** The SSE headers go out (the job is queued: errors before this are plain HTTP statuses). */
  open(): void;
  /** Output of one choice. A piece with neither text nor logprobs only opens the choice. */
  content(index: number, text: string, logprobs: TokenLogprob[] | null | undefined): void;
  /** A fragment of an upstream's streamed tool call (chat streams only; the others have no tool calls). */
  toolCall?(index: number, call: ToolCallDelta): void;
  /** The end of a stream whose output was all written. */
  finish(result: JobResult): void;
  /** An error after the headers went out, when the client is still there. */
  fail(err: ApiError): void;
  end(): void;
}

export class ChatStream implements StreamRenderer {
  private readonly chunks: ChunkFactory;
  private readonly opened = new Set<number>();
  /** Per choice, when the request offered tools: its text read for tool calls (tools/parser.ts). */
  private readonly tools: Map<number, ToolCallParser> | null;

  constructor(
    private readonly sse: SseWriter,
    private readonly meta: CompletionMeta,
    private readonly includeUsage: boolean,
    parseToolCalls = false,
  ) {
    this.chunks = new ChunkFactory(meta, includeUsage);
    this.tools = parseToolCalls ? new Map() : null;
  }

  open(): void {
    this.sse.open();
  }

  content(index: number, text: string, logprobs: TokenLogprob[] | null | undefined): void {
    this.openChoice(index);
    if (this.tools === null) {
      if (text.length > 0 || logprobs?.length) this.sse.data(this.chunks.content(index, text, logprobs ?? null));
      return;
    }
    let parser = this.tools.get(index);
    if (!parser) this.tools.set(index, (parser = new ToolCallParser((call) => toolCallId(this.meta.id, index, call))));
    this.toolEvents(index, parser.push(text), logprobs ?? null);
  }

  /** An upstream's fragment, passed on as it came (its calls are not in the text: nothing for the parser). */
  toolCall(index: number, call: ToolCallDelta): void {
    this.openChoice(index);
    this.sse.data(this.chunks.toolCall(index, call, null));
  }

  private openChoice(index: number): void {
    if (this.opened.has(index)) return;
    this.opened.add(index);
    this.sse.data(this.chunks.role(index));
  }

  finish(result: JobResult): void {
    const choices = [...result.choices].sort((a, b) => a.index - b.index);
    for (const [index, parser] of this.tools ?? []) this.toolEvents(index, parser.flush(), null);
    for (const c of choices) {
      // Our workers' calls are counted by the parser; an upstream's ride on the result (routing/upstream-tools.ts).
      const called = (this.tools?.get(c.index)?.callCount ?? 0) > 0 || toolCallsOf(c) !== null;
      this.sse.data(this.chunks.finish(c.index, c.finish_reason, called));
    }
    if (this.includeUsage) this.sse.data(this.chunks.usage(result));
    this.sse.done();
  }

  /** Content and tool-call chunks, in the order the model wrote them; logprobs ride on the first chunk. */
  private toolEvents(index: number, events: ToolEvent[], logprobs: TokenLogprob[] | null): void {
    let lp = logprobs?.length ? logprobs : null;
    for (const e of events) {
      if (e.kind === 'text') this.sse.data(this.chunks.content(index, e.text, lp));
      else if (e.kind === 'call') {
        this.sse.data(this.chunks.toolCall(index, { index: e.index, id: e.id, type: 'function', function: { name: e.name, arguments: '' } }, lp));
      } else this.sse.data(this.chunks.toolCall(index, { index: e.index, function: { arguments: e.text } }, lp));
      lp = null;
    }
    if (lp) this.sse.data(this.chunks.content(index, '', lp));
  }

  fail(err: ApiError): void {
    if (this.sse.writable) this.sse.error(err);
  }

  end(): void {
    this.sse.end();
  }
}

/** The tutorial's text stream: only the first choice's text; the SseWriter is built with `errorEvent: 'error'`. */
export class TextStream implements StreamRenderer {
  constructor(private readonly sse: SseWriter) {}

  open(): void {
    this.sse.open();
  }

  content(index: number, text: string): void {
    if (index === 0 && text.length > 0) this.sse.text(text);
  }

  finish(): void {
    this.sse.done();
  }

  fail(err: ApiError): void {
    if (this.sse.writable) this.sse.error(err);
  }

  end(): void {
    this.sse.end();
  }
}

/** The legacy completions' stream; indices are global (prompt × n + choice), as the pipeline passes them. */
export class CompletionStream implements StreamRenderer {
  private readonly chunks: CompletionChunks;
  /** Per choice: characters of its text so far (the legacy logprobs' text_offset counts from the choice's start). */
  private readonly offsets = new Map<number, number>();
  /**
   * Echo with logprobs: each choice's echo waits for its prompt's scored tokens, which come first in its first delta
   * (or, for a choice that generated nothing, in its result), and goes out just before its first text.
   */
  private readonly echoWaits: boolean;

  constructor(
    private readonly sse: SseWriter,
    private readonly r: CompletionRender,
  ) {
    this.chunks = new CompletionChunks(r);
    this.echoWaits = r.echo && r.logprobs !== null;
  }

  open(): void {
    this.sse.open();
    if (!this.r.echo || this.echoWaits) return;
    // The echo goes first, once per choice, before any generated text.
    for (let index = 0; index < this.r.prompts.length * this.r.n; index++) {
      const prompt = promptOf(this.r, index);
      this.sse.position(Math.floor(index / this.r.n), 0); // before any event of that prompt's job
      this.offsets.set(index, codePoints(prompt));
      this.sse.data(this.chunks.text(index, prompt, null));
    }
  }

  content(index: number, text: string, logprobs: TokenLogprob[] | null | undefined): void {
    if (this.echoWaits && !this.offsets.has(index)) {
      const { prompt, generated } = splitPromptLogprobs(logprobs ?? []);
      this.echo(index, prompt);
      logprobs = generated;
    }
    if (text.length === 0 && !logprobs?.length) return;
    const at = this.offsets.get(index) ?? 0;
    const lp = this.r.logprobs === null ? null : legacyLogprobs(logprobs ?? [], at);
    this.offsets.set(index, at + (lp ? lp.tokens.reduce((n, t) => n + codePoints(t), 0) : 0));
    this.sse.data(this.chunks.text(index, text, lp));
  }

  finish(result: JobResult): void {
    const choices = [...result.choices].sort((a, b) => a.index - b.index);
    if (this.echoWaits) for (const c of choices) if (!this.offsets.has(c.index)) this.echo(c.index, splitPromptLogprobs(c.logprobs ?? []).prompt);
    for (const c of choices) this.sse.data(this.chunks.finish(c.index, c.finish_reason));
    if (this.r.includeUsage) this.sse.data(this.chunks.usage(result));
    this.sse.done();
  }

  fail(err: ApiError): void {
    if (this.sse.writable) this.sse.error(err);
  }

  end(): void {
    this.sse.end();
  }

  /** A choice's echoed prompt, with its scored tokens (they spell it from offset 0). */
  private echo(index: number, prompt: TokenLogprob[]): void {
    const text = promptOf(this.r, index);
    this.offsets.set(index, codePoints(text));
    this.sse.data(this.chunks.text(index, text, legacyLogprobs(prompt, 0)));
  }
}
