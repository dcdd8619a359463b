/**
 * Server-sent events as the openai SDKs read them: `data: <json>\n\n` per event, `data: [DONE]` at the end, comment
 * lines (": keep-alive") to keep idle connections open. An error after the headers went out is written as
 * `data: {"error":{…}}` then `data: [DONE]`, so the SDKs raise an APIError instead of seeing a silent close.
 */
import type { Response } from 'express';
import { ApiError } from '../errors';
import type { EventCursor } from './event-ids';

export interface SseOptions {
  /** Send ": keep-alive" after this long without writing anything. */
  keepAliveMs: number;
  /**
   * Bytes the client may leave unread (in the response's buffer, past what the socket took). Beyond, the stream ends
   * with a `stream_buffer_full` error event and `onOverflow` runs (the caller cancels the job): a slow or stalled
   * reader must not pile its output up in the gateway's memory. Unset: no bound.
   */
  maxBufferedBytes?: number;
  onOverflow?: () => void;
  /**
   * Errors after the headers are written as `event: <name>` + `data: {"error":…}` (the tutorial's /chat/stream, whose
   * data lines are plain text); unset, as a plain `data:` event (what the openai SDKs read).
   */
  errorEvent?: string;
  /**
   * Gives every data event and the final [DONE] an `id:` (streaming/event-ids.ts), and leaves out those the client
   * already has (a resumed stream). Unset: no ids (the tutorial's /chat/stream).
   */
  cursor?: EventCursor;
}

/**
 * How long an overflowed stream's last events (what was buffered, then the error event and [DONE]) may take to leave
 * before the connection is dropped. A reader that pauses for a minute (issue 12's slow readers; an app sent to the
 * background) still learns why its stream ended when it reads again, instead of a silent cut; one gone for good holds
 * at most its capped buffer (the job is already cancelled) until then.
 */
const OVERFLOW_DRAIN_MS = 120_000;

export class SseWriter {
  private keepAlive: NodeJS.Timeout | null = null;
  private lastWriteMs = 0;
  private ended = false;
  /** Events written before open() (a fast worker can beat the enqueue's reply); sent right after the headers. */
  private pending: string[] | null = [];

  constructor(
    private readonly res: Response,
    private readonly opts: SseOptions,
  ) {
    res.on('close', () => this.stopKeepAlive());
  }

  /** Sends the 200 and the SSE headers now (they go out before the first event, so the client stops waiting). */
  open(): void {
    const res = this.res;
    res.status(200);
    res.setHeader('content-type', 'text/event-stream; charset=utf-8');
    res.setHeader('cache-control', 'no-cache, no-transform');
    res.setHeader('connection', 'keep-alive');
    // nginx and some proxies buffer responses unless told not to.
    res.setHeader('x-accel-buffering', 'no');
    res.flushHeaders();
    const pending = this.pending ?? [];
    this.pending = null;
    for (const chunk of pending) this.write(chunk);
    this.lastWriteMs = Date.now();
    const period = Math.max(50, Math.floor(this.opts.keepAliveMs / 2));
    this.keepAlive = setInterval(() => {
      if (Date.now() - this.lastWriteMs >= this.opts.keepAliveMs) this.comment('keep-alive');
    }, period);
    this.keepAlive.unref();
  }

  /** False once the stream has ended or the client has gone. */
  get writable(): boolean {
    return !this.ended && !this.res.writableEnded && !this.res.destroyed;
  }

  comment(text: string): void {
    this.write(`: ${text.replace(/[\r\n]+/g, ' ')}\n\n`);
  }

  data(payload: unknown): void {
    const id = this.nextId();
    if (id === null) return;
    this.write(`${id}data: ${JSON.stringify(payload)}\n\n`);
  }

  /** The events written from now on come from worker event `seq` of job `part` (their ids say so). */
  position(part: number, seq: number): void {
    this.opts.cursor?.at(part, seq);
  }

  /** Plain text as the tutorial's /chat/stream sends it: `data: <text>`; each newline in the text starts a `data:` line. */
  text(text: string): void {
    this.write(`data: ${text.split(/\r\n|\r|\n/).join('\ndata: ')}\n\n`);
  }

  /** `data: [DONE]` and the end of the response. */
  done(): void {
    if (!this.writable) return;
    const id = this.nextId();
    if (id !== null) this.write(`${id}data: [DONE]\n\n`);
    this.end();
  }

  /** An error after the headers: the OpenAI error object as an event, then [DONE]; neither has an id. */
  error(err: ApiError): void {
    if (!this.writable) return;
    this.write(`${this.errorChunk(err)}data: [DONE]\n\n`);
    this.end();
  }

  end(): void {
    if (this.ended) return;
    this.ended = true;
    this.stopKeepAlive();
    if (!this.res.writableEnded) this.res.end();
  }

  private write(chunk: string): void {
    if (this.pending) {
      this.pending.push(chunk);
      return;
    }
    if (!this.writable) return;
    this.lastWriteMs = Date.now();
    this.res.write(chunk);
    const max = this.opts.maxBufferedBytes;
    if (max !== undefined && this.res.writableLength > max) this.overflow(max);
  }

  private overflow(max: number): void {
    // The last events go straight to the response (write() would see the full buffer again and come back here).
    this.ended = true;
    this.stopKeepAlive();
    this.opts.onOverflow?.();
    const err = new ApiError('stream_buffer_full', `The client read the stream too slowly: more than ${max} bytes were waiting, so generation was stopped.`);
    if (!this.res.writableEnded) this.res.end(`${this.errorChunk(err)}data: [DONE]\n\n`);
    // A reader that has stalled for good would hold the socket and its buffer: drop it after a grace.
    const drop = setTimeout(() => this.res.destroy(), OVERFLOW_DRAIN_MS);
    drop.unref();
    this.res.once('finish', () => clearTimeout(drop));
  }

  /** `id: …\n` for the next event, '' without a cursor, null when the client already has that event. */
  private nextId(): string | null {
    const cursor = this.opts.cursor;
    if (!cursor) return '';
    const id = cursor.take();
    return id === null ? null : `id: ${id}\n`;
  }

  private errorChunk(err: ApiError): string {
    const event = this.opts.errorEvent ? `event: ${this.opts.errorEvent}\n` : '';
    return `${event}data: ${JSON.stringify(err.toBody())}\n\n`;
  }

  private stopKeepAlive(): void {
    if (this.keepAlive) clearInterval(this.keepAlive);
    this.keepAlive = null;
  }
}
