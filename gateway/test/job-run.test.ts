/**
 * JobRun on its own (no HTTP), against real Redis/BullMQ and the FAKE worker: the backstops that the HTTP tests cannot
 * isolate — the poll that settles a job when both its `done` message and QueueEvents are missed, and the hard stop
 * when a worker goes silent past the deadline.
 */
import { randomUUID } from 'node:crypto';
import { ApiError } from '../src/errors';
import { silentLogger } from '../src/logger';
import { cancelledKey, type JobData } from '../src/protocol/job';
import { JobEventBus } from '../src/queue/job-events';
import { JobQueues, type Settlement } from '../src/queue/job-queue';
import { JobRun, type RunTimings } from '../src/queue/job-run';
import { DEFAULT_JOB_PARAMS } from '../src/services/chat-params';
import { FakeWorker, type FakeScript } from './helpers/fake-worker';
import { waitFor } from './helpers/gateway';
import { useTestRedis } from './helpers/redis-server';

/** QueueEvents that never report anything: as if its stream read had missed the job's end. */
class DeafQueues extends JobQueues {
  override onSettled(_jobId: string, _handler: (s: Settlement) => void): () => void {
    return () => undefined;
  }
}

const redis = useTestRedis();
let bus: JobEventBus;
const closers: Array<() => Promise<void>> = [];

beforeAll(() => {
  bus = new JobEventBus(redis.connect(), silentLogger);
});
afterEach(async () => {
  for (const close of closers.splice(0)) await close();
});

// Queue and request timeouts far beyond what these tests take, even on a loaded machine: only the timer under test fires.
const timings: RunTimings = { queueTimeoutMs: 30_000, requestTimeoutMs: 60_000, pollMs: 200, heartbeatCheckMs: 100, deadlineGraceMs: 200 };

async function setup(script: FakeScript, queuesClass = JobQueues) {
  const model = `m-${randomUUID().slice(0, 8)}`;
  const worker = new FakeWorker({ redisUrl: redis.url, model, script });
  await worker.start();
  const queues = new queuesClass(redis.client, redis.url, silentLogger);
  closers.push(async () => {
    await worker.close();
    await queues.close();
  });
  return { model, worker, queues };
}

function jobData(model: string, deadlineInMs: number): JobData {
  const now = Date.now();
  return {
    v: 1,
    request_id: 'req_test',
    model,
    messages: [{ role: 'user', content: 'Hi' }],
    params: { ...DEFAULT_JOB_PARAMS, stop: [], logit_bias: {}, max_tokens: 16 },
    stream: true,
    prompt_tokens: 5,
    enqueued_at_ms: now,
    deadline_ms: now + deadlineInMs,
  };
}

const alive = { isAlive: () => true, hasLiveWorker: () => true };

it('a lost `done` with deaf QueueEvents: the poll reads the stored result, and the unsent tail is handed back', async () => {
  // "abcdefghij" in 2 deltas of 5, `done` is seq 3 and is dropped.
  const { model, queues } = await setup({ reply: () => 'abcdefghij', pieceChars: 5, dropSeqs: [3] }, DeafQueues);
  const seen: string[] = [];
  const data = jobData(model, 30_000);
  const run = new JobRun({ bus, queues, liveness: alive, logger: silentLogger, timings }, `chatcmpl-${randomUUID()}`, data, {
    onDelta: (_i, text) => seen.push(text),
  });
  await run.start(data);
  const { result, rest } = await run.outcome;
  expect(seen.join('')).toBe('abcdefghij');
  expect(rest).toEqual([{ index: 0, rest: '', restLogprobs: null }]);
  expect(result.choices[0].text).toBe('abcdefghij');
});

it('a gap plus a lost `done`: the poll hands back exactly the text not yet forwarded', async () => {
  const { model, queues } = await setup({ reply: () => 'abcdefghijklmno', pieceChars: 5, dropSeqs: [2, 4] }, DeafQueues);
  const seen: string[] = [];
  const data = jobData(model, 30_000);
  const run = new JobRun({ bus, queues, liveness: alive, logger: silentLogger, timings }, `chatcmpl-${randomUUID()}`, data, {
    onDelta: (_i, text) => seen.push(text),
  });
  await run.start(data);
  const { rest } = await run.outcome;
  expect(seen).toEqual(['abcde']); // seq 2 lost: forwarding stops for good, seq 3 is not forwarded
  expect(rest[0].rest).toBe('fghijklmno');
});

it('a worker that goes silent past the deadline: request_timeout, and the job is cancelled', async () => {
  // One delta, then silence until the job is cancelled.
  const { model, queues, worker } = await setup({ reply: () => 'abcdefghij', pieceChars: 5, holdAfterDeltas: 1 });
  const jobId = `chatcmpl-${randomUUID()}`;
  const data = jobData(model, 300);
  const run = new JobRun({ bus, queues, liveness: alive, logger: silentLogger, timings }, jobId, data);
  const t0 = Date.now();
  await run.start(data);
  const err = await run.outcome.catch((e) => e);
  expect(err).toBeInstanceOf(ApiError);
  expect(err.code).toBe('request_timeout');
  // The bound is what is tested: the hard stop comes at the job's deadline plus grace (~0.5 s), not after the request
  // timeout (60 s) or the worker's next delta (never). Loose, so that a loaded machine passes.
  expect(Date.now() - t0).toBeLessThan(10_000);
  expect(await redis.client.get(cancelledKey(jobId))).toBe('1');
  await waitFor(() => worker.cancelled.has(jobId), undefined, 'the cancel message at the worker');
});
