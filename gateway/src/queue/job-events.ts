/**
 * One shared subscriber connection for every job's channel (llm:job:{id}), with a per-channel dispatch map.
 * SUBSCRIBE resolves only once Redis has acknowledged it, so a caller that awaits `subscribe` before Queue.add cannot
 * miss the job's first event.
 */
import type Redis from 'ioredis';
import type { Logger } from '../logger';
import { jobChannel } from '../protocol/job';

export type RawEventHandler = (message: string) => void;

export class JobEventBus {
  private readonly handlers = new Map<string, RawEventHandler>();

  constructor(
    private readonly sub: Redis,
    private readonly logger: Logger,
  ) {
    sub.on('message', (channel: string, message: string) => {
      const handler = this.handlers.get(channel);
      if (!handler) return;
      try {
        handler(message);
      } catch (err) {
        this.logger.error('job event handler threw', { channel, err });
      }
    });
  }

  /** Subscribes to a job's channel; returns the function that unsubscribes. */
  async subscribe(jobId: string, handler: RawEventHandler): Promise<() => Promise<void>> {
    const channel = jobChannel(jobId);
    if (this.handlers.has(channel)) throw new Error(`already subscribed to ${channel}`);
    this.handlers.set(channel, handler);
    try {
      await this.sub.subscribe(channel);
    } catch (err) {
      this.handlers.delete(channel);
      throw err;
    }
    return async () => {
      if (!this.handlers.delete(channel)) return;
      // Best effort: after a reconnect ioredis re-subscribes only to channels still wanted.
      await this.sub.unsubscribe(channel).catch(() => undefined);
    };
  }

  get size(): number {
    return this.handlers.size;
  }
}
