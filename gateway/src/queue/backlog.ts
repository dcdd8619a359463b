/**
 * Backlog admission (issue 11 item 5): a model queue's admitted work, in tokens, against how fast that model's
 * workers drain it, shared by every gateway replica through Redis. A request that would still be waiting when
 * QUEUE_TIMEOUT_MS runs out is refused at once (503 queue_full, retry-after = when the backlog will have drained enough)
 * instead of being queued only to get 503 queue_timeout 30 s later.
 *
 * - Backlog: every admitted request of the model holds an entry (its cost: prompt + n × max_tokens, what the TPM
 *   limiter charges) from admission until its end (`release`), waiting or running. Entries expire on their own after
 *   the request's whole lifetime (`entryTtlMs`), so a gateway that dies never leaves its entries behind for longer.
 * - Drain rate: the charged tokens of requests that ran to a result, per millisecond during which the backlog was not
 *   empty, both exponentially decayed with τ = DRAIN_TAU_MS (the estimate follows what the workers do now, and warms up
 *   from its first completion without being biased low). Charged tokens, not generated ones: the backlog is counted in
 *   charged tokens, so the rate must be too (an answer that stops early frees its whole charge early). Time without a
 *   backlog is not counted: idle workers say nothing about their speed.
 * - Room: while fewer requests hold entries than the model's workers run sequences at once (`slots`, the sum of their
 *   MAX_BATCH), a new one is admitted whatever the backlog: the engines admit requests by fair share, so it starts at
 *   once however long the running ones are (two long streams on two idle workers must not refuse the second). Only
 *   while no job has waited in the queue for longer than its way to a worker (`TRANSIT_MS`): such a job means the
 *   workers have no room whatever the count says (a stuck worker, requests wider than their share). The jobs of a
 *   burst admitted a moment ago are still on their way, so up to as many waiting jobs as requests admitted within
 *   TRANSIT_MS are not taken for that sign (a burst of streams at an idle worker was refused before it).
 * - Decision: otherwise refused when backlog / rate > queue timeout, i.e. when the work ahead of the request takes longer to
 *   drain than the request may wait to start (QUEUE_TIMEOUT_MS bounds the start, not the end: a request's own size
 *   does not count against it, so a large request is not refused where a small one would be admitted). No estimate
 *   (cold start) or nothing ahead: admitted.
 *
 * Known limits: the rate is what the workers did, which under light load is the demand, not their capacity, so the
 * first burst after a quiet spell may be refused early (retry-after is short then, and the estimate rises within
 * about τ of busy time); tiers are ignored (a `high` job that would jump the queue is refused like a standard one).
 *
 * Keys of one model share the hash tag `{<model>}` (Redis Cluster: one slot); the scripts are
 * redis-scripts/backlog-reserve.lua and backlog-release.lua.
 */
import type Redis from 'ioredis';
import { ApiError } from '../errors';
import { runScript } from '../redis-scripts';

/** Time constant of the drain-rate estimate (busy time). */
export const DRAIN_TAU_MS = 30_000;
/** How long an admitted job may wait in the queue before a worker with free rows takes it: BullMQ hands a job to a
 * waiting worker within milliseconds, seconds only on a machine loaded far beyond that. */
export const TRANSIT_MS = 1000;
/** The drain estimate of a model outlives idle spells, but not a model gone for a day. */
const STATE_TTL_MS = 24 * 3600_000;
/** retry-after of a refusal: the excess wait, within these bounds. */
const MIN_RETRY_MS = 1000;
const MAX_RETRY_MS = 60_000;

export interface BacklogOptions {
  /** QUEUE_TIMEOUT_MS: the longest a request may wait for a worker to start it. */
  queueTimeoutMs: number;
  /** How long an entry lives if never released (the request's whole lifetime, plus a margin). */
  entryTtlMs: number;
  tauMs?: number;
  /** TRANSIT_MS unless given (tests). */
  transitMs?: number;
  /** Tests only: the clock (ms) given to the scripts instead of Redis' own TIME. */
  now?: () => number;
}

export type Reservation =
  | { admitted: true; backlogTokens: number; drainPerS: number | null }
  /** `excessMs`: how much longer than the queue timeout the work ahead would take to drain. */
  | { admitted: false; backlogTokens: number; drainPerS: number; excessMs: number };

export interface BacklogSnapshot {
  entries: number;
  backlogTokens: number;
  /** As of the last reservation or release (not decayed since). */
  drainPerS: number | null;
}

export const backlogKeys = (model: string) => {
  const base = `llm:backlog:{${model}}`;
  return { entries: `${base}:entries`, costs: `${base}:costs`, state: `${base}:state`, recent: `${base}:recent` };
};

export class QueueBacklog {
  private readonly tauMs: number;

  constructor(
    private readonly redis: Redis,
    private readonly opts: BacklogOptions,
  ) {
    this.tauMs = opts.tauMs ?? DRAIN_TAU_MS;
  }

  /** Admits `requestId` (cost in tokens) into the backlog of `model`, or refuses it: one atomic script call.
   * `slots`: sequences the model's live workers run at once; `waiting`: jobs waiting in its queue now (either null:
   * unknown, the rate alone decides). */
  async reserve(model: string, requestId: string, costTokens: number, slots: number | null = null, waiting: number | null = 0): Promise<Reservation> {
    const k = backlogKeys(model);
    const argv = [
      requestId, Math.max(0, Math.round(costTokens)), this.opts.entryTtlMs, this.opts.queueTimeoutMs, this.tauMs, STATE_TTL_MS, this.now(),
      slots ?? '', waiting ?? '', this.opts.transitMs ?? TRANSIT_MS,
    ];
    const keys = [k.entries, k.costs, k.state, k.recent];
    const [admitted, excess, backlog, rate] = (await runScript(this.redis, 'backlogReserve', keys, argv)) as [number, number, number, string];
    const drainPerS = rate === '' ? null : Number(rate);
    if (Number(admitted) === 1) return { admitted: true, backlogTokens: Number(backlog), drainPerS };
    return { admitted: false, backlogTokens: Number(backlog), drainPerS: drainPerS ?? 0, excessMs: Number(excess) };
  }

  /**
   * Ends `requestId`'s entry; `ran`: it produced a result, so its charge counts as drained work (see the module
   * comment). Idempotent: returns false when there was no entry (released before, or expired).
   */
  async release(model: string, requestId: string, ran: boolean): Promise<boolean> {
    const k = backlogKeys(model);
    const argv = [requestId, ran ? '1' : '0', this.tauMs, STATE_TTL_MS, this.now()];
    return Number(await runScript(this.redis, 'backlogRelease', [k.entries, k.costs, k.state], argv)) === 1;
  }

  /** What the backlog holds now (for tests and diagnostics; expired entries are dropped only by `reserve`). */
  async snapshot(model: string): Promise<BacklogSnapshot> {
    const k = backlogKeys(model);
    const res = await this.redis.multi().zcard(k.entries).hmget(k.state, 'total', 'work', 'busy').exec();
    for (const [err] of res ?? []) if (err) throw err;
    const entries = Number(res?.[0]?.[1] ?? 0);
    const [total, work, busy] = ((res?.[1]?.[1] as Array<string | null>) ?? []).map((v) => Number(v ?? 0));
    return { entries, backlogTokens: total, drainPerS: work > 0 && busy > 0 ? (work / busy) * 1000 : null };
  }

  private now(): number | '' {
    return this.opts.now ? Math.round(this.opts.now()) : '';
  }
}

/** The 503 of a refused reservation: queue_full like MAX_QUEUE_DEPTH's, retry-after once enough will have drained. */
export function backlogFullError(model: string, r: Extract<Reservation, { admitted: false }>): ApiError {
  const retryAfterMs = Math.min(MAX_RETRY_MS, Math.max(MIN_RETRY_MS, r.excessMs));
  return new ApiError(
    'queue_full',
    `The queue of model '${model}' holds more work than its workers finish before a new request would time out ` +
      `(${r.backlogTokens} tokens ahead at ${Math.round(r.drainPerS)} tokens/s). Please retry in ${Math.ceil(retryAfterMs / 1000)} s.`,
    { retryAfterMs },
  );
}
