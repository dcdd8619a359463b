// Issue 14 target 4, the relay figure: how many tokens one gateway process relays to many concurrent streams, and how
// much CPU it spends on it (tokens per gateway CPU-second), with a CPU profile of the gateway that says where that CPU
// goes. A private stack on free ports: redis-server, --workers workers on the stand-in engine (ENGINE=standin: no model,
// fixed-rate tokens, engine/standin.py) and one gateway process started as `node --import tsx` directly (no tsx
// launcher in between, so /proc/<pid> is the gateway itself, and --cpu-prof can be given; Node refuses it in
// NODE_OPTIONS). The load generator is this process: raw SSE clients (tests/reliability/support/load.ts), closed loop
// (each finished stream is replaced at once), ramped in over --ramp-s.
//
//   node node_modules/tsx/dist/cli.mjs bench/cpu/gateway_relay.ts [--streams 1000] [--tokens 100] [--step-ms 50]
//       [--window-s 60] [--ramp-s 10] [--workers 1] [--profile] [--json out.json]
//
// --workers 2 or 3: one stand-in worker's transport tops out near 7,000 tokens/s (0.75 core), below the 20,000 asked
// for; several share the streams so that the gateway, not the feed, is what is measured.
//
// Figures: tokens/s relayed in the window (the gateway's llm_gateway_completion_tokens_total, sampled at the window's
// ends: counted when a stream finishes, so --window-s should be many stream lengths), the CPU (cores) of the gateway,
// worker, Redis and this load generator over the window, tokens per gateway CPU-second, stream errors, and with
// --profile the gateway's self time by function and by module (from the .cpuprofile written when it exits).
import { type ChildProcess, spawn } from 'node:child_process';
import { createWriteStream, mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { FaultStack, waitFor } from '../../tests/e2e/fault-stack';
import { freePort } from '../../gateway/test/helpers/redis-server';
import { cpuSeconds, markedChat, marker, type StreamResult, stream, type Target } from '../../tests/reliability/support/load';

const ROOT = path.resolve(__dirname, '../..');
const arg = (name: string, dflt: number): number => {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? Number(process.argv[i + 1]) : dflt;
};
const flag = (name: string) => process.argv.includes(`--${name}`);
const STREAMS = arg('streams', 1000);
const TOKENS = arg('tokens', 100);
const STEP_MS = arg('step-ms', 50);
const WINDOW_S = arg('window-s', 60);
const RAMP_S = arg('ramp-s', 10);
const WORKERS = arg('workers', 1);
const PROFILE = flag('profile');
const jsonOut = process.argv.includes('--json') ? process.argv[process.argv.indexOf('--json') + 1] : null;
const PROF_DIR = path.join(ROOT, '.run/relay-prof');

function spawnGatewayDirect(redisUrl: string, port: number, apiKey: string): ChildProcess {
  mkdirSync(path.join(ROOT, '.run'), { recursive: true });
  const out = createWriteStream(path.join(ROOT, '.run/relay-gateway.log'));
  const args = [...(PROFILE ? ['--cpu-prof', `--cpu-prof-dir=${PROF_DIR}`] : []), '--import', 'tsx', 'gateway/src/main.ts'];
  const child = spawn(process.execPath, args, {
    cwd: ROOT,
    env: {
      ...process.env, REDIS_URL: redisUrl, PORT: String(port), API_KEYS: apiKey, LOG_LEVEL: 'warn',
      // Out of the load's way: the limits and the response cache are not what this measures.
      DEFAULT_RPM: '10000000', DEFAULT_TPM: '10000000000', DEFAULT_MAX_CONCURRENT: '100000', CACHE_ENABLED: 'false',
      AUTH_FAILURE_LIMIT: '100000', RESUME_GRACE_MS: '0',
    },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  child.stdout!.pipe(out);
  child.stderr!.pipe(out);
  return child;
}

async function completionTokens(url: string): Promise<number> {
  const text = await (await fetch(`${url}/metrics`)).text();
  return text
    .split('\n')
    .filter((l) => l.startsWith('llm_gateway_completion_tokens_total'))
    .reduce((n, l) => n + Number(l.split(' ').at(-1)), 0);
}

/**
 * Self time by function and by module of a V8 .cpuprofile, in % of the busy (not idle) time of the window: the samples
 * from `fromEndUs` to `toEndUs` before the profile's end (its clock is not the wall clock, so the window is placed by
 * how long before the process exited it began and ended).
 */
function summarise(file: string, fromEndUs: number, toEndUs: number): { busyPct: number; functions: Array<[string, number]>; modules: Array<[string, number]> } {
  const prof = JSON.parse(readFileSync(file, 'utf8')) as {
    nodes: Array<{ id: number; callFrame: { functionName: string; url: string; lineNumber: number } }>;
    samples: number[];
    timeDeltas: number[];
    startTime: number;
    endTime: number;
  };
  const byId = new Map(prof.nodes.map((n) => [n.id, n.callFrame]));
  const fn = new Map<string, number>();
  const mod = new Map<string, number>();
  let total = 0;
  let idle = 0;
  let at = prof.startTime;
  prof.samples.forEach((id, i) => {
    const f = byId.get(id)!;
    const dt = prof.timeDeltas[i] ?? 0;
    at += dt;
    if (at < prof.endTime - fromEndUs || at > prof.endTime - toEndUs) return;
    if (f.functionName === '(idle)') {
      idle += dt;
      return;
    }
    total += dt;
    const url = f.url.replace(`file://${ROOT}/`, '');
    const where = url === '' ? '(native)' : url.startsWith('node:') ? url : url.includes('node_modules/') ? `node_modules/${url.split('node_modules/').at(-1)!.split('/').slice(0, url.includes('/@') ? 2 : 1).join('/')}` : url;
    const name = `${f.functionName || '(anonymous)'} ${url === '' ? '' : `${path.basename(url)}:${f.lineNumber + 1}`}`.trim();
    fn.set(name, (fn.get(name) ?? 0) + dt);
    const m = f.functionName === '(garbage collector)' ? '(gc)' : where;
    mod.set(m, (mod.get(m) ?? 0) + dt);
  });
  const pct = (m: Map<string, number>) => [...m].map(([k, v]) => [k, Math.round((1000 * v) / total) / 10] as [string, number]).sort((a, b) => b[1] - a[1]);
  return { busyPct: Math.round((1000 * total) / (total + idle)) / 10, functions: pct(fn).slice(0, 25), modules: pct(mod).slice(0, 15) };
}

async function main(): Promise<void> {
  rmSync(PROF_DIR, { recursive: true, force: true });
  const stack = new FaultStack();
  await stack.startRedis();
  const workerEnv = { ENGINE: 'standin', MAX_BATCH: String(Math.max(1024, STREAMS)), STANDIN_STEP_MS: String(STEP_MS) };
  const workers = [];
  for (let i = 0; i < WORKERS; i++) workers.push(await stack.spawnWorker(`relay${i}`, workerEnv));
  const port = await freePort();
  const gateway = spawnGatewayDirect(stack.redisUrl, port, stack.apiKey);
  const target: Target = { url: `http://127.0.0.1:${port}`, apiKey: stack.apiKey };
  let stopping = false;
  const results: StreamResult[] = [];
  try {
    for (const w of workers) await stack.waitWorkerReady(w, 180_000);
    await waitFor(async () => (await fetch(`${target.url}/ready`).catch(() => null))?.status === 200, 180_000, 'the gateway to be ready');
    const redisPid = Number((await stack.redis.info('server')).match(/process_id:(\d+)/)![1]);
    let n = 0;
    const client = async (): Promise<void> => {
      while (!stopping) {
        const r = await stream(target, markedChat(stack.model, marker('relay', n), TOKENS), {});
        n += 1;
        results.push(r);
      }
    };
    const clients: Array<Promise<void>> = [];
    for (let i = 0; i < STREAMS; i++) {
      clients.push(client());
      if (RAMP_S > 0) await new Promise((r) => setTimeout(r, (RAMP_S * 1000) / STREAMS));
    }
    // One more stream length for the loop to settle, then the window.
    await new Promise((r) => setTimeout(r, TOKENS * STEP_MS + 2000));
    const pids: Record<string, number> = { gateway: gateway.pid!, redis: redisPid };
    workers.forEach((w, i) => (pids[`worker${i}`] = w.proc.child.pid!));
    const cpu0 = Object.fromEntries(Object.entries(pids).map(([k, p]) => [k, cpuSeconds(p)]));
    const self0 = process.cpuUsage();
    const tok0 = await completionTokens(target.url);
    const t0 = Date.now();
    const done0 = results.length;
    await new Promise((r) => setTimeout(r, WINDOW_S * 1000));
    const t1 = Date.now();
    const secs = (t1 - t0) / 1000;
    const tokens = (await completionTokens(target.url)) - tok0;
    const cores = Object.fromEntries(Object.entries(pids).map(([k, p]) => [k, (cpuSeconds(p) - cpu0[k]) / secs]));
    const self = process.cpuUsage(self0);
    cores.loadgen = (self.user + self.system) / 1e6 / secs;
    const inWindow = results.slice(done0);
    const bad = inWindow.filter((r) => r.end !== 'done');
    stopping = true;
    const summary = {
      machine: `${os.cpus()[0].model}, ${os.cpus().length} CPUs`, load1: os.loadavg()[0], streams: STREAMS, tokensPerStream: TOKENS,
      stepMs: STEP_MS, workers: WORKERS, windowS: Math.round(secs), tokensPerS: Math.round(tokens / secs), streamsFinished: inWindow.length,
      streamErrors: bad.length, cores: Object.fromEntries(Object.entries(cores).map(([k, v]) => [k, Math.round(v * 100) / 100])),
      tokensPerGatewayCpuS: Math.round(tokens / (cores.gateway * secs)),
    };
    console.log(JSON.stringify(summary, null, 1));
    await Promise.race([Promise.all(clients), new Promise((r) => setTimeout(r, TOKENS * STEP_MS * 3 + 10_000))]);
    gateway.kill('SIGTERM');
    await new Promise((r) => gateway.once('exit', r));
    const exitedAt = Date.now();
    let profile = null;
    if (PROFILE) {
      const file = readdirSync(PROF_DIR).find((f) => f.endsWith('.cpuprofile'));
      if (file) {
        profile = summarise(path.join(PROF_DIR, file), (exitedAt - t0) * 1000, (exitedAt - t1) * 1000);
        console.log(`gateway busy ${profile.busyPct}% of the window; its busy time by module (%):`);
        for (const [m, p] of profile.modules) console.log(`  ${p.toFixed(1).padStart(5)}  ${m}`);
        console.log('by function:');
        for (const [f, p] of profile.functions) console.log(`  ${p.toFixed(1).padStart(5)}  ${f}`);
        console.log(`profile: ${path.join(PROF_DIR, file)} (open in Chrome DevTools or speedscope for the flame graph)`);
      }
    }
    if (jsonOut) writeFileSync(jsonOut, JSON.stringify({ ...summary, profile }, null, 1));
  } finally {
    stopping = true;
    if (gateway.exitCode === null) gateway.kill('SIGKILL');
    await stack.stop();
  }
}

main().then(
  () => process.exit(0),
  (err) => {
    console.error(err);
    process.exit(1);
  },
);
