// `npm test`: installs what is missing, starts its own Redis, one real worker on the bundled model and the gateway, then
// runs every suite against them — TypeScript (jest: gateway unit tests + end-to-end tests with the openai Node SDK),
// Python (pytest: worker unit tests, end-to-end tests with the openai Python SDK, deployment-file validation) — and stops
// everything. Then the reliability suite, short form (scripts/test-reliability.mjs --short), and the stack in containers,
// short form (scripts/test-compose.mjs --short). Extra arguments are passed
// to jest (e.g. `npm test -- -t stream`).
import { spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import path from "node:path";
import {
  ROOT, VENV_PYTHON, devKey, ensureNodeDeps, ensureWorkerVenv, freePort, log, startGateway, startRedis, startWorker,
  stopAll, waitReady,
} from "./lib/stack.mjs";

const t0 = Date.now();
const secs = (t) => `${((Date.now() - t) / 1000).toFixed(1)} s`;
const results = [];

/** `skipStatus`: the exit status with which the command says it skipped (reported, not a failure). */
function step(name, cmd, args, env = {}, { skipStatus } = {}) {
  const t = Date.now();
  log(`▶ ${name}`);
  const r = spawnSync(cmd, args, { cwd: ROOT, stdio: "inherit", env: { ...process.env, ...env } });
  const skipped = skipStatus !== undefined && r.status === skipStatus;
  const ok = r.status === 0 || skipped;
  results.push({ name: skipped ? `${name}: SKIPPED (see above)` : name, ok, skipped, time: secs(t) });
  log(`${skipped ? "-" : ok ? "✔" : "✘"} ${name} (${secs(t)})${skipped ? " SKIPPED" : ""}`);
  return ok;
}

for (const sig of ["SIGINT", "SIGTERM"]) {
  process.on(sig, async () => {
    await stopAll(3000);
    process.exit(130);
  });
}

let t = Date.now();
ensureNodeDeps();
ensureWorkerVenv({ withTestDeps: true });
const deployTools = path.join(ROOT, "tests/deploy/ensure_tools.sh");
if (existsSync(deployTools)) step("deployment test tools", "bash", [deployTools]);
const chromium = path.join(ROOT, "tests/e2e/ensure_chromium.sh");
if (existsSync(chromium)) step("chromium for the /docs test", "bash", [chromium]);
log(`installs checked (${secs(t)})`);

step("typecheck (tsc --noEmit)", process.execPath, [path.join(ROOT, "node_modules/typescript/bin/tsc"), "-p", "tsconfig.json", "--noEmit"]);

t = Date.now();
const { url: redisUrl } = await startRedis(await freePort());
const gatewayPort = await freePort();
const apiKey = devKey();
// Two workers would halve the CPU each gets on a 2-core machine; one real worker serves the suites, and the tests
// that need more (kill -9, failover) start their own.
const workerMetricsPort = await freePort();
const worker = startWorker({ redisUrl, env: { MAX_BATCH: "16", METRICS_PORT: String(workerMetricsPort) } });
// The suites send many deliberate 401s from one address within a minute; the per-address limit on failed
// authentication has tests of its own (gateway/test/tenancy.test.ts), so here it is set out of their way. A dropped
// stream's job goes on for RESUME_GRACE_MS before it is cancelled (README "Resumable streams"): 1 s here, so that the
// suites that drop streams on purpose do not leave the one worker busy for the default 30 s.
const gateway = startGateway({
  redisUrl, port: gatewayPort, apiKeys: apiKey, env: { LOG_LEVEL: "warn", AUTH_FAILURE_LIMIT: "100000", RESUME_GRACE_MS: "1000" },
});
let stackOk = true;
try {
  await waitReady(gatewayPort, 10 * 60_000, [worker, gateway]);
  log(`stack ready in ${secs(t)} (worker log: .run/worker.log, gateway log: .run/gateway.log)`);
} catch (err) {
  log(`stack failed to start: ${err.message}`);
  stackOk = false;
  results.push({ name: "start the stack", ok: false, time: secs(t) });
}

if (stackOk) {
  const env = {
    STACK_BASE_URL: `http://127.0.0.1:${gatewayPort}`,
    STACK_API_KEY: apiKey,
    STACK_REDIS_URL: redisUrl,
    STACK_MODEL: "smollm2-135m-instruct",
    STACK_PYTHON: VENV_PYTHON,
    STACK_WORKER_METRICS_URL: `http://127.0.0.1:${workerMetricsPort}`,
  };
  step("jest: gateway unit tests + end-to-end (openai Node SDK)", process.execPath,
    // --forceExit: a client library's idle timers (BullMQ/ioredis reconnect timers of connections the suites already
    // closed) can keep jest's process alive after the last test; without it a green run could hang CI.
    [path.join(ROOT, "node_modules/jest/bin/jest.js"), "--selectProjects", "gateway", "e2e", "--runInBand", "--forceExit", ...process.argv.slice(2)], env);
  // One pytest process per suite: each folder has its own conftest.py.
  for (const suite of ["worker-py/tests", "tests/e2e_py", "tests/deploy"]) {
    if (existsSync(path.join(ROOT, suite))) step(`pytest ${suite}`, VENV_PYTHON, ["-m", "pytest", "-q", "-p", "no:cacheprovider", suite], env);
  }
}

await stopAll();

// The stack on a 3-master Redis Cluster, short form (scripts/test-cluster.mjs --short: the cluster's own tests and the
// chat suite; `npm run test:cluster` runs resume and governance there too), after the shared stack is gone.
step("redis cluster, short form (scripts/test-cluster.mjs --short)", process.execPath, [path.join(ROOT, "scripts/test-cluster.mjs"), "--short"]);

// The reliability suite, short form (scripts/test-reliability.mjs --short): its own stacks, after the shared one is gone.
step("reliability suite, short form (scripts/test-reliability.mjs --short)", process.execPath,
  [path.join(ROOT, "scripts/test-reliability.mjs"), "--short"]);

// After the local stack is gone, so the two do not share the CPUs. It builds the images from docker/*.Dockerfile (cached
// between runs), runs `docker compose --profile cpu up --wait`, one chat through the published port, and `down -v`;
// it installs and starts an engine where it may (root on Debian/Ubuntu), and skips only where none can be started.
step("docker compose: images, up --wait, one chat, down (scripts/test-compose.mjs --short)", process.execPath,
  [path.join(ROOT, "scripts/test-compose.mjs"), "--short"], {}, { skipStatus: 3 });

log("summary:");
for (const r of results) log(`  ${r.skipped ? "-" : r.ok ? "✔" : "✘"} ${r.name} (${r.time})`);
const ok = results.every((r) => r.ok);
log(`${ok ? "all passed" : "FAILED"} in ${secs(t0)}`);
process.exit(ok ? 0 : 1);
