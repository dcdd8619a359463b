// Starting and stopping the whole system (Redis, worker, gateway) for `npm start` and `npm test`.
// Plain Node ESM on purpose: it must run before `npm ci` has installed anything.
import { spawn, spawnSync } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { existsSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import net from "node:net";
import path from "node:path";
import { fileURLToPath } from "node:url";

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
export const RUN_DIR = path.join(ROOT, ".run");
export const VENV_PYTHON = path.join(ROOT, "worker-py/.venv/bin/python");

const children = [];

export function log(msg) {
  process.stdout.write(`[stack] ${msg}\n`);
}

export function fail(msg, code = 1) {
  process.stderr.write(`[stack] ERROR: ${msg}\n`);
  process.exit(code);
}

function run(cmd, args, opts = {}) {
  const r = spawnSync(cmd, args, { stdio: "inherit", cwd: ROOT, ...opts });
  if (r.status !== 0) fail(`${cmd} ${args.join(" ")} exited with ${r.status ?? r.signal}`);
}

function hashFiles(files) {
  const h = createHash("sha256");
  for (const f of files) h.update(existsSync(f) ? readFileSync(f) : "");
  return h.digest("hex");
}

/** `npm ci` when node_modules is missing or package-lock.json changed since the last install. */
export function ensureNodeDeps() {
  const stamp = path.join(ROOT, "node_modules/.stack-stamp");
  const want = hashFiles([path.join(ROOT, "package-lock.json")]);
  if (existsSync(stamp) && readFileSync(stamp, "utf8") === want) return;
  log("installing npm packages (npm ci)…");
  run("npm", ["ci", "--no-audit", "--no-fund"]);
  writeFileSync(stamp, want);
}

/** The worker's virtual environment (pinned requirements + the bundled model), and the Python test packages. */
export function ensureWorkerVenv({ withTestDeps = false } = {}) {
  run("bash", [path.join(ROOT, "worker-py/scripts/ensure_venv.sh")]);
  if (!withTestDeps) return;
  const req = path.join(ROOT, "tests/requirements.txt");
  const stamp = path.join(ROOT, "worker-py/.venv/.tests-stamp");
  const want = hashFiles([req]);
  if (existsSync(stamp) && readFileSync(stamp, "utf8") === want) return;
  log("installing Python test packages…");
  run(VENV_PYTHON, ["-m", "pip", "install", "-q", "-r", req]);
  writeFileSync(stamp, want);
}

function which(cmd) {
  return spawnSync("sh", ["-c", `command -v ${cmd}`], { encoding: "utf8" }).stdout.trim();
}

/** redis-server from PATH; installed through apt-get when absent and we are root. */
export function ensureRedisServer() {
  let bin = which("redis-server");
  if (bin) return bin;
  const isRoot = process.getuid?.() === 0;
  if (isRoot && which("apt-get")) {
    log("redis-server not found: installing it with apt-get…");
    run("apt-get", ["update", "-qq"]);
    run("apt-get", ["install", "-y", "-qq", "redis-server"], { env: { ...process.env, DEBIAN_FRONTEND: "noninteractive" } });
    bin = which("redis-server");
    if (bin) return bin;
  }
  fail(
    "redis-server (Redis ≥ 6.2) is needed and was not found. Install it (Debian/Ubuntu: `sudo apt-get install redis-server`, " +
      "macOS: `brew install redis`), or point REDIS_URL at a Redis you run (maxmemory-policy noeviction).",
  );
}

export function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

export function portIsFree(port) {
  return new Promise((resolve) => {
    const srv = net.createServer();
    srv.once("error", () => resolve(false));
    srv.listen(port, "0.0.0.0", () => srv.close(() => resolve(true)));
  });
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/**
 * Spawns a long-running child in its own process group, so that stopAll() can end it and everything it started.
 * Output goes to the given log file, or is prefixed and mirrored to ours when `echo` is set.
 */
export function startChild(name, cmd, args, { env = {}, echo = false, logFile } = {}) {
  mkdirSync(RUN_DIR, { recursive: true });
  const child = spawn(cmd, args, {
    cwd: ROOT,
    env: { ...process.env, ...env },
    detached: true,
    stdio: ["ignore", "pipe", "pipe"],
  });
  const file = logFile ?? path.join(RUN_DIR, `${name}.log`);
  writeFileSync(file, "");
  const sink = (buf) => {
    writeFileSync(file, buf, { flag: "a" });
    if (echo) for (const line of buf.toString().split("\n")) if (line) process.stdout.write(`[${name}] ${line}\n`);
  };
  child.stdout.on("data", sink);
  child.stderr.on("data", sink);
  child.stackName = name;
  child.logFile = file;
  child.exited = new Promise((resolve) => child.on("exit", (code, signal) => resolve({ code, signal })));
  children.push(child);
  return child;
}

/**
 * A local Redis (BullMQ requires noeviction). `persist`: an append-only file in .run/redis-data, so that `npm start`
 * keeps its stored API keys and queued jobs across restarts; the tests' Redis keeps nothing on disk.
 */
export async function startRedis(port, { persist = false } = {}) {
  const bin = ensureRedisServer();
  const dir = persist ? path.join(RUN_DIR, "redis-data") : path.join(RUN_DIR, `redis-${port}`);
  mkdirSync(dir, { recursive: true });
  const persistence = persist ? ["--appendonly", "yes", "--appendfsync", "everysec", "--save", ""] : ["--save", "", "--appendonly", "no"];
  const child = startChild("redis", bin, [
    "--port", String(port), "--bind", "127.0.0.1", ...persistence, "--maxmemory-policy", "noeviction", "--dir", dir,
  ]);
  await waitFor(async () => (await redisPing(port)) || (child.exitCode !== null && fail("redis-server exited; see .run/redis.log")), 10_000, "Redis");
  return { child, url: `redis://127.0.0.1:${port}` };
}

function redisPing(port) {
  return new Promise((resolve) => {
    const sock = net.connect(port, "127.0.0.1");
    sock.setTimeout(500);
    sock.on("connect", () => sock.write("PING\r\n"));
    sock.on("data", (d) => {
      resolve(d.toString().startsWith("+PONG"));
      sock.destroy();
    });
    sock.on("error", () => resolve(false));
    sock.on("timeout", () => {
      resolve(false);
      sock.destroy();
    });
  });
}

export async function waitFor(check, timeoutMs, what) {
  const t0 = Date.now();
  while (Date.now() - t0 < timeoutMs) {
    if (await check()) return Date.now() - t0;
    await sleep(200);
  }
  throw new Error(`${what} not ready after ${timeoutMs} ms`);
}

export function startWorker({ redisUrl, env = {}, name = "worker", echo = false }) {
  return startChild(name, VENV_PYTHON, ["-m", "llm_worker"], {
    env: { REDIS_URL: redisUrl, PYTHONUNBUFFERED: "1", ...env },
    echo,
  });
}

export function startGateway({ redisUrl, port, apiKeys, env = {}, echo = false, name = "gateway" }) {
  return startChild(name, process.execPath, [path.join(ROOT, "node_modules/tsx/dist/cli.mjs"), "gateway/src/main.ts"], {
    env: { REDIS_URL: redisUrl, PORT: String(port), API_KEYS: apiKeys, ...env },
    echo,
  });
}

/** Waits until GET /ready answers 200: Redis reachable and a live worker serves the default model. */
export async function waitReady(port, timeoutMs, watched = []) {
  return waitFor(async () => {
    for (const c of watched) if (c.exitCode !== null) throw new Error(`${c.stackName} exited (code ${c.exitCode}); see ${c.logFile}`);
    try {
      const r = await fetch(`http://127.0.0.1:${port}/ready`);
      return r.status === 200;
    } catch {
      return false;
    }
  }, timeoutMs, "the stack");
}

export function devKey() {
  return `sk-dev-${randomBytes(18).toString("base64url")}`;
}

/** SIGTERM to every child's process group (newest first), SIGKILL after `graceMs`. */
export async function stopAll(graceMs = 10_000) {
  for (const c of [...children].reverse()) {
    if (c.exitCode !== null || c.signalCode !== null) continue;
    try {
      process.kill(-c.pid, "SIGTERM");
    } catch {}
    const done = await Promise.race([c.exited.then(() => true), sleep(graceMs).then(() => false)]);
    if (!done) {
      try {
        process.kill(-c.pid, "SIGKILL");
      } catch {}
      await c.exited;
    }
  }
}
