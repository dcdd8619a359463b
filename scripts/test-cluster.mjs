// `npm run test:cluster`: the stack on a Redis Cluster. Starts a 3-master cluster on loopback (scripts/lib/redis-cluster.mjs),
// one real worker on the bundled model and the gateway, both with REDIS_URL=redis+cluster://… (the one setting that
// selects a cluster: docs/DEPLOY.md, Redis Cluster), then runs against them the cluster's own tests (tests/cluster:
// sharded pub/sub, one slot per script) and the end-to-end suites that use Redis the most: chat (openai SDK, stream and
// not), resume (dropped streams, cancel when nobody resumes, a gateway killed), governance (shared rate limits, key
// revocation, the response cache). `--short` (inside `npm test`): the cluster's own tests and the chat suite only.
// Extra arguments go to jest.
import { spawnSync } from "node:child_process";
import path from "node:path";
import { clusterErrorStats, clusterFailedCalls, grownCounts, startRedisCluster } from "./lib/redis-cluster.mjs";
import {
  ROOT, VENV_PYTHON, devKey, ensureNodeDeps, ensureWorkerVenv, freePort, log, startGateway, startWorker, stopAll, waitReady,
} from "./lib/stack.mjs";

const short = process.argv.includes("--short");
const jestArgs = process.argv.slice(2).filter((a) => a !== "--short");
const t0 = Date.now();
const secs = (t) => `${((Date.now() - t) / 1000).toFixed(1)} s`;

for (const sig of ["SIGINT", "SIGTERM"]) {
  process.on(sig, async () => {
    await stopAll(3000);
    process.exit(130);
  });
}

ensureNodeDeps();
ensureWorkerVenv({ withTestDeps: true });
let status = 1;
try {
  const cluster = await startRedisCluster();
  log(`redis cluster ready: ${cluster.url} (${secs(t0)})`);
  const gatewayPort = await freePort();
  const apiKey = devKey();
  const workerMetricsPort = await freePort();
  // As scripts/test.mjs: one worker, the per-address failed-auth limit out of the suites' way, a 1 s resume grace.
  const worker = startWorker({ redisUrl: cluster.url, name: "cluster-worker", env: { MAX_BATCH: "16", METRICS_PORT: String(workerMetricsPort) } });
  const gateway = startGateway({
    redisUrl: cluster.url, port: gatewayPort, apiKeys: apiKey, name: "cluster-gateway",
    env: { LOG_LEVEL: "warn", AUTH_FAILURE_LIMIT: "100000", RESUME_GRACE_MS: "1000" },
  });
  await waitReady(gatewayPort, 10 * 60_000, [worker, gateway]);
  log(`stack on the cluster ready in ${secs(t0)} (logs: .run/cluster-worker.log, .run/cluster-gateway.log)`);
  const errorsBefore = clusterErrorStats(cluster.ports);
  const failedBefore = clusterFailedCalls(cluster.ports);
  const suites = short
    ? ["tests/cluster", "tests/e2e/chat.test.ts"]
    : ["tests/cluster", "tests/e2e/chat.test.ts", "tests/e2e/resume.test.ts", "tests/e2e/governance.test.ts"];
  const r = spawnSync(process.execPath, [
    path.join(ROOT, "node_modules/jest/bin/jest.js"), "--selectProjects", "cluster", "e2e", "--runInBand", "--forceExit", ...jestArgs, ...suites,
  ], {
    cwd: ROOT, stdio: "inherit",
    env: {
      ...process.env,
      STACK_BASE_URL: `http://127.0.0.1:${gatewayPort}`, STACK_API_KEY: apiKey, STACK_REDIS_URL: cluster.url,
      STACK_MODEL: "smollm2-135m-instruct", STACK_PYTHON: VENV_PYTHON, STACK_WORKER_METRICS_URL: `http://127.0.0.1:${workerMetricsPort}`,
    },
  });
  status = r.status ?? 1;
  // Every script and multi-key command the suites drove through the gateway and the worker, checked at once: a
  // CROSSSLOT reply anywhere means keys that do not share a slot. tests/cluster provokes exactly one on purpose (and
  // checks it sees it); extra jest arguments may leave that test out, so then the count is only printed. The other
  // error replies are printed for information: on Redis 7.0 each redis-py connection's CLIENT SETINFO (7.2+) is an
  // ERR, and a script's first EVALSHA a NOSCRIPT.
  const delta = grownCounts(errorsBefore, clusterErrorStats(cluster.ports));
  const crossslot = delta.CROSSSLOT ?? 0;
  const failed = grownCounts(failedBefore, clusterFailedCalls(cluster.ports));
  log(`error replies from the cluster during the suites: ${JSON.stringify(delta)}; by command: ${JSON.stringify(failed)}`);
  if (jestArgs.length === 0 && crossslot !== 1) {
    log(`✘ ${crossslot} CROSSSLOT replies, expected exactly the 1 tests/cluster provokes: a script or command sent keys in several slots`);
    status ||= 1;
  }
} catch (err) {
  log(`cluster stack failed: ${err.message}`);
} finally {
  await stopAll(3000);
}
log(`${status === 0 ? "cluster tests passed" : "cluster tests FAILED"} in ${secs(t0)}`);
process.exit(status);
