/**
 * A tokenizer thread (services/tokenizer-pool.ts): prompt counting off the gateway's event loop. It builds the
 * ModelTokenizers it is sent (by hash, a few at most) and answers count requests; errors travel back as plain data.
 */
import { parentPort } from 'node:worker_threads';
import { LRUCache } from 'lru-cache';
import { ApiError } from '../errors';
import type { JobMessage } from '../protocol/job';
import { ModelTokenizer, pickChatTemplate } from './model-tokenizer';

export interface TokenizerSource {
  tokenizerJson: string;
  configJson: string;
  /** The template when it is stored apart from tokenizer_config.json. */
  chatTemplate?: string | null;
}

export type ThreadRequest =
  | { id: number; op: 'load'; hash: string; source: TokenizerSource }
  | { id: number; op: 'count'; hash: string; messages: JobMessage[] }
  | { id: number; op: 'countText'; hash: string; text: string };

export type ThreadReply =
  | { id: number; ok: true; vocabSize: number; maxTokenChars: number }
  | { id: number; ok: true; count: number }
  | { id: number; ok: false; missing: true }
  | { id: number; ok: false; error: { code: string; message: string; param: string | null } };

/** Tokenizers this thread has built; the pool sends a source again after an eviction (reply `missing`). */
const built = new LRUCache<string, ModelTokenizer>({ max: 4 });

function handle(req: ThreadRequest): ThreadReply {
  if (req.op === 'load') {
    let tok = built.get(req.hash);
    if (!tok) {
      const config = JSON.parse(req.source.configJson) as Record<string, unknown>;
      tok = new ModelTokenizer(JSON.parse(req.source.tokenizerJson), config, pickChatTemplate(config, req.source.chatTemplate));
      built.set(req.hash, tok);
    }
    return { id: req.id, ok: true, vocabSize: tok.vocabSize, maxTokenChars: tok.maxTokenChars };
  }
  const tok = built.get(req.hash);
  if (!tok) return { id: req.id, ok: false, missing: true };
  return { id: req.id, ok: true, count: req.op === 'count' ? tok.countPrompt(req.messages) : tok.textIds(req.text).length };
}

parentPort?.on('message', (req: ThreadRequest) => {
  let reply: ThreadReply;
  try {
    reply = handle(req);
  } catch (err) {
    const e = err instanceof ApiError ? err : new ApiError('internal_error', err instanceof Error ? err.message : String(err));
    reply = { id: req.id, ok: false, error: { code: e.code, message: e.message, param: e.param } };
  }
  parentPort!.postMessage(reply);
});
