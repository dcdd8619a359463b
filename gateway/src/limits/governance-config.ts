/**
 * The governance part of the configuration (keys, JWT, limits, degradation, cache, input limits, output filter).
 * Spread into `configSchema` in config.ts, so it is parsed with everything else and a bad value stops start-up.
 * Every variable is listed with its default in gateway/README.md ("Governance"); keep the two in step.
 */
import { z } from 'zod';

const int = (min: number, max = Number.MAX_SAFE_INTEGER) => z.coerce.number().int().min(min).max(max);
const bool = z
  .enum(['1', '0', 'true', 'false', 'yes', 'no', 'on', 'off', ''])
  .transform((v) => ['1', 'true', 'yes', 'on'].includes(v));
const csv = z.string().transform((v) => v.split(',').map((s) => s.trim()).filter((s) => s.length > 0));

export const TIERS = ['high', 'standard', 'low'] as const;
export type Tier = (typeof TIERS)[number];

/** Patterns are separated by newlines or `;;` (a regex may contain commas). Each must compile. */
const patterns = z
  .string()
  .transform((v) => v.split(/\n|;;/).map((s) => s.trim()).filter((s) => s.length > 0))
  .refine(
    (list) =>
      list.every((p) => {
        try {
          new RegExp(p, 'iu');
          return true;
        } catch {
          return false;
        }
      }),
    'every pattern must be a valid regular expression',
  );

export const governanceConfigShape = {
  /** Bearer key of the admin API (/admin/*). Empty: the admin API answers 404. */
  ADMIN_API_KEY: z.string().min(16, 'must be at least 16 characters').optional(),
  /** How long a Redis-stored key lookup is reused in-process; bounds how late a revocation is seen. */
  KEY_CACHE_MS: int(0, 1000).default(500),
  /** JWT: a shared secret (HS256) or a PEM public key (RS256/ES256). Both empty: JWTs are not accepted. */
  JWT_SECRET: z.string().min(32, 'must be at least 32 characters').optional(),
  JWT_PUBLIC_KEY: z.string().regex(/-----BEGIN PUBLIC KEY-----/, 'must be a PEM public key (SPKI)').optional(),
  JWT_ALGORITHM: z.enum(['HS256', 'RS256', 'ES256']).default('HS256'),
  JWT_AUDIENCE: z.string().optional(),
  JWT_ISSUER: z.string().optional(),
  JWT_CLOCK_TOLERANCE_S: int(0, 300).default(5),
  /** The window of RPM/TPM: a full bucket holds one window's budget and refills in one window (60000 = per minute). */
  RATE_LIMIT_WINDOW_MS: int(1000, 3_600_000).default(60_000),
  /** Limits for callers whose key or token sets none (static API_KEYS among them); 0 = unlimited. */
  DEFAULT_RPM: int(0).default(0),
  DEFAULT_TPM: int(0).default(0),
  DEFAULT_MAX_CONCURRENT: int(0).default(0),
  DEFAULT_TIER: z.enum(TIERS).default('standard'),
  /** Requests per window per caller on the tutorial routes (/chat, /chat/stream, /chat/batch, /chat/secure). */
  TUTORIAL_RPM: int(0).default(10),
  /** Waiting + prioritized jobs of one model at which new requests get 503 + retry-after; 0 = no limit. */
  MAX_QUEUE_DEPTH: int(0).default(1000),
  /**
   * Refuse (503 queue_full) a request that the model's backlog, in tokens, would keep waiting past QUEUE_TIMEOUT_MS at
   * the drain rate its workers have shown (queue/backlog.ts). Set it alike on every replica: the backlog counts only
   * what replicas with it on admitted.
   */
  BACKLOG_ADMISSION: bool.default(true),
  /** Queue depth from which requests are degraded (fallback model and/or max_tokens cap); 0 = never. */
  DEGRADE_QUEUE_DEPTH: int(0).default(0),
  DEGRADE_FALLBACK_MODEL: z.string().optional(),
  DEGRADE_MAX_TOKENS: int(0).default(0),
  /** Response cache (deterministic requests only). */
  CACHE_ENABLED: bool.default(true),
  CACHE_TTL_MS: int(1000).default(300_000),
  CACHE_L1_MAX_ENTRIES: int(0).default(1000),
  CACHE_L1_MAX_BYTES: int(0).default(32 * 1024 * 1024),
  /** Budget of the Redis cache (Redis runs with noeviction, so the cache evicts itself); 0 = no L2. */
  CACHE_L2_MAX_BYTES: int(0).default(64 * 1024 * 1024),
  CACHE_MAX_ENTRY_BYTES: int(1024).default(1024 * 1024),
  /**
   * Whose answers a cache entry may serve: `caller` (default) only the same key / JWT subject, so one tenant cannot
   * learn what another asked; `shared` every caller (one tenant, or public prompts: more hits).
   */
  CACHE_SCOPE: z.enum(['caller', 'shared']).default('caller'),
  /** Input limits: messages per request, prompt tokens per request (0 = the model's context only). */
  MAX_MESSAGES: int(1).default(256),
  MAX_PROMPT_TOKENS: int(0).default(0),
  /** Output filter: comma-separated phrases (case-insensitive) and regexes separated by newlines or `;;`. */
  OUTPUT_FILTER_BLOCKLIST: csv.default([]),
  OUTPUT_FILTER_PATTERNS: patterns.default([]),
  OUTPUT_FILTER_REPLACEMENT: z.string().default('[filtered]'),
  /** Longest text a pattern may match; streamed text is held back this much so a match split across chunks is caught. */
  OUTPUT_FILTER_MAX_MATCH_CHARS: int(1, 4096).default(64),
};

export const GOVERNANCE_SECRETS = ['ADMIN_API_KEY', 'JWT_SECRET'] as const;
