/**
 * BullMQ access for the gateway: one Queue and one QueueEvents per model queue, created on first use and kept.
 * QueueEvents reads BullMQ's event stream, so a job's completion or failure reaches us even when its pub/sub `done`
 * message was lost (pub/sub is fire-and-forget; streams are not). Completions are dispatched by job id.
 */
import { Job, Queue, QueueEvents } from 'bullmq';
import type Redis from 'ioredis';
import type { Logger } from '../logger';
import { bullPrefix, createRedis } from './redis';
import { CANCEL_CHANNEL, cancelledKey, JOB_NAME, type JobData, queueName } from '../protocol/job';

export type Settlement = { kind: 'completed'; returnvalue: unknown } | { kind: 'failed'; failedReason: string };
type SettleHandler = (s: Settlement) => void;
export interface JobPlacement {
  priority?: number;
  lifo?: boolean;
}

/**
 * The job options of docs/PROTOCOL.md: kept only as long as the gateway may need the result. `completedAgeS` is
 * JOB_RESULT_RETENTION_S (config.ts); BullMQ applies it when a later job of the queue finishes.
 */
export function jobOptions(completedAgeS = 300) {
  return {
    removeOnComplete: { age: completedAgeS, count: 1000 },
    removeOnFail: { age: 3600, count: 1000 },
    attempts: 1,
  } as const;
}

/** How long a first request for a model waits for its queue's connections before answering 503. */
const READY_TIMEOUT_MS = 5000;

function withTimeout<T>(p: Promise<T>, ms: number): Promise<T> {
  return new Promise<T>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('Redis is unavailable: queue not ready')), ms);
    p.then(
      (v) => (clearTimeout(timer), resolve(v)),
      (e) => (clearTimeout(timer), reject(e)),
    );
  });
}

export interface JobSnapshot {
  state: string;
  returnvalue: unknown;
  failedReason: string | undefined;
}

interface ModelQueue {
  queue: Queue;
  events: QueueEvents;
  eventsConn: Redis;
  ready: Promise<void>;
  /** Set once `ready` has resolved: later adds skip the wait (and its timer). */
  isReady: boolean;
}

export class JobQueues {
  private readonly queues = new Map<string, ModelQueue>();
  /** Per job, its followers on this gateway (the run that started it, and any resumed stream of it). */
  private readonly settleHandlers = new Map<string, Set<SettleHandler>>();

  constructor(
    private readonly redis: Redis,
    private readonly redisUrl: string,
    private readonly logger: Logger,
    private readonly options = jobOptions(),
  ) {}

  private get(model: string): ModelQueue {
    const name = queueName(model);
    let mq = this.queues.get(name);
    if (mq) return mq;
    const queue = new Queue(name, { connection: this.redis, prefix: bullPrefix(this.redis) });
    // QueueEvents blocks on XREAD, so it needs a connection of its own (one per model, not per request); BullMQ
    // requires maxRetriesPerRequest null on blocking connections.
    const eventsConn = createRedis(this.redisUrl, `events:${name}`, this.logger, { maxRetriesPerRequest: null });
    const events = new QueueEvents(name, { connection: eventsConn, prefix: bullPrefix(eventsConn) });
    events.on('completed', ({ jobId, returnvalue }) => this.settle(jobId, { kind: 'completed', returnvalue }));
    events.on('failed', ({ jobId, failedReason }) => this.settle(jobId, { kind: 'failed', failedReason }));
    // Connection errors repeat on every reconnect attempt; createRedis already warns once per outage.
    events.on('error', (err) => this.logger.debug('queue events error', { queue: name, err: String(err) }));
    queue.on('error', (err) => this.logger.debug('queue error', { queue: name, err: String(err) }));
    const ready = Promise.all([queue.waitUntilReady(), events.waitUntilReady()]).then(() => undefined);
    ready.catch(() => undefined);
    mq = { queue, events, eventsConn, ready, isReady: false };
    const created = mq;
    ready.then(() => (created.isReady = true), () => undefined);
    this.queues.set(name, mq);
    return mq;
  }

  private settle(jobId: string, s: Settlement): void {
    for (const handler of [...(this.settleHandlers.get(jobId) ?? [])]) handler(s);
  }

  /** Registers a completion/failure handler of a job; returns the function that removes it. */
  onSettled(jobId: string, handler: SettleHandler): () => void {
    let handlers = this.settleHandlers.get(jobId);
    if (!handlers) this.settleHandlers.set(jobId, (handlers = new Set()));
    handlers.add(handler);
    return () => {
      const set = this.settleHandlers.get(jobId);
      if (!set?.delete(handler) || set.size > 0) return;
      this.settleHandlers.delete(jobId);
    };
  }

  /** `placement`: BullMQ priority (1 = first, in the prioritized set) or lifo (head of the wait list); none = FIFO. */
  async add(model: string, jobId: string, data: JobData, placement: JobPlacement = {}): Promise<void> {
    const mq = this.get(model);
    if (!mq.isReady) await withTimeout(mq.ready, READY_TIMEOUT_MS);
    await mq.queue.add(JOB_NAME, data, { ...this.options, jobId, ...placement });
  }

  /** Removes a job that no worker holds. Returns false when it is active (locked) or already gone. */
  async removeIfWaiting(model: string, jobId: string): Promise<boolean> {
    const { queue } = this.get(model);
    const removed = await queue.remove(jobId);
    return removed === 1;
  }

  async snapshot(model: string, jobId: string): Promise<JobSnapshot | null> {
    const { queue } = this.get(model);
    const job = await Job.fromId(queue, jobId);
    if (!job) return null;
    const state = await job.getState();
    return { state, returnvalue: job.returnvalue, failedReason: job.failedReason };
  }

  /** docs/PROTOCOL.md, cancellation: set the key (seen by a worker that picks the job up later), then publish. */
  async cancel(model: string, jobId: string): Promise<void> {
    await this.redis.set(cancelledKey(jobId), '1', 'EX', 600);
    await this.redis.publish(CANCEL_CHANNEL, jobId);
    await this.removeIfWaiting(model, jobId).catch(() => false);
  }

  async close(): Promise<void> {
    const all = [...this.queues.values()];
    this.queues.clear();
    await Promise.allSettled(all.flatMap((mq) => [mq.events.close(), mq.queue.close()]));
    for (const mq of all) mq.eventsConn.disconnect();
  }
}
