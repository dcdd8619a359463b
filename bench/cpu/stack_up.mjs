// Starts our stack for a benchmark — a fresh Redis, one worker, the gateway, all on free ports — with the same helpers
// and commands `npm start` uses (scripts/lib/stack.mjs), then prints one JSON line {baseUrl, apiKey, redisUrl, …} and
// stays up until SIGTERM/SIGINT, when it stops everything it started. Extra worker settings come from the environment
// (e.g. ENGINE=standin MAX_BATCH=256 for the stand-in runs). Logs: .run/bench-worker.log, .run/bench-gateway.log.
import {
  devKey, ensureNodeDeps, freePort, ROOT, startChild, startGateway, startRedis, startWorker, stopAll, VENV_PYTHON, waitReady,
} from "../../scripts/lib/stack.mjs";
import path from "node:path";

let stopping = false;
async function shutdown(code) {
  if (stopping) return new Promise(() => {}); // the first caller exits the process
  stopping = true;
  await stopAll(5_000);
  process.exit(code);
}
process.on("SIGINT", () => shutdown(0));
process.on("SIGTERM", () => shutdown(0));

ensureNodeDeps();
const t0 = Date.now();
const { url: redisUrl } = await startRedis(await freePort());
const port = await freePort();
const apiKey = devKey();
const workerEnv = { METRICS_PORT: String(await freePort()) };
// BENCH_STANDIN_SHIM=1: run the worker through bench/cpu/standin_worker.py, which selects the stand-in engine without
// the worker's factory knowing ENGINE=standin (used only until that one line exists in llm_worker/engine/__init__.py).
const worker = process.env.BENCH_STANDIN_SHIM === "1"
  ? startChild("bench-worker", VENV_PYTHON, [path.join(ROOT, "bench/cpu/standin_worker.py")], {
      env: { REDIS_URL: redisUrl, PYTHONUNBUFFERED: "1", ...workerEnv },
    })
  : startWorker({ redisUrl, env: workerEnv, name: "bench-worker" });
const gateway = startGateway({ redisUrl, port, apiKeys: apiKey, name: "bench-gateway" });
for (const c of [worker, gateway]) {
  c.exited.then(({ code, signal }) => {
    if (!stopping) {
      process.stderr.write(`[stack_up] ${c.stackName} exited (${code ?? signal}); see ${c.logFile}\n`);
      shutdown(3);
    }
  });
}
try {
  await waitReady(port, 10 * 60_000, [worker, gateway]);
} catch (err) {
  process.stderr.write(`[stack_up] ${err.message ?? err}\n`);
  await shutdown(3);
}
const info = {
  baseUrl: `http://127.0.0.1:${port}/v1`, apiKey, redisUrl, workerPid: worker.pid, gatewayPid: gateway.pid,
  workerLog: worker.logFile, gatewayLog: gateway.logFile, readySeconds: (Date.now() - t0) / 1000,
};
process.stdout.write(`STACK ${JSON.stringify(info)}\n`);
