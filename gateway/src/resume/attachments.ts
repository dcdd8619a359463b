/**
 * Who is reading a job's stream right now, as every replica sees it, and the disconnect grace built on that.
 *
 * ZSET llm:attached:{jobId}: one member per client attached to the job's stream (a random token), scored with the
 * epoch ms its lease runs out. A gateway renews the leases of all its attached streams every LEASE_REFRESH_MS in one
 * pipeline and removes a lease as soon as its client goes, so a lease outlives its client only when its gateway died,
 * and then by at most LEASE_MS. The key itself expires LEASE_MS after its last renewal.
 *
 * The grace: a streaming client that disconnects does not cancel its job at once. RESUME_GRACE_MS later the job is
 * cancelled unless a live lease says a client is attached to it again (a resume, on any replica); the disconnect of
 * that client starts the same grace again, on its own gateway.
 */
import { randomBytes } from 'node:crypto';
import type Redis from 'ioredis';
import type { Logger } from '../logger';
import { pipelineEach } from '../queue/redis';

export const attachedKey = (jobId: string): string => `llm:attached:${jobId}`;

/** How long a lease lasts without renewal: bounds how long a dead gateway's client still counts as attached. */
export const LEASE_MS = 10_000;
/** Renewal period: three renewals per lease, so one slow or lost round trip never lets a live lease lapse. */
const LEASE_REFRESH_MS = 3_000;

interface Grace {
  jobId: string;
  cancel: () => void;
}

export class StreamAttachments {
  /** This gateway's leases: token → job id. */
  private readonly leases = new Map<string, string>();
  private readonly graces = new Map<NodeJS.Timeout, Grace>();
  private refresher: NodeJS.Timeout | null = null;

  constructor(
    private readonly redis: Redis,
    private readonly graceMs: number,
    private readonly log: Logger,
  ) {}

  /** A client reads the job's stream from now on; returns the function that ends its lease (idempotent). */
  attach(jobId: string): () => void {
    const token = randomBytes(8).toString('hex');
    this.leases.set(token, jobId);
    this.renew([[token, jobId]]);
    if (!this.refresher) {
      this.refresher = setInterval(() => this.renew([...this.leases]), LEASE_REFRESH_MS);
      this.refresher.unref();
    }
    return () => {
      if (!this.leases.delete(token)) return;
      if (this.leases.size === 0 && this.refresher) {
        clearInterval(this.refresher);
        this.refresher = null;
      }
      this.redis.zrem(attachedKey(jobId), token).catch((err) => this.log.warn('ending a stream lease failed', { jobId, err: String(err) }));
    };
  }

  /** Whether a client holds a live lease on the job, on any replica. */
  async attachedNow(jobId: string): Promise<boolean> {
    return (await this.redis.zcount(attachedKey(jobId), Date.now(), '+inf')) > 0;
  }

  /**
   * The client of a running job went away: `cancel` runs once the grace is over unless a client is attached by then.
   * Returns the function that drops the grace (the job ended first). A grace of 0 cancels at once.
   */
  grace(jobId: string, cancel: () => void): () => void {
    if (this.graceMs === 0) {
      cancel();
      return () => undefined;
    }
    const timer = setTimeout(() => {
      this.graces.delete(timer);
      void this.decide({ jobId, cancel });
    }, this.graceMs);
    this.graces.set(timer, { jobId, cancel });
    return () => {
      clearTimeout(timer);
      this.graces.delete(timer);
    };
  }

  /** The gateway stops: graces still running end now (each job is cancelled unless a client is attached); leases end. */
  async close(): Promise<void> {
    if (this.refresher) clearInterval(this.refresher);
    this.refresher = null;
    const graces = [...this.graces];
    this.graces.clear();
    for (const [timer] of graces) clearTimeout(timer);
    await Promise.all(graces.map(([, g]) => this.decide(g)));
    const leases = [...this.leases];
    this.leases.clear();
    if (leases.length === 0) return;
    await pipelineEach(this.redis, leases, (pipe, [token, jobId]) => pipe.zrem(attachedKey(jobId), token)).catch(() => undefined);
  }

  private async decide(g: Grace): Promise<void> {
    let attached = false;
    try {
      attached = await this.attachedNow(g.jobId);
    } catch (err) {
      // Redis does not answer: cancel, the outcome that never leaves a job generating for nobody.
      this.log.warn('could not read the stream leases; cancelling', { jobId: g.jobId, err: String(err) });
    }
    if (attached) this.log.info('the stream was resumed: its job goes on', { jobId: g.jobId });
    else g.cancel();
  }

  private renew(leases: ReadonlyArray<readonly [string, string]>): void {
    if (leases.length === 0) return;
    const until = Date.now() + LEASE_MS;
    pipelineEach(this.redis, leases, (pipe, [token, jobId]) => pipe.zadd(attachedKey(jobId), until, token).pexpire(attachedKey(jobId), LEASE_MS)).catch((err) => this.log.warn('renewing stream leases failed', { leases: leases.length, err: String(err) }));
  }
}
