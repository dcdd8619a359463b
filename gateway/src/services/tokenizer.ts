/**
 * Prompt token counting in the gateway, with the tokenizer each worker exports at registration (docs/PROTOCOL.md:
 * HASH llm:tokenizer:{model}), so that a prompt too long for the context is a plain HTTP 400 before any stream header.
 * Matches Transformers' apply_chat_template(add_generation_prompt=True): render the chat template with the special
 * tokens in scope, then encode without adding special tokens.
 */
import { Template } from '@huggingface/jinja';
import { Tokenizer } from '@huggingface/tokenizers';
import type Redis from 'ioredis';
import { ApiError } from '../errors';
import type { Logger } from '../logger';
import { type JobMessage, tokenizerKey } from '../protocol/job';
import type { LiveWorker } from './worker-registry';

type Json = Record<string, unknown>;

const SPECIAL_TOKEN_KEYS = ['bos_token', 'eos_token', 'unk_token', 'pad_token', 'sep_token', 'cls_token', 'mask_token'];

/** tokenizer_config.json may spell a special token as "<s>" or as an AddedToken object {"content": "<s>", …}. */
function tokenText(v: unknown): string | undefined {
  if (typeof v === 'string') return v;
  if (v && typeof v === 'object' && typeof (v as Json).content === 'string') return (v as Json).content as string;
  return undefined;
}

/** The template: a separate string (Transformers 5 saves chat_template.jinja) or tokenizer_config's own field. */
export function pickChatTemplate(config: Json, separate?: string | null): string | null {
  if (separate) return separate;
  const t = config.chat_template;
  if (typeof t === 'string') return t;
  if (Array.isArray(t)) {
    // Named templates: [{name, template}]; Transformers uses "default".
    const named = t as Array<{ name?: string; template?: string }>;
    return (named.find((x) => x.name === 'default') ?? named[0])?.template ?? null;
  }
  return null;
}

export class ModelTokenizer {
  private readonly tokenizer: Tokenizer;
  private readonly template: Template;
  private readonly specials: Record<string, unknown>;
  readonly vocabSize: number;

  constructor(tokenizerJson: Json, config: Json, chatTemplate: string | null) {
    if (!chatTemplate) throw new Error('the tokenizer has no chat template');
    this.tokenizer = new Tokenizer(tokenizerJson, config);
    this.template = new Template(chatTemplate);
    this.specials = {};
    for (const key of SPECIAL_TOKEN_KEYS) {
      const text = tokenText(config[key]);
      if (text !== undefined) this.specials[key] = text;
    }
    if (Array.isArray(config.additional_special_tokens)) {
      this.specials.additional_special_tokens = config.additional_special_tokens.map(tokenText);
    }
    this.vocabSize = this.tokenizer.get_vocab(true).size;
  }

  render(messages: readonly JobMessage[]): string {
    try {
      return this.template.render({
        ...this.specials,
        messages,
        add_generation_prompt: true,
        // raise_exception is a built-in of @huggingface/jinja, as it is of Transformers.
      });
    } catch (err) {
      // Templates reject some conversations on purpose (e.g. roles that do not alternate): that is the client's 400.
      const message = err instanceof Error ? err.message : String(err);
      throw new ApiError('invalid_request', `The model's chat template rejected these messages: ${message}`, {
        param: 'messages',
      });
    }
  }

  countPrompt(messages: readonly JobMessage[]): number {
    return this.tokenizer.encode(this.render(messages), { add_special_tokens: false }).ids.length;
  }

  encode(text: string): number[] {
    return this.tokenizer.encode(text, { add_special_tokens: false }).ids;
  }
}

/** Tokenizers by hash: built once (~100 ms for a 3.5 MB tokenizer.json), shared by every request of that model. */
export class TokenizerCache {
  private readonly byHash = new Map<string, Promise<ModelTokenizer>>();
  private readonly loaded = new Set<string>();
  private static readonly MAX_ENTRIES = 16;

  constructor(
    private readonly redis: Redis,
    private readonly logger: Logger,
  ) {}

  get(model: string, hash: string): Promise<ModelTokenizer> {
    let entry = this.byHash.get(hash);
    if (!entry) {
      entry = this.load(model, hash);
      this.byHash.set(hash, entry);
      entry.then(
        () => this.loaded.add(hash),
        () => this.byHash.delete(hash),
      );
      if (this.byHash.size > TokenizerCache.MAX_ENTRIES) {
        const oldest = this.byHash.keys().next().value as string;
        this.byHash.delete(oldest);
        this.loaded.delete(oldest);
      }
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

  private async load(model: string, hash: string): Promise<ModelTokenizer> {
    const started = Date.now();
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
    const config = JSON.parse(fields.tokenizer_config_json) as Json;
    const tok = new ModelTokenizer(
      JSON.parse(fields.tokenizer_json) as Json,
      config,
      pickChatTemplate(config, fields.chat_template),
    );
    this.logger.info('tokenizer loaded', { model, hash: hash.slice(0, 12), ms: Date.now() - started });
    return tok;
  }
}
