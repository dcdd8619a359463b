/**
 * Gateway configuration: one object, parsed once from the environment by zod at start-up.
 * A bad value stops start-up with a message naming the variable (main.ts exits with code 2).
 * Every variable is listed with its default in gateway/README.md; keep the two in step.
 */
import { z } from 'zod';
import { GOVERNANCE_SECRETS, governanceConfigShape } from './limits/governance-config';

const int = (min: number, max = Number.MAX_SAFE_INTEGER) => z.coerce.number().int().min(min).max(max);

const bool = z
  .enum(['1', '0', 'true', 'false', 'yes', 'no', 'on', 'off', ''])
  .transform((v) => ['1', 'true', 'yes', 'on'].includes(v));

const csv = z
  .string()
  .transform((v) => v.split(',').map((s) => s.trim()).filter((s) => s.length > 0));

export const configSchema = z.object({
  PORT: int(0, 65535).default(8000),
  HOST: z.string().min(1).default('127.0.0.1'),
  REDIS_URL: z
    .string()
    .regex(/^rediss?(\+cluster)?:\/\//, 'must start with redis://, rediss:// or (Redis Cluster) redis+cluster://')
    .default('redis://127.0.0.1:6379'),
  /** Comma-separated Bearer keys. Empty: main.ts generates one development key and prints it. */
  API_KEYS: csv.default([]),
  DEFAULT_MODEL: z.string().min(1).default('smollm2-135m-instruct'),
  /** Largest accepted request body; larger bodies get 413. */
  MAX_BODY_BYTES: int(1024).default(4 * 1024 * 1024),
  /** Failed authentications per client address and window (shared by replicas) before 429; 0 = no limit. */
  AUTH_FAILURE_LIMIT: int(0).default(20),
  AUTH_FAILURE_WINDOW_MS: int(1000).default(60_000),
  /** Express's `trust proxy`: whether and which proxies' X-Forwarded-For give the client address (false, true, a hop count, or addresses). */
  TRUST_PROXY: z
    .string()
    .default('false')
    .transform((v): boolean | number | string => (v === 'true' ? true : v === 'false' ? false : /^\d+$/.test(v) ? Number(v) : v)),
  /**
   * Worker threads that count prompt tokens (off the event loop), and how much may wait before 503 server_busy: counts,
   * and characters of prompt text (the work; 256 prompts of 16 KiB). A burst of 1,000 short prompts fits both.
   */
  TOKENIZER_THREADS: int(1, 64).default(2),
  TOKENIZER_MAX_PENDING: int(1).default(4096),
  TOKENIZER_MAX_PENDING_CHARS: int(1).default(4_194_304),
  /** max_tokens when a request sets none; always capped by what the model's context leaves. */
  DEFAULT_MAX_TOKENS: int(1).default(512),
  /** How long a completed job's result stays in BullMQ (removeOnComplete age; at most the last 1000 are kept). */
  JOB_RESULT_RETENTION_S: int(1).default(300),
  /** A job that no worker has started after this long is removed: 503 (or an in-stream error). */
  QUEUE_TIMEOUT_MS: int(100).default(30_000),
  /** Whole-request limit; it is the job's deadline_ms, at which the worker cuts generation. */
  REQUEST_TIMEOUT_MS: int(1000).default(600_000),
  /** Unread bytes a streaming client may leave in the gateway before its stream ends and its job is cancelled. */
  SSE_MAX_BUFFER_BYTES: int(16 * 1024).default(4 * 1024 * 1024),
  /** SSE comment interval while a stream has nothing else to send. */
  SSE_KEEPALIVE_MS: int(100).default(15_000),
  /** Mirrors the worker's HEARTBEAT_TTL_MS (docs/PROTOCOL.md); sizes retry-after when no worker is live. */
  HEARTBEAT_TTL_MS: int(100).default(5_000),
  /** How often the shared view of live workers (ZSET llm:workers) is refreshed. */
  WORKER_REFRESH_MS: int(50).default(1_000),
  /** With no event for this long, a job's state is read from BullMQ (backstop for lost messages). */
  JOB_POLL_MS: int(100).default(2_000),
  /**
   * Resumable streams (README "Resumable streams"): a streaming client that disconnects does not cancel its job at
   * once; the job goes on this long, and is cancelled then unless a client has resumed the stream on any replica.
   * 0: cancelled at once.
   */
  RESUME_GRACE_MS: int(0, 3_600_000).default(30_000),
  /** How long a stream's stored events (LIST llm:events:{id}) outlive its last event: it stays resumable that long. */
  RESUME_EVENTS_TTL_MS: int(1000).default(600_000),
  /** Bytes of events stored per job; past it the stream can no longer be resumed (410). 0: none stored, no resume. */
  RESUME_EVENTS_MAX_BYTES: int(0).default(1024 * 1024),
  /**
   * How long a client may take to send its request's headers, and its whole request (headers and body), before the
   * connection is answered 408 and closed: a slow-loris client cannot hold sockets open. A response (a long stream
   * included) is not bounded by either.
   */
  HEADERS_TIMEOUT_MS: int(1000).default(60_000),
  REQUEST_RECEIVE_TIMEOUT_MS: int(1000).default(300_000),
  /** SIGTERM: how long open requests may run before they are cut. */
  SHUTDOWN_GRACE_MS: int(0).default(30_000),
  LOG_LEVEL: z.enum(['error', 'warn', 'info', 'debug']).default('info'),
  /** Log prompt and output text (off: lengths and counts only). */
  LOG_PROMPTS: bool.default(false),
  /** Prometheus metrics on PORT at this path; who may read them (docs/OBSERVABILITY.md). */
  METRICS_PATH: z.string().regex(/^\/[A-Za-z0-9._~\/-]+$/, 'must be a path such as /metrics').default('/metrics'),
  METRICS_AUTH: z.enum(['none', 'api_key', 'token']).default('none'),
  /** The Bearer token scrapers send when METRICS_AUTH=token. */
  METRICS_TOKEN: z.string().min(16, 'must be at least 16 characters').optional(),
  /**
   * The routing table (docs/ROUTING.md): a JSON file mapping public model names to our worker pools or to external
   * OpenAI-compatible upstreams, with fallback chains and circuit breakers. Unset: every model is the pool of its name.
   */
  ROUTING_FILE: z.string().min(1).optional(),
  /** Keys, JWT, limits, cache, output filter (issue 5): limits/governance-config.ts. */
  ...governanceConfigShape,
});

export type Config = z.infer<typeof configSchema>;

const SECRET_KEYS = new Set<string>(['API_KEYS', 'METRICS_TOKEN', ...GOVERNANCE_SECRETS]);

export class ConfigError extends Error {
  override name = 'ConfigError';
}

/** Parses the environment; empty strings count as unset so `FOO= cmd` falls back to the default. */
export function loadConfig(env: NodeJS.ProcessEnv = process.env): Config {
  const input: Record<string, string> = {};
  for (const key of Object.keys(configSchema.shape)) {
    const value = env[key];
    if (value !== undefined && value.trim() !== '') input[key] = value.trim();
  }
  const parsed = configSchema.safeParse(input);
  if (parsed.success && parsed.data.METRICS_AUTH === 'token' && !parsed.data.METRICS_TOKEN) {
    throw new ConfigError('invalid configuration:\n  METRICS_TOKEN="": required when METRICS_AUTH=token');
  }
  if (!parsed.success) {
    const lines = parsed.error.issues.map((issue) => {
      const key = String(issue.path[0] ?? '?');
      const shown = SECRET_KEYS.has(key) ? '<redacted>' : JSON.stringify(input[key] ?? '');
      return `  ${key}=${shown}: ${issue.message}`;
    });
    throw new ConfigError(`invalid configuration:\n${lines.join('\n')}`);
  }
  return parsed.data;
}
