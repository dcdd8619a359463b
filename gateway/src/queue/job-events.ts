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
 */
import type Redis from 'ioredis';
import type { Logger } from '../logger';
import { jobChannel } from '../protocol/job';

export type RawEventHandler = (message: string) => void;

/** A reservation that no `subscribe` took within this long is dropped (a safety net; callers release their own). */
const RESERVATION_MS = 60_000;

interface Entry {
  /** null while reserved: messages are buffered until `subscribe` takes the channel. */
  handler: RawEventHandler | null;
  buffered: string[];
  /** The SUBSCRIBE's acknowledgement. */
  ready: Promise<void>;
  claimed: boolean;
  timer: NodeJS.Timeout | null;
}

export class JobEventBus {
  private readonly entries = new Map<string, Entry>();

  constructor(
    private readonly sub: Redis,
    private readonly logger: Logger,
  ) {
    sub.on('message', (channel: string, message: string) => {
      const entry = this.entries.get(channel);
      if (!entry) return;
      if (!entry.handler) {
        entry.buffered.push(message);
        return;
      }
      try {
        entry.handler(message);
      } catch (err) {
        this.logger.error('job event handler threw', { channel, err });
      }
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
    this.entries.set(channel, { handler: null, buffered: [], ready, claimed: false, timer });
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

  /** Subscribes to a job's channel (or takes over its reservation); returns the function that unsubscribes. */
  async subscribe(jobId: string, handler: RawEventHandler): Promise<() => Promise<void>> {
    const channel = jobChannel(jobId);
    const reserved = this.entries.get(channel);
    if (reserved && (reserved.claimed || reserved.handler)) throw new Error(`already subscribed to ${channel}`);
    const entry: Entry = reserved ?? { handler: null, buffered: [], ready: Promise.resolve(), claimed: true, timer: null };
    entry.claimed = true;
    if (entry.timer) clearTimeout(entry.timer);
    entry.timer = null;
    if (!reserved) {
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
    for (const message of entry.buffered.splice(0)) {
      try {
        handler(message);
      } catch (err) {
        this.logger.error('job event handler threw', { channel, err });
      }
    }
    entry.handler = handler;
    return async () => {
      if (this.entries.get(channel) !== entry) return;
      this.entries.delete(channel);
      // Best effort: after a reconnect ioredis re-subscribes only to channels still wanted.
      await this.sub.unsubscribe(channel).catch(() => undefined);
    };
  }

  private async unsubscribeIfUnused(channel: string): Promise<void> {
    if (this.entries.has(channel)) return; // reserved or subscribed again meanwhile
    await this.sub.unsubscribe(channel).catch(() => undefined);
  }

  get size(): number {
    return this.entries.size;
  }
}
