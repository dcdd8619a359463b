/**
 * Tracks open requests so SIGTERM can stop taking new ones, let open ones (streams above all) finish within
 * SHUTDOWN_GRACE_MS, and then cut the rest with an error rather than a silent close.
 */
export class Lifecycle {
  draining = false;
  private readonly open = new Set<AbortController>();
  private idleWaiters: Array<() => void> = [];

  track(controller: AbortController): () => void {
    this.open.add(controller);
    return () => {
      this.open.delete(controller);
      if (this.open.size === 0) {
        for (const w of this.idleWaiters) w();
        this.idleWaiters = [];
      }
    };
  }

  get openRequests(): number {
    return this.open.size;
  }

  /** Resolves true when every open request has ended, false when `ms` ran out first. */
  waitIdle(ms: number): Promise<boolean> {
    if (this.open.size === 0) return Promise.resolve(true);
    return new Promise((resolve) => {
      const timer = setTimeout(() => resolve(false), ms);
      this.idleWaiters.push(() => {
        clearTimeout(timer);
        resolve(true);
      });
    });
  }

  /** Aborts what is still open (their handlers write an in-stream error or a 503). */
  abortAll(reason: string): void {
    for (const c of this.open) c.abort(reason);
  }
}
