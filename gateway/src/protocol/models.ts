/** OpenAI's Model object and list, as zod schemas (the source of these types and, later, of the OpenAPI document). */
import { z } from 'zod';

export const modelSchema = z.object({
  id: z.string(),
  object: z.literal('model'),
  /** Unix seconds: when the longest-running live worker of this model started. */
  created: z.number().int(),
  owned_by: z.string(),
});
export type Model = z.infer<typeof modelSchema>;

export const modelListSchema = z.object({ object: z.literal('list'), data: z.array(modelSchema) });
export type ModelList = z.infer<typeof modelListSchema>;

export const MODEL_OWNER = 'llm-gateway';
