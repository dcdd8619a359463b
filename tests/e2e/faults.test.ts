// Faults end to end (issue 4), through the official openai Node SDK against a private stack (fault-stack.ts): real Redis,
// real workers on the bundled model, real gateways. A queued job past QUEUE_TIMEOUT_MS, a worker killed with SIGKILL
// mid-stream and before anything reached its client, and a Redis restart under running workers.
// The measured times are printed (docs/PROTOCOL.md, "Worker death and retries", quotes them).
import { Job, Queue } from 'bullmq';
import OpenAI from 'openai';
import { FaultStack, type FaultGateway, type FaultWorker, JobWatcher, QUEUE, waitFor } from './fault-stack';

jest.setTimeout(120_000);

const stack = new FaultStack();
let watcher: JobWatcher;
let queue: Queue;
let gateway: FaultGateway; // default configuration
let busyGateway: FaultGateway; // QUEUE_TIMEOUT_MS=1500
let workerA: FaultWorker;
let workerB: FaultWorker;
/** Started once the Redis-restart case has checked re-registration, so that two are alive again for the retry case. */
let workerC: FaultWorker | null = null;
const timings: Record<string, number> = {};

const messages: OpenAI.ChatCompletionMessageParam[] = [{ role: 'user', content: 'Tell me a long story about the sea.' }];
/** A generation that outlasts every test step unless cut: ignore_eos with a large max_tokens. */
const LONG = { max_tokens: 2000, ignore_eos: true } as Record<string, unknown>;

function sdk(gw: FaultGateway, timeout = 60_000): OpenAI {
  // maxRetries 0: a retry by the SDK would hide what the gateway answered. no-store: generation must reach a worker.
  return new OpenAI({ baseURL: `${gw.url}/v1`, apiKey: stack.apiKey, maxRetries: 0, timeout, defaultHeaders: { 'cache-control': 'no-store' } });
}

/** The job once BullMQ has stored its result: the gateway answers on the worker's `done` event, published just before. */
async function completedJob(id: string): Promise<Job & { returnvalue: { worker_id: string } }> {
  let job: Job | undefined;
  await waitFor(async () => {
    job = await Job.fromId(queue, id);
    return job?.returnvalue != null;
  }, 30_000, `the result stored on job ${id}`);
  return job as Job & { returnvalue: { worker_id: string } };
}

async function metric(url: string, name: string, labels = ''): Promise<number | null> {
  const text = await (await fetch(url)).text();
  const line = text.split('\n').find((l) => l.startsWith(labels ? `${name}{` : `${name} `) && l.includes(labels));
  return line ? Number(line.slice(line.lastIndexOf(' ') + 1)) : null;
}

/** Job ids BullMQ still holds as waiting, prioritized or active: none may be left behind by a fault. */
async function pendingJobs(): Promise<string[]> {
  const jobs = await queue.getJobs(['wait', 'prioritized', 'active', 'delayed'], 0, -1);
  return jobs.filter((j): j is Job => !!j).map((j) => j.id!);
}

beforeAll(async () => {
  await stack.startRedis();
  workerA = await stack.spawnWorker('a');
  workerB = await stack.spawnWorker('b');
  gateway = await stack.startGateway('default');
  // Without backlog admission: with both workers held by long generations it would refuse the request below at once
  // (503 queue_full, what it is for), and the case under test is the queue timer itself.
  busyGateway = await stack.startGateway('busy', { QUEUE_TIMEOUT_MS: '1500', BACKLOG_ADMISSION: 'false' });
  watcher = new JobWatcher(stack.redisUrl);
  await watcher.start();
  queue = new Queue(QUEUE, { connection: { url: stack.redisUrl, maxRetriesPerRequest: null } as never });
  queue.on('error', () => undefined); // the Redis restart case
  const t0 = Date.now();
  await Promise.all([
    stack.waitGatewayUp(gateway, 120_000),
    stack.waitGatewayUp(busyGateway, 120_000),
    stack.waitWorkerReady(workerA, 240_000),
    stack.waitWorkerReady(workerB, 240_000),
  ]);
  await waitFor(async () => (await fetch(`${gateway.url}/ready`)).status === 200, 60_000, 'the gateway to see the workers');
  timings.startMs = Date.now() - t0;
  // One request through the 1500 ms gateway first: it loads the model's tokenizer on its first request, and the
  // queue-timeout case below times the queue, not that cold start.
  await sdk(busyGateway, 120_000).chat.completions.create({ model: stack.model, messages, max_tokens: 1 });
}, 420_000);

afterAll(async () => {
  // eslint-disable-next-line no-console
  console.log(`fault timings (ms): ${JSON.stringify(timings)}`);
  watcher?.close();
  await queue?.close().catch(() => undefined);
  await stack.stop();
});

test('a job that waits past QUEUE_TIMEOUT_MS ends with 503 + retry-after and leaves the queue', async () => {
  // Fill every slot: both workers run MAX_BATCH 1 and each gets a long generation.
  const since = Date.now();
  const busy = [0, 1].map(() => {
    const ac = new AbortController();
    const done = sdk(gateway)
      .chat.completions.create({ model: stack.model, messages, stream: true, ...LONG } as OpenAI.ChatCompletionCreateParamsStreaming, { signal: ac.signal })
      .then(async (s) => {
        for await (const _ of s) if (ac.signal.aborted) break;
      })
      .catch(() => undefined);
    return { ac, done };
  });
  try {
    await waitFor(() => new Set([...watcher.jobs.values()].filter((t) => t.firstSeenMs >= since).flatMap((t) => t.started.map((s) => s.workerId))).size === 2,
      60_000, 'both workers to be busy');
    const [[lastEventId]] = (await stack.redis.xrevrange(`bull:${QUEUE}:events`, '+', '-', 'COUNT', 1)) as [string, string[]][];

    const t0 = Date.now();
    const err = await sdk(busyGateway).chat.completions.create({ model: stack.model, messages, max_tokens: 4 }).catch((e: unknown) => e);
    timings.queueTimeoutMs = Date.now() - t0;

    expect(err).toBeInstanceOf(OpenAI.APIError);
    const e = err as InstanceType<typeof OpenAI.APIError>;
    expect(e.status).toBe(503);
    expect(Number(e.headers?.get('retry-after'))).toBeGreaterThanOrEqual(1);
    expect(e.error).toEqual({ message: expect.any(String), type: 'server_error', param: null, code: 'queue_timeout' });
    expect(timings.queueTimeoutMs).toBeGreaterThanOrEqual(1500);
    // The bound under test: the answer comes from the 1500 ms timer (measured 1.6-2.4 s), not from a slot freeing up.
    // The slack above 1500 ms is the gateway's admission and its Redis round trips, which a loaded machine stretches;
    // waiting for a slot instead would mean the 2000-token generations ending (and a 200, not this 503).
    expect(timings.queueTimeoutMs).toBeLessThan(10_000);

    // BullMQ's event stream: the job was added and removed, never made active; and it is gone from Redis.
    const events = (await stack.redis.xrange(`bull:${QUEUE}:events`, `(${lastEventId}`, '+')).map(([, kv]) => {
      const o: Record<string, string> = {};
      for (let i = 0; i < kv.length; i += 2) o[kv[i]] = kv[i + 1];
      return o;
    });
    const added = events.filter((ev) => ev.event === 'added');
    expect(added).toHaveLength(1);
    const jobId = added[0].jobId;
    expect(events.filter((ev) => ev.jobId === jobId).map((ev) => ev.event)).toContain('removed');
    expect(await Job.fromId(queue, jobId)).toBeUndefined();

    // Free the workers; the removed job must not run later (it would be `active` in the event stream). Once a request
    // sent after the busy jobs ended has been served, whatever was waiting before it has had its turn.
    for (const b of busy) b.ac.abort();
    await waitFor(async () => (await pendingJobs()).length === 0, 60_000, 'the busy jobs to end');
    await sdk(gateway).chat.completions.create({ model: stack.model, messages, max_tokens: 1 });
    const later = await stack.redis.xrange(`bull:${QUEUE}:events`, `(${lastEventId}`, '+');
    expect(later.filter(([, kv]) => kv.includes(jobId) && kv.includes('active'))).toHaveLength(0);
  } finally {
    for (const b of busy) b.ac.abort();
    await Promise.all(busy.map((b) => b.done));
  }
});

test('workers that lose Redis (restart, every key gone) register again and serve without a restart', async () => {
  const workers = [workerA, workerB];
  const pids = workers.map((w) => w.proc.child.pid);
  await stack.restartRedis();
  const restartedAt = Date.now();
  // Listed again with a live heartbeat, and the tokenizer written again (no other worker is starting to write it).
  timings.reregisteredAfterRestartMs = await waitFor(async () => {
    const listed = await Promise.all(workers.map((w) => stack.workerListed(w.id)));
    return listed.every(Boolean) && (await stack.redis.hexists(`llm:tokenizer:${stack.model}`, 'tokenizer_json')) === 1;
  }, 60_000, 'the workers to register again (heartbeat and tokenizer)');
  // The replacement for the worker the next case kills loads its model meanwhile (it touches Redis only when loaded).
  workerC = await stack.spawnWorker('c');

  // A request through the gateway (which reconnects by itself too) is served by one of the same worker processes.
  let answer: OpenAI.ChatCompletion | null = null;
  await waitFor(async () => {
    answer = await sdk(gateway, 20_000).chat.completions.create({ model: stack.model, messages, max_tokens: 8 }).catch(() => null);
    return answer !== null;
  }, 90_000, 'a request to succeed after the Redis restart');
  timings.servedAfterRestartMs = Date.now() - restartedAt;
  expect(answer!.choices[0].message.content!.length).toBeGreaterThan(0);
  // Who served it, from the result stored on the job (pub/sub events may be lost around a restart; the result is not).
  const servedBy = (await completedJob(answer!.id)).returnvalue.worker_id;
  expect(workers.map((w) => w.id)).toContain(servedBy);
  expect(workers.map((w) => w.proc.child.pid)).toEqual(pids);
  expect(stack.liveWorkerIds()).toEqual(expect.arrayContaining(workers.map((w) => w.id)));
  // Measured 3.3-4.4 s (the fetch loop retries after 1 s). The bound only says that service resumes by itself, in the
  // same processes, within a while; it leaves a loaded machine room.
  expect(timings.servedAfterRestartMs).toBeLessThan(30_000);
  // Both take jobs again: two long generations at once run on the two workers (MAX_BATCH 1 each).
  const both = Date.now();
  const acs = [0, 1].map(() => new AbortController());
  const errors: unknown[] = [];
  const run = (ac: AbortController) => sdk(gateway).chat.completions
    .create({ model: stack.model, messages, stream: true, ...LONG } as OpenAI.ChatCompletionCreateParamsStreaming, { signal: ac.signal })
    .then(async (st) => {
      for await (const _ of st) if (ac.signal.aborted) break;
    })
    .catch((err) => void (ac.signal.aborted || errors.push(err)));
  const startedSince = () => new Set([...watcher.jobs.values()].filter((t) => t.firstSeenMs >= both).flatMap((t) => t.started.map((x) => x.workerId)));
  // One after the other: sent at the same instant, the second can find the first still waiting in the queue (not yet
  // fetched), and backlog admission may then refuse it on a drain-rate estimate made slow by the fault cases before.
  const runs = [run(acs[0])];
  try {
    await waitFor(() => startedSince().size >= 1 || errors.length > 0, 60_000, 'the first long generation to start');
    runs.push(run(acs[1]));
    await waitFor(() => startedSince().size === 2 || errors.length > 0, 60_000, 'both workers to take a job after the restart');
    expect(errors).toEqual([]);
  } finally {
    for (const ac of acs) ac.abort();
    await Promise.all(runs);
  }
  await waitFor(async () => (await pendingJobs()).length === 0, 60_000, 'the jobs to end');
});

test('a worker killed mid-stream: the SDK raises worker_lost within 10 s, and no job is left stuck', async () => {
  const cancelled = (w: FaultWorker) => metric(`${w.metricsUrl}/metrics`, 'llm_worker_jobs_total', 'outcome="cancelled"').then((v) => v ?? 0);
  // Per worker: the replacement started by the previous case may be up by now and take the dead worker's job too.
  const cancelledNow = async () => new Map(await Promise.all([...stack.workers.values()].map(async (w) => [w.id, await cancelled(w).catch(() => 0)] as const)));
  const cancelledBefore = await cancelledNow();
  const since = Date.now();
  const stream = await sdk(gateway).chat.completions.create(
    { model: stack.model, messages, stream: true, ...LONG } as OpenAI.ChatCompletionCreateParamsStreaming,
  );
  let texts = 0;
  let killedAt = 0;
  let victim = '';
  let jobId = '';
  let error: unknown = null;
  const guard = setTimeout(() => stream.controller.abort(), 90_000); // a hang fails the test instead of blocking it
  try {
    for await (const chunk of stream) {
      jobId = chunk.id;
      if (chunk.choices[0]?.delta.content) texts += 1;
      if (texts === 3 && !killedAt) {
        victim = (await watcher.waitJob(since, (t) => t.jobId === jobId && t.started.length > 0, 30_000, 'started')).started[0].workerId;
        await stack.killWorker(victim);
        killedAt = Date.now();
      }
    }
  } catch (err) {
    error = err;
  } finally {
    clearTimeout(guard);
  }
  timings.streamErrorAfterKillMs = Date.now() - killedAt;
  expect(killedAt).toBeGreaterThan(0);
  expect(error).toBeInstanceOf(OpenAI.APIError);
  expect(error).not.toBeInstanceOf(OpenAI.APIUserAbortError);
  const e = error as InstanceType<typeof OpenAI.APIError>;
  expect(e.error).toEqual({ message: expect.any(String), type: 'server_error', param: null, code: 'worker_lost' });
  // The bound under test, the promise of docs/PROTOCOL.md ("Worker death and retries"): the heartbeat expires 4-5 s
  // after the death and the gateway looks every second (measured 4.1-5.7 s); a longer bound would not test it.
  expect(timings.streamErrorAfterKillMs).toBeLessThan(10_000);

  // The dead worker's job must end up neither active nor waiting, and must not be generated again. Two ways, by timing:
  // the gateway gave up on it (cancel key set, then Queue.remove) after its lock had lapsed: removed at once; or before:
  // the lock held, the survivor's stalled check re-queued it, the survivor saw the cancel key and failed it.
  // The replacement started by the previous case may be the one that took the job (and died): any other live worker
  // is a survivor.
  const survivor = [...stack.workers.values()].find((w) => w.id !== victim)!;
  const stalledKey = `bull:${QUEUE}:stalled`;
  await waitFor(async () => {
    const [job, pending, stalled] = await Promise.all([Job.fromId(queue, jobId), pendingJobs(), stack.redis.sismember(stalledKey, jobId)]);
    return pending.length === 0 && stalled === 0 && (job === undefined || (await job.getState()) === 'failed');
  }, 60_000, "the dead worker's job to be removed or failed, and seen by a stalled check");
  timings.orphanSettledAfterKillMs = Date.now() - killedAt;
  const job = await Job.fromId(queue, jobId);
  if (job) {
    expect(job.failedReason).toMatch(/^cancelled/);
    expect(job.stalledCounter).toBe(1);
    await waitFor(async () => [...(await cancelledNow())].some(([id, n]) => n > (cancelledBefore.get(id) ?? 0)), 30_000,
      'a survivor to count the cancelled job');
  }
  // eslint-disable-next-line no-console
  console.log(`dead worker's job: ${job ? 're-queued by the stalled check, then failed as cancelled' : 'removed by the gateway'}`);
  expect(watcher.jobs.get(jobId)!.end?.type).not.toBe('done');
  // One more stalled check, started after the job settled, must bring nothing back. Each check stores its start time
  // in the stalled-check key (SET … PX STALLED_INTERVAL_MS, in the same Lua call that re-queues), so the key holding a
  // later time means such a check has run to its end.
  const settledAt = Date.now();
  await waitFor(async () => Number(await stack.redis.get(`bull:${QUEUE}:stalled-check`)) > settledAt, 60_000,
    'a stalled check after the job settled');
  expect(await pendingJobs()).toEqual([]);

  // The rest of the system is fine: ready, the dead worker no longer counted, nothing active.
  expect((await fetch(`${gateway.url}/ready`)).status).toBe(200);
  expect((await fetch(`${survivor.metricsUrl}/health`)).status).toBe(200);
  await waitFor(async () => {
    const listed = (await Promise.all(stack.liveWorkerIds().map((id) => stack.workerListed(id)))).filter(Boolean).length;
    const counted = await metric(`${gateway.url}/metrics`, 'llm_gateway_live_workers', `model="${stack.model}"`);
    return listed >= 1 && counted === listed && !(await stack.workerListed(victim));
  }, 30_000, 'the gateway to count the live workers without the dead one');
  expect(await metric(`${gateway.url}/metrics`, 'llm_queue_jobs', `model="${stack.model}",state="active"`)).toBe(0);
});

test('a worker killed before anything reached its client: the job is retried on another worker transparently', async () => {
  expect(workerC).not.toBeNull();
  // Two live workers: the replacement started two cases ago and the survivor of the last case, or, when the
  // replacement was up in time to be that case's victim, the two first ones.
  const t = Date.now();
  const live = [...stack.workers.values()];
  expect(live).toHaveLength(2);
  for (const w of live) await stack.waitWorkerReady(w, 240_000);
  timings.replacementReadyWaitMs = Date.now() - t;
  await waitFor(async () => (await metric(`${gateway.url}/metrics`, 'llm_gateway_live_workers', `model="${stack.model}"`)) === 2, 30_000,
    'the gateway to count two live workers');

  // Non-streaming: the gateway sends nothing before the end, so a death at any point leaves nothing to repeat.
  const since = Date.now();
  const maxTokens = 64;
  const pending = sdk(gateway, 120_000).chat.completions.create({ model: stack.model, messages, max_tokens: maxTokens, ignore_eos: true, temperature: 0 } as
    OpenAI.ChatCompletionCreateParamsNonStreaming);
  const first = await watcher.waitJob(since, (t) => t.started.length > 0 && t.deltas > 0, 60_000, 'the job to start and publish text');
  const victim = first.started[0].workerId;
  const survivor = stack.liveWorkerIds().find((id) => id !== victim)!;
  await stack.killWorker(victim);
  const killedAt = Date.now();
  const completion = await pending.catch((err) => {
    console.log('retry case: the request failed', JSON.stringify({ victim, survivor, job: first.jobId, err: String(err) }));
    throw err;
  });
  const answeredAt = Date.now();

  const trace = watcher.jobs.get(completion.id)!;
  const job = await completedJob(completion.id);
  // Printed for a failure's sake: what the watcher saw and what BullMQ stored.
  console.log('retry case', JSON.stringify({ victim, survivor, first: first.jobId, answered: completion.id, started: trace?.started,
    deltas: trace?.deltas, end: trace?.end?.type, stalledCounter: job.stalledCounter, servedBy: job.returnvalue.worker_id }));
  expect(trace.deltas).toBeGreaterThan(0); // the first attempt had produced text, the client saw none of it
  expect(trace.started.map((s) => s.workerId)).toEqual([victim, survivor]);
  expect(completion.choices[0].message.content!.length).toBeGreaterThan(0);
  expect(completion.choices[0].finish_reason).toBe('length');
  expect(completion.usage!.completion_tokens).toBe(maxTokens);
  expect(job.stalledCounter).toBe(1);
  expect(job.returnvalue.worker_id).toBe(survivor);

  timings.retryStartedAfterKillMs = trace.started[1].atMs - killedAt;
  timings.retryGenerationMs = trace.end!.atMs - trace.started[1].atMs;
  timings.retryAnsweredAfterKillMs = answeredAt - killedAt;
  // The bound under test, the promise of docs/PROTOCOL.md: the lock lapses 2.5-5 s after the death and the next stalled
  // check (every 2.5 s) re-queues the job, at most 7.5 s (measured 4.9-7.2 s); a longer bound would not test it.
  expect(timings.retryStartedAfterKillMs).toBeLessThan(10_000);
  // Then the retry's own generation, and the gateway's answer after its `done` (pub/sub, then HTTP: slack for load).
  expect(timings.retryAnsweredAfterKillMs).toBeLessThan(10_000 + timings.retryGenerationMs + 5000);
  expect(await pendingJobs()).toEqual([]);
}, 300_000); // includes the wait for the replacement worker's model load on a busy machine
