/**
 * OpenAI Chat Completions wire types (request, response, chunk) as zod schemas: the single source of these types,
 * and later of the OpenAPI document (issue 6).
 *
 * The request schema checks shapes and OpenAI's ranges only. Which fields we *support* is decided by the parameter
 * table in services/chat-params.ts, so enabling a field is a one-line change there. Fields OpenAI does not define are
 * kept (looseObject) and ignored, as vLLM does, because SDKs and proxies send fields we may not know.
 */
import { z } from 'zod';

const num = (min: number, max: number) => z.number().min(min).max(max).nullish();

export const textPartSchema = z.looseObject({ type: z.literal('text'), text: z.string() });

/** Any content part; types other than text/refusal are refused by the converter with a precise `param`. */
export const contentPartSchema = z.looseObject({ type: z.string() });

/** A function name as OpenAI allows it. */
const functionName = z.string().regex(/^[A-Za-z0-9_-]{1,64}$/, 'must be 1 to 64 characters of a-z, A-Z, 0-9, underscores and dashes');

/** A tool call the model made, as clients send it back in an assistant message (arguments: a JSON text). */
export const toolCallParamSchema = z.looseObject({
  id: z.string().min(1),
  type: z.literal('function'),
  function: z.looseObject({ name: z.string().min(1), arguments: z.string() }),
});

export const chatMessageSchema = z.looseObject({
  role: z.string(),
  content: z.union([z.string(), z.array(contentPartSchema)]).nullish(),
  name: z.string().nullish(),
  /** assistant messages: the tool calls it made. */
  tool_calls: z.array(toolCallParamSchema).nullish(),
  /** tool messages: which call this is the result of. */
  tool_call_id: z.string().nullish(),
});
export type ChatMessageParam = z.infer<typeof chatMessageSchema>;

/** A function the model may call; `parameters` is a JSON schema (checked by tools/schema-check.ts and the worker). */
export const toolSchema = z.looseObject({
  type: z.literal('function'),
  function: z.looseObject({
    name: functionName,
    description: z.string().nullish(),
    parameters: z.record(z.string(), z.unknown()).nullish(),
    strict: z.boolean().nullish(),
  }),
});
export type ToolParam = z.infer<typeof toolSchema>;

export const toolChoiceSchema = z.union([
  z.enum(['none', 'auto', 'required']),
  z.looseObject({ type: z.literal('function'), function: z.looseObject({ name: z.string() }) }),
]);
export type ToolChoice = z.infer<typeof toolChoiceSchema>;

/** OpenAI's json_schema response format; `schema` is checked by the worker's grammar compiler (400 naming it). */
export const jsonSchemaFormatSchema = z.looseObject({
  name: z
    .string()
    .regex(/^[A-Za-z0-9_-]{1,64}$/, 'must be 1 to 64 characters of a-z, A-Z, 0-9, underscores and dashes'),
  description: z.string().nullish(),
  schema: z.record(z.string(), z.unknown()).nullish(),
  strict: z.boolean().nullish(),
});

/** `text` (the default), `json_object` (any JSON object) or `json_schema` (valid against the given schema). */
export const responseFormatSchema = z.discriminatedUnion('type', [
  z.looseObject({ type: z.literal('text') }),
  z.looseObject({ type: z.literal('json_object') }),
  z.looseObject({ type: z.literal('json_schema'), json_schema: jsonSchemaFormatSchema }),
]);
export type ResponseFormat = z.infer<typeof responseFormatSchema>;

export const chatCompletionRequestSchema = z.looseObject({
  model: z.string().min(1),
  messages: z.array(chatMessageSchema).min(1),

  // Sampling: supported (see services/chat-params.ts).
  max_tokens: z.number().int().min(1).nullish(),
  max_completion_tokens: z.number().int().min(1).nullish(),
  temperature: num(0, 2),
  top_p: num(0, 1),
  seed: z.number().int().min(Number.MIN_SAFE_INTEGER).max(Number.MAX_SAFE_INTEGER).nullish(),
  stop: z.union([z.string(), z.array(z.string()).max(4)]).nullish(),
  n: z.number().int().min(1).max(128).nullish(),
  presence_penalty: num(-2, 2),
  frequency_penalty: num(-2, 2),
  logit_bias: z.record(z.string().regex(/^\d+$/, 'keys must be token ids'), z.number().min(-100).max(100)).nullish(),
  logprobs: z.boolean().nullish(),
  top_logprobs: z.number().int().min(0).max(20).nullish(),

  // vLLM's extensions, accepted by the openai SDKs through extra_body.
  top_k: z.number().int().min(-1).nullish(),
  min_p: num(0, 1),
  repetition_penalty: z.number().gt(0).max(2).nullish(),
  ignore_eos: z.boolean().nullish(),

  // Transport.
  stream: z.boolean().nullish(),
  stream_options: z
    .looseObject({ include_usage: z.boolean().nullish(), include_obfuscation: z.boolean().nullish() })
    .nullish(),

  // Accepted and ignored: bookkeeping fields with no effect on the output.
  user: z.string().nullish(),
  metadata: z.record(z.string(), z.string()).nullish(),
  store: z.boolean().nullish(),
  service_tier: z.string().nullish(),
  safety_identifier: z.string().nullish(),
  prompt_cache_key: z.string().nullish(),
  prompt_cache_retention: z.string().nullish(),

  // Tool calling (gateway/src/tools/).
  tools: z.array(toolSchema).max(128).nullish(),
  tool_choice: toolChoiceSchema.nullish(),
  parallel_tool_calls: z.boolean().nullish(),

  // Structured outputs (services/chat-params.ts, worker-py grammar.py).
  response_format: responseFormatSchema.nullish(),

  // Defined by OpenAI, refused when used (see the table); only their presence/shape matters here.
  functions: z.array(z.unknown()).nullish(),
  function_call: z.unknown().optional(),
  audio: z.unknown().optional(),
  modalities: z.array(z.string()).nullish(),
  prediction: z.unknown().optional(),
  reasoning_effort: z.string().nullish(),
  verbosity: z.string().nullish(),
  web_search_options: z.unknown().optional(),
});
export type ChatCompletionRequest = z.infer<typeof chatCompletionRequestSchema>;

/** Every field OpenAI (or vLLM's accepted extensions) defines; anything else is logged at debug and ignored. */
export const KNOWN_REQUEST_FIELDS: ReadonlySet<string> = new Set(Object.keys(chatCompletionRequestSchema.shape));

// ---- Responses (what we send; the exact OpenAI objects) ----------------------------------------------------------
export const usageSchema = z.object({
  prompt_tokens: z.number().int(),
  completion_tokens: z.number().int(),
  total_tokens: z.number().int(),
  prompt_tokens_details: z.object({ cached_tokens: z.number().int(), audio_tokens: z.number().int() }).optional(),
  completion_tokens_details: z
    .object({
      reasoning_tokens: z.number().int(),
      audio_tokens: z.number().int(),
      accepted_prediction_tokens: z.number().int(),
      rejected_prediction_tokens: z.number().int(),
    })
    .optional(),
});
export type Usage = z.infer<typeof usageSchema>;

const logprobsOutSchema = z.object({ content: z.array(z.unknown()).nullable(), refusal: z.array(z.unknown()).nullable() });
const finishReasonSchema = z.enum(['stop', 'length', 'tool_calls', 'content_filter', 'function_call']);

/** A tool call in a response (arguments: JSON text, as OpenAI sends it). */
export const toolCallSchema = z.object({
  id: z.string(),
  type: z.literal('function'),
  function: z.object({ name: z.string(), arguments: z.string() }),
});
export type ToolCall = z.infer<typeof toolCallSchema>;

/** A piece of a streamed tool call: the first carries id, type and name; later ones pieces of the arguments. */
export const toolCallDeltaSchema = z.object({
  index: z.number().int(),
  id: z.string().optional(),
  type: z.literal('function').optional(),
  function: z.object({ name: z.string().optional(), arguments: z.string().optional() }),
});
export type ToolCallDelta = z.infer<typeof toolCallDeltaSchema>;
export type FinishReason = z.infer<typeof finishReasonSchema>;

export const chatCompletionSchema = z.object({
  id: z.string(),
  object: z.literal('chat.completion'),
  created: z.number().int(),
  model: z.string(),
  choices: z.array(
    z.object({
      index: z.number().int(),
      message: z.object({
        role: z.literal('assistant'),
        content: z.string().nullable(),
        refusal: z.string().nullable(),
        annotations: z.array(z.unknown()).optional(),
        tool_calls: z.array(toolCallSchema).optional(),
      }),
      logprobs: logprobsOutSchema.nullable(),
      finish_reason: finishReasonSchema,
    }),
  ),
  usage: usageSchema,
  service_tier: z.string().nullable().optional(),
  system_fingerprint: z.string().nullable().optional(),
});
export type ChatCompletion = z.infer<typeof chatCompletionSchema>;

export const chatCompletionChunkSchema = z.object({
  id: z.string(),
  object: z.literal('chat.completion.chunk'),
  created: z.number().int(),
  model: z.string(),
  choices: z.array(
    z.object({
      index: z.number().int(),
      delta: z.object({
        role: z.literal('assistant').optional(),
        content: z.string().nullable().optional(),
        refusal: z.string().nullable().optional(),
        tool_calls: z.array(toolCallDeltaSchema).optional(),
      }),
      logprobs: logprobsOutSchema.nullable(),
      finish_reason: finishReasonSchema.nullable(),
    }),
  ),
  usage: usageSchema.nullable().optional(),
  service_tier: z.string().nullable().optional(),
  system_fingerprint: z.string().nullable().optional(),
});
export type ChatCompletionChunk = z.infer<typeof chatCompletionChunkSchema>;
