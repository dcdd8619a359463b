// Soak (issue 12): N concurrent streams, kept open for the whole run (each finished stream replaced at once by a new one
// with a new marker), through 2 gateway processes on the stand-in engine. Every response must end `[DONE]` with
// finish_reason `length`, its expected token count, each event id once, its own marker and no other; no 5xx; the
// gateways' RSS may grow < 10 % from warm-up to the end; Redis memory goes back to its baseline once results expire.
import { figure, pick } from './support/figures';
import { checkResponse, groupMaxRssKiB, marker, markedChat, percentile, stream, type StreamResult, type Target } from './support/load';
import { type ReliabilityStack, startLoadStack } from './support/stack';
import { sleep, waitFor } from '../e2e/fault-stack';

const PART = 'soak';
const STREAMS = pick({ short: 100, full: 500 });
const DURATION_MS = pick({ short: 30_000, full: 300_000 });
/** Clients start spread over this (a burst of hundreds at once is admission's problem, issue 17, not the soak's). */
const RAMP_MS = pick({ short: 5_000, full: 30_000 });
const MAX_TOKENS = 40;
/** Stand-in token interval: 5 tokens/s per stream, so a stream lasts ~8 s and the machine's 2 cores keep up. */
const STEP_MS = 200;
/** Result and event retention shortened for this stack, so "back to baseline" is a bounded wait (defaults: 300 s, 600 s). */
const RETENTION_S = 5;
const EVENTS_TTL_MS = 5_000;
const RUN = Math.random().toString(36).slice(2, 8);
const MARK = new RegExp(`mk${RUN}x\\d+q`, 'g');

jest.setTimeout(DURATION_MS + 300_000);

let rs: ReliabilityStack;

beforeAll(async () => {
  rs = await startLoadStack(STEP_MS, {
    DEFAULT_RPM: '0', DEFAULT_TPM: '0', DEFAULT_MAX_CONCURRENT: '0', JOB_RESULT_RETENTION_S: String(RETENTION_S),
    RESUME_EVENTS_TTL_MS: String(EVENTS_TTL_MS), RESUME_GRACE_MS: '1000',
  });
});

afterAll(async () => {
  await rs?.stack.stop();
});

async function usedMemory(): Promise<number> {
  const info = await rs.stack.redis.info('memory');
  return Number(/used_memory:(\d+)/.exec(info)![1]);
}

async function keyCount(): Promise<number> {
  return Number(await rs.stack.redis.dbsize());
}

/**
 * BullMQ's event log of the queue (a stream, XADD MAXLEN ~10000): it fills up to its cap and stays there by design, so
 * it is measured on its own and left out of the comparison with the baseline.
 */
async function eventLogBytes(): Promise<number> {
  return Number((await rs.stack.redis.call('MEMORY', 'USAGE', `bull:gen.${rs.stack.model}:events`, 'SAMPLES', '0')) ?? 0);
}

interface Checked {
  r: StreamResult;
  mark: string;
  problem: string | null;
}

/** Runs one request of every kind the soak sends, to completion: the warm-up before a baseline and the cleanup trigger. */
async function oneRound(tag: string, n: number): Promise<void> {
  const rounds = await Promise.all(
    Array.from({ length: n }, (_, i) => stream(rs.targets[i % 2], { ...markedChat(rs.stack.model, `${tag}${i}`, MAX_TOKENS), stream_options: { include_usage: true } })),
  );
  for (const r of rounds) expect(r.end).toBe('done');
}

test(`${STREAMS} concurrent streams for ${DURATION_MS / 1000} s through 2 gateways: none lost, duplicated or mixed up, no 5xx, no leak`, async () => {
  const { stack } = rs;
  await oneRound('warm', 4);
  // Baseline: the stack after its first requests, once their results and events are gone.
  await sleep(Math.max(RETENTION_S * 1000, EVENTS_TTL_MS) + 1000);
  await oneRound('base', 1);
  const baseKeys = await keyCount();
  const baseLog = await eventLogBytes();
  const baseMem = (await usedMemory()) - baseLog;

  const results: Checked[] = [];
  const statuses = new Map<number, number>();
  const completionIds = new Set<string>();
  let duplicatedIds = 0;
  let seq = 0;
  const t0 = Date.now();
  const endAt = t0 + RAMP_MS + DURATION_MS;

  const client = async (slot: number) => {
    await sleep((slot * RAMP_MS) / STREAMS);
    const target: Target = rs.targets[slot % 2];
    while (Date.now() < endAt) {
      const mark = marker(RUN, seq++);
      const r = await stream(target, { ...markedChat(stack.model, mark, MAX_TOKENS), stream_options: { include_usage: true } });
      statuses.set(r.status, (statuses.get(r.status) ?? 0) + 1);
      if (r.completionId) {
        if (completionIds.has(r.completionId)) duplicatedIds += 1;
        completionIds.add(r.completionId);
      }
      results.push({ r, mark, problem: checkResponse(r, mark, MARK, MAX_TOKENS) });
    }
  };

  // Every 2 s: each gateway's RSS and Redis memory. A gateway's RSS swings by ±10 % from one sample to the next under
  // this load (V8 grows and shrinks its heap with GC; the live JS heap stays flat: in two heap snapshots of a gateway
  // 160 s and 13,000 streams apart, no constructor's objects grew by more than 0.15 MB), so growth is judged on the median of a window right after warm-up (every client started and a
  // few stream lengths passed) against the median of the same-sized window at the end.
  const samples: Array<{ at: number; rss: number[]; mem: number }> = [];
  let sampling = true;
  const sampler = (async () => {
    while (sampling) {
      samples.push({ at: Date.now(), rss: stack.gateways.map((g) => groupMaxRssKiB(g.proc.child.pid!)), mem: await usedMemory() });
      await sleep(2000);
    }
  })();

  await Promise.all(Array.from({ length: STREAMS }, (_, i) => client(i)));
  sampling = false;
  await sampler;
  const elapsedS = (Date.now() - t0) / 1000;

  const windowMs = Math.min(60_000, DURATION_MS / 3);
  const warmAt = t0 + RAMP_MS + Math.min(30_000, DURATION_MS / 3);
  const median = (xs: number[]) => percentile(xs, 50);
  const window = (from: number, to: number) => samples.filter((s) => s.at >= from && s.at < to);
  const warm = window(warmAt, warmAt + windowMs);
  const last = window(endAt - windowMs, endAt);
  const rssWarm = stack.gateways.map((_, g) => median(warm.map((s) => s.rss[g])));
  const rssEnd = stack.gateways.map((_, g) => median(last.map((s) => s.rss[g])));
  const peakMem = Math.max(...samples.map((s) => s.mem));

  const bad = results.filter((c) => c.problem !== null);
  const fiveXX = [...statuses].filter(([s]) => s >= 500).reduce((n, [, c]) => n + c, 0);
  const tokens = results.reduce((n, c) => n + (c.r.completionTokens ?? 0), 0);
  const ttfts = results.filter((c) => c.r.deltaTimes.length > 0).map((c) => c.r.deltaTimes[0] - c.r.startedAt);
  figure(PART, 'streams completed', results.length - bad.length);
  figure(PART, 'streams failed (lost, duplicated, mixed up or wrong)', bad.length);
  figure(PART, 'completion ids seen twice', duplicatedIds);
  figure(PART, 'statuses', JSON.stringify(Object.fromEntries(statuses)));
  figure(PART, 'tokens delivered per second', Math.round(tokens / elapsedS), 'tok/s');
  figure(PART, 'TTFT p50', Math.round(percentile(ttfts, 50)), 'ms');
  figure(PART, 'TTFT p99', Math.round(percentile(ttfts, 99)), 'ms');
  stack.gateways.forEach((_, g) => {
    const range = (w: typeof samples) => `${Math.min(...w.map((s) => s.rss[g]))}–${Math.max(...w.map((s) => s.rss[g]))}`;
    figure(PART, `gateway ${g} RSS after warm-up, median of ${windowMs / 1000} s (range)`, `${rssWarm[g]} (${range(warm)})`, 'KiB');
    figure(PART, `gateway ${g} RSS at the end, median of ${windowMs / 1000} s (range)`, `${rssEnd[g]} (${range(last)})`, 'KiB');
    figure(PART, `gateway ${g} RSS growth`, ((100 * (rssEnd[g] - rssWarm[g])) / rssWarm[g]).toFixed(1), '%');
  });

  // Results and stored events expire; BullMQ removes a finished job older than its retention when the next job of the
  // queue finishes, so one more round (like the one before the baseline) triggers it.
  await sleep(Math.max(RETENTION_S * 1000, EVENTS_TTL_MS) + 1000);
  await oneRound('base', 1);
  let afterMem = 0;
  let afterKeys = 0;
  let afterLog = 0;
  await waitFor(async () => {
    [afterLog, afterKeys] = [await eventLogBytes(), await keyCount()];
    afterMem = (await usedMemory()) - afterLog;
    return afterKeys <= baseKeys && afterMem <= baseMem * 1.1;
  }, 30_000, 'Redis back to its baseline').catch(() => undefined);
  figure(PART, 'Redis used_memory baseline (less the BullMQ event log)', baseMem, 'B');
  figure(PART, 'Redis used_memory peak (2 s samples, all of it)', peakMem, 'B');
  figure(PART, 'Redis used_memory after results expired (less the BullMQ event log)', afterMem, 'B');
  figure(PART, 'BullMQ event log (capped stream) baseline / after', `${baseLog} / ${afterLog}`, 'B');
  figure(PART, 'Redis keys baseline / after', `${baseKeys} / ${afterKeys}`);

  expect(bad.slice(0, 5).map((c) => `${c.mark}: ${c.problem}`)).toEqual([]);
  expect(duplicatedIds).toBe(0);
  expect(fiveXX).toBe(0);
  expect(results.length).toBeGreaterThan(STREAMS);
  for (let g = 0; g < rssWarm.length; g++) expect(rssEnd[g]).toBeLessThan(rssWarm[g] * 1.1);
  expect(afterKeys).toBeLessThanOrEqual(baseKeys);
  expect(afterMem).toBeLessThanOrEqual(baseMem * 1.1);
});
