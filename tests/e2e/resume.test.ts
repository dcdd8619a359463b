// Resumable streams end to end: the real worker on the bundled model stores each job's events in Redis, a second gateway
// process on the stack's Redis (its own entry point, main.ts) takes the dropped streams, and the stack's gateway resumes
// them. Greedy decoding, so the uninterrupted answer is known: a stream dropped mid-way and resumed must give exactly it.
import { Job, Queue } from "bullmq";
import type Redis from "ioredis";
import OpenAI from "openai";
import { type FaultGateway, spawnGateway, stopGateway, waitGatewayUp } from "./fault-stack";
import { bullPrefix, client, collectStream, PROMPT, stack, waitFor } from "./helpers";

jest.setTimeout(240_000);

/** The grace of the second gateway: long enough to resume in, short enough to wait out in the grace case. */
const GRACE_MS = 4000;
const OTHER_KEY = `sk-e2e-other-${Math.random().toString(36).slice(2)}`;
const greedy = { temperature: 0, max_tokens: 48 };

let gw: FaultGateway;
let redis: Redis;
let queue: Queue;
let uninterrupted: string;

interface Ev {
  id: string | null;
  data: any;
}

function events(body: string): Ev[] {
  return body
    .slice(0, body.lastIndexOf("\n\n") + 2)
    .split("\n\n")
    .filter((b) => b.includes("data: "))
    .map((b) => {
      const lines = b.split("\n");
      const payload = lines.find((l) => l.startsWith("data: "))!.slice(6);
      return { id: lines.find((l) => l.startsWith("id: "))?.slice(4) ?? null, data: payload === "[DONE]" ? "[DONE]" : JSON.parse(payload) };
    });
}

const content = (evs: Ev[]) =>
  evs.filter((e) => e.data !== "[DONE]").flatMap((e) => e.data.choices).map((c: any) => c.delta?.content ?? "").join("");

const headers = (key = stack.apiKey) => ({ authorization: `Bearer ${key}`, "content-type": "application/json", "cache-control": "no-store" });

/** POSTs a stream to `base`; reads until `until(events)` holds, then drops the connection (or reads it all). */
async function stream(base: string, body: object, until?: (evs: Ev[]) => boolean): Promise<Ev[]> {
  const ctrl = new AbortController();
  const resp = await fetch(`${base}/v1/chat/completions`, { method: "POST", headers: headers(), body: JSON.stringify({ ...body, stream: true }), signal: ctrl.signal });
  expect(resp.status).toBe(200);
  const reader = resp.body!.getReader();
  const decoder = new TextDecoder();
  let text = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return events(text);
    text += decoder.decode(value, { stream: true });
    if (until && until(events(text))) {
      ctrl.abort();
      return events(text);
    }
  }
}

async function resume(base: string, id: string, lastEventId?: string, key = stack.apiKey): Promise<{ status: number; body: string }> {
  const h: Record<string, string> = { authorization: `Bearer ${key}` };
  if (lastEventId) h["last-event-id"] = lastEventId;
  const r = await fetch(`${base}/v1/chat/completions/${id}/stream`, { headers: h });
  return { status: r.status, body: await r.text() };
}

const posOf = (id: string) => id.split("/")[1].split(".").map(Number);
const increasing = (ids: string[]) =>
  ids.every((id, i) => i === 0 || posOf(id)[0] > posOf(ids[i - 1])[0] || (posOf(id)[0] === posOf(ids[i - 1])[0] && posOf(id)[1] > posOf(ids[i - 1])[1]));

beforeAll(async () => {
  gw = await spawnGateway("resume", stack.redisUrl, { API_KEYS: `${stack.apiKey},${OTHER_KEY}`, RESUME_GRACE_MS: String(GRACE_MS), LOG_LEVEL: "warn" });
  redis = stack.redis({ maxRetriesPerRequest: null });
  queue = new Queue(`gen.${stack.model}`, { connection: redis, prefix: bullPrefix(redis) });
  await waitGatewayUp(gw, 120_000);
  await waitFor(async () => (await fetch(`${gw.url}/ready`)).status === 200, 120_000, "the second gateway to be ready");
  const r = await client().chat.completions.create({ model: stack.model, messages: PROMPT, ...greedy });
  uninterrupted = r.choices[0].message.content!;
  expect(uninterrupted.length).toBeGreaterThan(20);
});

afterAll(async () => {
  await queue?.close();
  redis?.disconnect();
  if (gw) await stopGateway(gw);
});

test("every event carries an increasing id of its completion; the openai SDK reads the same stream unaffected", async () => {
  const evs = await stream(stack.baseUrl, { model: stack.model, messages: PROMPT, ...greedy, stream_options: { include_usage: true } });
  const id = evs[0].data.id;
  expect(evs.every((e) => e.id?.startsWith(`${id}/`))).toBe(true);
  expect(increasing(evs.map((e) => e.id!))).toBe(true);
  expect(evs.at(-1)!.data).toBe("[DONE]");
  expect(content(evs)).toBe(uninterrupted);
  const sdk = await collectStream(await client().chat.completions.create({ model: stack.model, messages: PROMPT, ...greedy, stream: true }));
  expect(sdk.text).toBe(uninterrupted);
});

test("dropped mid-stream, resumed through the other gateway with Last-Event-ID: received + resumed = the uninterrupted answer", async () => {
  const before = await stream(gw.url, { model: stack.model, messages: PROMPT, ...greedy }, (evs) => content(evs).length >= 10);
  const received = content(before);
  expect(received.length).toBeLessThan(uninterrupted.length); // really cut in the middle
  const id = before[0].data.id;
  const r = await resume(stack.baseUrl, id, before.at(-1)!.id!);
  expect(r.status).toBe(200);
  const after = events(r.body);
  expect(received + content(after)).toBe(uninterrupted);
  expect(after.at(-1)!.data).toBe("[DONE]");
  expect(increasing([...before, ...after].map((e) => e.id!))).toBe(true);

  // Finished now, and still resumable: from the start (no Last-Event-ID) it is the whole answer, on either gateway.
  const whole = await resume(gw.url, id);
  expect(content(events(whole.body))).toBe(uninterrupted);
  // Only by the caller who started it.
  const theirs = await resume(gw.url, id, undefined, OTHER_KEY);
  expect(theirs.status).toBe(404);
  expect(JSON.parse(theirs.body).error.code).toBe("completion_not_found");
});

test("dropped mid-stream, resumed from the start (no Last-Event-ID) while it still runs: the whole answer", async () => {
  const before = await stream(gw.url, { model: stack.model, messages: PROMPT, ...greedy }, (evs) => content(evs).length >= 5);
  const r = await resume(stack.baseUrl, before[0].data.id);
  expect(r.status).toBe(200);
  expect(content(events(r.body))).toBe(uninterrupted);
});

test("nobody resumes: the job keeps generating through the grace, then it is cancelled", async () => {
  const long = { model: stack.model, messages: PROMPT, max_tokens: 2000, ignore_eos: true };
  const before = await stream(gw.url, long, (evs) => content(evs).length >= 5);
  const droppedAt = Date.now();
  const id = before[0].data.id;
  const storedAtDrop = await redis.llen(`llm:events:${id}`);
  // Still generating with nobody attached: its events keep being stored.
  await waitFor(async () => (await redis.llen(`llm:events:${id}`)) > storedAtDrop + 3, 30_000, "events after the disconnect");
  expect((await Job.fromId(queue, id))?.finishedOn).toBeUndefined();
  let job: Job | undefined;
  await waitFor(async () => {
    job = await Job.fromId(queue, id);
    return job?.finishedOn !== undefined;
  }, 60_000, "the job to end");
  const endedAfterMs = job!.finishedOn! - droppedAt;
  expect(await job!.getState()).toBe("failed");
  expect(job!.failedReason).toMatch(/^cancelled/);
  expect(endedAfterMs).toBeGreaterThanOrEqual(GRACE_MS - 50);
  console.log(`job cancelled ${endedAfterMs} ms after its client left (RESUME_GRACE_MS ${GRACE_MS})`);
});

test("the gateway process is killed (SIGKILL) mid-stream: the client resumes through the other one and gets the whole answer", async () => {
  // Last: it kills the second gateway. Nobody is left to cancel the job (no grace runs on a dead process): it goes on.
  const resp = await fetch(`${gw.url}/v1/chat/completions`, {
    method: "POST", headers: headers(), body: JSON.stringify({ model: stack.model, messages: PROMPT, ...greedy, stream: true }),
  });
  const reader = resp.body!.getReader();
  const decoder = new TextDecoder();
  let text = "";
  let killed = false;
  const lost = await (async () => {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return false;
      text += decoder.decode(value, { stream: true });
      if (!killed && content(events(text)).length >= 10) {
        killed = true;
        process.kill(-gw.proc.child.pid!, "SIGKILL"); // the process group: tsx runs the gateway in a child
      }
    }
  })().catch(() => true);
  expect(killed).toBe(true);
  const before = events(text); // what the client has: the complete events that arrived before the process died
  const received = content(before);
  expect(lost || received.length < uninterrupted.length).toBe(true);
  const r = await resume(stack.baseUrl, before[0].data.id, before.at(-1)!.id!);
  expect(r.status).toBe(200);
  expect(received + content(events(r.body))).toBe(uninterrupted);
});
