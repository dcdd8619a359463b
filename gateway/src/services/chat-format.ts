/** Builds the exact OpenAI response objects (ChatCompletion, ChatCompletionChunk) from the worker's results. */
import type { ChatCompletion, ChatCompletionChunk, FinishReason, ToolCallDelta, Usage } from '../protocol/chat';
import { parseToolOutput, toolCallId } from '../tools/parser';
import type { JobResult, TokenLogprob } from '../protocol/job';
import { toolCallsOf } from '../routing/upstream-tools';

export interface CompletionMeta {
  id: string;
  created: number;
  model: string;
}

/**
 * The worker says stop|length; anything else (a newer worker's reason) reads as stop rather than break a client. An
 * answer that called tools and ended by itself finished with "tool_calls", as OpenAI's do.
 */
export function finishReason(reason: string, calledTools = false): FinishReason {
  if (reason === 'length') return 'length';
  // An upstream's own (routing/upstream.ts), as OpenAI's API sends them; our workers say stop|length.
  if (reason === 'tool_calls' || reason === 'content_filter') return reason;
  return calledTools ? 'tool_calls' : 'stop';
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

/** `parseToolCalls`: the request offered tools, so each answer is read for calls (tools/parser.ts). */
export function toChatCompletion(meta: CompletionMeta, result: JobResult, wantLogprobs: boolean, parseToolCalls = false): ChatCompletion {
  return {
    id: meta.id,
    object: 'chat.completion',
    created: meta.created,
    model: meta.model,
    choices: [...result.choices]
      .sort((a, b) => a.index - b.index)
      .map((c) => {
        const logprobs = wantLogprobs ? logprobsOut(c.logprobs ?? []) : null;
        // An upstream's calls come structured (routing/upstream-tools.ts), ids as it gave them: nothing to parse.
        const upstreamCalls = toolCallsOf(c);
        if (upstreamCalls) {
          const message: ChatCompletion['choices'][number]['message'] = { role: 'assistant', content: c.text.length > 0 ? c.text : null, refusal: null, annotations: [], tool_calls: upstreamCalls };
          return { index: c.index, message, logprobs, finish_reason: finishReason(c.finish_reason, true) };
        }
        if (!parseToolCalls) {
          return {
            index: c.index,
            message: { role: 'assistant' as const, content: c.text, refusal: null, annotations: [] },
            logprobs,
            finish_reason: finishReason(c.finish_reason),
          };
        }
        const parsed = parseToolOutput(c.text, (call) => toolCallId(meta.id, c.index, call));
        const message: ChatCompletion['choices'][number]['message'] = { role: 'assistant', content: parsed.content, refusal: null, annotations: [] };
        if (parsed.calls.length > 0) {
          message.tool_calls = parsed.calls.map((t) => ({ id: t.id, type: 'function', function: { name: t.name, arguments: t.arguments } }));
        }
        return { index: c.index, message, logprobs, finish_reason: finishReason(c.finish_reason, parsed.calls.length > 0) };
      }),
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

  toolCall(index: number, call: ToolCallDelta, logprobs: TokenLogprob[] | null): ChatCompletionChunk {
    return this.base([{ index, delta: { tool_calls: [call] }, logprobs: logprobsOut(logprobs), finish_reason: null }]);
  }

  finish(index: number, reason: string, calledTools = false): ChatCompletionChunk {
    return this.base([{ index, delta: {}, logprobs: null, finish_reason: finishReason(reason, calledTools) }]);
  }

  usage(result: JobResult): ChatCompletionChunk {
    return { ...this.base([]), usage: usageOf(result) };
  }
}
