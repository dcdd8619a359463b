/**
 * The queue/stream layer against real Redis and BullMQ, with a FAKE worker that can lose messages, fail, stall or die:
 * the failures a real worker rarely shows on demand. Each test uses a fresh model (so a fresh queue).
 */
import { randomUUID } from 'node:crypto';
import { Queue } from 'bullmq';
import request from 'supertest';
import { queueDepth } from '../src/limits/admission';
import { cancelledKey, jobChannel, queueName } from '../src/protocol/job';
import { FakeWorker, type FakeScript } from './helpers/fake-worker';
import { completeEvents, openStream, parseSse, startGateway, TEST_KEY, type TestGateway, waitFor } from './helpers/gateway';
import { useTestRedis } from './helpers/redis-server';

const redis = useTestRedis();
/** Takes the tests' jobs: its queue timeout is far beyond the time a worker needs to pick a job up, however slow. */
let gw: TestGateway;
/** For the tests of the queue timeout itself: a short one, so that they do not wait long for it. */
let gwQ: TestGateway;
const workers: FakeWorker[] = [];

beforeAll(async () => {
  // A short resume grace: a streaming client's disconnect cancels its job once the grace has passed.
  const env = { SSE_KEEPALIVE_MS: '100', JOB_POLL_MS: '300', RESUME_GRACE_MS: '300' };
  gw = await startGateway(redis.url, { ...env, QUEUE_TIMEOUT_MS: '30000' });
  gwQ = await startGateway(redis.url, { ...env, QUEUE_TIMEOUT_MS: '600' });
});
afterEach(async () => {
  await Promise.all(workers.splice(0).map((w) => w.close()));
});
redis.beforeStop(async () => {
  await Promise.all([gw.close(), gwQ.close()]);
});

async function fake(script: FakeScript = {}, extra: Partial<ConstructorParameters<typeof FakeWorker>[0]> = {}) {
  const w = new FakeWorker({ redisUrl: redis.url, model: extra.model ?? `m-${randomUUID().slice(0, 8)}`, script, ...extra });
  await w.start();
  workers.push(w);
  return w;
}

const post = (body: object, g = gw) => request(g.url).post('/v1/chat/completions').set('authorization', `Bearer ${TEST_KEY}`).send(body);
/** Jobs of the model's queue that no worker has taken (BullMQ's wait list and prioritized set). */
const queued = (model: string) => queueDepth(redis.client, model);
const ask = (model: string, extra: object = {}) => ({ model, messages: [{ role: 'user', content: 'Hi' }], ...extra });

function streamText(body: string) {
  const { data, comments } = parseSse(body);
  const chunks = data.filter((d) => d !== '[DONE]') as Array<Record<string, any>>;
  const text = chunks.flatMap((c) => c.choices ?? []).map((c: any) => c.delta?.content ?? '').join('');
  const error = chunks.find((c) => c.error)?.error;
  const finish = chunks.flatMap((c) => c.choices ?? []).find((c: any) => c.finish_reason)?.finish_reason;
  return { data, chunks, comments, text, error, finish, done: data.at(-1) === '[DONE]' };
}

const REPLY = 'The quick brown fox jumps over the lazy dog.';
const reply = () => REPLY;

describe('lost pub/sub messages never lose a response', () => {
  it('a gap in deltas: forwarding stops and the rest comes from the stored result', async () => {
    const w = await fake({ reply, pieceChars: 5, dropSeqs: [2, 3] });
    const s = streamText((await post(ask(w.model, { stream: true }))).text);
    expect(s.text).toBe(REPLY);
    expect(s.finish).toBe('stop');
    expect(s.done).toBe(true);
  });

  it('a lost `done`: the end comes from BullMQ (QueueEvents), stream and non-stream', async () => {
    // 44 chars / 11 per delta = 4 deltas, so `done` is seq 5.
    const w = await fake({ reply, pieceChars: 11, dropSeqs: [5] });
    const s = streamText((await post(ask(w.model, { stream: true, stream_options: { include_usage: true } }))).text);
    expect(s.text).toBe(REPLY);
    expect(s.chunks.at(-1)!.usage.completion_tokens).toBe(4);
    const ns = await post(ask(w.model));
    expect(ns.status).toBe(200);
    expect(ns.body.choices[0].message.content).toBe(REPLY);
  });

  it('every message lost: still the whole text', async () => {
    const w = await fake({ reply, pieceChars: 11, dropSeqs: [1, 2, 3, 4, 5] });
    const s = streamText((await post(ask(w.model, { stream: true }))).text);
    expect(s.text).toBe(REPLY);
    expect(s.done).toBe(true);
  });
});

describe('worker failures', () => {
  it('an error event before any text: non-stream is a plain HTTP error, stream an in-stream error then [DONE]', async () => {
    const w = await fake({ fail: { code: 'invalid_request', message: 'token id 99999 is outside the vocabulary' } });
    const ns = await post(ask(w.model));
    expect(ns.status).toBe(400);
    expect(ns.body.error).toMatchObject({ code: 'invalid_request', message: 'token id 99999 is outside the vocabulary' });
    const s = streamText((await post(ask(w.model, { stream: true }))).text);
    expect(s.error).toMatchObject({ code: 'invalid_request', type: 'invalid_request_error' });
    expect(s.done).toBe(true);
  });

  it('an internal error after some text: the text, then the error, then [DONE]; internals are not leaked', async () => {
    const w = await fake({ reply, pieceChars: 5, fail: { code: 'internal_error', message: 'CUDA OOM at 0xdeadbeef' }, failAfterDeltas: 2 });
    const s = streamText((await post(ask(w.model, { stream: true }))).text);
    expect(s.text).toBe(REPLY.slice(0, 10));
    expect(s.error).toMatchObject({ code: 'internal_error', type: 'server_error' });
    expect(JSON.stringify(s.error)).not.toContain('deadbeef');
    expect(s.done).toBe(true);
  });

  it('a lost error event: the failure comes from BullMQ failedReason "<code>: <message>"', async () => {
    const w = await fake({ fail: { code: 'context_length_exceeded', message: 'too long for this worker' }, dropSeqs: [1] });
    const ns = await post(ask(w.model));
    expect(ns.status).toBe(400);
    expect(ns.body.error).toMatchObject({ code: 'context_length_exceeded', message: 'too long for this worker', param: 'messages' });
  });

  it('the worker dies after streaming text: error worker_lost at once, then [DONE]', async () => {
    // The worker holds after two deltas until the client has their text, then dies: the gateway has forwarded text
    // when it sees the worker gone (with none forwarded it would wait for BullMQ's retry instead).
    let die!: () => void;
    const w = await fake({ reply, pieceChars: 5, holdAfterDeltas: 2, holdGate: new Promise<void>((r) => (die = r)), dieAfterDeltas: 2 });
    const stream = await openStream(`${gw.url}/v1/chat/completions`, ask(w.model, { stream: true }), { authorization: `Bearer ${TEST_KEY}` });
    try {
      await waitFor(() => streamText(completeEvents(stream.received())).text === REPLY.slice(0, 10), undefined, 'the two deltas at the client');
      const died = Date.now();
      die();
      const s = streamText(await stream.body);
      expect(s.text).toBe(REPLY.slice(0, 10));
      expect(s.error).toMatchObject({ code: 'worker_lost', type: 'server_error' });
      expect(s.done).toBe(true);
      // "At once" is what is tested: the gateway sees the worker gone from the registry (die() unregisters it), instead
      // of hanging until the request timeout (10 min). Loose, so that a loaded machine passes.
      expect(Date.now() - died).toBeLessThan(15_000);
    } finally {
      die();
      stream.abort();
    }
  });

  it('the same worker starts the job again after text was sent (its lock lapsed): worker_lost, never the text twice', async () => {
    // A worker whose event loop stalls past its lock (CPU-starved) gets the job back from BullMQ's stalled check and runs
    // it again beside its first run: a second `started` from the same worker id, then deltas numbered from 1 again.
    // The first attempt is held after two deltas; the second attempt's first events are what that worker publishes.
    let release!: () => void;
    const w = await fake({ reply, pieceChars: 5, holdAfterDeltas: 2, holdGate: new Promise<void>((r) => (release = r)) });
    const stream = await openStream(`${gw.url}/v1/chat/completions`, ask(w.model, { stream: true }), { authorization: `Bearer ${TEST_KEY}` });
    try {
      await waitFor(() => streamText(completeEvents(stream.received())).text === REPLY.slice(0, 10), undefined, 'the two deltas at the client');
      const jobId = streamText(completeEvents(stream.received())).chunks[0].id as string;
      const again = (event: object) => redis.client.publish(jobChannel(jobId), JSON.stringify({ ...event, ts_ms: Date.now() }));
      await again({ type: 'started', worker_id: w.workerId, prompt_tokens: w.jobs[0].prompt_tokens });
      await again({ type: 'delta', seq: 1, choices: [{ index: 0, text: REPLY.slice(0, 5), tokens: 1, logprobs: null }] });
      release();
      const s = streamText(await stream.body);
      expect(s.text).toBe(REPLY.slice(0, 10));
      expect(s.error).toMatchObject({ code: 'worker_lost', type: 'server_error' });
      expect(s.done).toBe(true);
    } finally {
      release();
      stream.abort();
    }
  });

  it('the worker dies before any text: the gateway waits for BullMQ to retry the job on another worker', async () => {
    const model = `m-${randomUUID().slice(0, 8)}`;
    const doomed = await fake({ reply, dieAfterDeltas: 0 }, { model });
    const res = post(ask(model, { stream: true })).then((r) => r);
    await waitFor(() => doomed.jobs.length === 1, undefined, 'the first worker to take the job');
    const healthy = await fake({ reply: () => 'second attempt' }, { model });
    const s = streamText((await res).text);
    expect(s.error).toBeUndefined();
    expect(s.text).toBe('second attempt');
    expect(healthy.jobs.length).toBe(1);
  });
});

describe('no worker left', () => {
  it('the only worker dies before any text: 503 queue_timeout soon after QUEUE_TIMEOUT_MS, not a hang', async () => {
    const w = await fake({ reply, dieAfterDeltas: 0 });
    const t0 = Date.now();
    const res = await post(ask(w.model), gwQ);
    expect(res.status).toBe(503);
    expect(res.body.error.code).toBe('queue_timeout');
    expect(res.headers['retry-after']).toBeDefined();
    // "Not a hang" is what is tested: QUEUE_TIMEOUT_MS (0.6 s) after the worker is seen gone, not the request timeout
    // (10 min). Loose, so that a loaded machine passes.
    expect(Date.now() - t0).toBeLessThan(15_000);
  });
});

describe('queueing', () => {
  it('SSE keep-alive comments while the job waits for a worker', async () => {
    // The worker holds the job before `started` until the client has seen two keep-alives, then answers.
    let start!: () => void;
    const w = await fake({ reply, startGate: new Promise<void>((r) => (start = r)) });
    try {
      const stream = await openStream(`${gw.url}/v1/chat/completions`, ask(w.model, { stream: true }), { authorization: `Bearer ${TEST_KEY}` });
      const keepAlives = () => streamText(completeEvents(stream.received())).comments.filter((c) => c === 'keep-alive').length;
      await waitFor(() => keepAlives() >= 2, undefined, 'two keep-alive comments');
      start();
      const s = streamText(await stream.body);
      expect(s.comments.filter((c) => c === 'keep-alive').length).toBeGreaterThanOrEqual(2);
      expect(s.text).toBe(REPLY);
    } finally {
      start();
    }
  });

  it('no worker takes the job within QUEUE_TIMEOUT_MS: 503 + retry-after, and the job is removed', async () => {
    const w = await fake({}, { consume: false });
    const res = await post(ask(w.model), gwQ);
    expect(res.status).toBe(503);
    expect(res.body.error.code).toBe('queue_timeout');
    expect(Number(res.headers['retry-after'])).toBeGreaterThanOrEqual(1);
    const q = new Queue(queueName(w.model), { connection: redis.client });
    expect(await q.getJobCounts('waiting', 'prioritized', 'active')).toEqual({ waiting: 0, prioritized: 0, active: 0 });
    await q.close();
  });

  it('stream: queue timeout is an in-stream error after keep-alives', async () => {
    const w = await fake({}, { consume: false });
    const s = streamText((await post(ask(w.model, { stream: true }), gwQ)).text);
    expect(s.error).toMatchObject({ code: 'queue_timeout' });
    expect(s.done).toBe(true);
  });
});

describe('client disconnect cancels the job', () => {
  it('streaming, once the resume grace (300 ms here) has passed: the worker is told (llm:cancel and the llm:cancelled key)', async () => {
    // The worker holds after its first delta until it is cancelled: the job is still running when the client goes.
    const w = await fake({ reply, pieceChars: 2, holdAfterDeltas: 1 });
    const stream = await openStream(`${gw.url}/v1/chat/completions`, ask(w.model, { stream: true }), { authorization: `Bearer ${TEST_KEY}` });
    await waitFor(() => streamText(completeEvents(stream.received())).text.length > 0, undefined, 'the first generated text');
    stream.abort();
    const leftAt = Date.now();
    expect(w.jobs.length).toBe(1);
    await waitFor(() => w.cancelled.size === 1, undefined, 'cancel message');
    expect(Date.now() - leftAt).toBeGreaterThanOrEqual(290); // not before the grace
    const [jobId] = [...w.cancelled];
    expect(await redis.client.get(cancelledKey(jobId))).toBe('1');
    expect(await redis.client.ttl(cancelledKey(jobId))).toBeGreaterThan(500);
  });

  it('non-stream (not resumable, no grace), still queued: the job is removed from the queue', async () => {
    const w = await fake({}, { consume: false });
    const ctrl = new AbortController();
    const resp = fetch(`${gw.url}/v1/chat/completions`, {
      method: 'POST',
      headers: { authorization: `Bearer ${TEST_KEY}`, 'content-type': 'application/json' },
      body: JSON.stringify(ask(w.model)),
      signal: ctrl.signal,
    });
    resp.catch(() => undefined);
    await waitFor(async () => (await queued(w.model)) === 1, undefined, 'the job to be queued');
    ctrl.abort();
    await waitFor(() => w.cancelled.size === 1, undefined, 'cancel message');
    // The gateway publishes the cancel message before it removes the job: wait for the removal itself.
    await waitFor(async () => (await queued(w.model)) === 0, undefined, 'the job to leave the queue');
  });
});

describe('logprobs', () => {
  const tokensOf = (lp: any) => (lp?.content ?? []).map((t: any) => t.token).join('');

  it('non-stream: {content: [...], refusal: null} covering the text, with top_logprobs', async () => {
    const w = await fake({ reply, pieceChars: 5 });
    const res = await post(ask(w.model, { logprobs: true, top_logprobs: 2 }));
    const lp = res.body.choices[0].logprobs;
    expect(lp.refusal).toBeNull();
    expect(tokensOf(lp)).toBe(REPLY);
    expect(lp.content[0]).toMatchObject({ logprob: -0.5, top_logprobs: [{ logprob: -0.5 }, { logprob: -1.5 }] });
    expect(w.jobs.at(-1)!.params).toMatchObject({ logprobs: true, top_logprobs: 2 });
  });

  it('stream: each content chunk carries the logprobs of its text, also across a gap', async () => {
    const w = await fake({ reply, pieceChars: 5, dropSeqs: [3, 4] });
    const s = streamText((await post(ask(w.model, { stream: true, logprobs: true }))).text);
    expect(s.text).toBe(REPLY);
    const contentChunks = s.chunks.flatMap((c) => c.choices).filter((c: any) => c.delta.content);
    expect(contentChunks.map((c: any) => tokensOf(c.logprobs)).join('')).toBe(REPLY);
  });
});
