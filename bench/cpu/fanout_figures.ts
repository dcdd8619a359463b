// Figures for bench/cpu/fanout.ts: the stack overhead
// as bench/loadgen.py defines it (so that the figures compare with run_all.py's "standin" rows), and CPU per process.
import { readFileSync } from 'node:fs';
import type Redis from 'ioredis';
import { cpuSeconds, percentile, processGroupPids, type StreamResult } from '../../tests/reliability/support/load';

/** The worker's timestamps of one job (BullMQ job hash: data.enqueued_at_ms, returnvalue.timing; docs/PROTOCOL.md). */
export interface WorkerTiming {
  enqueued_at_ms?: number;
  picked_up_ms: number;
  first_token_ms: number;
  finished_ms: number;
}

export async function workerTimings(redis: Redis, queue: string, jobIds: string[]): Promise<Map<string, WorkerTiming>> {
  const out = new Map<string, WorkerTiming>();
  for (let i = 0; i < jobIds.length; i += 500) {
    const ids = jobIds.slice(i, i + 500);
    const pipe = redis.pipeline();
    for (const id of ids) pipe.hmget(`bull:${queue}:${id}`, 'data', 'returnvalue');
    const replies = (await pipe.exec()) ?? [];
    replies.forEach(([err, v], k) => {
      const [data, ret] = (v ?? []) as Array<string | null>;
      if (err || !data || !ret) return;
      const timing = JSON.parse(ret).timing;
      if (timing?.picked_up_ms && timing.first_token_ms) out.set(ids[k], { enqueued_at_ms: JSON.parse(data).enqueued_at_ms, ...timing });
    });
  }
  return out;
}

/** Σ max_batch of the live workers of `queue` (llm:worker:*): the slots a job can wait for. */
export async function queueSlots(redis: Redis, queue: string): Promise<number> {
  const ids = await redis.zrangebyscore('llm:workers', Date.now(), '+inf');
  const infos = ids.length ? await redis.mget(ids.map((w) => `llm:worker:${w}`)) : [];
  return infos.reduce((n, raw) => {
    const info = raw ? JSON.parse(raw) : {};
    return n + (info.queue === queue ? Number(info.max_batch ?? 0) : 0);
  }, 0);
}

/**
 * For each job [enqueued, picked_up, finished] (ms): the part of enqueued → picked up during which every slot was taken
 * (bench/loadgen.py queue_waits, same rule: that wait is the queue's, not the stack's overhead).
 */
export function queueWaits(jobs: Array<[number, number, number]>, slots: number): number[] {
  const edges = [...jobs.map(([, p]) => [p, 1]), ...jobs.map(([, , f]) => [f, -1])].sort((a, b) => a[0] - b[0] || a[1] - b[1]);
  const full: Array<[number, number]> = [];
  let occupied = 0;
  let since: number | null = null;
  for (const [t, d] of edges) {
    occupied += d;
    if (occupied >= slots && since === null) since = t;
    else if (occupied < slots && since !== null) {
      if (t > since) full.push([since, t]);
      since = null;
    }
  }
  return jobs.map(([e, p]) => full.reduce((w, [a, b]) => (a < p && b > e ? w + Math.max(0, Math.min(p, b) - Math.max(e, a)) : w), 0));
}

export interface Overhead {
  n: number;
  p50: number;
  p99: number;
  max: number;
  /** sent → picked up by a worker (less queue wait), and the worker's first token → the client has it. */
  inP50: number;
  inP99: number;
  outP50: number;
  outP99: number;
  /** Of "in": sent → the gateway enqueued it (data.enqueued_at_ms), and enqueued → picked up (less queue wait). */
  toEnqueuedP50: number;
  toEnqueuedP99: number;
  toPickupP50: number;
  toPickupP99: number;
  workerTtftP99: number;
  queueWaitedN: number;
}

/**
 * Stack overhead per response = client TTFT − worker TTFT (first_token_ms − picked_up_ms) − queue wait, as
 * bench/loadgen.py summarize(): what the gateway, Redis, BullMQ and the transport add before the first token.
 */
export function overhead(rs: StreamResult[], timings: Map<string, WorkerTiming>, slots: number): Overhead | null {
  const joined = rs.filter((r) => r.completionId && r.deltaTimes.length && timings.has(r.completionId));
  if (!joined.length) return null;
  const all = [...timings.values()];
  const waits = new Map(queueWaits(all.map((t) => [t.enqueued_at_ms ?? t.picked_up_ms, t.picked_up_ms, t.finished_ms]), slots).map((w, i) => [all[i], w]));
  const over: number[] = [];
  const inn: number[] = [];
  const out: number[] = [];
  const wt: number[] = [];
  const enq: number[] = [];
  const pick: number[] = [];
  let waited = 0;
  for (const r of joined) {
    const t = timings.get(r.completionId!)!;
    const q = waits.get(t) ?? 0;
    if (q > 0) waited += 1;
    wt.push(t.first_token_ms - t.picked_up_ms);
    over.push(r.deltaTimes[0] - r.startedAt - wt.at(-1)! - q);
    inn.push(t.picked_up_ms - r.startedAt - q);
    out.push(r.deltaTimes[0] - t.first_token_ms);
    if (t.enqueued_at_ms) {
      enq.push(t.enqueued_at_ms - r.startedAt);
      pick.push(t.picked_up_ms - t.enqueued_at_ms - q);
    }
  }
  return {
    n: joined.length, p50: percentile(over, 50), p99: percentile(over, 99), max: Math.max(...over), inP50: percentile(inn, 50),
    inP99: percentile(inn, 99), outP50: percentile(out, 50), outP99: percentile(out, 99),
    toEnqueuedP50: percentile(enq, 50), toEnqueuedP99: percentile(enq, 99), toPickupP50: percentile(pick, 50),
    toPickupP99: percentile(pick, 99), workerTtftP99: percentile(wt, 99),
    queueWaitedN: waited,
  };
}

/** CPU seconds of a process group (a gateway through tsx is its launcher and the gateway; a worker, its process). */
export function groupCpuSeconds(pgid: number): number {
  return processGroupPids(pgid).reduce((s, pid) => {
    try {
      return s + cpuSeconds(pid);
    } catch {
      return s; // ended between the listing and the read
    }
  }, 0);
}

/** Busy CPU seconds of the whole machine (/proc/stat: all but idle and iowait), to tell our processes from others'. */
export function machineBusySeconds(): number {
  const f = readFileSync('/proc/stat', 'utf8').split('\n')[0].trim().split(/\s+/).slice(1, 9).map(Number); // user … steal (guest is inside user)
  return (f.reduce((a, b) => a + b, 0) - f[3] - f[4]) / 100;
}
