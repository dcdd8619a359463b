/**
 * Redis restart under load (issue 12): LOAD streams run through two gateways (stand-in engine) when Redis is killed
 * (SIGKILL) and, after OUTAGE_MS, started again on the same port, empty (no persistence: every job, lock and
 * registration is gone). Checked, against real processes (tests/reliability/support/stack.ts):
 *   - /ready turns 503 on every gateway (figure: how soon);
 *   - requests made during the outage get 503 with retry-after and an OpenAI error body, promptly (figure: the slowest
 *     answer), never a hang;
 *   - every stream that was in flight ends with [DONE] or a clean error event (OpenAI shape), none cut silently and
 *     none left hanging, and the job of every stream that ended with an error is stopped on the worker (cancelled,
 *     not run to max_tokens for nobody);
 *   - with no restart of any gateway or worker, requests succeed again (figure: seconds from Redis answering again to
 *     the first successful request), /ready is 200 again, and a new round of LOAD streams all complete with their own
 *     text.
 */
import os from 'node:os';
import { JobWatcher, sleep, waitFor } from '../e2e/fault-stack';
import { figure, pick } from './support/figures';
import { markedChat, marker, stream, type StreamResult, type Target } from './support/load';
import { type ReliabilityStack, startStack } from './support/stack';

const PART = 'redis-restart';
const LOAD = pick({ short: 20, full: 50 });
const OUTAGE_MS = pick({ short: 3000, full: 10_000 });
/** In-flight streams last far longer than the outage (a token per 20 ms): they are all cut into by it. */
const LONG_TOKENS = 1500;
/** Bounds on what must never hang (a loaded machine is slow; a hang is forever). */
const ANSWER_BOUND_MS = 15_000;
const END_BOUND_MS = 120_000;

jest.setTimeout(pick({ short: 240_000, full: 420_000 }));

let rs: ReliabilityStack;
let targets: Target[];
let watcher: JobWatcher;

beforeAll(async () => {
  rs = await startStack({ gateways: 2, workers: 1, standin: true });
  targets = rs.targets;
  // Follows every job's channel from the worker's side; it resubscribes by itself once Redis is back.
  watcher = new JobWatcher(rs.stack.redisUrl);
  await watcher.start();
});
afterAll(async () => {
  watcher?.close();
  await rs?.stack.stop();
});

async function readyStatus(t: Target): Promise<{ status: number; retryAfter: string | null }> {
  const r = await fetch(`${t.url}/ready`, { signal: AbortSignal.timeout(ANSWER_BOUND_MS) });
  await r.arrayBuffer();
  return { status: r.status, retryAfter: r.headers.get('retry-after') };
}

function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  return Promise.race([p, sleep(ms).then(() => Promise.reject(new Error(`${what}: still pending after ${ms} ms`)))]);
}

test(`Redis killed under ${LOAD} streams for ${OUTAGE_MS / 1000} s: refused fast, streams end cleanly, recovers by itself`, async () => {
  const model = rs.stack.model;
  // Warm-up (tokenizers, connections): one request per gateway.
  for (const t of targets) expect((await stream(t, markedChat(model, marker('warm', 0), 5))).end).toBe('done');

  // LOAD streams, all under way (each has its first text) before Redis goes.
  let started = 0;
  const inFlight = Array.from({ length: LOAD }, (_, i) => {
    let counted = false;
    return stream(targets[i % targets.length], markedChat(model, marker('inflight', i), LONG_TOKENS), {
      onChunk: (r) => {
        if (!counted && r.content.length > 0) started += (counted = true) ? 1 : 0;
      },
    });
  });
  await waitFor(() => started === LOAD, 60_000, `all ${LOAD} streams to have their first text`);

  const killedAt = Date.now();
  await rs.stack.killRedis();

  // /ready goes 503 on every gateway.
  const notReadyMs = await Promise.all(targets.map(async (t) => {
    await waitFor(async () => (await readyStatus(t)).status === 503, 30_000, `${t.url}/ready to answer 503`);
    return Date.now() - killedAt;
  }));
  const ready = await readyStatus(targets[0]);
  expect(Number(ready.retryAfter)).toBeGreaterThan(0);
  figure(PART, '/ready 503 on every gateway after the kill', Math.max(...notReadyMs), 'ms');

  // New requests while Redis is down: 503 + retry-after, each answered promptly.
  const refused: Array<StreamResult & { ms: number }> = [];
  const outageEnds = killedAt + OUTAGE_MS;
  await Promise.all(targets.map(async (t, g) => {
    for (let i = 0; Date.now() < outageEnds; i += 1) {
      const t0 = Date.now();
      const r = await within(stream(t, markedChat(model, marker(`outage${g}`, i), 20)), ANSWER_BOUND_MS, 'a request during the outage');
      refused.push({ ...r, ms: Date.now() - t0 });
      await sleep(20); // pacing, not synchronisation: a steady trickle of new requests, not a flood of the 2 cores
    }
  }));
  figure(PART, `requests during the outage: answered / slowest answer`, `${refused.length}/${Math.max(...refused.map((r) => r.ms))}`, 'ms');
  expect(refused.length).toBeGreaterThan(0);
  for (const r of refused) {
    expect({ end: r.end, status: r.status }).toEqual({ end: 'http-error', status: 503 });
    expect(Number(r.headers['retry-after'])).toBeGreaterThan(0);
    expect(r.error).toMatchObject({ type: 'server_error', message: expect.any(String), code: expect.any(String) });
  }

  // Redis back (same port, empty); nothing else is restarted.
  await rs.stack.startRedis();
  const backAt = Date.now();
  const firstSuccessMs = await Promise.all(targets.map(async (t, g) => {
    for (let i = 0; ; i += 1) {
      const r = await within(stream(t, markedChat(model, marker(`back${g}`, i), 5)), ANSWER_BOUND_MS, 'a request after the restart');
      if (r.end === 'done') return Date.now() - backAt;
      if (Date.now() - backAt > 60_000) throw new Error(`${t.url}: no success within 60 s of Redis returning; last: ${r.status} ${JSON.stringify(r.error)}`);
      await sleep(100);
    }
  }));
  figure(PART, 'first successful request after Redis answered again (first / every gateway)', `${(Math.min(...firstSuccessMs) / 1000).toFixed(2)}/${(Math.max(...firstSuccessMs) / 1000).toFixed(2)}`, 's');
  await Promise.all(targets.map((t) => waitFor(async () => (await readyStatus(t)).status === 200, 60_000, `${t.url}/ready to answer 200 again`)));
  figure(PART, '/ready 200 on every gateway after Redis answered again', ((Date.now() - backAt) / 1000).toFixed(2), 's');

  // Every stream that was in flight has ended, cleanly.
  const ends = await within(Promise.all(inFlight), END_BOUND_MS, 'the in-flight streams to end');
  const kinds = ends.map((r) => (r.end === 'error-event' ? `error-event:${r.error?.code}` : r.end));
  const tally = Object.entries(kinds.reduce<Record<string, number>>((a, k) => ({ ...a, [k]: (a[k] ?? 0) + 1 }), {}));
  figure(PART, `in-flight streams' ends (${LOAD})`, tally.map(([k, n]) => `${k} ${n}`).join(', '), '');
  for (const r of ends) {
    expect(['done', 'error-event']).toContain(r.end);
    if (r.end === 'error-event') expect(r.error).toMatchObject({ type: expect.any(String), message: expect.any(String), code: expect.any(String) });
  }
  // A stream that ended with an error must not leave its generation running for nobody: the worker stops each such
  // job (cancelled) well before its LONG_TOKENS would have ended it.
  const errored = ends.filter((r) => r.end === 'error-event').map((r) => r.completionId!);
  const stopped = () => errored.filter((id) => watcher.jobs.get(id)?.end?.type === 'error');
  await waitFor(() => errored.every((id) => watcher.jobs.get(id)?.end), 60_000, 'the errored streams\' jobs to end on the worker').catch(() => undefined);
  figure(PART, 'errored streams whose job the worker stopped (not run to max_tokens)', `${stopped().length}/${errored.length}`, '');
  expect(stopped()).toEqual(errored);

  // Everything serves again by itself: a new round of LOAD streams, each with its own marker.
  const after = await within(Promise.all(Array.from({ length: LOAD }, (_, i) =>
    stream(targets[i % targets.length], markedChat(model, marker('after', i), 50)))), END_BOUND_MS, 'the round after recovery');
  expect(after.map((r) => r.end)).toEqual(Array(LOAD).fill('done'));
  after.forEach((r, i) => expect(r.content).toContain(marker('after', i)));
  figure(PART, 'load average (1 min) at the end', os.loadavg()[0].toFixed(2), '');
});
