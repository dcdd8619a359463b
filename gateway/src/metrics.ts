/**
 * The gateway's Prometheus metrics (prom-client), served at METRICS_PATH (routes/metrics.ts). Every metric lives in
 * one module-level registry so any module can import and increment its counter without plumbing (the rate limiter and
 * the cache do: `rateLimitRejections.inc()`, `cacheLookups.inc({ result: 'hit' })`). Names are listed, with what
 * each means, in docs/OBSERVABILITY.md; the Grafana dashboard (deploy/grafana/llm-gateway.json) queries them and
 * tests/e2e/metrics.test.ts checks that each one it queries is served with samples.
 *
 * Label values are bounded: `route` is the Express route pattern (never the raw URL), `model` a served model id.
 */
import { Queue } from 'bullmq';
import type Redis from 'ioredis';
import client from 'prom-client';
import type { Logger } from './logger';
import { queueName } from './protocol/job';
import { bullPrefix } from './queue/redis';

export const registry = new client.Registry();
client.collectDefaultMetrics({ register: registry });

/** Request latency: from the first byte in to the last byte out (a stream's whole length). */
const LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320];
const TTFT_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.5, 3, 6, 12, 25, 50, 100];
const ITL_BUCKETS = [0.002, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5];

export const httpRequests = new client.Counter({
  name: 'llm_gateway_requests_total',
  help: 'HTTP requests by route pattern, method and status (499: the client went away first)',
  labelNames: ['route', 'method', 'status'] as const,
  registers: [registry],
});

export const httpDuration = new client.Histogram({
  name: 'llm_gateway_request_duration_seconds',
  help: 'HTTP request latency by route pattern, method and status, first byte in to last byte out',
  labelNames: ['route', 'method', 'status'] as const,
  buckets: LATENCY_BUCKETS,
  registers: [registry],
});

export const timeToFirstToken = new client.Histogram({
  name: 'llm_gateway_time_to_first_token_seconds',
  help: 'Chat completions: from the request being accepted (validated, counted, enqueued) to its first generated text',
  labelNames: ['model', 'stream'] as const,
  buckets: TTFT_BUCKETS,
  registers: [registry],
});

export const interTokenLatency = new client.Histogram({
  name: 'llm_gateway_inter_token_latency_seconds',
  help: 'Chat completions: mean time between generated tokens of one request after its first (one observation per request)',
  labelNames: ['model', 'stream'] as const,
  buckets: ITL_BUCKETS,
  registers: [registry],
});

export const promptTokens = new client.Counter({
  name: 'llm_gateway_prompt_tokens_total',
  help: 'Prompt tokens of finished chat completions',
  labelNames: ['model'] as const,
  registers: [registry],
});

export const completionTokens = new client.Counter({
  name: 'llm_gateway_completion_tokens_total',
  help: 'Generated tokens of finished chat completions',
  labelNames: ['model'] as const,
  registers: [registry],
});

/** Incremented by the rate limiter each time it refuses a request (429). */
export const rateLimitRejections = new client.Counter({
  name: 'llm_gateway_rate_limit_rejections_total',
  help: 'Requests refused by a rate limit (429)',
  registers: [registry],
});

/** Incremented by services/chat-admission.ts for each 503 queue_full: `reason` is `depth` (MAX_QUEUE_DEPTH) or `backlog` (queue/backlog.ts). */
export const queueFullRejections = new client.Counter({
  name: 'llm_gateway_queue_full_rejections_total',
  help: 'Requests refused with 503 queue_full, by model and reason (depth: MAX_QUEUE_DEPTH; backlog: more work queued than drains within QUEUE_TIMEOUT_MS)',
  labelNames: ['model', 'reason'] as const,
  registers: [registry],
});

/** Incremented by the response cache on each lookup: `cacheLookups.inc({ result: 'hit' | 'miss' })`. */
export const cacheLookups = new client.Counter({
  name: 'llm_gateway_cache_lookups_total',
  help: 'Response cache lookups by result (hit or miss)',
  labelNames: ['result'] as const,
  registers: [registry],
});
// Both series exist from the start, so a hit ratio is 0/x rather than "no data" before the first hit.
cacheLookups.inc({ result: 'hit' }, 0);
cacheLookups.inc({ result: 'miss' }, 0);

// The three gauges below are read at scrape time; registry.metrics() collects all metrics at once, so they share one
// refresh (see refreshGauges).
export const openRequests = new client.Gauge({
  name: 'llm_gateway_open_requests',
  help: 'HTTP requests in progress (streams included)',
  registers: [registry],
  async collect() {
    await refreshGauges();
  },
});

export const liveWorkers = new client.Gauge({
  name: 'llm_gateway_live_workers',
  help: 'Live, ready workers per model, as the gateway sees their heartbeats',
  labelNames: ['model'] as const,
  registers: [registry],
  async collect() {
    await refreshGauges();
  },
});

/** The BullMQ states reported. `prioritized` jobs are kept outside the wait list, so "queued" = waiting + prioritized. */
export const QUEUE_STATES = ['waiting', 'prioritized', 'active', 'delayed'] as const;

/** Named without the gateway prefix: the autoscalers (k8s/components/keda, worker-hpa) query it by this name. */
export const queueJobs = new client.Gauge({
  name: 'llm_queue_jobs',
  help: 'Jobs in each model queue by BullMQ state (read from Redis at scrape time; every gateway reports the same)',
  labelNames: ['model', 'state'] as const,
  registers: [registry],
  async collect() {
    await refreshGauges();
  },
});

// ---- scrape-time sources (set by wiring.ts for the gateway it builds) ------------------------------------------------

export interface GaugeSource {
  /** Models to report: the default model and every model a live worker serves. */
  models(): Promise<Array<{ id: string; workers: number }>>;
  queue(model: string): Queue;
  openRequests(): number;
  logger: Logger;
}

let source: GaugeSource | null = null;
/** A scrape never waits longer than this on Redis; the gauges are then left empty rather than stale. */
const SCRAPE_TIMEOUT_MS = 2000;

/** Makes `s` the source of the scrape-time gauges; returns the function that detaches it. */
export function setGaugeSource(s: GaugeSource): () => void {
  source = s;
  return () => {
    if (source === s) source = null;
  };
}

let refreshing: Promise<void> | null = null;

/** One Redis read per scrape however many gauges ask: callers during a refresh share it. */
function refreshGauges(): Promise<void> {
  refreshing ??= readGauges().finally(() => {
    refreshing = null;
  });
  return refreshing;
}

async function readGauges(): Promise<void> {
  queueJobs.reset();
  liveWorkers.reset();
  const s = source;
  if (!s) return;
  openRequests.set(s.openRequests());
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error('queue depth: Redis did not answer in time')), SCRAPE_TIMEOUT_MS);
  });
  try {
    const counts = await Promise.race([readCounts(s), timeout]);
    for (const { model, workers, counts: c } of counts) {
      liveWorkers.set({ model }, workers);
      for (const state of QUEUE_STATES) queueJobs.set({ model, state }, c[state] ?? 0);
    }
  } catch (err) {
    s.logger.debug('metrics: queue depth unavailable', { err: String(err) });
  } finally {
    clearTimeout(timer);
  }
}

async function readCounts(s: GaugeSource) {
  const models = await s.models();
  return Promise.all(
    models.map(async ({ id, workers }) => ({ model: id, workers, counts: await s.queue(id).getJobCounts(...QUEUE_STATES) })),
  );
}

/**
 * The gauge source of one gateway: BullMQ Queue objects on its commands connection (no connection of their own, unlike
 * the QueueEvents of queue/job-queue.ts), for the default model and every model a live worker serves.
 */
export function attachGaugeSource(deps: {
  redis: Redis;
  defaultModel: string;
  models: () => Promise<Array<{ id: string; workers: number }>>;
  openRequests: () => number;
  logger: Logger;
}): () => Promise<void> {
  const queues = new Map<string, Queue>();
  const queue = (model: string) => {
    let q = queues.get(model);
    if (!q) {
      q = new Queue(queueName(model), { connection: deps.redis, prefix: bullPrefix(deps.redis) });
      q.on('error', (err) => deps.logger.debug('metrics queue error', { model, err: String(err) }));
      queues.set(model, q);
    }
    return q;
  };
  const detach = setGaugeSource({
    async models() {
      const live = await deps.models();
      return live.some((m) => m.id === deps.defaultModel) ? live : [{ id: deps.defaultModel, workers: 0 }, ...live];
    },
    queue,
    openRequests: deps.openRequests,
    logger: deps.logger,
  });
  return async () => {
    detach();
    await Promise.allSettled([...queues.values()].map((q) => q.close()));
  };
}

// ---- per-request observations --------------------------------------------------------------------------------------

export function observeRequest(route: string, method: string, status: number, seconds: number): void {
  const labels = { route, method, status: String(status) };
  httpRequests.inc(labels);
  httpDuration.observe(labels, seconds);
}

/**
 * Follows one chat completion's timing. Streams are timed in the gateway as the client sees them; a non-stream
 * request's first token is placed by subtracting the worker's own decode time (same clock) from the gateway's total,
 * so no two clocks are ever compared.
 */
export class GenerationTimer {
  private firstTextMs: number | null = null;
  private lastTextMs: number | null = null;

  constructor(
    private readonly model: string,
    private readonly acceptedMs: number,
    private readonly stream: boolean,
  ) {}

  /** A delta with text was sent (streams only). */
  text(): void {
    const now = Date.now();
    if (this.firstTextMs === null) this.firstTextMs = now;
    this.lastTextMs = now;
  }

  finish(usage: { prompt_tokens: number; completion_tokens: number }, choices: number, timing?: Record<string, number | null>): void {
    const labels = { model: this.model, stream: String(this.stream) };
    promptTokens.inc({ model: this.model }, usage.prompt_tokens);
    completionTokens.inc({ model: this.model }, usage.completion_tokens);
    const perChoice = usage.completion_tokens / Math.max(1, choices);
    let first: number | null = null;
    let decodeMs: number | null = null;
    if (this.stream) {
      first = this.firstTextMs;
      if (this.firstTextMs !== null && this.lastTextMs !== null) decodeMs = this.lastTextMs - this.firstTextMs;
    } else if (typeof timing?.first_token_ms === 'number' && typeof timing?.finished_ms === 'number') {
      decodeMs = Math.max(0, timing.finished_ms - timing.first_token_ms);
      first = Date.now() - decodeMs;
    }
    if (first !== null) timeToFirstToken.observe(labels, Math.max(0, first - this.acceptedMs) / 1000);
    // Coalesced deltas (PROTOCOL.md: STREAM_FLUSH_MS) make per-delta gaps meaningless; the mean over the request is not.
    if (decodeMs !== null && perChoice >= 2) interTokenLatency.observe(labels, decodeMs / (perChoice - 1) / 1000);
  }
}
