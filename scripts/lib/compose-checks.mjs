// What test:compose asks of the running containers, through the published port and from inside the compose network:
// the official openai Node SDK (stream and not), the tutorial's /chat, both /metrics, and a worker restarted under a
// running stream. Each check throws on failure; waits are on conditions, with deadlines that only bound a hang.
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { promisify } from "node:util";
import OpenAI from "openai";
import { waitFor } from "./stack.mjs";

const execFileP = promisify(execFile);
const PROMPT = [{ role: "user", content: "Write a long story about a lighthouse keeper and a storm." }];

/** ctx: {baseUrl, apiKey, model, compose: argv prefix (with -p/-f/--profile), env} */
export function checks(ctx) {
  const client = (maxRetries = 0) => new OpenAI({
    baseURL: `${ctx.baseUrl}/v1`, apiKey: ctx.apiKey, maxRetries, timeout: 180_000,
    // The gateway's response cache would answer a repeated request without the worker.
    defaultHeaders: { "cache-control": "no-store" },
  });
  const compose = async (...args) => {
    const [cmd, ...pre] = ctx.compose;
    const { stdout } = await execFileP(cmd, [...pre, ...args], { env: { ...process.env, ...ctx.env }, maxBuffer: 64 << 20 });
    return stdout;
  };
  /** A page fetched from inside the network, by service name, with the tools the image has (no curl in either). */
  const scrape = {
    worker: () => compose("exec", "-T", "gateway", "node", "-e",
      "fetch('http://worker-cpu:9101/metrics').then(async r=>{if(!r.ok)process.exit(1);process.stdout.write(await r.text())})"),
    gateway: () => compose("exec", "-T", "worker-cpu", "python", "-c",
      "import sys,urllib.request as u; sys.stdout.write(u.urlopen('http://gateway:8000/metrics', timeout=5).read().decode())"),
  };
  const health = async (service) => {
    const out = (await compose("ps", "--format", "json", service)).trim();
    const rows = out.startsWith("[") ? JSON.parse(out) : out.split("\n").filter(Boolean).map((l) => JSON.parse(l));
    return rows[0]?.Health ?? "";
  };
  const completedJobs = async () => sumMetric(await scrape.worker(), "llm_worker_jobs_total", { outcome: "completed" });

  async function ready() {
    const r = await fetch(`${ctx.baseUrl}/ready`);
    const body = await r.json();
    assert.equal(r.status, 200, `/ready: ${JSON.stringify(body)}`);
    assert.equal(body.status, "ready");
    assert.ok(body.redis && body.workers >= 1 && body.tokenizer, JSON.stringify(body));
    return `workers ${body.workers}, model ${body.model}`;
  }

  async function chat() {
    const c = await client().chat.completions.create({ model: ctx.model, messages: PROMPT, max_tokens: 8 });
    assert.equal(c.object, "chat.completion");
    assert.ok(c.choices[0].message.content.length > 0, "empty answer");
    assert.ok(c.usage.completion_tokens > 0);
    return `${c.usage.completion_tokens} tokens: ${JSON.stringify(c.choices[0].message.content)}`;
  }

  async function stream() {
    const s = await client().chat.completions.create({ model: ctx.model, messages: PROMPT, max_tokens: 8, stream: true });
    let text = "";
    let finish = null;
    for await (const chunk of s) {
      text += chunk.choices[0]?.delta?.content ?? "";
      finish = chunk.choices[0]?.finish_reason ?? finish;
    }
    assert.ok(text.length > 0, "no streamed text");
    assert.ok(finish, "the stream ended without a finish_reason");
    return `finish_reason ${finish}: ${JSON.stringify(text)}`;
  }

  /** Both of the above, and the worker container's own counter moved by them: it is that container that answered. */
  async function answeredByWorker() {
    const before = await completedJobs();
    const a = await chat();
    const b = await stream();
    const after = await completedJobs();
    assert.ok(after - before >= 2, `llm_worker_jobs_total{outcome="completed"} went ${before} → ${after}, not +2`);
    return `non-stream ${a}; stream ${b}; worker-cpu completed jobs ${before} → ${after}`;
  }

  async function tutorialChat() {
    const r = await fetch(`${ctx.baseUrl}/chat`, {
      method: "POST",
      headers: { "content-type": "application/json", authorization: `Bearer ${ctx.apiKey}` },
      body: JSON.stringify({ prompt: "Hello, please introduce yourself", max_length: 8, temperature: 0.7 }),
    });
    const body = await r.json();
    assert.equal(r.status, 200, JSON.stringify(body));
    assert.deepEqual(Object.keys(body).sort(), ["history", "processing_time", "response", "tokens_used"]);
    assert.ok(body.response.length > 0);
    return `${body.tokens_used} tokens in ${body.processing_time} s`;
  }

  /** zod-openapi declares Node ≥ 22.14 (npm warns when the image installs it); the image runs Node 20: it must work. */
  async function openapi() {
    const r = await fetch(`${ctx.baseUrl}/openapi.json`);
    assert.equal(r.status, 200);
    const doc = await r.json();
    assert.match(doc.openapi, /^3\.1/);
    assert.ok(doc.paths["/v1/chat/completions"], "no /v1/chat/completions in the document");
    return `OpenAPI ${doc.openapi}, ${Object.keys(doc.paths).length} paths`;
  }

  async function metrics() {
    const g = await scrape.gateway();
    const w = await scrape.worker();
    for (const name of ["llm_gateway_requests_total", "llm_gateway_live_workers"]) assert.match(g, new RegExp(`^${name}`, "m"), `gateway /metrics lacks ${name}`);
    for (const name of ["llm_worker_jobs_total", "llm_worker_generated_tokens_total"]) assert.match(w, new RegExp(`^${name}`, "m"), `worker /metrics lacks ${name}`);
    return `gateway:8000/metrics from worker-cpu (${g.split("\n").length} lines), worker-cpu:9101/metrics from gateway (${w.split("\n").length} lines)`;
  }

  /**
   * What the k8s manifests' securityContext also asks: our images run as their numeric non-root USER, under an init
   * as PID 1 (`init: true`: signals forwarded, children reaped), and the gateway on a read-only root with a writable /tmp.
   */
  async function processes() {
    const probe = "printf '%s %s ' \"$(id -u)\" \"$(cat /proc/1/comm)\"; touch /tmp/w && echo tmp-rw; touch /app/w 2>/dev/null && echo root-rw || echo root-ro";
    const seen = {};
    for (const [service, uid] of [["gateway", "1000"], ["worker-cpu", "10001"]]) {
      const [got, init, tmp, root] = (await compose("exec", "-T", service, "sh", "-c", probe)).trim().split(/\s+/);
      assert.equal(got, uid, `${service} runs as uid ${got}, not ${uid}`);
      assert.equal(init, "docker-init", `${service}: PID 1 is ${init}, not the init of \`init: true\``);
      assert.equal(tmp, "tmp-rw", `${service}: /tmp is not writable`);
      if (service === "gateway") assert.equal(root, "root-ro", "gateway: the root file system is writable (read_only: true)");
      seen[service] = `uid ${got}, PID 1 ${init}${service === "gateway" ? `, ${root}` : ""}`;
    }
    // Printed, not asserted: what the k8s manifests' memory limits (gateway 1Gi, worker 4Gi on CPU) must hold.
    const ids = (await compose("ps", "-q")).trim().split("\n").filter(Boolean);
    const { stdout: mem } = await execFileP("docker", ["stats", "--no-stream", "--format", "{{.Name}} {{.MemUsage}}", ...ids]);
    return `${Object.entries(seen).map(([k, v]) => `${k}: ${v}`).join("; ")}; memory: ${mem.trim().split("\n").map((l) => l.replace(/ \/ .*/, "")).join(", ")}`;
  }

  /**
   * `docker compose restart worker-cpu` while a stream runs. `graceful` (the default stop timeout): the worker drains,
   * so the stream must finish. Forced (`-t 0`: SIGKILL at once): the gateway must end the stream with an error the SDK
   * raises (worker_lost), never a silent close. Then the restarted worker must make the stack ready and serving again.
   */
  async function restartUnderStream({ graceful }) {
    const s = await client().chat.completions.create({ model: ctx.model, messages: PROMPT, max_tokens: 200, stream: true });
    const it = s[Symbol.asyncIterator]();
    let text = "";
    let finish = null;
    let error = null;
    // The first text: the job runs in the worker now.
    while (!text) {
      const { value, done } = await it.next();
      assert.ok(!done, "the stream ended before any text");
      text += value.choices[0]?.delta?.content ?? "";
    }
    const restarted = compose("restart", ...(graceful ? [] : ["-t", "0"]), "worker-cpu");
    try {
      for (;;) {
        const { value, done } = await it.next();
        if (done) break;
        text += value.choices[0]?.delta?.content ?? "";
        finish = value.choices[0]?.finish_reason ?? finish;
      }
    } catch (err) {
      error = err;
    }
    await restarted;
    let outcome;
    if (graceful) {
      assert.equal(error, null, `graceful restart: the stream failed: ${error?.message}`);
      assert.ok(finish, "graceful restart: the stream ended without a finish_reason (a silent close)");
      outcome = `stream finished (finish_reason ${finish}, ${text.length} chars) while the worker drained`;
    } else {
      assert.ok(error instanceof OpenAI.APIError || finish, `forced restart: the stream closed without an error or a finish_reason`);
      assert.ok(error, `forced restart: the stream finished (${finish}) before the worker was killed: nothing was tested`);
      outcome = `stream ended with ${error.constructor.name} ${error.code ?? ""} (${error.message.slice(0, 80)})`;
    }
    const t = Date.now();
    // The restarted container's own healthcheck first (a killed worker's registration outlives it by a few seconds,
    // so /ready alone could still count the old one), then the gateway's /ready.
    await waitFor(async () => (await health("worker-cpu")) === "healthy", 300_000, "worker-cpu healthy after the restart");
    await waitFor(async () => (await fetch(`${ctx.baseUrl}/ready`).catch(() => null))?.status === 200, 300_000, "/ready after the restart");
    const again = await chat();
    return `${outcome}; ready again after ${((Date.now() - t) / 1000).toFixed(1)} s; then ${again}`;
  }

  return { ready, chat, stream, answeredByWorker, tutorialChat, openapi, metrics, processes, restartUnderStream };
}

/** The sum of a Prometheus counter's samples whose labels include `labels`. */
export function sumMetric(text, name, labels = {}) {
  let sum = 0;
  for (const line of text.split("\n")) {
    const m = new RegExp(`^${name}(?:\\{([^}]*)\\})? (\\S+)$`).exec(line);
    if (!m) continue;
    const have = Object.fromEntries([...(m[1] ?? "").matchAll(/(\w+)="([^"]*)"/g)].map((x) => [x[1], x[2]]));
    if (Object.entries(labels).every(([k, v]) => have[k] === v)) sum += Number(m[2]);
  }
  return sum;
}
