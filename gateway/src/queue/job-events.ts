/**
 * One shared subscriber connection for every job's channel (llm:job:{id}), with a per-channel dispatch map.
 * SUBSCRIBE resolves only once Redis has acknowledged it, so a caller that awaits `subscribe` before Queue.add cannot
 * miss the job's first event.
 *
 * `reserve` starts a job's SUBSCRIBE early — as soon as its id exists, while the gateway still does other reads for
 * the request (cache lookup, queue depth) — so that the round trip overlaps them instead of coming after them. The
 * later `subscribe` (JobRun, right before Queue.add) then only waits for the acknowledgement if it has not arrived,
 * and takes over whatever the channel received meanwhile, in order. A reservation nobody takes is dropped by
 * `release`, or after RESERVATION_MS in case a caller forgot.
 *
 * Several followers of one job on one gateway share its channel: the run that started the job and a resumed stream of
 * it (a client reconnecting to the same replica while the run still follows the job). Each gets every message from its
 * `subscribe` on; the channel is unsubscribed when the last one leaves.
 */
import type Redis from 'ioredis';
import type { Logger } from '../logger';
import { jobChannel } from '../protocol/job';
import { channels, type Channels } from './redis';

export type RawEventHandler = (message: string) => void;

/** A reservation that no `subscribe` took within this long is dropped (a safety net; callers release their own). */
const RESERVATION_MS = 60_000;

interface Entry {
  /** Empty while reserved: messages are buffered until `subscribe` takes the channel. */
  handlers: Set<RawEventHandler>;
  /** false until the first subscriber has taken what was buffered. */
  live: boolean;
  buffered: string[];
  /** The SUBSCRIBE's acknowledgement. */
  ready: Promise<void>;
  claimed: boolean;
  timer: NodeJS.Timeout | null;
}

export class JobEventBus {
  private readonly entries = new Map<string, Entry>();
  /** SUBSCRIBE, or SSUBSCRIBE on a cluster (queue/redis.ts). */
  private readonly sub: Channels;

  constructor(
    subscriber: Redis,
    private readonly logger: Logger,
  ) {
    this.sub = channels(subscriber);
    this.sub.onMessage((channel: string, message: string) => {
      const entry = this.entries.get(channel);
      if (!entry) return;
      if (!entry.live) {
        entry.buffered.push(message);
        return;
      }
      this.dispatch(channel, entry, message);
    });
  }

  /** Starts subscribing to a job's channel now; `subscribe` takes it over later, `release` drops it. */
  reserve(jobId: string): void {
    const channel = jobChannel(jobId);
    if (this.entries.has(channel)) return;
    const ready = this.sub.subscribe(channel).then(() => undefined);
    ready.catch(() => undefined); // reported by `subscribe`, which awaits it
    const timer = setTimeout(() => this.release(jobId), RESERVATION_MS);
    timer.unref();
    this.entries.set(channel, { handlers: new Set(), live: false, buffered: [], ready, claimed: false, timer });
  }

  /** Drops a reservation that no `subscribe` took (the request ended before its job was enqueued). */
  release(jobId: string): void {
    const channel = jobChannel(jobId);
    const entry = this.entries.get(channel);
    if (!entry || entry.claimed) return;
    if (entry.timer) clearTimeout(entry.timer);
    this.entries.delete(channel);
    void entry.ready.then(() => this.unsubscribeIfUnused(channel), () => undefined);
  }

  /**
   * Subscribes to a job's channel (or takes over its reservation, or joins the followers it already has); resolves
   * once Redis has acknowledged the subscription, with the function that leaves it.
   */
  async subscribe(jobId: string, handler: RawEventHandler): Promise<() => Promise<void>> {
    const channel = jobChannel(jobId);
    const existing = this.entries.get(channel);
    if (existing?.claimed) {
      // Another follower of the job on this gateway: share its subscription.
      await existing.ready;
      if (this.entries.get(channel) !== existing) return this.subscribe(jobId, handler); // it left meanwhile
      existing.handlers.add(handler);
      return this.leave(channel, existing, handler);
    }
    const entry: Entry = existing ?? { handlers: new Set(), live: false, buffered: [], ready: Promise.resolve(), claimed: true, timer: null };
    entry.claimed = true;
    if (entry.timer) clearTimeout(entry.timer);
    entry.timer = null;
    if (!existing) {
      this.entries.set(channel, entry);
      entry.ready = this.sub.subscribe(channel).then(() => undefined);
    }
    try {
      await entry.ready;
    } catch (err) {
      if (this.entries.get(channel) === entry) this.entries.delete(channel);
      throw err;
    }
    // Whatever arrived before now, in order, then live: one synchronous step, so nothing can come in between.
    entry.handlers.add(handler);
    for (const message of entry.buffered.splice(0)) this.dispatch(channel, entry, message);
    entry.live = true;
    return this.leave(channel, entry, handler);
  }

  private leave(channel: string, entry: Entry, handler: RawEventHandler): () => Promise<void> {
    return async () => {
      if (!entry.handlers.delete(handler) || entry.handlers.size > 0 || this.entries.get(channel) !== entry) return;
      this.entries.delete(channel);
      // Best effort: after a reconnect ioredis re-subscribes only to channels still wanted.
      await this.sub.unsubscribe(channel).catch(() => undefined);
    };
  }

  private dispatch(channel: string, entry: Entry, message: string): void {
    for (const handler of [...entry.handlers]) {
      try {
        handler(message);
      } catch (err) {
        this.logger.error('job event handler threw', { channel, err });
      }
    }
  }

  private async unsubscribeIfUnused(channel: string): Promise<void> {
    if (this.entries.has(channel)) return; // reserved or subscribed again meanwhile
    await this.sub.unsubscribe(channel).catch(() => undefined);
  }

  get size(): number {
    return this.entries.size;
  }
}
