/**
 * Prompt token counting in the gateway, with the tokenizer each worker exports at registration (docs/PROTOCOL.md:
 * HASH llm:tokenizer:{model}), so that a prompt too long for the context is a plain HTTP 400 before any stream header.
 * The tokenizers themselves (model-tokenizer.ts) live on worker threads (tokenizer-pool.ts), never on the event loop.
 */
import type Redis from 'ioredis';
import { LRUCache } from 'lru-cache';
import { ApiError } from '../errors';
import type { Logger } from '../logger';
import { type JobMessage, tokenizerKey } from '../protocol/job';
import { TokenizerPool } from './tokenizer-pool';
import type { TokenizerSource } from './tokenizer-thread';
import type { LiveWorker } from './worker-registry';

/** A model's tokenizer as the request path sees it: what is checked before counting, and the count (on the pool). */
export interface LoadedTokenizer {
  vocabSize: number;
  maxTokenChars: number;
  countPrompt(messages: JobMessage[]): Promise<number>;
  /** Tokens of a raw prompt (no template; plain text), on the pool too. */
  countText(text: string): Promise<number>;
}

export interface TokenizerPoolOptions {
  /** Worker threads that count prompts. */
  threads: number;
  /** Counts waiting at most, beyond which requests get 503 server_busy. */
  maxPending: number;
  /** Characters of prompt text waiting to be counted at most (tokenizer-pool.ts); unbounded when left out. */
  maxPendingChars?: number;
}

/**
 * Tokenizers by hash: built once per thread (~200 ms for a 3.5 MB tokenizer.json, off the event loop), shared by
 * every request of that model. The main thread keeps only their facts (vocabulary size, longest token).
 */
export class TokenizerCache {
  private readonly loaded = new Set<string>();
  /** At most 16 models' tokenizers; an evicted one is built again on its next request. */
  private readonly byHash = new LRUCache<string, Promise<LoadedTokenizer>>({ max: 16, dispose: (_v, hash) => this.loaded.delete(hash) });
  private readonly pool: TokenizerPool;

  constructor(
    private readonly redis: Redis,
    private readonly logger: Logger,
    pool: TokenizerPoolOptions = { threads: 1, maxPending: 64 },
  ) {
    this.pool = new TokenizerPool(pool.threads, pool.maxPending, logger, pool.maxPendingChars);
  }

  get(model: string, hash: string): Promise<LoadedTokenizer> {
    let entry = this.byHash.get(hash);
    if (!entry) {
      entry = this.load(model, hash);
      this.byHash.set(hash, entry);
      entry.then(
        () => {
          if (this.byHash.get(hash) === entry) this.loaded.add(hash);
        },
        () => this.byHash.delete(hash),
      );
    }
    return entry;
  }

  /** Whether the tokenizer with this hash is built (so a request will not wait for it). */
  isLoaded(hash: string): boolean {
    return this.loaded.has(hash);
  }

  /** Builds tokenizers of newly seen models in the background, so their first request does not pay for it. */
  warm(workers: ReadonlyMap<string, LiveWorker>): void {
    for (const w of workers.values()) {
      if (w.ready && !this.byHash.has(w.tokenizer_hash)) {
        this.get(w.model, w.tokenizer_hash).catch((err) =>
          this.logger.warn('tokenizer warm-up failed', { model: w.model, err: String(err) }),
        );
      }
    }
  }

  close(): Promise<void> {
    return this.pool.close();
  }

  private async load(model: string, hash: string): Promise<LoadedTokenizer> {
    const started = Date.now();
    const info = await this.pool.load(hash, await this.source(model, hash));
    this.logger.info('tokenizer loaded', { model, hash: hash.slice(0, 12), ms: Date.now() - started });
    return {
      ...info,
      // A thread that evicted it gets the source again from Redis (rare: a few tokenizers per thread).
      countPrompt: (messages) => this.pool.count(hash, () => this.source(model, hash), messages),
      countText: (text) => this.pool.countText(hash, () => this.source(model, hash), text),
    };
  }

  private async source(model: string, hash: string): Promise<TokenizerSource> {
    const fields = await this.redis.hgetall(tokenizerKey(model));
    if (!fields.tokenizer_json || !fields.tokenizer_config_json) {
      // A worker lists itself only after writing its tokenizer, so this is a Redis that lost data (restarted without
      // persistence): retryable once a worker registers again.
      this.logger.error('a live worker serves this model but its tokenizer is not in Redis', { model });
      throw new ApiError('no_worker_available', `The tokenizer of model '${model}' is not registered. Please retry shortly.`, {
        retryAfterMs: 5000,
      });
    }
    if (fields.hash && fields.hash !== hash) {
      // A worker with another tokenizer version registered since; counting with it is still better than failing.
      this.logger.warn('tokenizer hash differs from worker info', { model, expected: hash, stored: fields.hash });
    }
    return { tokenizerJson: fields.tokenizer_json, configJson: fields.tokenizer_config_json, chatTemplate: fields.chat_template };
  }
}
