/**
 * The one renderer of a chat completion as server-sent events, used for a live job (deltas as they arrive) and for a
 * cached result (replayed whole): role chunk on a choice's first output, content chunks, then every finish chunk in
 * index order, the usage chunk when asked for, and [DONE]. Events written before open() wait inside SseWriter.
 */
import type { Response } from 'express';
import type { ApiError } from '../errors';
import type { JobResult, TokenLogprob } from '../protocol/job';
import { SseWriter } from '../streaming/sse';
import { ChunkFactory, type CompletionMeta } from './chat-format';

export interface ChatStreamOptions {
  keepAliveMs: number;
  maxBufferedBytes?: number;
  /** The reader fell too far behind (see SseWriter): the caller stops the generation. */
  onOverflow?: () => void;
}

export class ChatStream {
  private readonly sse: SseWriter;
  private readonly chunks: ChunkFactory;
  private readonly opened = new Set<number>();

  constructor(res: Response, meta: CompletionMeta, private readonly includeUsage: boolean, opts: ChatStreamOptions) {
    this.sse = new SseWriter(res, opts);
    this.chunks = new ChunkFactory(meta, includeUsage);
  }

  open(): void {
    this.sse.open();
  }

  get writable(): boolean {
    return this.sse.writable;
  }

  /** Output of one choice; its role chunk goes first. A piece with neither text nor logprobs only opens the choice. */
  content(index: number, text: string, logprobs: TokenLogprob[] | null | undefined): void {
    if (!this.opened.has(index)) {
      this.opened.add(index);
      this.sse.data(this.chunks.role(index));
    }
    if (text.length > 0 || logprobs?.length) this.sse.data(this.chunks.content(index, text, logprobs ?? null));
  }

  /** Finish chunks, usage, [DONE]: the end of a stream whose output was all written. */
  finish(result: JobResult): void {
    for (const c of [...result.choices].sort((a, b) => a.index - b.index)) this.sse.data(this.chunks.finish(c.index, c.finish_reason));
    if (this.includeUsage) this.sse.data(this.chunks.usage(result));
    this.sse.done();
  }

  /** A whole stored result (the response cache), streamed as a live job would have streamed it. */
  replay(result: JobResult, wantLogprobs: boolean): void {
    this.open();
    for (const c of [...result.choices].sort((a, b) => a.index - b.index)) {
      this.content(c.index, c.text, wantLogprobs ? (c.logprobs ?? []) : null);
    }
    this.finish(result);
  }

  /** An error after the headers went out: the error event and [DONE], when the client is still there. */
  fail(err: ApiError): void {
    if (this.sse.writable) this.sse.error(err);
  }

  end(): void {
    this.sse.end();
  }
}
