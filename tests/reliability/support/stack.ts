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
  await stack.startRedis();
  const workerEnv = o.standin ? { ENGINE: 'standin', MAX_BATCH: '1024', ...o.workerEnv } : { MAX_BATCH: '16', ...o.workerEnv };
  const workers = await Promise.all(Array.from({ length: o.workers }, (_, i) => stack.spawnWorker(`w${i}`, workerEnv)));
  const gateways = await Promise.all(Array.from({ length: o.gateways }, (_, i) => stack.startGateway(`g${i}`, { LOG_LEVEL: 'warn', ...o.gatewayEnv })));
  await Promise.all([...workers.map((w) => stack.waitWorkerReady(w, timeout)), ...gateways.map((g) => stack.waitGatewayUp(g, timeout))]);
  // Ready as a load balancer sees it (/ready: Redis, a live worker, its tokenizer built), not only listening.
  await Promise.all(gateways.map((g) => waitFor(async () => (await fetch(`${g.url}/ready`).catch(() => null))?.status === 200, timeout, `${g.url}/ready`)));
  return { stack, targets: gateways.map((g) => ({ url: g.url, apiKey: stack.apiKey })) };
}
