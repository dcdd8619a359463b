// Gateway processes of our own on the stack's Redis and worker (the e2e governance/tutorial suites start them to get
// two replicas, or a configuration of their own). Real processes: `tsx gateway/src/main.ts`, as `npm start` runs it.
import { type ChildProcess, spawn } from "node:child_process";
import { createServer } from "node:net";
import path from "node:path";
import { stack, waitFor } from "./helpers";

const ROOT = path.resolve(__dirname, "../..");

export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.on("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const addr = srv.address();
      const port = typeof addr === "object" && addr ? addr.port : 0;
      srv.close(() => resolve(port));
    });
  });
}

export interface GatewayProcess {
  url: string;
  child: ChildProcess;
  output: () => string;
  stop(): Promise<void>;
}

export async function startGatewayProcess(env: Record<string, string>): Promise<GatewayProcess> {
  const port = await freePort();
  const child = spawn(process.execPath, [path.join(ROOT, "node_modules/tsx/dist/cli.mjs"), "gateway/src/main.ts"], {
    cwd: ROOT,
    env: {
      ...process.env,
      REDIS_URL: stack.redisUrl,
      DEFAULT_MODEL: stack.model,
      PORT: String(port),
      LOG_LEVEL: "warn",
      METRICS_PORT: String(await freePort()),
      // The suites' deliberate 401s all come from 127.0.0.1 and the failure count is shared in Redis: out of the way
      // here (the limit's own tests: gateway/test/tenancy.test.ts).
      AUTH_FAILURE_LIMIT: "100000",
      ...env,
    },
    stdio: ["ignore", "pipe", "pipe"],
  });
  let out = "";
  child.stdout!.on("data", (b) => (out += b));
  child.stderr!.on("data", (b) => (out += b));
  const url = `http://127.0.0.1:${port}`;
  // Ready: listening, and it sees Redis and a live worker. The deadline only bounds a hang: tsx compiling the gateway
  // on a loaded machine, two at once, takes a while.
  await waitFor(async () => {
    if (child.exitCode !== null || child.signalCode !== null) throw new Error(`gateway exited (${child.exitCode ?? child.signalCode})`);
    return (await fetch(`${url}/ready`).catch(() => null))?.status === 200;
  }, 180_000, `gateway ${url} to be ready`).catch((err: Error) => {
    child.kill("SIGKILL");
    throw new Error(`${err.message}; its output: ${out}`);
  });
  return {
    url,
    child,
    output: () => out,
    async stop() {
      if (child.exitCode !== null) return;
      const exited = new Promise((r) => child.once("exit", r));
      child.kill("SIGTERM");
      await Promise.race([exited, new Promise((r) => setTimeout(r, 10_000))]);
      if (child.exitCode === null) child.kill("SIGKILL");
    },
  };
}
