/**
 * Builds OpenAI's legacy `text_completion` objects (the response and the stream's chunks) from the workers' results,
 * as services/chat-format.ts does for chat. A request with several prompts ran one job per prompt: its choices are
 * indexed prompt-major, as OpenAI's are (index = prompt × n + choice).
 */
import type { CompletionLogprobs, CompletionUsage, TextCompletion, TextCompletionChunk } from '../protocol/completions';
import type { JobResult, TokenLogprob } from '../protocol/job';
import type { CompletionMeta } from './chat-format';

/** What rendering a completions request needs beyond the results. */
export interface CompletionRender {
  meta: CompletionMeta;
  /** The request's prompts, in order (one job each). */
  prompts: string[];
  /** Choices per prompt. */
  n: number;
  /** Each choice's text starts with its prompt. */
  echo: boolean;
  /** The legacy logprobs' k; null: none were asked for. */
  logprobs: number | null;
  includeUsage: boolean;
}

type FinishReason = TextCompletion['choices'][number]['finish_reason'];

/**
 * The worker says stop|length; an upstream may also say content_filter (routing/upstream.ts); anything else (a newer
 * worker's reason) reads as stop rather than break a client.
 */
const finishReason = (reason: string): FinishReason => (reason === 'length' || reason === 'content_filter' ? reason : 'stop');

/** Characters as OpenAI (Python) counts them for text_offset: code points, not UTF-16 units. */
export const codePoints = (s: string): number => {
  let n = 0;
  for (const _ of s) n++;
  return n;
};

/** The prompt a choice echoes (choice index = prompt × n + choice). */
export const promptOf = (r: CompletionRender, index: number): string => r.prompts[Math.floor(index / r.n)] ?? '';

/**
 * The worker's token entries (chat's ChatCompletionTokenLogprob) as the legacy parallel lists. `offset`: where the
 * first entry's text starts in the choice's text. Each top_logprobs map holds the k alternatives and always the
 * sampled token (so up to k + 1 entries, as OpenAI documents). Offsets add up the tokens' text, which is the choice's
 * text exactly unless a token ends inside a multi-byte character (its text then carries a replacement character).
 * An echoed prompt's first token has no logprob (nothing precedes it): null in both lists, as OpenAI sends it.
 */
export function legacyLogprobs(entries: readonly TokenLogprob[], offset: number): CompletionLogprobs {
  const out: CompletionLogprobs = { tokens: [], token_logprobs: [], top_logprobs: [], text_offset: [] };
  let at = offset;
  for (const e of entries) {
    let top: Record<string, number> | null = null;
    if (e.logprob !== null) {
      // No prototype: a token spelled "__proto__" must be a key like any other.
      top = Object.create(null) as Record<string, number>;
      for (const t of e.top_logprobs ?? []) if (!(t.token in top)) top[t.token] = t.logprob;
      if (!(e.token in top)) top[e.token] = e.logprob;
    }
    out.tokens.push(e.token);
    out.token_logprobs.push(e.logprob);
    out.top_logprobs.push(top);
    out.text_offset.push(at);
    at += codePoints(e.token);
  }
  return out;
}

/** The entries of an echoed prompt's own tokens (the worker puts them first, flagged), and the generated ones. */
export function splitPromptLogprobs(entries: readonly TokenLogprob[]): { prompt: TokenLogprob[]; generated: TokenLogprob[] } {
  let k = 0;
  while (k < entries.length && entries[k].prompt === true) k++;
  return { prompt: entries.slice(0, k), generated: entries.slice(k) };
}

/** One result for the whole request: each prompt's choices moved to their global index, usage summed. */
export function mergeResults(results: readonly JobResult[], n: number): JobResult {
  if (results.length === 1) return results[0];
  return {
    choices: results.flatMap((r, p) => r.choices.map((c) => ({ ...c, index: p * n + c.index }))),
    usage: {
      prompt_tokens: results.reduce((s, r) => s + r.usage.prompt_tokens, 0),
      completion_tokens: results.reduce((s, r) => s + r.usage.completion_tokens, 0),
    },
  };
}

export function completionUsage(result: JobResult): CompletionUsage {
  const { prompt_tokens, completion_tokens } = result.usage;
  return { prompt_tokens, completion_tokens, total_tokens: prompt_tokens + completion_tokens };
}

/**
 * A choice's legacy logprobs: the echoed prompt's tokens (which spell it from offset 0), then the generated ones from
 * the end of the echo. Without the prompt's entries (not echoed) the generated ones start after the echo all the same.
 */
function choiceLogprobs(entries: readonly TokenLogprob[], echoed: string): CompletionLogprobs {
  const { prompt, generated } = splitPromptLogprobs(entries);
  const head = legacyLogprobs(prompt, 0);
  const tail = legacyLogprobs(generated, codePoints(echoed));
  return {
    tokens: [...head.tokens, ...tail.tokens],
    token_logprobs: [...head.token_logprobs, ...tail.token_logprobs],
    top_logprobs: [...head.top_logprobs, ...tail.top_logprobs],
    text_offset: [...head.text_offset, ...tail.text_offset],
  };
}

/** The non-stream response; `result` is the merged one (global indices). */
export function toTextCompletion(r: CompletionRender, result: JobResult): TextCompletion {
  return {
    id: r.meta.id,
    object: 'text_completion',
    created: r.meta.created,
    model: r.meta.model,
    choices: [...result.choices]
      .sort((a, b) => a.index - b.index)
      .map((c) => {
        const echoed = r.echo ? promptOf(r, c.index) : '';
        return {
          text: echoed + c.text,
          index: c.index,
          logprobs: r.logprobs === null ? null : choiceLogprobs(c.logprobs ?? [], echoed),
          finish_reason: finishReason(c.finish_reason),
        };
      }),
    usage: completionUsage(result),
    system_fingerprint: null,
  };
}

/** Builds the chunks of one stream; `includeUsage` adds `usage: null` to each chunk, as chat's stream does. */
export class CompletionChunks {
  constructor(private readonly r: CompletionRender) {}

  private base(choices: TextCompletionChunk['choices']): TextCompletionChunk {
    const { meta } = this.r;
    const chunk: TextCompletionChunk = { id: meta.id, object: 'text_completion', created: meta.created, model: meta.model, choices, system_fingerprint: null };
    if (this.r.includeUsage) chunk.usage = null;
    return chunk;
  }

  text(index: number, text: string, logprobs: CompletionLogprobs | null): TextCompletionChunk {
    return this.base([{ text, index, logprobs, finish_reason: null }]);
  }

  finish(index: number, reason: string): TextCompletionChunk {
    return this.base([{ text: '', index, logprobs: null, finish_reason: finishReason(reason) }]);
  }

  usage(result: JobResult): TextCompletionChunk {
    return { ...this.base([]), usage: completionUsage(result) };
  }
}
