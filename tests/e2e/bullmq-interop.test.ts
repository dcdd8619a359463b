// Node bullmq 6.7.0 ↔ Python bullmq 3.4.4, the pinned pair: a job added from Node is processed by the real Python worker,
// and Node reads its result and its failure reason (without the stray JSON quotes of Python bullmq ≤ 3.0.4, issue #4596).
import { randomUUID } from "node:crypto";
import { Queue, QueueEvents } from "bullmq";
import Redis from "ioredis";
import { stack } from "./helpers";

jest.setTimeout(120_000);

const queueName = () => `gen.${stack.model.replace(/[^A-Za-z0-9._-]/g, "_")}`;

function jobData(overrides: Record<string, unknown> = {}) {
  const now = Date.now();
  return {
    v: 1,
    request_id: `req_${randomUUID()}`,
    model: stack.model,
    messages: [{ role: "user", content: "Say hi." }],
    params: {
      max_tokens: 4, temperature: 0, top_p: 1, seed: null, stop: [], n: 1, presence_penalty: 0, frequency_penalty: 0,
      logit_bias: {}, logprobs: false, top_logprobs: 0, top_k: 0, min_p: 0, repetition_penalty: 1, ignore_eos: false,
    },
    stream: false,
    prompt_tokens: 0,
    enqueued_at_ms: now,
    deadline_ms: now + 60_000,
    ...overrides,
  };
}

describe("BullMQ Node → Python worker", () => {
  let queue: Queue;
  let events: QueueEvents;
  let connection: Redis;
  let eventsConnection: Redis;

  beforeAll(async () => {
    connection = new Redis(stack.redisUrl, { maxRetriesPerRequest: null });
    queue = new Queue(queueName(), { connection });
    eventsConnection = new Redis(stack.redisUrl, { maxRetriesPerRequest: null });
    events = new QueueEvents(queueName(), { connection: eventsConnection });
    await events.waitUntilReady();
  });

  afterAll(async () => {
    await events.close();
    await queue.close();
    // Connections handed to BullMQ stay ours to close.
    await connection.quit();
    eventsConnection.disconnect();
  });

  test("Queue.add → Python processes it → waitUntilFinished returns the JobResult", async () => {
    const id = `interop-${randomUUID()}`;
    const job = await queue.add("chat", jobData(), { jobId: id, removeOnComplete: { age: 60 } });
    const result = await job.waitUntilFinished(events, 60_000);
    expect(result.choices[0]).toMatchObject({ index: 0, finish_reason: "length" });
    expect(typeof result.choices[0].text).toBe("string");
    expect(result.usage.completion_tokens).toBe(4);
    expect(result.usage.prompt_tokens).toBeGreaterThan(0);
  });

  test("a failure reaches Node as '<code>: <message>' with no JSON quoting", async () => {
    const id = `interop-${randomUUID()}`;
    const bad = jobData({ params: { ...jobData().params, logit_bias: { "99999999": 5 } } });
    const job = await queue.add("chat", bad, { jobId: id, removeOnFail: { age: 60 } });
    const err = await job.waitUntilFinished(events, 60_000).catch((e: Error) => e);
    expect(err).toBeInstanceOf(Error);
    expect((err as Error).message).toMatch(/^invalid_request: /);
    const stored = await queue.getJob(id);
    expect(stored!.failedReason).toMatch(/^invalid_request: /);
    expect(stored!.failedReason.startsWith('"')).toBe(false);
  });
});
