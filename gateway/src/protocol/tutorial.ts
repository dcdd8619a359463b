/**
 * The tutorial's routes (/work/shared/seed: /chat, /chat/stream, /chat/batch, /chat/secure) in its own shapes.
 * `history` is the tutorial's list of [user, assistant] pairs; `max_length` is the number of new tokens.
 */
import { z } from 'zod';

/**
 * One [user, assistant] pair. Documented as "exactly two strings", which says the same as the tuple's `prefixItems`
 * form: schemathesis 4.32 rewrites `prefixItems` of a response schema to draft 4's `items: […]` and then refuses it
 * as invalid, leaving /chat and /chat/secure unfuzzed (tests/reliability/bad-input.test.ts).
 */
const pairSchema = z.tuple([z.string(), z.string()]).meta({
  override: ({ jsonSchema }) => {
    delete jsonSchema.prefixItems;
    jsonSchema.items = { type: 'string' };
  },
});

export const historySchema = z.array(pairSchema);

export const tutorialChatRequestSchema = z.looseObject({
  prompt: z.string().min(1),
  max_length: z.number().int().positive().default(512),
  temperature: z.number().min(0).max(2).default(0.7),
  history: historySchema.nullable().optional(),
  /** Ours, not the tutorial's: which model (default DEFAULT_MODEL). */
  model: z.string().min(1).optional(),
});
export type TutorialChatRequest = z.infer<typeof tutorialChatRequestSchema>;

export const tutorialChatResponseSchema = z.object({
  response: z.string(),
  history: historySchema,
  tokens_used: z.number().int(),
  processing_time: z.number(),
});
export type TutorialChatResponse = z.infer<typeof tutorialChatResponseSchema>;

/** /chat/secure answers the tutorial's shorter shape. */
export const tutorialSecureResponseSchema = tutorialChatResponseSchema.pick({ response: true, history: true });

export const tutorialBatchRequestSchema = z.array(z.unknown()).min(1);

/** One result per request, in order: the /chat shape, or an OpenAI error object when that one failed. */
export const tutorialBatchResponseSchema = z.object({
  results: z.array(
    z.union([
      tutorialChatResponseSchema,
      z.object({ error: z.object({ message: z.string(), type: z.string(), param: z.string().nullable(), code: z.string().nullable() }) }),
    ]),
  ),
});
