// `npm start`: installs what is missing, then runs Redis (unless REDIS_URL is set), one worker on the bundled model and
// the gateway; prints the base URL, the API key and a line when the model is ready. Ctrl-C stops all of it.
import {
  devKey, ensureNodeDeps, ensureWorkerVenv, fail, freePort, log, portIsFree, startGateway, startRedis, startWorker,
  stopAll, waitReady,
} from "./lib/stack.mjs";

const t0 = Date.now();
const port = Number(process.env.PORT ?? 8000);
if (!Number.isInteger(port) || port < 1 || port > 65535) fail(`PORT must be a port number, got "${process.env.PORT}"`, 2);

let stopping = false;
async function shutdown(code) {
  if (stopping) return;
  stopping = true;
  log("stopping…");
  await stopAll();
  log("stopped.");
  process.exit(code);
}
process.on("SIGINT", () => shutdown(0));
process.on("SIGTERM", () => shutdown(0));

ensureNodeDeps();
ensureWorkerVenv();
if (!(await portIsFree(port))) fail(`port ${port} is in use: stop what runs there or set PORT`, 2);

let redisUrl = process.env.REDIS_URL;
if (!redisUrl) {
  ({ url: redisUrl } = await startRedis(await freePort(), { persist: true }));
  log(`Redis started at ${redisUrl}`);
}

const configuredKeys = process.env.API_KEYS?.trim();
const apiKey = configuredKeys ? null : devKey();
const worker = startWorker({ redisUrl, echo: true });
const gateway = startGateway({ redisUrl, port, apiKeys: configuredKeys || apiKey, echo: true });
for (const c of [worker, gateway]) {
  c.exited.then(({ code, signal }) => {
    if (!stopping) {
      log(`${c.stackName} exited (${code ?? signal}); see ${c.logFile}`);
      shutdown(1);
    }
  });
}

const baseUrl = `http://127.0.0.1:${port}/v1`;
log(`base URL: ${baseUrl}`);
log(apiKey ? `API key (development, generated for this run): ${apiKey}` : "API key: one of the keys in API_KEYS");
log("loading the model… (Ctrl-C stops everything)");
try {
  await waitReady(port, 15 * 60_000, [worker, gateway]);
} catch (err) {
  log(String(err.message ?? err));
  await shutdown(1);
}
if (stopping) await new Promise(() => {}); // shutdown() is under way and exits the process
const model = process.env.DEFAULT_MODEL ?? "smollm2-135m-instruct";
log(`READY: model ${model} is served at ${baseUrl} (${((Date.now() - t0) / 1000).toFixed(1)} s after start)`);
log(`try: curl ${baseUrl}/chat/completions -H "Authorization: Bearer ${apiKey ?? "$API_KEY"}" -H "Content-Type: application/json" ` +
  `-d '{"model":"${model}","messages":[{"role":"user","content":"Hello!"}]}'`);
