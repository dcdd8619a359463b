/**
 * The gateway's view of live workers (docs/PROTOCOL.md: ZSET llm:workers scored by expiry, STRING llm:worker:{id}).
 * One refresh loop reads both with a single round trip every WORKER_REFRESH_MS, whatever the request rate; requests
 * read the in-memory snapshot. A request for a model the snapshot lacks forces one (shared) refresh first, so a
 * worker that registered a moment ago is not reported missing.
 */
import type Redis from 'ioredis';
import type { Logger } from '../logger';
import { mgetAny } from '../queue/redis';
import { WORKERS_ZSET, type WorkerInfo, workerInfoSchema, workerKey } from '../protocol/job';

export interface LiveWorker extends WorkerInfo {
  expiresAtMs: number;
}

interface Snapshot {
  workers: Map<string, LiveWorker>;
  fetchedAtMs: number;
}

export interface ModelView {
  id: string;
  /** The smallest context among its live workers: a request must fit every worker it may land on. */
  contextLength: number;
  tokenizerHash: string;
  createdMs: number;
  workers: number;
  /** The fewest sequences a live worker runs at once (its MAX_BATCH), when the workers say: a request's `n` choices
   * must fit one worker's batch, or they would grow its cache past what it was sized for. */
  maxBatch: number | null;
  /** The smallest KV budget in tokens among its live workers that report one: n × (prompt + max_tokens) must fit it,
   * or no worker could ever run the request (it would wait, then time out). */
  kvTokenBudget: number | null;
  /** Sequences its live workers run at once in all (the sum of their MAX_BATCH), when every worker says. */
  slots: number | null;
}

export class WorkerRegistry {
  private snap: Snapshot | null = null;
  private inflight: Promise<Snapshot> | null = null;
  private timer: NodeJS.Timeout | null = null;
  private readonly listeners: Array<(s: ReadonlyMap<string, LiveWorker>) => void> = [];

  constructor(
    private readonly redis: Redis,
    private readonly logger: Logger,
    private readonly refreshMs: number,
    private readonly now: () => number = Date.now,
  ) {}

  start(): void {
    if (this.timer) return;
    const tick = () => void this.refresh().catch(() => undefined);
    tick();
    this.timer = setInterval(tick, this.refreshMs);
    this.timer.unref();
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
  }

  /** Called after each successful refresh (the tokenizer cache warms itself from it). */
  onRefresh(listener: (workers: ReadonlyMap<string, LiveWorker>) => void): void {
    this.listeners.push(listener);
  }

  /** One shared refresh at a time; concurrent callers await the same round trip. */
  refresh(): Promise<Snapshot> {
    if (this.inflight) return this.inflight;
    this.inflight = this.load()
      .then((snap) => {
        this.snap = snap;
        for (const l of this.listeners) l(snap.workers);
        return snap;
      })
      .finally(() => {
        this.inflight = null;
      });
    return this.inflight;
  }

  private async load(): Promise<Snapshot> {
    const now = this.now();
    const flat = await this.redis.zrangebyscore(WORKERS_ZSET, now, '+inf', 'WITHSCORES');
    const ids: string[] = [];
    const expiries: number[] = [];
    for (let i = 0; i < flat.length; i += 2) {
      ids.push(flat[i]);
      expiries.push(Number(flat[i + 1]));
    }
    const workers = new Map<string, LiveWorker>();
    if (ids.length > 0) {
      const infos = await mgetAny(this.redis, ids.map(workerKey));
      infos.forEach((raw, i) => {
        if (raw === null) return; // heartbeat key expired between the two reads
        const parsed = safeJson(raw);
        const info = workerInfoSchema.safeParse(parsed);
        if (!info.success) {
          this.logger.warn('ignoring malformed worker info', { workerId: ids[i] });
          return;
        }
        workers.set(ids[i], { ...info.data, expiresAtMs: expiries[i] });
      });
    }
    return { workers, fetchedAtMs: now };
  }

  /** The snapshot, refreshed first if a model is asked for that it does not show. */
  async model(id: string): Promise<ModelView | null> {
    const found = this.snap ? this.viewOf(id) : null;
    if (found) return found;
    await this.refresh();
    return this.viewOf(id);
  }

  async models(): Promise<ModelView[]> {
    if (!this.snap || this.now() - this.snap.fetchedAtMs > this.refreshMs * 2) await this.refresh();
    const ids = new Set([...this.liveWorkers()].map((w) => w.model));
    return [...ids].sort().map((id) => this.viewOf(id)).filter((m): m is ModelView => m !== null);
  }

  /**
   * Whether a worker is still alive by its last known heartbeat. Unknown (no successful refresh yet, or Redis away)
   * counts as alive: a gateway that cannot see Redis must not declare workers dead.
   */
  isAlive(workerId: string): boolean {
    if (!this.snap) return true;
    if (this.now() - this.snap.fetchedAtMs > this.refreshMs * 3) return true;
    const w = this.snap.workers.get(workerId);
    return w !== undefined && w.expiresAtMs >= this.now();
  }

  /** Whether the last snapshot shows a live, ready worker for the model; unknown (no snapshot) counts as yes. */
  hasLiveWorker(model: string): boolean {
    if (!this.snap) return true;
    return this.viewOf(model) !== null;
  }

  private *liveWorkers(): Iterable<LiveWorker> {
    if (!this.snap) return;
    const now = this.now();
    for (const w of this.snap.workers.values()) if (w.ready && w.expiresAtMs >= now) yield w;
  }

  private viewOf(id: string): ModelView | null {
    let view: ModelView | null = null;
    for (const w of this.liveWorkers()) {
      if (w.model !== id) continue;
      if (!view) {
        view = { id, contextLength: w.context_length, tokenizerHash: w.tokenizer_hash, createdMs: w.started_at_ms, workers: 1, maxBatch: w.max_batch ?? null, kvTokenBudget: w.kv_token_budget ?? null, slots: w.max_batch ?? null };
        continue;
      }
      view.workers += 1;
      view.contextLength = Math.min(view.contextLength, w.context_length);
      view.slots = view.slots === null || w.max_batch === undefined ? null : view.slots + w.max_batch;
      if (w.max_batch !== undefined) view.maxBatch = view.maxBatch === null ? w.max_batch : Math.min(view.maxBatch, w.max_batch);
      if (w.kv_token_budget != null) view.kvTokenBudget = view.kvTokenBudget === null ? w.kv_token_budget : Math.min(view.kvTokenBudget, w.kv_token_budget);
      if (w.started_at_ms < view.createdMs) {
        view.createdMs = w.started_at_ms;
        view.tokenizerHash = w.tokenizer_hash;
      }
    }
    return view;
  }
}

function safeJson(raw: string): unknown {
  try {
    return JSON.parse(raw);
  } catch {
    return null;
  }
}
