// A private stack for one reliability test file: its own redis-server, `workers` real worker processes and `gateways`
// gateway processes (their own entry point, main.ts), on free ports (tests/e2e/fault-stack.ts does the spawning and
// killing). `standin: true` runs the workers on the stand-in engine (engine/standin.py: no model, fixed-rate tokens
// echoing the prompt) so that hundreds of streams fit on a 2-core machine; otherwise the bundled model.
import { FaultStack, waitFor } from '../../e2e/fault-stack';
import type { Target } from './load';

export interface StackOptions {
  gateways: number;
  workers: number;
  standin: boolean;
  workerEnv?: Record<string, string>;
  gatewayEnv?: Record<string, string>;
  readyTimeoutMs?: number;
}

export interface ReliabilityStack {
  stack: FaultStack;
  targets: Target[];
}

export async function startStack(o: StackOptions): Promise<ReliabilityStack> {
  const stack = new FaultStack();
  const timeout = o.readyTimeoutMs ?? 180_000;
  let gateways: Awaited<ReturnType<FaultStack['startGateway']>>[];
  try {
    await stack.startRedis();
    const workerEnv = o.standin ? { ENGINE: 'standin', MAX_BATCH: '1024', ...o.workerEnv } : { MAX_BATCH: '16', ...o.workerEnv };
    const workers = await Promise.all(Array.from({ length: o.workers }, (_, i) => stack.spawnWorker(`w${i}`, workerEnv)));
    gateways = await Promise.all(Array.from({ length: o.gateways }, (_, i) => stack.startGateway(`g${i}`, { LOG_LEVEL: 'warn', ...o.gatewayEnv })));
    await Promise.all([...workers.map((w) => stack.waitWorkerReady(w, timeout)), ...gateways.map((g) => stack.waitGatewayUp(g, timeout))]);
    // Ready as a load balancer sees it (/ready: Redis, a live worker, its tokenizer built), not only listening.
    await Promise.all(gateways.map((g) => waitFor(async () => (await fetch(`${g.url}/ready`).catch(() => null))?.status === 200, timeout, `${g.url}/ready`)));
  } catch (err) {
    // A worker that refused its settings must not leave Redis and the gateways running (nobody else holds the stack).
    await stack.stop();
    throw err;
  }
  return { stack, targets: gateways.map((g) => ({ url: g.url, apiKey: stack.apiKey })) };
}

/** Gateway settings for a stack under load: no queue-depth cap, no response cache (every request is a job), and room
 * for thousands of prompt counts waiting at once. */
export const LOAD_GATEWAY_ENV = { MAX_QUEUE_DEPTH: '0', CACHE_ENABLED: 'false', TOKENIZER_MAX_PENDING: '4096' };

/** The load parts' stack: 2 gateways and 2 stand-in workers at `stepMs` a token, LOAD_GATEWAY_ENV plus `gatewayEnv`. */
export function startLoadStack(stepMs: number, gatewayEnv: Record<string, string> = {}): Promise<ReliabilityStack> {
  return startStack({
    gateways: 2,
    workers: 2,
    standin: true,
    workerEnv: { STANDIN_STEP_MS: String(stepMs) },
    gatewayEnv: { ...LOAD_GATEWAY_ENV, ...gatewayEnv },
  });
}
