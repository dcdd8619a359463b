/**
 * Where one request's time goes inside the gateway: wall-clock stamps at fixed points of the hot path, written with
 * the request's "chat completion finished" log line (`stamps`), so that the benchmark (bench/loadgen.py
 * --gateway-log) can join them by job id to the client's and the worker's clocks. Cost: a few performance.now() calls
 * and one small object per request; nothing is sent anywhere during the request.
 *
 * Points, in order: `route` (the handler runs: HTTP, auth and the JSON body are behind), `prepared` (validated,
 * prompt tokens counted), `admitted` (cache lookup, budgets, queue depth), `subscribed` (the job's channel is
 * subscribed), `enqueued` (Queue.add answered), `opened` (SSE headers out), `started` (the worker's `started` event
 * arrived), `delta` (its first delta with text arrived), `written` (that text was written to the socket).
 */
import { performance } from 'node:perf_hooks';

export type Stage = 'route' | 'prepared' | 'admitted' | 'subscribed' | 'enqueued' | 'opened' | 'started' | 'delta' | 'written';

export class Stamps {
  private readonly at = new Map<Stage, number>();

  /** Records the first time a stage is reached (later calls are ignored). */
  mark(stage: Stage): void {
    if (!this.at.has(stage)) this.at.set(stage, performance.timeOrigin + performance.now());
  }

  /** `{route: <epoch ms>, <stage>: <ms after route>, …}`, 0.01 ms precision; undefined when nothing was marked. */
  toLog(): Record<string, number> | undefined {
    const route = this.at.get('route');
    if (route === undefined) return undefined;
    const out: Record<string, number> = { route: Math.round(route * 100) / 100 };
    for (const [stage, t] of this.at) if (stage !== 'route') out[stage] = Math.round((t - route) * 100) / 100;
    return out;
  }
}
