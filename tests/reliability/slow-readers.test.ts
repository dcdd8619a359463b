/**
 * Slow readers (issue 12): clients that read nothing for a long time must neither slow the others down nor pile their
 * output up in the gateway. Real processes (tests/reliability/support/stack.ts): redis-server, one gateway (main.ts),
 * one worker on the stand-in engine (a token per STANDIN_STEP_MS per sequence).
 *
 * 1. The case: 16 clients stream alone, then again while SLOW clients (50 at full scale) pause reading for
 *    PAUSE_MS (60 s) with generations that outlast the pause. Their inter-token latency p99 stays within 1.5× of the
 *    run without slow readers (asserted at full scale; a figure at short scale), the gateway's peak RSS within its
 *    baseline plus SLOW × the cap, and every slow reader gets its whole answer or a clean error event when it reads again.
 *    At ~11 KB/s per stream, 60 s of output fits in the kernel's socket buffers (Linux autotunes a loopback
 *    connection's send buffer up to net.ipv4.tcp_wmem's max, 4 MiB), so the gateway's own buffer is not reached here.
 * 2. The cap: a few readers whose output outruns the kernel's buffers (n = 64 choices: ~0.7 MB/s each) pass
 *    SSE_MAX_BUFFER_BYTES while paused: their jobs are cancelled then (the worker's running sequences fall to 0 while
 *    the clients are still paused) and, reading again after PAUSE_MS, each finds the `stream_buffer_full` error event
 *    and [DONE], never a silent cut.
 */
import { readFileSync } from 'node:fs';
import os from 'node:os';
import { JobWatcher, waitFor } from '../e2e/fault-stack';
import { figure, pick, scale } from './support/figures';
import { gaps, markedChat, marker, percentile, rssKiB, stream, type StreamResult, type Target } from './support/load';
import { type ReliabilityStack, startStack } from './support/stack';

const PART = 'slow-readers';
const FAST = 16;
const SLOW = pick({ short: 20, full: 50 });
const PAUSE_MS = pick({ short: 10_000, full: 60_000 });
/** This stack's SSE_MAX_BUFFER_BYTES: small, so that part 2's readers pass it soon after the kernel's buffers are full. */
const CAP = 64 * 1024;
const STEP_MS = 20;
/** Each fast client streams requests of this many tokens, one after another, for the length of a phase. */
const FAST_TOKENS = 100;
/** Part 1's slow generations: they outlast the pause (so output waits for the reader), and end soon after it. */
const SLOW_TOKENS = Math.round((1.25 * PAUSE_MS) / STEP_MS);
/** Part 2: readers whose output outruns the kernel's socket buffers (n choices per request, each a token per step). */
const CAPPED = pick({ short: 2, full: 4 });
const CAPPED_N = 64;
/** Runtime noise allowed on top of the buffers themselves (V8 heap growth, sockets, parsed events in flight). */
const RSS_MARGIN_KIB = 96 * 1024;

jest.setTimeout(pick({ short: 240_000, full: 600_000 }));

let rs: ReliabilityStack;
let target: Target;
let watcher: JobWatcher;

beforeAll(async () => {
  rs = await startStack({
    gateways: 1, workers: 1, standin: true,
    workerEnv: { STANDIN_STEP_MS: String(STEP_MS) },
    gatewayEnv: { SSE_MAX_BUFFER_BYTES: String(CAP), RESUME_EVENTS_MAX_BYTES: String(CAP / 4) },
  });
  target = rs.targets[0];
  watcher = new JobWatcher(rs.stack.redisUrl);
  await watcher.start();
});
afterAll(async () => {
  watcher?.close();
  await rs?.stack.stop();
});

/** The gateway process itself: main.ts runs in a child of its tsx launcher (the pid that FaultStack holds). */
function gatewayPid(): number {
  const launcher = rs.stack.gateways[0].proc.child.pid!;
  const children = readFileSync(`/proc/${launcher}/task/${launcher}/children`, 'utf8').trim().split(/\s+/).map(Number);
  return children.length > 0 && children[0] > 0 ? children[0] : launcher;
}

async function runningSequences(): Promise<number> {
  const [w] = rs.stack.workers.values();
  const text = await (await fetch(`${w.metricsUrl}/metrics`)).text();
  const line = text.split('\n').find((l) => l.startsWith('llm_worker_running_sequences '));
  return line ? Number(line.split(' ')[1]) : NaN;
}

/** Peak gateway RSS and worker running sequences, sampled until stopped. */
function sampler() {
  const pid = gatewayPid();
  const s = { peakRssKiB: rssKiB(pid), running: [] as Array<{ at: number; n: number }>, stop: () => undefined as void };
  const timer = setInterval(() => {
    s.peakRssKiB = Math.max(s.peakRssKiB, rssKiB(pid));
    runningSequences().then((n) => s.running.push({ at: Date.now(), n }), () => undefined);
  }, 200);
  s.stop = () => clearInterval(timer);
  return s;
}

/** FAST clients, each streaming requests one after another until `ms` have passed. */
async function fastPhase(run: string, ms: number): Promise<StreamResult[]> {
  const until = Date.now() + ms;
  const results: StreamResult[] = [];
  await Promise.all(Array.from({ length: FAST }, async (_, c) => {
    for (let i = 0; Date.now() < until; i += 1) {
      results.push(await stream(target, markedChat(rs.stack.model, marker(run, c * 1000 + i), FAST_TOKENS)));
    }
  }));
  return results;
}

function itl(results: StreamResult[]) {
  const all = results.flatMap(gaps);
  return { p50: percentile(all, 50), p99: percentile(all, 99), n: all.length };
}

function expectAllDone(results: StreamResult[]): void {
  const bad = results.filter((r) => r.end !== 'done' || r.finishReason !== 'length');
  expect(bad.map((r) => ({ end: r.end, status: r.status, error: r.error }))).toEqual([]);
}

let baselineRssKiB = 0;

test(`${SLOW} readers paused ${PAUSE_MS / 1000} s beside ${FAST} streams: the others' ITL kept, gateway memory flat`, async () => {
  // Warm-up: the first streams pay for the tokenizer, JIT and connections; not part of either run.
  await fastPhase('warm', 3000);

  const base = sampler();
  const baseline = await fastPhase('base', PAUSE_MS);
  base.stop();
  baselineRssKiB = base.peakRssKiB;
  expectAllDone(baseline);
  const b = itl(baseline);
  figure(PART, `baseline: ${FAST} streams ITL p50/p99`, `${b.p50}/${b.p99}`, `ms (${b.n} gaps, a token per ${STEP_MS} ms; load ${os.loadavg()[0].toFixed(2)})`);

  const withSlow = sampler();
  const slow = Promise.all(Array.from({ length: SLOW }, (_, i) =>
    stream(target, markedChat(rs.stack.model, marker('slow', i), SLOW_TOKENS), { pauseMs: PAUSE_MS })));
  const fast = await fastPhase('fast', PAUSE_MS);
  const slowResults = await slow;
  withSlow.stop();
  expectAllDone(fast);
  const f = itl(fast);
  const ratio = f.p99 / b.p99;
  figure(PART, `with ${SLOW} slow readers: ${FAST} streams ITL p50/p99`, `${f.p50}/${f.p99}`, `ms (${f.n} gaps; load ${os.loadavg()[0].toFixed(2)})`);
  figure(PART, 'ITL p99 with / without slow readers (target ≤ 1.5)', Number(ratio.toFixed(2)), '×');
  figure(PART, 'gateway peak RSS without / with slow readers', `${Math.round(base.peakRssKiB / 1024)}/${Math.round(withSlow.peakRssKiB / 1024)}`,
    `MiB (bound: + ${SLOW} × ${CAP / 1024} KiB + ${RSS_MARGIN_KIB / 1024} MiB)`);
  figure(PART, 'worker running sequences peak', Math.max(...withSlow.running.map((r) => r.n)), '');

  // Each slow reader got its whole answer (it waited in the socket buffers) or, had it passed the cap, the error event.
  const bad = slowResults.filter((r) => !(r.end === 'done' || (r.end === 'error-event' && r.error?.code === 'stream_buffer_full')));
  expect(bad.map((r) => ({ end: r.end, status: r.status, error: r.error }))).toEqual([]);
  expect(withSlow.peakRssKiB).toBeLessThanOrEqual(base.peakRssKiB + (SLOW * CAP) / 1024 + RSS_MARGIN_KIB);
  // A latency bound is asserted only at the size: the short run is a few seconds on a shared machine.
  if (scale() === 'full') expect(ratio).toBeLessThanOrEqual(1.5);
});

test(`${CAPPED} readers whose output outruns the socket buffers: cut at the cap with an error event, jobs cancelled`, async () => {
  const t0 = Date.now();
  const s = sampler();
  const body = (i: number) => ({ ...markedChat(rs.stack.model, marker('cap', i), 8000), n: CAPPED_N });
  const capped = Promise.all(Array.from({ length: CAPPED }, (_, i) => stream(target, body(i), { pauseMs: PAUSE_MS })));
  // Their jobs ran and were stopped while their clients were still paused: the cap cancelled them, not the reading.
  const jobs = () => [...watcher.jobs.values()].filter((j) => j.firstSeenMs >= t0);
  await waitFor(() => jobs().filter((j) => j.end !== null).length >= CAPPED, PAUSE_MS + 30_000, 'the capped readers\' jobs to end');
  const cancelledAfterMs = Math.max(...jobs().map((j) => j.end?.atMs ?? Infinity)) - t0;
  const results = await capped;
  s.stop();
  figure(PART, `${CAPPED} readers × n=${CAPPED_N}: every job cancelled at the cap after`, Number((cancelledAfterMs / 1000).toFixed(1)), `s (they paused ${PAUSE_MS / 1000} s)`);
  figure(PART, 'capped readers: worker running sequences peak / gateway peak RSS', `${Math.max(...s.running.map((r) => r.n))} / ${Math.round(s.peakRssKiB / 1024)}`, 'MiB');
  expect(jobs().map((j) => ({ started: j.started.length > 0, end: j.end?.type, code: (j.end?.body.error as { code?: string })?.code })))
    .toEqual(Array(CAPPED).fill({ started: true, end: 'error', code: 'cancelled' }));
  expect(cancelledAfterMs).toBeLessThan(PAUSE_MS);
  expect(Date.now() - t0).toBeLessThan(PAUSE_MS + 60_000); // once reading again, each ends at once

  expect(results.map((r) => `${r.end}:${r.error?.code ?? ''}`)).toEqual(Array(CAPPED).fill('error-event:stream_buffer_full'));
  for (const r of results) expect(r.error).toMatchObject({ type: 'server_error', code: 'stream_buffer_full', message: expect.any(String) });
  if (baselineRssKiB > 0) expect(s.peakRssKiB).toBeLessThanOrEqual(baselineRssKiB + (CAPPED * CAP) / 1024 + RSS_MARGIN_KIB);
});
