// Issue 17 item 3, "many gateways, one queue": --gateways gateway processes and --workers workers on one Redis carry
// --streams concurrent slow streams (stand-in engine, --step-ms per token: 200 = 5 tok/s each), and every response is
// checked: none lost, duplicated or mixed up; the stack overhead's p99 once every stream is running; each process's CPU.
//
//   node node_modules/tsx/dist/cli.mjs bench/cpu/fanout.ts [--streams 2000] [--tokens 100] [--step-ms 200]
//       [--gateways 2] [--workers 2] [--ramp-s 30] [--window-s 60] [--max-batch N] [--json out.json]
//
// The stack is the reliability suite's (tests/reliability/support/stack.ts: real redis-server, gateways via main.ts,
// `python -m llm_worker` with ENGINE=standin, free ports). The load generator is this process: raw SSE clients, one
// socket each (tests/reliability/support/load.ts), closed loop (each finished stream replaced at once by one with a new
// marker; a refusal retried after its retry-after), client i on gateway i mod --gateways, their starts spread over
// --ramp-s (a burst is item 2's problem).
// After the ramp and one stream length, the window: CPU per process, streams open (client side) and jobs active (BullMQ)
// sampled each second, and the stack overhead of every stream started in it (fanout_figures.ts: loadgen.py's
// definition, from the worker's timestamps in Redis, read as each stream ends). Then no new streams; every stream started must end, checked as
// the soak test checks (tests/reliability/support/load.ts checkResponse), and a stream that has not ended by the drain deadline is lost.
import { spawnSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import { monitorEventLoopDelay } from 'node:perf_hooks';
import { sleep } from '../../tests/e2e/fault-stack';
import { checkResponse, gaps, marker, markedChat, percentile, stream, type StreamResult } from '../../tests/reliability/support/load';
import { LOAD_GATEWAY_ENV, startStack } from '../../tests/reliability/support/stack';
import { groupCpuSeconds, machineBusySeconds, overhead, queueSlots, workerTimings } from './fanout_figures';

const arg = (name: string, dflt: number): number => {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? Number(process.argv[i + 1]) : dflt;
};
const STREAMS = arg('streams', 2000);
const TOKENS = arg('tokens', 100);
const STEP_MS = arg('step-ms', 200);
const GATEWAYS = arg('gateways', 2);
const WORKERS = arg('workers', 2);
const RAMP_MS = arg('ramp-s', 30) * 1000;
const WINDOW_MS = arg('window-s', 60) * 1000;
/** Batch room: the worker's most (config.py: MAX_BATCH ≤ 1024), 2,048 slots for 2,000 streams on 2 workers. */
const MAX_BATCH = arg('max-batch', 1024);
const JSON_OUT = process.argv.includes('--json') ? process.argv[process.argv.indexOf('--json') + 1] : null;
const STREAM_MS = TOKENS * STEP_MS;
const RUN = Math.random().toString(36).slice(2, 8);
const MARKERS = new RegExp(`mk${RUN}x\\d+q`, 'g');

/**
 * This process holds one socket per stream and a gateway STREAMS / GATEWAYS client sockets: below the soft limit on
 * open files, re-run under a raised one (a shell's `ulimit -n`, up to the hard limit) rather than fail with EMFILE.
 */
function ensureOpenFiles(): void {
  const need = STREAMS + 1024;
  const m = /Max open files\s+(\d+|unlimited)\s+(\d+|unlimited)/.exec(readFileSync('/proc/self/limits', 'utf8'))!;
  const [soft, hard] = [m[1], m[2]].map((v) => (v === 'unlimited' ? Infinity : Number(v)));
  if (soft >= need) return;
  if (hard < need || process.env.FANOUT_ULIMIT_RAISED) throw new Error(`open files: need ${need}, hard limit ${hard}: raise it (ulimit -Hn) first`);
  console.log(`[fanout] open files soft limit ${soft} < ${need}: re-running under ulimit -n ${need}`);
  const q = (s: string) => `'${s.replace(/'/g, `'\\''`)}'`;
  const cmd = `ulimit -n ${need} && exec ${[process.execPath, ...process.execArgv, ...process.argv.slice(1)].map(q).join(' ')}`;
  const r = spawnSync('sh', ['-c', cmd], { stdio: 'inherit', env: { ...process.env, FANOUT_ULIMIT_RAISED: '1' } });
  process.exit(r.status ?? 1);
}

interface Sent {
  mark: string;
  gateway: number;
  r: StreamResult | null;
}

async function main(): Promise<void> {
  ensureOpenFiles();
  const t00 = Date.now();
  const { stack, targets } = await startStack({
    gateways: GATEWAYS, workers: WORKERS, standin: true,
    workerEnv: { STANDIN_STEP_MS: String(STEP_MS), MAX_BATCH: String(MAX_BATCH) },
    // No limits in the load's way (as the soak): rate, token and concurrency budgets off; no cache, no queue-depth cap.
    gatewayEnv: { ...LOAD_GATEWAY_ENV, DEFAULT_RPM: '0', DEFAULT_TPM: '0', DEFAULT_MAX_CONCURRENT: '0' },
  });
  try {
    console.log(`[fanout] stack up in ${((Date.now() - t00) / 1000).toFixed(1)} s: ${GATEWAYS} gateways, ${WORKERS} workers (MAX_BATCH ${MAX_BATCH}), one Redis`);
    const queue = `gen.${stack.model}`;
    const redisPid = Number(/process_id:(\d+)/.exec(await stack.redis.info('server'))![1]);
    const sent: Sent[] = [];
    const completionIds = new Map<string, number>();
    let open = 0;
    const t0 = Date.now();
    const w0 = t0 + RAMP_MS + STREAM_MS;
    const w1 = w0 + WINDOW_MS;
    const client = async (slot: number) => {
      await sleep((slot * RAMP_MS) / STREAMS);
      const gateway = slot % GATEWAYS;
      while (Date.now() < w1) {
        const s: Sent = { mark: marker(RUN, sent.length), gateway, r: null };
        sent.push(s);
        open += 1;
        s.r = await stream(targets[gateway], { ...markedChat(stack.model, s.mark, TOKENS), stream_options: { include_usage: true } });
        open -= 1;
        if (s.r.completionId) completionIds.set(s.r.completionId, (completionIds.get(s.r.completionId) ?? 0) + 1);
        if (s.r.completionId && s.r.startedAt >= w0 && s.r.startedAt < w1) toFetch.push(s.r.completionId);
        // A refusal (503 queue_full, 429) is retried after its retry-after, as the openai SDKs do: retried at once, a
        // closed loop of 2,000 clients turns a moment of backlog into a storm of requests that is all the load.
        if (s.r.status === 503 || s.r.status === 429) await sleep(Math.min(60_000, Math.max(1000, Number(s.r.headers['retry-after-ms'] ?? 1000))));
      }
    };
    // The worker's timestamps of each stream started in the window, read within a second of its end: BullMQ keeps only
    // the last 1,000 finished jobs (removeOnComplete), a few seconds' worth at this rate.
    const toFetch: string[] = [];
    const timings: Awaited<ReturnType<typeof workerTimings>> = new Map();
    let fetching = true;
    const fetcher = (async () => {
      while (fetching || toFetch.length) {
        for (const [k, v] of await workerTimings(stack.redis, queue, toFetch.splice(0))) timings.set(k, v);
        await sleep(1000);
      }
    })();
    const clients = Promise.all(Array.from({ length: STREAMS }, (_, i) => client(i)));

    await sleep(w0 - Date.now());
    const pgids: Record<string, number> = { redis: redisPid };
    stack.gateways.forEach((g, i) => (pgids[`gateway${i}`] = g.proc.child.pid!));
    [...stack.workers.values()].forEach((w, i) => (pgids[`worker${i}`] = w.proc.child.pid!));
    const cpu0 = Object.fromEntries(Object.entries(pgids).map(([k, p]) => [k, groupCpuSeconds(p)]));
    const self0 = process.cpuUsage();
    const machine0 = machineBusySeconds();
    const load0 = os.loadavg()[0];
    const lag = monitorEventLoopDelay({ resolution: 10 });
    lag.enable();
    const samples: Array<{ open: number; active: number }> = [];
    while (Date.now() < w1 - 500) {
      samples.push({ open, active: Number(await stack.redis.llen(`bull:${queue}:active`)) });
      await sleep(1000);
    }
    await sleep(Math.max(0, w1 - Date.now()));
    const secs = (Date.now() - w0) / 1000;
    lag.disable();
    const cores = Object.fromEntries(Object.entries(pgids).map(([k, p]) => [k, (groupCpuSeconds(p) - cpu0[k]) / secs]));
    const self = process.cpuUsage(self0);
    cores.loadgen = (self.user + self.system) / 1e6 / secs;
    const machineCores = (machineBusySeconds() - machine0) / secs;
    const load1 = os.loadavg()[0];

    // Drain: no new streams after w1; each one open must end within a few stream lengths, or it is counted lost.
    const drainDeadline = Date.now() + 3 * STREAM_MS + 60_000;
    await Promise.race([clients, sleep(drainDeadline - Date.now())]);
    const finished = sent.filter((s) => s.r !== null);
    const lost = sent.length - finished.length;
    // A refusal (503/429 before any stream) is admission saying "not now", counted apart: not a lost or wrong answer.
    const refused = finished.filter((s) => s.r!.status === 503 || s.r!.status === 429).length;
    const problems = finished
      .filter((s) => s.r!.status !== 503 && s.r!.status !== 429)
      .map((s) => ({ s, problem: checkResponse(s.r!, s.mark, MARKERS, TOKENS) }))
      .filter((p) => p.problem);
    const duplicatedIds = [...completionIds.values()].filter((n) => n > 1).length;

    const inWindow = finished.filter((s) => s.r!.startedAt >= w0 && s.r!.startedAt < w1).map((s) => s.r!);
    fetching = false;
    await fetcher;
    const slots = await queueSlots(stack.redis, queue);
    const over = overhead(inWindow, timings, slots);
    const ttft = inWindow.filter((r) => r.deltaTimes.length).map((r) => r.deltaTimes[0] - r.startedAt);
    const itl = inWindow.flatMap(gaps);
    const deltasInWindow = finished.reduce((n, s) => n + s.r!.deltaTimes.filter((t) => t >= w0 && t < w1).length, 0);
    const med = (xs: number[]) => percentile(xs, 50);
    const round = (x: number, d = 1) => Math.round(x * 10 ** d) / 10 ** d;
    const summary = {
      machine: `${os.cpus()[0].model}, ${os.cpus().length} CPUs`, date: new Date(w0).toISOString(), load1: { windowStart: round(load0, 2), windowEnd: round(load1, 2) },
      streams: STREAMS, gateways: GATEWAYS, workers: WORKERS, maxBatch: MAX_BATCH, tokensPerStream: TOKENS, stepMs: STEP_MS,
      rampS: RAMP_MS / 1000, windowS: round(secs),
      openStreams: { min: Math.min(...samples.map((x) => x.open)), median: med(samples.map((x) => x.open)) },
      activeJobs: { min: Math.min(...samples.map((x) => x.active)), median: med(samples.map((x) => x.active)) },
      contentDeltasPerS: Math.round(deltasInWindow / secs), wantTokensPerS: Math.round((STREAMS * 1000) / STEP_MS),
      requests: sent.length, refused, lost, failedChecks: problems.length, duplicatedCompletionIds: duplicatedIds,
      firstProblems: problems.slice(0, 5).map((p) => `${p.s.mark} via gateway ${p.s.gateway}: ${p.problem}`),
      statuses: finished.reduce<Record<number, number>>((m, s) => ({ ...m, [s.r!.status]: (m[s.r!.status] ?? 0) + 1 }), {}),
      startedInWindow: inWindow.length, overheadMs: over && Object.fromEntries(Object.entries(over).map(([k, v]) => [k, round(v)])),
      queueSlots: slots, ttftMs: { p50: med(ttft), p99: percentile(ttft, 99) }, itlMs: { p50: med(itl), p99: percentile(itl, 99) },
      cores: Object.fromEntries(Object.entries(cores).map(([k, v]) => [k, round(v, 2)])), machineBusyCores: round(machineCores, 2),
      otherCores: round(machineCores - Object.values(cores).reduce((a, b) => a + b, 0), 2),
      loadgenEventLoopDelayMs: { p50: round(lag.percentile(50) / 1e6), p99: round(lag.percentile(99) / 1e6), max: round(lag.max / 1e6) },
    };
    console.log(JSON.stringify(summary, null, 1));
    const ok = lost === 0 && problems.length === 0 && duplicatedIds === 0;
    console.log(`[fanout] ${STREAMS} streams via ${GATEWAYS} gateways × ${WORKERS} workers: ${sent.length} requests, ${refused} refused (503/429), ${lost} lost, ` +
      `${problems.length} wrong, ${duplicatedIds} completion ids twice → ${ok ? 'all correct' : 'NOT all correct'}; stack overhead ` +
      `p50 ${summary.overheadMs?.p50} p99 ${summary.overheadMs?.p99} ms (target p99 ≤ 50 → ${over && over.p99 <= 50 ? 'met' : 'NOT met'}); ` +
      `load ${summary.load1.windowStart}–${summary.load1.windowEnd}${Math.max(load0, load1) > 2 ? ' (noisy)' : ''}`);
    if (JSON_OUT) writeFileSync(JSON_OUT, JSON.stringify(summary, null, 1));
    process.exitCode = ok ? 0 : 2;
  } finally {
    await stack.stop();
  }
}

main().then(
  () => process.exit(process.exitCode ?? 0),
  (err) => {
    console.error(err);
    process.exit(1);
  },
);
