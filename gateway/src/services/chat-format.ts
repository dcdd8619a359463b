/** Builds the exact OpenAI response objects (ChatCompletion, ChatCompletionChunk) from the worker's results. */
import type { ChatCompletion, ChatCompletionChunk, FinishReason, Usage } from '../protocol/chat';
import type { JobResult, TokenLogprob } from '../protocol/job';

export interface CompletionMeta {
  id: string;
  created: number;
  model: string;
}

/** The worker says stop|length; anything else (a newer worker's reason) reads as stop rather than break a client. */
export function finishReason(reason: string): FinishReason {
  return reason === 'length' ? 'length' : 'stop';
}

export function usageOf(result: JobResult): Usage {
  const { prompt_tokens, completion_tokens } = result.usage;
  return {
    prompt_tokens,
    completion_tokens,
    total_tokens: prompt_tokens + completion_tokens,
    prompt_tokens_details: { cached_tokens: 0, audio_tokens: 0 },
    completion_tokens_details: {
      reasoning_tokens: 0,
      audio_tokens: 0,
      accepted_prediction_tokens: 0,
      rejected_prediction_tokens: 0,
    },
  };
}

const logprobsOut = (lp: TokenLogprob[] | null) => (lp === null ? null : { content: lp, refusal: null });

export function toChatCompletion(meta: CompletionMeta, result: JobResult, wantLogprobs: boolean): ChatCompletion {
  return {
    id: meta.id,
    object: 'chat.completion',
    created: meta.created,
    model: meta.model,
    choices: [...result.choices]
      .sort((a, b) => a.index - b.index)
      .map((c) => ({
        index: c.index,
        message: { role: 'assistant' as const, content: c.text, refusal: null, annotations: [] },
        logprobs: wantLogprobs ? logprobsOut(c.logprobs ?? []) : null,
        finish_reason: finishReason(c.finish_reason),
      })),
    usage: usageOf(result),
    service_tier: 'default',
    system_fingerprint: null,
  };
}

/** Builds the chunks of one stream; `includeUsage` adds `usage: null` to each chunk as OpenAI does. */
export class ChunkFactory {
  constructor(
    private readonly meta: CompletionMeta,
    private readonly includeUsage: boolean,
  ) {}

  private base(choices: ChatCompletionChunk['choices']): ChatCompletionChunk {
    const chunk: ChatCompletionChunk = {
      id: this.meta.id,
      object: 'chat.completion.chunk',
      created: this.meta.created,
      model: this.meta.model,
      service_tier: 'default',
      system_fingerprint: null,
      choices,
    };
    if (this.includeUsage) chunk.usage = null;
    return chunk;
  }

  role(index: number): ChatCompletionChunk {
    return this.base([
      { index, delta: { role: 'assistant', content: '', refusal: null }, logprobs: null, finish_reason: null },
    ]);
  }

  content(index: number, text: string, logprobs: TokenLogprob[] | null): ChatCompletionChunk {
    return this.base([{ index, delta: { content: text }, logprobs: logprobsOut(logprobs), finish_reason: null }]);
  }

  finish(index: number, reason: string): ChatCompletionChunk {
    return this.base([{ index, delta: {}, logprobs: null, finish_reason: finishReason(reason) }]);
  }

  usage(result: JobResult): ChatCompletionChunk {
    return { ...this.base([]), usage: usageOf(result) };
  }
}
