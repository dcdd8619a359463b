/**
 * Circuit breakers, one per upstream and one per worker pool of the routing table (routing/table.ts), local to this
 * gateway (each replica judges the targets it talks to by its own requests):
 *   closed    — requests go through; `failure_threshold` consecutive failures (an error of the target, a timeout, a
 *               first output slower than `latency_ms`) open it;
 *   open      — requests are not sent (the fallback chain answers) until `open_ms` has passed;
 *   half-open — one probe request goes through: its success closes the breaker, its failure opens it again.
 * A request that ends for reasons of its own (the client left, a 4xx) says nothing about the target: it neither
 * counts nor closes, and a probe that ends so lets the next request probe.
 */
import client from 'prom-client';
import { toApiError } from '../errors';
import { registry } from '../metrics';
import type { BreakerSettings } from './table';

export type BreakerState = 'closed' | 'open' | 'half_open';
const STATE_VALUE: Record<BreakerState, number> = { closed: 0, half_open: 1, open: 2 };

export const breakerState = new client.Gauge({
  name: 'llm_gateway_breaker_state',
  help: 'Circuit breaker state per upstream or worker pool of the routing table (0 closed, 1 half-open, 2 open)',
  labelNames: ['breaker'] as const,
  registers: [registry],
});

export const fallbacks = new client.Counter({
  name: 'llm_gateway_fallbacks_total',
  help: 'Requests handed to a later model of the fallback chain than the one asked for, by model asked, the model it went to, and why (breaker_open, failed)',
  labelNames: ['model', 'to', 'reason'] as const,
  registers: [registry],
});

/** One request's use of a breaker: exactly one of its three endings counts (the first called). */
export interface Permit {
  /** The target answered; `firstOutputMs` over latency_ms still counts as a failure. */
  success(firstOutputMs: number): void;
  /** The target failed (its error, a timeout, no answer). */
  failure(): void;
  /** The request ended for reasons of its own: nothing is learnt about the target. */
  release(): void;
}

/**
 * One request's permit shared by its runs (the prompts of a /v1/completions list, one run each): the first failure
 * is the request's failure; otherwise, once every run has ended, a success at the slowest run's first output, unless
 * one of them ended for reasons of its own (nothing learnt then).
 */
export function sharePermit(permit: Permit, runs: number): Permit[] {
  let left = runs;
  let released = false;
  let slowestMs = 0;
  const ended = () => {
    left -= 1;
    if (left === 0) (released ? permit.release() : permit.success(slowestMs));
  };
  return Array.from({ length: runs }, (): Permit => {
    let done = false;
    const once = (f: () => void) => () => {
      if (done) return;
      done = true;
      f();
      ended();
    };
    return {
      success: (ms: number) => once(() => (slowestMs = Math.max(slowestMs, ms)))(),
      failure: once(() => permit.failure()),
      release: once(() => (released = true)),
    };
  });
}

export class CircuitBreaker {
  private state: BreakerState = 'closed';
  private failures = 0;
  private openedAtMs = 0;
  private probing = false;

  constructor(
    readonly name: string,
    private readonly settings: BreakerSettings,
    private readonly now: () => number = Date.now,
  ) {
    breakerState.set({ breaker: name }, 0);
  }

  get current(): BreakerState {
    if (this.state === 'open' && this.now() - this.openedAtMs >= this.settings.open_ms) this.set('half_open');
    return this.state;
  }

  /** Milliseconds until an open breaker lets a probe through (0 when it would now). */
  get retryInMs(): number {
    return this.state === 'open' ? Math.max(0, this.settings.open_ms - (this.now() - this.openedAtMs)) : 0;
  }

  /** A permit to send one request, or null: open, or half-open with its probe already out. */
  permit(): Permit | null {
    const state = this.current;
    if (state === 'open') return null;
    const probe = state === 'half_open';
    if (probe) {
      if (this.probing) return null;
      this.probing = true;
    }
    let done = false;
    const once = (f: () => void) => () => {
      if (done) return;
      done = true;
      if (probe) this.probing = false;
      f();
    };
    return {
      success: (ms: number) => once(() => (this.settings.latency_ms > 0 && ms > this.settings.latency_ms ? this.failed() : this.succeeded()))(),
      failure: once(() => this.failed()),
      release: once(() => undefined),
    };
  }

  private succeeded(): void {
    this.failures = 0;
    if (this.state !== 'closed') this.set('closed');
  }

  private failed(): void {
    this.failures += 1;
    if (this.state === 'half_open' || this.failures >= this.settings.failure_threshold) {
      this.openedAtMs = this.now();
      this.set('open');
    }
  }

  private set(state: BreakerState): void {
    this.state = state;
    breakerState.set({ breaker: this.name }, STATE_VALUE[state]);
  }
}

/** The breakers of one gateway, made on first use per name. */
export class Breakers {
  private readonly byName = new Map<string, CircuitBreaker>();

  constructor(private readonly settings: BreakerSettings) {}

  get(name: string): CircuitBreaker {
    let b = this.byName.get(name);
    if (!b) {
      b = new CircuitBreaker(name, this.settings);
      this.byName.set(name, b);
    }
    return b;
  }
}

/**
 * Whether a failure was the serving target's (an upstream or a worker pool): what a circuit breaker counts and a
 * fallback chain moves on for. The caller's own limits, its bad request, its leaving and our shutdown are not.
 */
export function isTargetFailure(err: unknown): boolean {
  const e = toApiError(err);
  if (e.code === 'upstream_rate_limited') return true;
  return e.status >= 500 && e.code !== 'shutting_down' && e.code !== 'stream_buffer_full' && e.code !== 'cancelled';
}
