// A private stack for the fault tests (tests/e2e/faults.test.ts): its own redis-server, gateways and worker processes
// on free ports, so that killing a worker or Redis never disturbs the stack the other suites share. Everything is real:
// redis-server from PATH, `python -m llm_worker` on the bundled model, the gateway's own entry point (main.ts).
import { type ChildProcess, spawn } from 'node:child_process';
import { createWriteStream, existsSync, mkdirSync } from 'node:fs';
import path from 'node:path';
import Redis from 'ioredis';
import { freePort, pingOnce } from '../../gateway/test/helpers/redis-server';
import { sleep, waitFor } from './helpers';

export const ROOT = path.resolve(__dirname, '../..');
const LOG_DIR = path.join(ROOT, '.run/faults');
const MODEL = 'smollm2-135m-instruct';
export const QUEUE = `gen.${MODEL}`;

export { sleep, waitFor };

function python(): string {
  const p = process.env.STACK_PYTHON ?? path.join(ROOT, 'worker-py/.venv/bin/python');
  if (!existsSync(p)) throw new Error(`no Python for the worker at ${p}: run \`npm test\` once (it builds worker-py/.venv)`);
  return p;
}

interface Proc {
  name: string;
  child: ChildProcess;
  exited: Promise<void>;
  logFile: string;
}

/** Spawns a child in its own process group (so that stop() ends what it started too), output to .run/faults/<name>.log. */
function launch(name: string, cmd: string, args: string[], env: Record<string, string>): Proc {
  mkdirSync(LOG_DIR, { recursive: true });
  const logFile = path.join(LOG_DIR, `${name}.log`);
  const out = createWriteStream(logFile);
  const child = spawn(cmd, args, { cwd: ROOT, env: { ...process.env, ...env }, detached: true, stdio: ['ignore', 'pipe', 'pipe'] });
  child.stdout!.pipe(out);
  child.stderr!.pipe(out);
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  return { name, child, exited, logFile };
}

function alive(p: Proc): boolean {
  return p.child.exitCode === null && p.child.signalCode === null;
}

async function terminate(p: Proc, graceMs = 5000): Promise<void> {
  if (!alive(p)) return;
  try {
    process.kill(-p.child.pid!, 'SIGTERM');
  } catch {}
  if (await Promise.race([p.exited.then(() => true), sleep(graceMs).then(() => false)])) return;
  try {
    process.kill(-p.child.pid!, 'SIGKILL');
  } catch {}
  await p.exited;
}

export interface FaultWorker {
  id: string;
  metricsUrl: string;
  proc: Proc;
}

export interface FaultGateway {
  url: string;
  proc: Proc;
}

/** A gateway process (its own entry point, main.ts) on `redisUrl`, on a free port; `env` adds to or overrides the defaults. */
export async function spawnGateway(name: string, redisUrl: string, env: Record<string, string>): Promise<FaultGateway> {
  const port = await freePort();
  const proc = launch(`gateway-${name}`, process.execPath, [path.join(ROOT, 'node_modules/tsx/dist/cli.mjs'), 'gateway/src/main.ts'], {
    REDIS_URL: redisUrl, PORT: String(port), LOG_LEVEL: 'info', AUTH_FAILURE_LIMIT: '100000', ...env,
  });
  return { url: `http://127.0.0.1:${port}`, proc };
}

export async function waitGatewayUp(gw: FaultGateway, timeoutMs: number): Promise<number> {
  return waitFor(async () => {
    if (!alive(gw.proc)) throw new Error(`gateway exited; see ${gw.proc.logFile}`);
    return (await fetch(`${gw.url}/health`).catch(() => null))?.status === 200;
  }, timeoutMs, `gateway ${gw.url}`);
}

/** SIGTERM (then SIGKILL after a grace) to a gateway started with spawnGateway, and what it started. */
export async function stopGateway(gw: FaultGateway): Promise<void> {
  await terminate(gw.proc);
}

/** The stack of one test file. `redis` answers test-side inspection; it reconnects by itself after a Redis restart. */
export class FaultStack {
  readonly apiKey = `sk-faults-${Math.random().toString(36).slice(2)}`;
  readonly model = MODEL;
  readonly workers = new Map<string, FaultWorker>();
  readonly gateways: FaultGateway[] = [];
  redis!: Redis;
  private redisProc: Proc | null = null;
  private redisPort = 0;

  get redisUrl(): string {
    return `redis://127.0.0.1:${this.redisPort}`;
  }

  async startRedis(): Promise<void> {
    if (!this.redisPort) this.redisPort = await freePort();
    const dir = path.join(LOG_DIR, `redis-${this.redisPort}`);
    mkdirSync(dir, { recursive: true });
    // As scripts/lib/stack.mjs: no persistence, so a restart is a Redis that lost every key (the harshest case).
    this.redisProc = launch('redis', process.env.REDIS_SERVER ?? 'redis-server', [
      '--port', String(this.redisPort), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no',
      '--maxmemory-policy', 'noeviction', '--dir', dir,
    ], {});
    await waitFor(() => pingOnce(this.redisPort), 60_000, 'redis-server to answer PING');
    this.redis ??= new Redis(this.redisUrl, { maxRetriesPerRequest: null, retryStrategy: () => 100 });
  }

  /** SIGKILL only: Redis stays down until startRedis() (same port, empty), for an outage of a chosen length. */
  async killRedis(): Promise<void> {
    const p = this.redisProc!;
    process.kill(p.child.pid!, 'SIGKILL');
    await p.exited;
  }

  /** SIGKILL, then the same port again: every key, lock, script and subscription on the server is gone. */
  async restartRedis(): Promise<void> {
    const p = this.redisProc!;
    process.kill(p.child.pid!, 'SIGKILL');
    await p.exited;
    await this.startRedis();
  }

  /** Starts a worker (MAX_BATCH 1 unless set: one busy request fills it); resolves once it is spawned, not ready. */
  async spawnWorker(name: string, env: Record<string, string> = {}): Promise<FaultWorker> {
    const metricsPort = await freePort();
    const id = `w-faults-${name}`;
    const proc = launch(`worker-${name}`, python(), ['-m', 'llm_worker'], {
      REDIS_URL: this.redisUrl, WORKER_ID: id, MAX_BATCH: '1', METRICS_PORT: String(metricsPort), PYTHONUNBUFFERED: '1',
      ...env,
    });
    const w = { id, metricsUrl: `http://127.0.0.1:${metricsPort}`, proc };
    this.workers.set(id, w);
    return w;
  }

  /** Listed in llm:workers with a live heartbeat and ready (the gateway's own test of liveness). */
  async workerListed(id: string): Promise<boolean> {
    const [score, info] = await Promise.all([this.redis.zscore('llm:workers', id), this.redis.get(`llm:worker:${id}`)]);
    return score !== null && Number(score) > Date.now() && info !== null && JSON.parse(info).ready === true;
  }

  async waitWorkerReady(w: FaultWorker, timeoutMs: number): Promise<number> {
    return waitFor(async () => {
      if (!alive(w.proc)) throw new Error(`${w.id} exited (code ${w.proc.child.exitCode}); see ${w.proc.logFile}`);
      return this.workerListed(w.id);
    }, timeoutMs, `worker ${w.id} to register`);
  }

  /** kill -9: no shutdown handler runs, its locks and heartbeat simply stop being renewed. */
  async killWorker(id: string): Promise<void> {
    const w = this.workers.get(id);
    if (!w) throw new Error(`unknown worker ${id}`);
    process.kill(w.proc.child.pid!, 'SIGKILL');
    await w.proc.exited;
    this.workers.delete(id);
  }

  liveWorkerIds(): string[] {
    return [...this.workers.values()].filter((w) => alive(w.proc)).map((w) => w.id);
  }

  async startGateway(name: string, env: Record<string, string> = {}): Promise<FaultGateway> {
    // A short resume grace: these tests free the workers by dropping their streams, and wait for the jobs to end.
    const gw = await spawnGateway(name, this.redisUrl, { API_KEYS: this.apiKey, RESUME_GRACE_MS: '1000', ...env });
    this.gateways.push(gw);
    return gw;
  }

  async waitGatewayUp(gw: FaultGateway, timeoutMs: number): Promise<number> {
    return waitGatewayUp(gw, timeoutMs);
  }

  async stop(): Promise<void> {
    this.redis?.disconnect();
    await Promise.all([...this.gateways.map((g) => terminate(g.proc)), ...[...this.workers.values()].map((w) => terminate(w.proc))]);
    if (this.redisProc) await terminate(this.redisProc, 1000);
  }
}

export interface JobTrace {
  jobId: string;
  firstSeenMs: number;
  /** Every `started` event: a retried job has one per attempt. */
  started: Array<{ workerId: string; atMs: number }>;
  deltas: number;
  end: { type: 'done' | 'error'; atMs: number; body: Record<string, unknown> } | null;
}

/**
 * Follows every job's pub/sub channel (PSUBSCRIBE llm:job:*), as a gateway does for one: which worker started it
 * (once per attempt), how many deltas it published, and how it ended. The worker publishes these whoever listens.
 */
export class JobWatcher {
  readonly jobs = new Map<string, JobTrace>();
  private sub: Redis;

  constructor(redisUrl: string) {
    this.sub = new Redis(redisUrl, { maxRetriesPerRequest: null, retryStrategy: () => 100 });
    this.sub.on('error', () => undefined); // a Redis restart is part of the tests
    this.sub.on('pmessage', (_p, channel, raw) => this.onMessage(channel.slice('llm:job:'.length), raw));
  }

  async start(): Promise<void> {
    await this.sub.psubscribe('llm:job:*');
  }

  private onMessage(jobId: string, raw: string): void {
    const now = Date.now();
    let t = this.jobs.get(jobId);
    if (!t) {
      t = { jobId, firstSeenMs: now, started: [], deltas: 0, end: null };
      this.jobs.set(jobId, t);
    }
    const e = JSON.parse(raw) as { type: string; worker_id?: string };
    if (e.type === 'started') t.started.push({ workerId: e.worker_id!, atMs: now });
    else if (e.type === 'delta') t.deltas += 1;
    else if (e.type === 'done' || e.type === 'error') t.end = { type: e.type, atMs: now, body: e as Record<string, unknown> };
  }

  /** The first job first seen after `sinceMs` that satisfies `pred`. */
  async waitJob(sinceMs: number, pred: (t: JobTrace) => boolean, timeoutMs: number, what: string): Promise<JobTrace> {
    let found: JobTrace | undefined;
    await waitFor(() => {
      found = [...this.jobs.values()].find((t) => t.firstSeenMs >= sinceMs && pred(t));
      return found !== undefined;
    }, timeoutMs, what);
    return found!;
  }

  close(): void {
    this.sub.disconnect();
  }
}
