/**
 * Prompt counting on a small pool of worker threads (services/tokenizer-thread.ts), so that a large prompt never
 * blocks the event loop: /health, other streams and other requests go on while it is counted. With two threads or
 * more, large prompts never occupy the first one (leastBusy). The pool is bounded by the work waiting, not only by how
 * many counts wait: past `maxPending` counts, or `maxPendingChars` characters of prompt text (what a count costs grows
 * with it), a request gets 503 server_busy (retryable) instead of queuing without end. Why both: a burst of 1,000
 * ordinary prompts (~0.7 ms each) is under a second of counting and must not be refused (issue 17: a bound of 256
 * counts refused 742 of 1,000 clients starting at once), while 256 prompts near the character cap are minutes of it.
 */
import path from 'node:path';
import { Worker } from 'node:worker_threads';
import { ApiError, type ErrorCode } from '../errors';
import type { Logger } from '../logger';
import type { JobMessage } from '../protocol/job';
import type { ThreadReply, ThreadRequest, TokenizerSource } from './tokenizer-thread';

/** Above this many content characters a prompt is "large" (see leastBusy). */
const LARGE_PROMPT_CHARS = 16_384;

export interface TokenizerInfo {
  vocabSize: number;
  maxTokenChars: number;
}

interface Pending {
  resolve(reply: ThreadReply): void;
  reject(err: Error): void;
}

/** One thread, its in-flight requests, and the tokenizer hashes it has been sent. */
class TokenizerThread {
  private readonly worker: Worker;
  readonly pending = new Map<number, Pending>();
  readonly known = new Set<string>();
  /** Builds in flight, by hash: a count that needs one waits for it instead of sending a second. */
  readonly loading = new Map<string, Promise<TokenizerInfo>>();
  dead = false;

  constructor(onExit: (t: TokenizerThread, err: Error) => void) {
    this.worker = spawnThread();
    this.worker.unref(); // never what keeps the process alive
    this.worker.on('message', (reply: ThreadReply) => {
      const p = this.pending.get(reply.id);
      this.pending.delete(reply.id);
      p?.resolve(reply);
    });
    const fail = (err: Error) => {
      if (this.dead) return;
      this.dead = true;
      for (const p of this.pending.values()) p.reject(err);
      this.pending.clear();
      onExit(this, err);
    };
    this.worker.on('error', fail);
    this.worker.on('exit', (code) => fail(new Error(`tokenizer thread exited (${code})`)));
  }

  send(req: ThreadRequest): Promise<ThreadReply> {
    return new Promise((resolve, reject) => {
      this.pending.set(req.id, { resolve, reject });
      this.worker.postMessage(req);
    });
  }

  terminate(): Promise<number> {
    this.dead = true;
    return this.worker.terminate();
  }
}

/** Under tsx or ts-jest the thread runs the TypeScript source through tsx's require hook; compiled, its .js. */
function spawnThread(): Worker {
  const file = path.join(__dirname, `tokenizer-thread${path.extname(__filename)}`);
  if (!file.endsWith('.ts')) return new Worker(file);
  const hook = require.resolve('tsx/cjs');
  return new Worker(`require(${JSON.stringify(hook)}); require(${JSON.stringify(file)});`, { eval: true });
}

export class TokenizerPool {
  private threads: TokenizerThread[] = [];
  private nextId = 1;
  private closed = false;
  /**
   * Counts asked for and not answered yet, and their characters. Kept here rather than summed over the threads'
   * in-flight messages: a count waiting for its thread to build the tokenizer has sent none yet, and still waits.
   */
  private pending = 0;
  private pendingChars = 0;

  constructor(
    size: number,
    private readonly maxPending: number,
    private readonly logger: Logger,
    private readonly maxPendingChars = Number.POSITIVE_INFINITY,
  ) {
    for (let i = 0; i < size; i++) this.threads.push(this.spawn());
  }

  private spawn(): TokenizerThread {
    return new TokenizerThread((dead, err) => {
      if (this.closed) return;
      this.logger.error('tokenizer thread died; starting another', { err: err.message });
      this.threads = this.threads.map((t) => (t === dead ? this.spawn() : t));
    });
  }

  /**
   * Large prompts take seconds to count (whitespace runs ~10 µs a character): they go only to threads 1…n-1, so thread
   * 0 always serves ordinary prompts and one client's huge prompt cannot make everyone else's count wait behind it.
   */
  private leastBusy(large: boolean): TokenizerThread {
    const lane = large && this.threads.length > 1 ? this.threads.slice(1) : this.threads;
    return lane.reduce((a, b) => (b.pending.size < a.pending.size ? b : a));
  }

  /**
   * Builds the tokenizer on the first thread and returns what the gateway checks early; then the other threads build
   * it one after another in the background: not all at once (a cold start would build it on every core together), and
   * not on their first count either (a burst right after start-up waited ~1.4 s for it on the 2-core machine, every
   * request sent to the second thread behind its build).
   */
  async load(hash: string, source: TokenizerSource): Promise<TokenizerInfo> {
    const info = await this.loadOn(this.threads[0], hash, source);
    let next: Promise<unknown> = Promise.resolve();
    for (const t of this.threads.slice(1)) {
      next = next.then(() => (t.dead || t.known.has(hash) ? undefined : this.loadOn(t, hash, source))).catch(() => undefined);
    }
    return info;
  }

  private loadOn(t: TokenizerThread, hash: string, source: TokenizerSource): Promise<TokenizerInfo> {
    const inFlight = t.loading.get(hash);
    if (inFlight) return inFlight;
    const build = (async () => {
      const reply = unwrap(await t.send({ id: this.nextId++, op: 'load', hash, source }));
      t.known.add(hash);
      if (!('vocabSize' in reply)) throw new ApiError('internal_error', 'tokenizer thread: unexpected reply to load');
      return { vocabSize: reply.vocabSize, maxTokenChars: reply.maxTokenChars };
    })();
    t.loading.set(hash, build);
    build.then(
      () => t.loading.delete(hash),
      () => t.loading.delete(hash),
    );
    return build;
  }

  /** Prompt tokens of `messages` (content as plain text, services/tokenizer.ts). */
  count(hash: string, source: () => Promise<TokenizerSource>, messages: JobMessage[]): Promise<number> {
    const chars = messages.reduce((n, m) => n + m.content.length, 0);
    return this.countOn(hash, source, chars, (id) => ({ id, op: 'count', hash, messages }));
  }

  /** Tokens of a raw prompt (/v1/completions: no template, plain text). */
  countText(hash: string, source: () => Promise<TokenizerSource>, text: string): Promise<number> {
    return this.countOn(hash, source, text.length, (id) => ({ id, op: 'countText', hash, text }));
  }

  private async countOn(hash: string, source: () => Promise<TokenizerSource>, chars: number, request: (id: number) => ThreadRequest): Promise<number> {
    // A prompt longer than the whole budget is still counted when nothing else waits (the character cap, checked
    // before, is what bounds one prompt).
    if (this.pending >= this.maxPending || (this.pending > 0 && this.pendingChars + chars > this.maxPendingChars)) {
      throw new ApiError('server_busy', 'The server is busy counting other prompts. Please retry shortly.', { retryAfterMs: 1000 });
    }
    this.pending += 1;
    this.pendingChars += chars;
    try {
      return await this.countOnThread(hash, source, chars, request);
    } finally {
      this.pending -= 1;
      this.pendingChars -= chars;
    }
  }

  private async countOnThread(hash: string, source: () => Promise<TokenizerSource>, chars: number, request: (id: number) => ThreadRequest): Promise<number> {
    const t = this.leastBusy(chars > LARGE_PROMPT_CHARS);
    for (let attempt = 0; attempt < 2; attempt++) {
      if (!t.known.has(hash)) await (t.loading.get(hash) ?? this.loadOn(t, hash, await source()));
      const reply = await t.send(request(this.nextId++));
      if (reply.ok || !('missing' in reply)) {
        const done = unwrap(reply);
        if (!('count' in done)) throw new ApiError('internal_error', 'tokenizer thread: unexpected reply to count');
        return done.count;
      }
      t.known.delete(hash); // the thread evicted it: send it again
    }
    throw new ApiError('internal_error', 'the tokenizer thread lost its tokenizer twice');
  }

  async close(): Promise<void> {
    this.closed = true;
    await Promise.allSettled(this.threads.map((t) => t.terminate()));
  }
}

function unwrap(reply: ThreadReply): Extract<ThreadReply, { ok: true }> {
  if (reply.ok) return reply;
  if ('error' in reply) throw new ApiError(reply.error.code as ErrorCode, reply.error.message, { param: reply.error.param });
  throw new ApiError('internal_error', 'tokenizer missing in its thread');
}
