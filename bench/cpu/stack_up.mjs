// Starts our stack for a benchmark — a fresh Redis, one worker, the gateway, all on free ports — with the same helpers
// and commands `npm start` uses (scripts/lib/stack.mjs), then prints one JSON line {baseUrl, apiKey, redisUrl, …} and
// stays up until SIGTERM/SIGINT, when it stops everything it started. Extra worker settings come from the environment
// (e.g. ENGINE=standin MAX_BATCH=256 for the stand-in runs). Logs: .run/bench-worker.log, .run/bench-gateway.log.
import {
  devKey, ensureNodeDeps, freePort, startGateway, startRedis, startWorker, stopAll, waitReady,
} from "../../scripts/lib/stack.mjs";

let stopping = false;
async function shutdown(code) {
  if (stopping) return;
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
const worker = startWorker({ redisUrl, env: workerEnv, name: "bench-worker" });
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
