// Node bullmq (the gateway's side, 6.7.0 from the repo's node_modules) → Python worker → Node, as PROTOCOL.md says:
// subscribe to llm:job:{id} first, Queue.add, then job.waitUntilFinished(). Prints one JSON line per case.
// Usage: node node_roundtrip.mjs <redis-url> <queue> <jobs.json> [deadline-ms]   (jobs.json: [{"id": "...", "data": {...}}])
// At its deadline (default 240 s: inside the timeouts of the pytest cases that run it) it fails, exit 1, saying what it
// was waiting for, instead of hanging; so does a job that ends without its done/error event or without ending at all.
import { createRequire } from "node:module";
import { readFileSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const require = createRequire(path.join(here, "../../../package.json")); // resolve from the repo root
const { Queue, QueueEvents } = require("bullmq");
const IORedis = require("ioredis");

const [url, queueName, jobsFile, deadlineArg] = process.argv.slice(2);
const deadlineMs = Number(deadlineArg ?? 240000);
const deadline = Date.now() + deadlineMs;
let waitingFor = () => "Redis";
const fail = (why) => {
  console.error(`node_roundtrip: ${why}`);
  process.exit(1);
};
const timer = setTimeout(() => fail(`gave up after ${deadlineMs} ms waiting for ${waitingFor()}`), deadlineMs);

const connection = { url };
const queue = new Queue(queueName, { connection });
const events = new QueueEvents(queueName, { connection });
await events.waitUntilReady();
const sub = new IORedis(url);

for (const { id, data } of JSON.parse(readFileSync(jobsFile, "utf8"))) {
  const channel = `llm:job:${id}`;
  const seen = [];
  let ended;
  const terminal = new Promise((resolve) => (ended = resolve));
  sub.on("message", (ch, msg) => {
    if (ch !== channel) return;
    const event = JSON.parse(msg);
    seen.push(event);
    if (event.type === "done" || event.type === "error") ended();
  });
  await sub.subscribe(channel);
  const job = await queue.add("chat", data, {
    jobId: id, attempts: 1, removeOnComplete: { age: 300, count: 1000 }, removeOnFail: { age: 3600, count: 1000 },
  });
  waitingFor = () => `job ${id} to finish (events so far: ${JSON.stringify(seen.map((e) => e.type))})`;
  let out;
  try {
    const result = await job.waitUntilFinished(events, Math.max(1, deadline - Date.now()));
    out = { id, ok: true, result };
  } catch (err) {
    // A failed job rejects with its failedReason; anything else (the wait ran out) is this run failing, not the job.
    const stored = await queue.getJob(id);
    if (!stored?.failedReason) fail(`job ${id} did not finish: ${err.message}`);
    out = { id, ok: false, message: err.message, failedReason: stored.failedReason };
  }
  // The worker publishes its done/error event before BullMQ stores the result, but on another connection than the
  // one that told us: wait until that last pub/sub message has landed too.
  waitingFor = () => `the done/error event of job ${id}, which BullMQ says has ended (events: ${JSON.stringify(seen)})`;
  await terminal;
  await sub.unsubscribe(channel);
  sub.removeAllListeners("message");
  out.events = seen;
  console.log(JSON.stringify(out));
}
clearTimeout(timer);
await Promise.all([queue.close(), events.close(), sub.quit()]);
