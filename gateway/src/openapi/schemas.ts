/**
 * Response shapes that have no zod schema elsewhere: the error body (errors.ts writes it from ErrorBody) and the probes'
 * bodies (routes/health.ts). gateway/test/openapi.test.ts parses the real responses with them, so they cannot drift.
 */
import { z } from 'zod';
import { ERROR_TABLE } from '../errors';

export const errorBodySchema = z
  .object({
    error: z.object({
      message: z.string(),
      type: z.enum(['invalid_request_error', 'server_error', 'rate_limit_error']),
      param: z.string().nullable(),
      code: z.enum(Object.keys(ERROR_TABLE) as [keyof typeof ERROR_TABLE]).nullable(),
    }),
  })
  .meta({ description: "OpenAI's error shape; `code` is stable (the one table: ERROR_TABLE in src/errors.ts)" });

export const healthSchema = z.object({
  status: z.literal('healthy'),
  service: z.literal('llm-api'),
  version: z.string(),
  uptime_s: z.number().int(),
});

export const readySchema = z.object({
  status: z.enum(['ready', 'not_ready']),
  service: z.literal('llm-api'),
  redis: z.boolean(),
  model: z.string().meta({ description: 'DEFAULT_MODEL' }),
  workers: z.number().int().meta({ description: 'Live workers serving it' }),
  tokenizer: z.boolean().meta({ description: 'Its tokenizer is built in the gateway' }),
});
