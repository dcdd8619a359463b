/**
 * The transport pieces of an upstream exchange (routing/upstream.ts): the SSE `data:` payloads of a response body as
 * they arrive, the idle timeout (`timeout_ms`) that bounds each wait for the upstream, and the guard every reader of
 * an upstream's JSON uses.
 */
import { ApiError } from '../errors';

export type Json = Record<string, unknown>;
/** A JSON object (not an array, not null): what an upstream's body, chunk, choice or call must be to be read. */
export const isObject = (v: unknown): v is Json => typeof v === 'object' && v !== null && !Array.isArray(v);

/** The SSE `data:` payloads of a response body, one per event, as they arrive; `onChunk` on every network chunk. */
export async function* sseData(body: ReadableStream<Uint8Array>, onChunk: () => void): AsyncGenerator<string> {
  const decoder = new TextDecoder();
  let buffered = '';
  for await (const chunk of body) {
    onChunk();
    buffered += decoder.decode(chunk, { stream: true });
    let end: number;
    while ((end = buffered.search(/\r?\n\r?\n/)) >= 0) {
      const block = buffered.slice(0, end);
      buffered = buffered.slice(end).replace(/^\r?\n\r?\n/, '');
      const data = block
        .split(/\r?\n/)
        .filter((line) => line.startsWith('data:'))
        .map((line) => line.slice(5).replace(/^ /, ''))
        .join('\n');
      if (data.length > 0) yield data;
    }
    // An event is a few hundred bytes; a "line" without end this long is not SSE.
    if (buffered.length > 1024 * 1024) throw new ApiError('upstream_error', 'The upstream sent an event over 1 MiB.');
  }
}

/** Aborts its signal when `touch` has not been called for `ms`. */
export class IdleTimeout {
  private readonly ctl = new AbortController();
  private timer: NodeJS.Timeout | null = null;
  fired = false;

  constructor(readonly ms: number) {
    this.touch();
  }

  get signal(): AbortSignal {
    return this.ctl.signal;
  }

  touch(): void {
    this.clear();
    this.timer = setTimeout(() => {
      this.fired = true;
      this.ctl.abort('upstream timeout');
    }, this.ms);
    this.timer.unref();
  }

  clear(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
  }
}
