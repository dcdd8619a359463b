/** The admin API's shapes (/admin/keys, /admin/jwt/revocations). */
import { z } from 'zod';
import { TIERS } from '../limits/governance-config';

const limitFields = {
  models: z.array(z.string().min(1)).nullable().optional(),
  rpm: z.number().int().min(0).nullable().optional(),
  tpm: z.number().int().min(0).nullable().optional(),
  max_concurrent: z.number().int().min(0).nullable().optional(),
  tier: z.enum(TIERS).nullable().optional(),
};

export const createKeyRequestSchema = z.strictObject({ name: z.string().min(1).max(200), ...limitFields });
export const updateKeyRequestSchema = z.strictObject({ name: z.string().min(1).max(200).optional(), ...limitFields });

export const keyRecordSchema = z.object({
  id: z.string(),
  name: z.string(),
  prefix: z.string(),
  models: z.array(z.string()).nullable(),
  rpm: z.number().nullable(),
  tpm: z.number().nullable(),
  max_concurrent: z.number().nullable(),
  tier: z.enum(TIERS).nullable(),
  created_at: z.number(),
  revoked_at: z.number().nullable(),
  usage: z.object({ requests: z.number(), prompt_tokens: z.number(), completion_tokens: z.number(), cache_hits: z.number() }),
});

/** Creation is the only time the key itself is returned. */
export const createdKeySchema = keyRecordSchema.extend({ key: z.string() });
export const keyListSchema = z.object({ object: z.literal('list'), data: z.array(keyRecordSchema) });

export const revokeJwtRequestSchema = z.strictObject({
  jti: z.string().min(1),
  /** The token's exp (seconds); the revocation is kept until then. Default: 24 h. */
  exp: z.number().int().positive().optional(),
});
