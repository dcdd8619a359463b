/**
 * One job's life as the gateway sees it: subscribe to its channel, enqueue, follow its events, and settle exactly once.
 *
 * Why the machinery: pub/sub is fire-and-forget, so a message can be lost (a reconnect, a slow subscriber). Every event
 * carries `seq`; on a gap the run stops forwarding deltas and, when the job ends, hands the caller the unsent tail of
 * the stored result. The end itself is learnt from whichever comes first: the `done`/`error` event, BullMQ's
 * QueueEvents (a Redis stream, so not lost), or a poll of the job when nothing has been heard for a while.
 *
 * A run either starts its job (`start`: subscribe, then Queue.add) or follows one that another request started
 * (`attach`, a resumed stream: subscribe, then read the job's stored events, then hear the rest live).
 */
import { ApiError } from '../errors';
import type { Logger } from '../logger';
import { type JobData, type JobEvent, jobEventSchema, type JobResult, jobResultSchema, type TokenLogprob, TRUNCATED_EVENT } from '../protocol/job';
import type { JobEventBus } from './job-events';
import type { JobPlacement, JobQueues, Settlement } from './job-queue';
import { failedReasonToApiError, safeJson, workerErrorToApiError } from './worker-errors';

export interface RunHooks {
  /**
   * Text of one choice in order, with the `seq` of the delta that carried it; not called after a gap (the rest
   * arrives with the final result).
   */
  onDelta?(index: number, text: string, logprobs: TokenLogprob[] | null, seq: number): void;
  onStarted?(workerId: string): void;
  /** Where the job goes in its BullMQ queue (the caller's tier); absent = FIFO. Not a hook, but set with them. */
  placement?: JobPlacement;
}

/** Where the heartbeat of the worker named in `started` is read (services/worker-registry.ts). */
export interface WorkerLiveness {
  isAlive(workerId: string): boolean;
  /** Whether any live, ready worker serves the model (from the last snapshot; no Redis call). */
  hasLiveWorker(model: string): boolean;
}

export interface RunTimings {
  queueTimeoutMs: number;
  requestTimeoutMs: number;
  pollMs: number;
  heartbeatCheckMs: number;
  /** Extra time past the job's deadline before the gateway gives up on hearing from the worker. */
  deadlineGraceMs: number;
}

export interface RunDeps {
  bus: JobEventBus;
  queues: JobQueues;
  liveness: WorkerLiveness;
  logger: Logger;
  timings: RunTimings;
}

export interface FinalChoice {
  index: number;
  /** Text not yet given to onDelta (all of it when nothing was forwarded). */
  rest: string;
  restLogprobs: TokenLogprob[] | null;
}

export interface RunOutcome {
  result: JobResult;
  rest: FinalChoice[];
  /** The `seq` of the job's `done` event (the one it would have had, when the end came from BullMQ instead). */
  seq: number;
}

/** What following a job needs to know of it: the whole JobData when the run starts the job, less when it attaches. */
export type RunTarget = Pick<JobData, 'model' | 'request_id' | 'deadline_ms'> & Partial<Pick<JobData, 'prompt_tokens' | 'start_deadline_ms'>>;

export class JobRun {
  readonly outcome: Promise<RunOutcome>;
  private resolve!: (o: RunOutcome) => void;
  private reject!: (e: ApiError) => void;
  private settled = false;
  private expectedSeq = 1;
  private gap = false;
  private workerId: string | null = null;
  private readonly forwarded = new Map<number, { chars: number; logprobs: number }>();
  private lastHeardMs = Date.now();
  /** Quiet time before the next poll; doubles while a job stays pending (long queues cost Redis little). */
  private pollAfterMs: number;
  private lastPollMs = 0;
  private timers: NodeJS.Timeout[] = [];
  private queueTimer: NodeJS.Timeout | null = null;
  private unsubscribe: (() => Promise<void>) | null = null;
  private offSettled: (() => void) | null = null;
  private polling = false;
  /** Set while the queue timeout removes the job, so the poll does not read its absence as a lost job. */
  private removing = false;
  /** Following a job another request started (attach): events missing at its start cannot be made up for. */
  private attached = false;
  private readonly log: Logger;

  constructor(
    private readonly deps: RunDeps,
    readonly jobId: string,
    private readonly data: RunTarget,
    private readonly hooks: RunHooks = {},
  ) {
    this.log = deps.logger.child({ jobId, requestId: data.request_id, model: data.model });
    this.pollAfterMs = deps.timings.pollMs;
    this.outcome = new Promise<RunOutcome>((res, rej) => {
      this.resolve = res;
      this.reject = rej;
    });
    this.outcome.catch(() => undefined); // callers may attach later; never an unhandled rejection
  }

  /** Subscribes, then enqueues `job` (this run's own). Throws (before any response header) when Redis refuses either. */
  async start(job: JobData): Promise<void> {
    this.unsubscribe = await this.deps.bus.subscribe(this.jobId, (raw) => this.onMessage(raw));
    this.offSettled = this.deps.queues.onSettled(this.jobId, (s) => this.onSettlement(s));
    try {
      await this.deps.queues.add(this.data.model, this.jobId, job, this.hooks.placement);
    } catch (err) {
      this.settled = true;
      await this.cleanup();
      throw err;
    }
    this.startTimers(this.deps.timings.queueTimeoutMs);
  }

  /**
   * Follows a job that is already queued, running or done: subscribes to its channel first, then reads its stored
   * events (`read`, LIST llm:events:{id}), replays them, then goes on with what it hears live. Every event is in what
   * it read, in what it heard, or in both: the worker appends before it publishes, so the events heard that were also
   * read are the first ones heard, and they are dropped by their text (each carries its own seq and time stamp).
   * Resolves with what was read, once replayed. Throws when the stored events were cut at their bound (`stream_truncated`).
   */
  async attach(read: () => Promise<string[]>): Promise<string[]> {
    this.attached = true;
    let heard: string[] | null = []; // buffered until the stored events are replayed
    let overlap: Set<string> | null = null;
    this.unsubscribe = await this.deps.bus.subscribe(this.jobId, (raw) => {
      if (heard) return void heard.push(raw);
      if (overlap?.has(raw)) return;
      overlap = null; // past the overlap: everything from here on is new
      this.onMessage(raw);
    });
    this.offSettled = this.deps.queues.onSettled(this.jobId, (s) => this.onSettlement(s));
    let stored: string[];
    try {
      stored = await read();
      if (stored.includes(TRUNCATED_EVENT)) {
        throw new ApiError('stream_truncated', 'This stream produced more events than the server keeps (RESUME_EVENTS_MAX_BYTES), so it cannot be resumed.');
      }
    } catch (err) {
      this.settled = true;
      await this.cleanup();
      throw err;
    }
    overlap = new Set(stored);
    for (const raw of [...overlap]) this.onMessage(raw); // a Set: a retried append stored twice is replayed once
    const live = heard;
    heard = null;
    for (const raw of live) {
      if (overlap?.has(raw)) continue;
      overlap = null;
      this.onMessage(raw);
    }
    if (!this.settled) {
      const start = this.data.start_deadline_ms;
      this.startTimers(this.workerId === null && start != null ? Math.max(0, start - Date.now()) : null);
    }
    return stored;
  }

  /** Stops following without telling the worker anything (a resume refused after its events were read). */
  async detach(): Promise<void> {
    if (this.settled) return;
    this.settled = true;
    await this.cleanup();
  }

  /** `queueTimeoutMs`: when the job must have started (null: no such check, it has already). */
  private startTimers(queueTimeoutMs: number | null): void {
    const t = this.deps.timings;
    if (queueTimeoutMs !== null) this.queueTimer = setTimeout(() => void this.onQueueTimeout(), queueTimeoutMs);
    const untilDeadline = this.data.deadline_ms === null ? t.requestTimeoutMs : this.data.deadline_ms - Date.now();
    const hardStop = Math.max(0, untilDeadline) + t.deadlineGraceMs;
    this.timers.push(setTimeout(() => this.abandon('request_timeout', 'The request timed out.'), hardStop));
    this.timers.push(setInterval(() => void this.poll(), t.pollMs));
    this.timers.push(setInterval(() => this.checkHeartbeat(), t.heartbeatCheckMs));
  }

  /** The client went away (or we are shutting down): tell the worker, drop the job if still queued. */
  cancel(): void {
    if (this.settled) return;
    this.log.info('job cancelled: the client went away or the gateway is shutting down');
    this.abandon('cancelled', 'The client closed the request.');
  }

  get hasForwardedText(): boolean {
    for (const f of this.forwarded.values()) if (f.chars > 0) return true;
    return false;
  }

  // ---- events -----------------------------------------------------------------------------------------------------
  private onMessage(raw: string): void {
    if (this.settled) return;
    this.lastHeardMs = Date.now();
    this.pollAfterMs = this.deps.timings.pollMs;
    let event: JobEvent;
    try {
      const parsed = jobEventSchema.safeParse(JSON.parse(raw));
      if (!parsed.success) throw parsed.error;
      event = parsed.data;
    } catch (err) {
      this.log.warn('ignoring malformed job event', { err: String(err) });
      return;
    }
    switch (event.type) {
      case 'started':
        if (event.prompt_tokens !== undefined && this.data.prompt_tokens !== undefined && event.prompt_tokens !== this.data.prompt_tokens) {
          // The gateway's count decides context errors; a mismatch means its tokenizer or template differs.
          this.log.warn('prompt token counts differ', { gateway: this.data.prompt_tokens, worker: event.prompt_tokens });
        }
        return this.onStarted(event.worker_id);
      case 'delta':
        if (!this.checkSeq(event.seq)) return;
        for (const c of event.choices) this.forward(c.index, c.text, c.logprobs ?? null, event.seq);
        return;
      case 'done':
        return this.finish(event.result, event.seq);
      case 'error':
        return this.fail(workerErrorToApiError(event.error));
    }
  }

  private onStarted(workerId: string): void {
    if (this.workerId !== null && this.hasForwardedText) {
      // A second attempt after text already reached the client would repeat it. The same worker counts too: one whose
      // event loop stalled past its lock (a CPU-starved host) gets the job back from BullMQ's stalled check and runs it
      // again beside the first run (seen at 2,000 streams, bench/cpu/fanout.ts: the two runs' text interleaved).
      // Each attempt publishes `started` once, and a replayed copy of the same event is dropped before this (attach).
      return this.abandon('worker_lost', 'The worker generating this response was lost. Please retry.');
    }
    if (this.queueTimer) clearTimeout(this.queueTimer);
    this.queueTimer = null;
    // A retried job (its first worker died) numbers its events from 1 again.
    this.workerId = workerId;
    this.expectedSeq = 1;
    this.gap = false;
    this.log.debug('job started', { workerId });
    this.hooks.onStarted?.(workerId);
  }

  /**
   * True when `seq` is the next expected. A seq already seen is a repeat (a publish the worker's client retried):
   * ignored. On a gap, forwarding stops for good and the final result fills in; a run that attached to a job whose
   * first events it never got (a worker that does not store them) cannot fill in what its client never had: it fails.
   */
  private checkSeq(seq: number): boolean {
    if (seq < this.expectedSeq) return false;
    if (seq !== this.expectedSeq && !this.gap) {
      if (this.attached && this.forwarded.size === 0) {
        this.fail(new ApiError('stream_not_resumable', 'The events of this stream are not stored (the worker that runs it does not keep them), so it cannot be resumed.'));
        return false;
      }
      this.gap = true;
      this.log.warn('job event gap: finishing from the stored result', { expected: this.expectedSeq, got: seq });
    }
    this.expectedSeq = seq + 1;
    return !this.gap;
  }

  private forward(index: number, text: string, logprobs: TokenLogprob[] | null, seq: number): void {
    if (!this.hooks.onDelta) return;
    const f = this.forwarded.get(index) ?? { chars: 0, logprobs: 0 };
    f.chars += text.length;
    f.logprobs += logprobs?.length ?? 0;
    this.forwarded.set(index, f);
    this.hooks.onDelta(index, text, logprobs, seq);
  }

  private onSettlement(s: Settlement): void {
    if (this.settled) return;
    if (s.kind === 'completed') this.finishFromStored(s.returnvalue);
    else this.fail(failedReasonToApiError(s.failedReason));
  }

  private finishFromStored(returnvalue: unknown): void {
    const parsed = jobResultSchema.safeParse(typeof returnvalue === 'string' ? safeJson(returnvalue) : returnvalue);
    if (!parsed.success) {
      this.log.error('stored job result does not match the protocol', { err: parsed.error.message });
      return this.fail(new ApiError('internal_error', 'The worker returned a malformed result.'));
    }
    this.finish(parsed.data, this.expectedSeq);
  }

  // ---- timers -----------------------------------------------------------------------------------------------------
  private async onQueueTimeout(): Promise<void> {
    this.queueTimer = null;
    if (this.settled || this.workerId !== null) return;
    this.removing = true;
    const removed = await this.deps.queues.removeIfWaiting(this.data.model, this.jobId).catch(() => false);
    this.removing = false;
    if (removed) {
      return this.abandon('queue_timeout', 'No worker could take this request in time: the server is busy. Please retry.');
    }
    if (!this.deps.liveness.hasLiveWorker(this.data.model)) {
      // Held by a dead worker's lock and no live worker left to retry it: waiting longer would only hang the client.
      return this.abandon('queue_timeout', 'No worker could take this request in time. Please retry.');
    }
    // Not removable: a worker holds it (its `started` was lost) or it has ended; the poll settles the latter.
    this.log.info('queue timeout reached but the job is not waiting; still following it');
  }

  private async poll(): Promise<void> {
    if (this.settled || this.polling || this.removing) return;
    if (Date.now() - Math.max(this.lastHeardMs, this.lastPollMs) < this.pollAfterMs) return;
    this.polling = true;
    this.lastPollMs = Date.now();
    this.pollAfterMs = Math.min(this.pollAfterMs * 2, this.deps.timings.pollMs * 16);
    try {
      const snap = await this.deps.queues.snapshot(this.data.model, this.jobId);
      if (this.settled || this.removing) return;
      if (snap === null) {
        // The job is gone from Redis: a Redis restart without persistence (or a flush) took it. Nothing about the
        // request was wrong, and a retry will be served: a retryable 503, never a 500. A worker may still be running it
        // (generation goes on through an outage): tell it to stop, or it runs to max_tokens for nobody.
        this.deps.queues.cancel(this.data.model, this.jobId).catch((err) => this.log.warn('cancel failed', { err: String(err) }));
        return this.fail(new ApiError('redis_unavailable', 'The request was lost when the queue store restarted. Please retry.', { retryAfterMs: 1000 }));
      }
      if (snap.state === 'completed') this.finishFromStored(snap.returnvalue);
      else if (snap.state === 'failed') this.fail(failedReasonToApiError(snap.failedReason));
    } catch (err) {
      this.log.debug('job poll failed', { err: String(err) });
    } finally {
      this.polling = false;
    }
  }

  private checkHeartbeat(): void {
    if (this.settled || this.workerId === null || this.deps.liveness.isAlive(this.workerId)) return;
    if (this.hasForwardedText) {
      return this.abandon('worker_lost', 'The worker generating this response was lost. Please retry.');
    }
    // Nothing reached the client: BullMQ's stalled-job check hands the job to another worker; wait for it.
    this.log.warn('worker lost before any text was sent; waiting for the retry', { workerId: this.workerId });
    this.workerId = null;
    this.forwarded.clear();
    this.queueTimer = setTimeout(() => void this.onQueueTimeout(), this.deps.timings.queueTimeoutMs);
  }

  // ---- settling ---------------------------------------------------------------------------------------------------
  private finish(result: JobResult, seq: number): void {
    if (this.settled) return;
    this.settled = true;
    const rest = [...result.choices]
      .sort((a, b) => a.index - b.index)
      .map((c) => {
        const f = this.forwarded.get(c.index) ?? { chars: 0, logprobs: 0 };
        return { index: c.index, rest: c.text.slice(f.chars), restLogprobs: c.logprobs?.slice(f.logprobs) ?? null };
      });
    void this.cleanup();
    this.resolve({ result, rest, seq });
  }

  private fail(err: ApiError): void {
    if (this.settled) return;
    this.settled = true;
    void this.cleanup();
    this.reject(err);
  }

  /** Ends the run on our side and tells the worker to stop (the job may still be queued or running). */
  private abandon(code: 'cancelled' | 'queue_timeout' | 'worker_lost' | 'request_timeout', message: string): void {
    if (this.settled) return;
    this.deps.queues.cancel(this.data.model, this.jobId).catch((err) => this.log.warn('cancel failed', { err: String(err) }));
    const retryAfterMs = code === 'queue_timeout' ? 1000 : undefined;
    this.fail(new ApiError(code, message, { retryAfterMs }));
  }

  private async cleanup(): Promise<void> {
    for (const t of this.timers) clearInterval(t);
    this.timers = [];
    if (this.queueTimer) clearTimeout(this.queueTimer);
    this.queueTimer = null;
    this.offSettled?.();
    this.offSettled = null;
    const unsubscribe = this.unsubscribe;
    this.unsubscribe = null;
    await unsubscribe?.();
  }
}
