/**
 * OpenAI's legacy Completions wire types (POST /v1/completions: request, `text_completion` response and chunk) as zod
 * schemas, the single source of these types and of their part of the OpenAPI document.
 *
 * As for chat (protocol/chat.ts), the schema checks shapes and OpenAI's ranges only; which fields we serve is the
 * parameter table's business (services/completion-params.ts). The prompt is accepted in every shape OpenAI defines,
 * so that token-id prompts get a 400 that says why rather than a type error.
 */
import { z } from 'zod';
import { chatCompletionRequestSchema } from './chat';

/** The sampling fields are the chat request's own (same names, same OpenAI ranges). */
const shared = chatCompletionRequestSchema.shape;

export const completionRequestSchema = z.looseObject({
  model: z.string().min(1),
  /** One prompt, a list of prompts, or token ids (one list or a list of lists; refused: ids are not served). */
  prompt: z.union([z.string(), z.array(z.string()), z.array(z.number().int()), z.array(z.array(z.number().int()))]),

  max_tokens: z.number().int().min(1).nullish(),
  temperature: shared.temperature,
  top_p: shared.top_p,
  seed: shared.seed,
  stop: shared.stop,
  n: shared.n,
  presence_penalty: shared.presence_penalty,
  frequency_penalty: shared.frequency_penalty,
  logit_bias: shared.logit_bias,
  /** The legacy form: how many most likely alternatives to return per token (0..5), not a boolean. */
  logprobs: z.number().int().min(0).max(5).nullish(),
  echo: z.boolean().nullish(),
  /** Refused unless empty (the model does not insert text). */
  suffix: z.string().nullish(),
  /** Refused unless equal to n (no server-side best-of). */
  best_of: z.number().int().min(0).max(20).nullish(),

  // vLLM's extensions, as for chat.
  top_k: shared.top_k,
  min_p: shared.min_p,
  repetition_penalty: shared.repetition_penalty,
  ignore_eos: shared.ignore_eos,

  stream: z.boolean().nullish(),
  stream_options: shared.stream_options,
  user: z.string().nullish(),
});
export type CompletionRequest = z.infer<typeof completionRequestSchema>;

/** Every field OpenAI (or vLLM's accepted extensions) defines for completions; anything else is logged and ignored. */
export const KNOWN_COMPLETION_FIELDS: ReadonlySet<string> = new Set(Object.keys(completionRequestSchema.shape));

// ---- Responses (OpenAI's `text_completion` objects) --------------------------------------------------------------
/** The legacy logprobs object: parallel lists, one entry per token of the choice's text. */
export const completionLogprobsSchema = z.object({
  tokens: z.array(z.string()),
  token_logprobs: z.array(z.number().nullable()),
  /** Per token: the most likely alternatives (and the sampled token) → logprob. */
  top_logprobs: z.array(z.record(z.string(), z.number()).nullable()),
  /** Per token: where its text starts in the choice's text. */
  text_offset: z.array(z.number().int()),
});
export type CompletionLogprobs = z.infer<typeof completionLogprobsSchema>;

export const completionUsageSchema = z.object({
  prompt_tokens: z.number().int(),
  completion_tokens: z.number().int(),
  total_tokens: z.number().int(),
});
export type CompletionUsage = z.infer<typeof completionUsageSchema>;

const completionChoiceSchema = z.object({
  text: z.string(),
  index: z.number().int(),
  logprobs: completionLogprobsSchema.nullable(),
  finish_reason: z.enum(['stop', 'length', 'content_filter']),
});

export const textCompletionSchema = z.object({
  id: z.string(),
  object: z.literal('text_completion'),
  created: z.number().int(),
  model: z.string(),
  choices: z.array(completionChoiceSchema),
  usage: completionUsageSchema,
  system_fingerprint: z.string().nullable().optional(),
});
export type TextCompletion = z.infer<typeof textCompletionSchema>;

/** A stream's chunk: a choice's new text (finish_reason on its last chunk), or the usage chunk with no choices. */
export const textCompletionChunkSchema = z.object({
  id: z.string(),
  object: z.literal('text_completion'),
  created: z.number().int(),
  model: z.string(),
  choices: z.array(completionChoiceSchema.extend({ finish_reason: completionChoiceSchema.shape.finish_reason.nullable() })),
  usage: completionUsageSchema.nullable().optional(),
  system_fingerprint: z.string().nullable().optional(),
});
export type TextCompletionChunk = z.infer<typeof textCompletionChunkSchema>;
