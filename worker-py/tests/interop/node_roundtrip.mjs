// Node bullmq (the gateway's side, 6.7.0 from the repo's node_modules) → Python worker → Node, as PROTOCOL.md says:
// subscribe to llm:job:{id} first, Queue.add, then job.waitUntilFinished(). Prints one JSON line per case.
// Usage: node node_roundtrip.mjs <redis-url> <queue> <jobs.json>   (jobs.json: [{"id": "...", "data": {...}}])
import { createRequire } from "node:module";
import { readFileSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const require = createRequire(path.join(here, "../../../package.json")); // resolve from the repo root
const { Queue, QueueEvents } = require("bullmq");
const IORedis = require("ioredis");

const [url, queueName, jobsFile] = process.argv.slice(2);
const connection = { url };
const queue = new Queue(queueName, { connection });
const events = new QueueEvents(queueName, { connection });
await events.waitUntilReady();
const sub = new IORedis(url);

for (const { id, data } of JSON.parse(readFileSync(jobsFile, "utf8"))) {
  const seen = [];
  await sub.subscribe(`llm:job:${id}`);
  sub.on("message", (ch, msg) => { if (ch === `llm:job:${id}`) seen.push(JSON.parse(msg)); });
  const job = await queue.add("chat", data, {
    jobId: id, attempts: 1, removeOnComplete: { age: 300, count: 1000 }, removeOnFail: { age: 3600, count: 1000 },
  });
  let out;
  try {
    const result = await job.waitUntilFinished(events, 120000);
    out = { id, ok: true, result };
  } catch (err) {
    const stored = await queue.getJob(id);
    out = { id, ok: false, message: err.message, failedReason: stored?.failedReason };
  }
  // The worker publishes its done/error event before BullMQ stores the result, but on another connection than the
  // one that told us: wait until that last pub/sub message has landed too (the deadline only bounds a hang).
  const landBy = Date.now() + 60000;
  while (!seen.some((e) => e.type === "done" || e.type === "error") && Date.now() < landBy) {
    await new Promise((r) => setTimeout(r, 20));
  }
  await sub.unsubscribe(`llm:job:${id}`);
  sub.removeAllListeners("message");
  out.events = seen;
  console.log(JSON.stringify(out));
}
await Promise.all([queue.close(), events.close(), sub.quit()]);
