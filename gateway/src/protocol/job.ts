/**
 * The gateway ↔ worker contract (docs/PROTOCOL.md, version 1) as zod schemas. The Python worker mirrors this file in
 * worker-py/src/llm_worker/protocol.py; tests/fixtures/protocol/*.json are parsed by both. Change all three together.
 *
 * Schemas for what we *receive* (events, results, worker info) are loose: a newer worker may add fields.
 */
import { z } from 'zod';

export const PROTOCOL_VERSION = 1;

// ---- Redis names -------------------------------------------------------------------------------------------------
export const WORKERS_ZSET = 'llm:workers';
export const CANCEL_CHANNEL = 'llm:cancel';
export const JOB_NAME = 'chat';
export const workerKey = (workerId: string): string => `llm:worker:${workerId}`;
export const tokenizerKey = (model: string): string => `llm:tokenizer:${model}`;
export const jobChannel = (jobId: string): string => `llm:job:${jobId}`;
export const cancelledKey = (jobId: string): string => `llm:cancelled:${jobId}`;
/** LIST of every event published for a job whose data asks for it (`store_events`): what a resumed stream replays. */
export const eventsKey = (jobId: string): string => `llm:events:${jobId}`;
/** The last element of an events list that reached its `max_bytes`: the list is incomplete, nothing follows it. */
export const TRUNCATED_EVENT = '{"type":"truncated"}';
/** BullMQ names must not contain ':'; the worker applies the same mapping. */
export const queueName = (model: string): string => `gen.${model.replace(/[^A-Za-z0-9._-]/g, '_')}`;

// ---- WorkerInfo (STRING llm:worker:{id}) -------------------------------------------------------------------------
export const workerInfoSchema = z.looseObject({
  worker_id: z.string().min(1),
  model: z.string().min(1),
  queue: z.string().min(1),
  context_length: z.number().int().positive(),
  max_batch: z.number().int().positive().optional(),
  device: z.string().optional(),
  dtype: z.string().optional(),
  engine: z.string().optional(),
  tokenizer_hash: z.string().min(1),
  started_at_ms: z.number(),
  ready: z.boolean(),
  pid: z.number().optional(),
  host: z.string().optional(),
  version: z.string().optional(),
  /** Tokens of KV cache the worker's engine may hold at once (rows × longest reserved context); absent or null: not reported. */
  kv_token_budget: z.number().int().positive().nullish(),
});
export type WorkerInfo = z.infer<typeof workerInfoSchema>;

// ---- Job data (what the gateway enqueues) ------------------------------------------------------------------------
export const jobMessageSchema = z.object({
  role: z.enum(['system', 'user', 'assistant']),
  content: z.string(),
});
export type JobMessage = z.infer<typeof jobMessageSchema>;

/**
 * Structured outputs: every choice's text is constrained by a grammar the worker compiles (worker-py grammar.py).
 * json_object: any JSON object; json_schema: a JSON value valid against `schema` (OpenAI's json_schema.schema, unwrapped);
 * lark: see below.
 */
export const jobResponseFormatSchema = z.discriminatedUnion('type', [
  z.object({ type: z.literal('json_object') }),
  z.object({ type: z.literal('json_schema'), schema: z.record(z.string(), z.unknown()) }),
  /**
   * A Lark grammar (llguidance's dialect, `%json {…}` for JSON-schema parts) built by the gateway itself (tool calls:
   * gateway/src/tools/grammar.ts), never taken from a client; `param` names the request field its errors are about.
   */
  z.object({ type: z.literal('lark'), grammar: z.string(), param: z.string() }),
]);
export type JobResponseFormat = z.infer<typeof jobResponseFormatSchema>;

export const jobParamsSchema = z.object({
  max_tokens: z.number().int().positive(),
  temperature: z.number().min(0).max(2),
  top_p: z.number().min(0).max(1),
  seed: z.number().int().nullable(),
  stop: z.array(z.string()),
  n: z.number().int().positive(),
  presence_penalty: z.number(),
  frequency_penalty: z.number(),
  /** Keys are token ids as decimal strings (OpenAI's wire shape). */
  logit_bias: z.record(z.string(), z.number()),
  logprobs: z.boolean(),
  top_logprobs: z.number().int().min(0),
  /** 0 = off. */
  top_k: z.number().int().min(0),
  /** 0 = off. */
  min_p: z.number().min(0).max(1),
  repetition_penalty: z.number().positive(),
  ignore_eos: z.boolean(),
  /** Absent: free text. */
  response_format: jobResponseFormatSchema.optional(),
  /**
   * /v1/completions with echo and logprobs: the prompt's own tokens scored too, each with this many alternatives.
   * Their entries (flagged `prompt: true`) come first in each choice's logprobs. Absent: not scored.
   */
  prompt_logprobs: z.number().int().min(0).max(20).optional(),
});
export type JobParams = z.infer<typeof jobParamsSchema>;

/**
 * Keep the job's events in LIST llm:events:{jobId} as well as publishing them (docs/PROTOCOL.md, Stored events): set
 * for streams that can be resumed. A worker that does not know the field only publishes.
 */
export const storeEventsSchema = z.object({
  /** The list's expiry, set again with every append. */
  ttl_ms: z.number().int().min(1000),
  /** Bytes of events the list may hold; the event that would pass it is replaced by TRUNCATED_EVENT, then nothing. */
  max_bytes: z.number().int().positive(),
});
export type StoreEvents = z.infer<typeof storeEventsSchema>;

export const jobDataSchema = z.object({
  v: z.literal(PROTOCOL_VERSION),
  request_id: z.string(),
  model: z.string(),
  /** A chat: rendered with the model's chat template. Exactly one of `messages` and `prompt` is set. */
  messages: z.array(jobMessageSchema).min(1).optional(),
  /** A raw prompt (/v1/completions): sent to the model as is, no chat template, encoded as plain text. */
  prompt: z.string().optional(),
  params: jobParamsSchema,
  stream: z.boolean(),
  prompt_tokens: z.number().int().min(0),
  enqueued_at_ms: z.number(),
  /** Epoch ms; null = no deadline (the gateway always sets one: now + REQUEST_TIMEOUT_MS). */
  deadline_ms: z.number().nullable(),
  /**
   * Epoch ms by which generation must have started (now + QUEUE_TIMEOUT_MS), also while the job waits inside a worker
   * for room in its batch; past it the worker fails the job with queue_timeout. Absent: no such limit.
   */
  start_deadline_ms: z.number().nullable().optional(),
  /** Absent: the events are only published. */
  store_events: storeEventsSchema.optional(),
}).refine((d) => (d.messages === undefined) !== (d.prompt === undefined), {
  message: 'exactly one of messages and prompt must be set',
});
export type JobData = z.infer<typeof jobDataSchema>;

// ---- JobResult (BullMQ return value and done.result) -------------------------------------------------------------
/** OpenAI ChatCompletionTokenLogprob; passed through to clients as the worker made it. */
export const tokenLogprobSchema = z.looseObject({
  token: z.string(),
  // null only for the first token of an echoed prompt (`prompt: true`, /v1/completions echo + logprobs): nothing
  // comes before it to predict it, so it has no logprob (OpenAI's legacy token_logprobs[0] is null likewise).
  logprob: z.number().nullable(),
  bytes: z.array(z.number()).nullable().optional(),
  top_logprobs: z.array(z.looseObject({ token: z.string(), logprob: z.number() })).optional(),
});
export type TokenLogprob = z.infer<typeof tokenLogprobSchema>;

/** A list of token logprobs, or OpenAI's {content: [...]} wrapper; both are accepted, the gateway wraps. */
const logprobsSchema = z
  .union([z.array(tokenLogprobSchema), z.looseObject({ content: z.array(tokenLogprobSchema).nullable() })])
  .nullable()
  .optional()
  .transform((v): TokenLogprob[] | null => (v == null ? null : Array.isArray(v) ? v : (v.content ?? null)));

export const resultChoiceSchema = z.looseObject({
  index: z.number().int().min(0),
  text: z.string(),
  finish_reason: z.string(),
  logprobs: logprobsSchema,
});

export const jobResultSchema = z.looseObject({
  choices: z.array(resultChoiceSchema),
  usage: z.looseObject({ prompt_tokens: z.number().int().min(0), completion_tokens: z.number().int().min(0) }),
  worker_id: z.string().optional(),
  timing: z.record(z.string(), z.number().nullable()).optional(),
});
export type JobResult = z.infer<typeof jobResultSchema>;

// ---- Events on llm:job:{jobId} -----------------------------------------------------------------------------------
export const startedEventSchema = z.looseObject({
  type: z.literal('started'),
  worker_id: z.string(),
  prompt_tokens: z.number().int().optional(),
  ts_ms: z.number().optional(),
});

export const deltaEventSchema = z.looseObject({
  type: z.literal('delta'),
  seq: z.number().int().positive(),
  ts_ms: z.number().optional(),
  choices: z.array(
    z.looseObject({
      index: z.number().int().min(0),
      text: z.string(),
      tokens: z.number().int().optional(),
      logprobs: z.array(tokenLogprobSchema).nullable().optional(),
    }),
  ),
});

export const doneEventSchema = z.looseObject({
  type: z.literal('done'),
  seq: z.number().int().positive(),
  ts_ms: z.number().optional(),
  result: jobResultSchema,
});

/** `param`: the request field at fault (OpenAI's error.param), when the worker knows it. */
export const workerErrorSchema = z.looseObject({ code: z.string(), message: z.string(), param: z.string().optional() });
export type WorkerError = z.infer<typeof workerErrorSchema>;

export const errorEventSchema = z.looseObject({
  type: z.literal('error'),
  seq: z.number().int().positive(),
  ts_ms: z.number().optional(),
  error: workerErrorSchema,
});

export const jobEventSchema = z.discriminatedUnion('type', [
  startedEventSchema,
  deltaEventSchema,
  doneEventSchema,
  errorEventSchema,
]);
export type JobEvent = z.infer<typeof jobEventSchema>;
export type DeltaEvent = z.infer<typeof deltaEventSchema>;

/**
 * BullMQ failedReason is "<code>: <message>" or "<code>[<param>]: <message>" (docs/PROTOCOL.md, Failures); anything
 * else is an internal error.
 */
export function parseFailedReason(reason: string | undefined | null): WorkerError {
  const text = (reason ?? '').trim();
  const m = /^([a-z_]+)(?:\[([A-Za-z0-9_.\[\]]+)\])?:\s?([\s\S]*)$/.exec(text);
  if (m) return m[2] ? { code: m[1], message: m[3], param: m[2] } : { code: m[1], message: m[3] };
  return { code: 'internal_error', message: text || 'the job failed' };
}
