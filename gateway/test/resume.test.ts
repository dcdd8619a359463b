/**
 * Resumable streams through the real wiring, real Redis and BullMQ, with the FAKE worker (which stores a job's events
 * as the real one does, and can be told not to): SSE ids, GET …/{id}/stream from the start and after a Last-Event-ID,
 * on another gateway, ownership, the disconnect grace, and the refusals (404, 400, 409, 410). The real worker and
 * model are in tests/e2e/resume.test.ts.
 */
import { randomUUID } from 'node:crypto';
import { Job, Queue } from 'bullmq';
import request from 'supertest';
import { eventsKey, queueName } from '../src/protocol/job';
import { FakeWorker, type FakeScript } from './helpers/fake-worker';
import { completeEvents, openStream, startGateway, TEST_KEY, type TestGateway, waitFor } from './helpers/gateway';
import { useTestRedis } from './helpers/redis-server';

const redis = useTestRedis();
const OTHER_KEY = 'sk-test-other-0123456789';
const GRACE_MS = 400;
/** Two replicas on one Redis; a short resume grace on both. */
let gwA: TestGateway;
let gwB: TestGateway;
const workers: FakeWorker[] = [];

beforeAll(async () => {
  const env = { API_KEYS: `${TEST_KEY},${OTHER_KEY}`, RESUME_GRACE_MS: String(GRACE_MS), JOB_POLL_MS: '300' };
  [gwA, gwB] = await Promise.all([startGateway(redis.url, env), startGateway(redis.url, env)]);
});
afterEach(async () => {
  await Promise.all(workers.splice(0).map((w) => w.close()));
});
redis.beforeStop(async () => {
  await Promise.all([gwA.close(), gwB.close()]);
});

async function fake(script: FakeScript = {}, extra: Partial<ConstructorParameters<typeof FakeWorker>[0]> = {}) {
  const w = new FakeWorker({ redisUrl: redis.url, model: `m-${randomUUID().slice(0, 8)}`, script, ...extra });
  await w.start();
  workers.push(w);
  return w;
}

const REPLY = 'The quick brown fox jumps over the lazy dog.';
const reply = () => REPLY;
const ask = (model: string, extra: object = {}) => ({ model, messages: [{ role: 'user', content: 'Hi' }], stream: true, ...extra });
const auth = (key = TEST_KEY) => ({ authorization: `Bearer ${key}` });

interface Ev {
  id: string | null;
  data: any;
}

/** SSE blocks with their `id:` and parsed `data:`. */
function events(body: string): Ev[] {
  return body
    .split('\n\n')
    .filter((b) => b.includes('data: '))
    .map((b) => {
      const lines = b.split('\n');
      const id = lines.find((l) => l.startsWith('id: '))?.slice(4) ?? null;
      const payload = lines.find((l) => l.startsWith('data: '))!.slice(6);
      return { id, data: payload === '[DONE]' ? '[DONE]' : JSON.parse(payload) };
    });
}

const textOf = (evs: Ev[], index = 0) =>
  evs
    .filter((e) => e.data !== '[DONE]')
    .flatMap((e) => e.data.choices ?? [])
    .filter((c: any) => c.index === index)
    .map((c: any) => c.delta?.content ?? c.text ?? '')
    .join('');

/** `<id>/<seq>.<k>` → [seq, k] (one job). */
const pos = (id: string) => id.split('/')[1].split('.').map(Number) as [number, number];
const increasing = (ids: string[]) => ids.every((id, i) => i === 0 || pos(id)[0] > pos(ids[i - 1])[0] || (pos(id)[0] === pos(ids[i - 1])[0] && pos(id)[1] > pos(ids[i - 1])[1]));

const resume = (g: TestGateway, path: string, lastEventId?: string, key = TEST_KEY) => {
  const r = request(g.url).get(path).set('authorization', `Bearer ${key}`);
  return lastEventId === undefined ? r : r.set('last-event-id', lastEventId);
};
const chatPath = (id: string) => `/v1/chat/completions/${id}/stream`;

/** Starts a stream on `g`, reads until `events` complete events arrived, then drops the connection. */
async function dropAfter(g: TestGateway, path: string, body: object, count: number): Promise<Ev[]> {
  const s = await openStream(`${g.url}${path}`, body, auth());
  expect(s.status).toBe(200);
  await waitFor(() => events(completeEvents(s.received())).length >= count, undefined, `${count} events`);
  s.abort();
  return events(completeEvents(s.received()));
}

describe('event ids', () => {
  it('every event of a chat stream has an id <completion id>/<seq>.<k>, increasing; role, finish, usage and [DONE] too', async () => {
    const w = await fake({ reply, pieceChars: 5 });
    const res = await request(gwA.url).post('/v1/chat/completions').set(auth()).send(ask(w.model, { stream_options: { include_usage: true } }));
    const evs = events(res.text);
    const id = evs[0].data.id as string;
    expect(id).toMatch(/^chatcmpl-/);
    expect(evs.every((e) => e.id !== null && e.id.startsWith(`${id}/`))).toBe(true);
    expect(increasing(evs.map((e) => e.id!))).toBe(true);
    expect(evs[0].data.choices[0].delta.role).toBe('assistant');
    expect(pos(evs[0].id!)).toEqual([1, 0]); // the role chunk goes with the first delta
    // 44 chars in deltas of 5: 9 deltas, done is seq 10: the finish chunk, the usage chunk and [DONE] go with it.
    expect(evs.slice(-3).map((e) => pos(e.id!))).toEqual([[10, 0], [10, 1], [10, 2]]);
    expect(evs.at(-1)!.data).toBe('[DONE]');
    expect(textOf(evs)).toBe(REPLY);
  });

  it('an error written into the stream has no id, nor has the [DONE] after it', async () => {
    const w = await fake({ reply, pieceChars: 5, fail: { code: 'internal_error', message: 'boom' }, failAfterDeltas: 2 });
    const evs = events((await request(gwA.url).post('/v1/chat/completions').set(auth()).send(ask(w.model))).text);
    expect(evs.at(-2)!.data.error.code).toBe('internal_error');
    expect(evs.slice(-2).map((e) => e.id)).toEqual([null, null]);
    expect(evs.slice(0, -2).every((e) => e.id !== null)).toBe(true);
  });
});

describe('resuming', () => {
  it('a finished stream, from the start (no Last-Event-ID): the same events, ids and all', async () => {
    const w = await fake({ reply, pieceChars: 4 });
    const original = events((await request(gwA.url).post('/v1/chat/completions').set(auth()).send(ask(w.model, { stream_options: { include_usage: true } }))).text);
    const id = original[0].data.id;
    const again = await resume(gwA, chatPath(id));
    expect(again.status).toBe(200);
    expect(again.headers['content-type']).toMatch(/^text\/event-stream/);
    expect(events(again.text)).toEqual(original);
  });

  it('dropped mid-stream, resumed on another gateway after the last id: received + resumed = the whole answer, nothing twice', async () => {
    const w = await fake({ reply, pieceChars: 2, delayMs: 60 });
    const before = await dropAfter(gwA, '/v1/chat/completions', ask(w.model), 4);
    const id = before[0].data.id;
    const resumed = await resume(gwB, chatPath(id), before.at(-1)!.id!);
    expect(resumed.status).toBe(200);
    const after = events(resumed.text);
    const all = [...before, ...after];
    expect(textOf(all)).toBe(REPLY);
    expect(new Set(all.map((e) => e.id)).size).toBe(all.length);
    expect(increasing(all.map((e) => e.id!))).toBe(true);
    expect(after.at(-1)!.data).toBe('[DONE]');
    // Exactly the events an uninterrupted stream had: the same as resuming the finished stream from its start.
    expect(all).toEqual(events((await resume(gwA, chatPath(id))).text));
    expect(w.cancelled.size).toBe(0); // resumed within the grace: never cancelled
  });

  it('resumed on the same gateway while its run still follows the job (inside the grace): both follow it, nothing lost', async () => {
    const w = await fake({ reply, pieceChars: 2, delayMs: 60 });
    const before = await dropAfter(gwA, '/v1/chat/completions', ask(w.model, { stream_options: { include_usage: true } }), 3);
    const resumed = await resume(gwA, chatPath(before[0].data.id), before.at(-1)!.id!);
    const all = [...before, ...events(resumed.text)];
    expect(textOf(all)).toBe(REPLY);
    expect(all.at(-2)!.data.usage.completion_tokens).toBeGreaterThan(0);
    expect(w.cancelled.size).toBe(0);
  });

  it('a resume attached within the grace keeps the job alive past it; without one, the job is cancelled once the grace is over', async () => {
    // ~2.2 s of generation, far longer than the 400 ms grace.
    const w = await fake({ reply, pieceChars: 2, delayMs: 100 });
    const before = await dropAfter(gwA, '/v1/chat/completions', ask(w.model), 2);
    const kept = await resume(gwB, chatPath(before[0].data.id), before.at(-1)!.id!);
    expect(textOf([...before, ...events(kept.text)])).toBe(REPLY);
    expect(w.cancelled.size).toBe(0);

    const left = await dropAfter(gwA, '/v1/chat/completions', ask(w.model), 2);
    const jobId = left[0].data.id;
    const leftAt = Date.now();
    const stored = await redis.client.llen(eventsKey(jobId));
    // During the grace the job goes on: its events keep coming (and being stored) with nobody attached.
    await waitFor(async () => (await redis.client.llen(eventsKey(jobId))) > stored + 1, undefined, 'events after the disconnect');
    await waitFor(() => w.cancelled.has(jobId), undefined, 'the cancel after the grace');
    expect(Date.now() - leftAt).toBeGreaterThanOrEqual(GRACE_MS - 10);
  });

  it('while still queued: the resume gets every event once a worker runs the job', async () => {
    let go!: () => void;
    const w = await fake({ reply, pieceChars: 11, startGate: new Promise<void>((r) => (go = r)) });
    const s = await openStream(`${gwA.url}/v1/chat/completions`, ask(w.model), auth());
    // The id is in the stream only once something was sent: read it from the job the fake worker holds.
    await waitFor(() => w.jobs.length === 1, undefined, 'the job to be picked up');
    const q = new Queue(queueName(w.model), { connection: redis.client });
    const [job] = await q.getJobs(['active']);
    await q.close();
    s.abort();
    const resumed = resume(gwB, chatPath(job.id!)).then((r) => r);
    await waitFor(async () => (await redis.client.zcard(`llm:attached:${job.id}`)) > 0, undefined, 'the resume to attach');
    go();
    const evs = events((await resumed).text);
    expect(textOf(evs)).toBe(REPLY);
    expect(evs.at(-1)!.data).toBe('[DONE]');
  });

  it('a message lost on pub/sub: the resume replays it from the stored events', async () => {
    const w = await fake({ reply, pieceChars: 5, dropSeqs: [3] });
    const original = events((await request(gwA.url).post('/v1/chat/completions').set(auth()).send(ask(w.model))).text);
    expect(textOf(original)).toBe(REPLY); // the live stream filled the gap from the stored result
    const again = events((await resume(gwB, chatPath(original[0].data.id))).text);
    expect(textOf(again)).toBe(REPLY);
    expect(increasing(again.map((e) => e.id!))).toBe(true);
  });

  it('tool calls: the same call ids on every rendering (derived, not random)', async () => {
    const call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>';
    const w = await fake({ reply: () => call, pieceChars: 7 });
    const tools = [{ type: 'function', function: { name: 'get_weather', parameters: { type: 'object', properties: { city: { type: 'string' } } } } }];
    const original = events((await request(gwA.url).post('/v1/chat/completions').set(auth()).send(ask(w.model, { tools }))).text);
    const callIds = (evs: Ev[]) => evs.flatMap((e) => (e.data.choices ?? []).flatMap((c: any) => c.delta?.tool_calls ?? [])).filter((t: any) => t.id).map((t: any) => t.id);
    expect(callIds(original)).toHaveLength(1);
    const again = events((await resume(gwB, chatPath(original[0].data.id))).text);
    expect(again).toEqual(original);
  });

  it('a cached answer streamed: resumable like a job', async () => {
    const w = await fake({ reply, pieceChars: 5 });
    const body = ask(w.model, { temperature: 0 });
    await request(gwA.url).post('/v1/chat/completions').set(auth()).send(body);
    const hit = await request(gwA.url).post('/v1/chat/completions').set(auth()).send(body);
    expect(hit.headers['x-cache']).toBe('hit');
    const original = events(hit.text);
    expect(textOf(original)).toBe(REPLY);
    await waitFor(async () => (await redis.client.exists(eventsKey(original[0].data.id))) === 1, undefined, 'the cached events');
    const again = events((await resume(gwB, chatPath(original[0].data.id), original[1].id!)).text);
    expect([...original.slice(0, 2), ...again]).toEqual(original);
  });

  it('/v1/completions, a list of prompts: one position per job in the id, resumed after it', async () => {
    const w = await fake({ reply: (d) => `<${d.prompt}> ${REPLY}`, pieceChars: 3, delayMs: 20 });
    const body = { model: w.model, prompt: ['one', 'two'], stream: true, max_tokens: 30, echo: true };
    const before = await dropAfter(gwA, '/v1/completions', body, 8);
    const id = before[0].data.id as string;
    expect(id).toMatch(/^cmpl-/);
    expect(before.every((e) => /^cmpl-[0-9a-f]+\/(\d+\.\d+|-),(\d+\.\d+|-)$/.test(e.id!))).toBe(true);
    const resumed = await resume(gwB, `/v1/completions/${id}/stream`, before.at(-1)!.id!);
    expect(resumed.status).toBe(200);
    const all = [...before, ...events(resumed.text)];
    expect(textOf(all, 0)).toBe(`one<one> ${REPLY}`);
    expect(textOf(all, 1)).toBe(`two<two> ${REPLY}`);
    expect(all.at(-1)!.data).toBe('[DONE]');
    expect(all.filter((e) => e.data !== '[DONE]' && e.data.choices.some((c: any) => c.finish_reason))).toHaveLength(2);
  });
});

describe('/v1/completions echo + logprobs', () => {
  it('the echo chunk waits for the prompt\'s scored entries; a resume renders the same events, and received + resumed = the whole', async () => {
    const w = await fake({ reply: () => REPLY, pieceChars: 3, delayMs: 20 });
    const body = { model: w.model, prompt: 'abc', stream: true, max_tokens: 30, echo: true, logprobs: 1 };
    const original = events((await request(gwA.url).post('/v1/completions').set(auth()).send(body)).text);
    const chunks = original.filter((e) => e.data !== '[DONE]');
    const echo = chunks.find((e) => e.data.choices[0]?.text)!.data.choices[0];
    expect(echo.text).toBe('abc');
    expect(echo.logprobs).toMatchObject({ tokens: ['a', 'b', 'c'], token_logprobs: [null, -0.5, -0.5], top_logprobs: [null, expect.any(Object), expect.any(Object)], text_offset: [0, 1, 2] });
    const lp = chunks.flatMap((e) => e.data.choices.map((c: any) => c.logprobs).filter(Boolean));
    expect(lp.flatMap((l: any) => l.text_offset)).toEqual([...Array(3 + Math.ceil(REPLY.length / 3)).keys()].map((i) => (i < 3 ? i : 3 + (i - 3) * 3)));
    const id = chunks[0].data.id as string;
    expect(events((await resume(gwB, `/v1/completions/${id}/stream`)).text)).toEqual(original);
    const cut = original.findIndex((e) => e === chunks[3]);
    const rest = events((await resume(gwB, `/v1/completions/${id}/stream`, original[cut].id!)).text);
    expect([...original.slice(0, cut + 1), ...rest]).toEqual(original);
  });
});

describe('refusals', () => {
  it('another caller, an unknown id, the other route: 404 completion_not_found; a foreign Last-Event-ID: 400 naming it', async () => {
    const w = await fake({ reply, pieceChars: 11 });
    const id = events((await request(gwA.url).post('/v1/chat/completions').set(auth()).send(ask(w.model))).text)[0].data.id;
    const theirs = await resume(gwA, chatPath(id), undefined, OTHER_KEY);
    expect(theirs.status).toBe(404);
    expect(theirs.body.error).toMatchObject({ code: 'completion_not_found', type: 'invalid_request_error' });
    expect((await resume(gwA, chatPath('chatcmpl-0000'))).status).toBe(404);
    expect((await resume(gwA, `/v1/completions/${id}/stream`)).status).toBe(404);
    const bad = await resume(gwA, chatPath(id), 'chatcmpl-other/3.0');
    expect(bad.status).toBe(400);
    expect(bad.body.error).toMatchObject({ code: 'invalid_value', param: 'Last-Event-ID' });
    expect((await request(gwA.url).get(chatPath(id))).status).toBe(401);
  });

  it('a worker that stores no events (older than resumable streams): 409 stream_not_resumable', async () => {
    const w = await fake({ reply, pieceChars: 11 }, { storeEvents: false });
    const id = events((await request(gwA.url).post('/v1/chat/completions').set(auth()).send(ask(w.model))).text)[0].data.id;
    const r = await resume(gwA, chatPath(id));
    expect(r.status).toBe(409);
    expect(r.body.error.code).toBe('stream_not_resumable');
  });

  it('a running job of such a worker: the resumed stream fails cleanly (an in-stream error, then [DONE], no text)', async () => {
    const w = await fake({ reply, pieceChars: 2, delayMs: 80 }, { storeEvents: false });
    const before = await dropAfter(gwA, '/v1/chat/completions', ask(w.model), 3);
    const r = await resume(gwB, chatPath(before[0].data.id));
    const evs = events(r.text);
    expect(evs.at(-2)!.data.error.code).toBe('stream_not_resumable');
    expect(evs.at(-1)!.data).toBe('[DONE]');
    expect(textOf(evs)).toBe('');
  });

  it('events past RESUME_EVENTS_MAX_BYTES: 410 stream_truncated (the stream itself was whole)', async () => {
    const small = await startGateway(redis.url, { RESUME_EVENTS_MAX_BYTES: '600' });
    try {
      const w = await fake({ reply, pieceChars: 2 });
      const original = events((await request(small.url).post('/v1/chat/completions').set(auth()).send(ask(w.model))).text);
      expect(textOf(original)).toBe(REPLY);
      const r = await resume(small, chatPath(original[0].data.id));
      expect(r.status).toBe(410);
      expect(r.body.error.code).toBe('stream_truncated');
    } finally {
      await small.close();
    }
  });

  it('RESUME_EVENTS_MAX_BYTES=0: nothing stored, no record, ids still on the events', async () => {
    const off = await startGateway(redis.url, { RESUME_EVENTS_MAX_BYTES: '0' });
    try {
      const w = await fake({ reply, pieceChars: 11 });
      const original = events((await request(off.url).post('/v1/chat/completions').set(auth()).send(ask(w.model))).text);
      expect(original.every((e) => e.id !== null)).toBe(true);
      expect(w.jobs[0].store_events).toBeUndefined();
      expect((await resume(off, chatPath(original[0].data.id))).status).toBe(404);
    } finally {
      await off.close();
    }
  });
});

it('the job of a stream stored its events with the TTL asked for, and the stream record is shortened at its end', async () => {
  const w = await fake({ reply, pieceChars: 11 });
  const id = events((await request(gwA.url).post('/v1/chat/completions').set(auth()).send(ask(w.model))).text)[0].data.id;
  expect(w.jobs[0].store_events).toEqual({ ttl_ms: 600_000, max_bytes: 1024 * 1024 });
  const ttl = await redis.client.pttl(eventsKey(id));
  expect(ttl).toBeGreaterThan(590_000);
  await waitFor(async () => (await redis.client.pttl(`llm:stream:${id}`)) <= 600_000, undefined, 'the record to be shortened');
  const job = await Job.fromId(new Queue(queueName(w.model), { connection: redis.client }), id);
  expect(await job?.getState()).toBe('completed');
});
