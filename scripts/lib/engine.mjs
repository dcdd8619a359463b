// A container engine and the compose CLI for `npm run test:compose`: the ones already there when they answer, otherwise
// installed and started here (root on Debian/Ubuntu: apt's docker.io, dockerd started by hand since such machines often
// have no systemd; compose v2 built from the Go module proxy and cached). Only what this module started is stopped.
import { spawn, spawnSync } from "node:child_process";
import { copyFileSync, cpSync, existsSync, mkdirSync, mkdtempSync, openSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import http from "node:http";
import os from "node:os";
import path from "node:path";
import { waitFor } from "./stack.mjs";

export const log = (msg) => process.stdout.write(`[compose] ${msg}\n`);

/** Reusable downloads and builds (the compose binary, stand-in inputs): survive `git clean` and other checkouts. */
export const CACHE_DIR = path.join(process.env.XDG_CACHE_HOME ?? path.join(os.homedir(), ".cache"), "llm-gateway");
/** Checked with this project (FACTS.md): profiles, service_healthy, merge keys and `up --wait`. */
export const COMPOSE_VERSION = "v5.6.0";
const COMPOSE_MODULE = "github.com/docker/compose/v5";
const DOCKER_SOCKET = "/var/run/docker.sock";
/** The pid of a dockerd a run started, until that run stops it. */
const DOCKERD_PIDFILE = path.join(CACHE_DIR, "dockerd.pid");

export const isRoot = () => process.getuid?.() === 0;
export const which = (cmd) => spawnSync("sh", ["-c", `command -v ${cmd}`], { encoding: "utf8" }).stdout.trim();

/** Runs a command to completion; throws with its output's tail on failure unless `check` is false. */
export function sh(cmd, args, { check = true, quiet = true, env = {}, input, cwd, encoding = "utf8" } = {}) {
  const r = spawnSync(cmd, args, {
    encoding, input, cwd, maxBuffer: 256 * 1024 * 1024,
    stdio: [input === undefined ? "ignore" : "pipe", quiet ? "pipe" : "inherit", quiet ? "pipe" : "inherit"],
    env: { ...process.env, ...env },
  });
  if (check && r.status !== 0) {
    const tail = `${r.stdout ?? ""}${r.stderr ?? ""}`.trim().split("\n").slice(-25).join("\n");
    throw new Error(`${cmd} ${args.join(" ")} exited with ${r.status ?? r.signal}${tail ? `:\n${tail}` : ""}`);
  }
  return r;
}

function ping(socketPath) {
  return new Promise((resolve) => {
    const req = http.get({ socketPath, path: "/_ping", timeout: 2000 }, (res) => {
      res.resume();
      resolve(res.statusCode === 200);
    });
    req.on("error", () => resolve(false));
    req.on("timeout", () => req.destroy());
  });
}

const engineAnswers = () => which("docker") && sh("docker", ["info", "--format", "{{.ServerVersion}}"], { check: false }).status === 0;

function aptInstall(packages) {
  // Installed, not merely known to dpkg (a removed package keeps its config files and a status).
  const installed = (p) => sh("dpkg-query", ["-W", "-f", "${Status}", p], { check: false }).stdout.trim() === "install ok installed";
  const missing = packages.filter((p) => !installed(p));
  if (missing.length === 0) return;
  log(`installing ${missing.join(", ")} with apt-get…`);
  const env = { DEBIAN_FRONTEND: "noninteractive" };
  sh("apt-get", ["update", "-qq"], { env });
  sh("apt-get", ["install", "-y", "-qq", "--no-install-recommends", ...missing], { env });
}

/** Where this machine lets us install and start things ourselves. */
export const canInstall = () => isRoot() && Boolean(which("apt-get")) && Boolean(which("dpkg"));

/** Why no engine can be had here (no running one this user may use, and no root + apt to install one), or null. */
export function whyNoEngine() {
  if (engineAnswers() || canInstall()) return null;
  const why = !which("docker") ? "no docker CLI" : "the docker CLI finds no engine it may use (docker info fails)";
  return `${why}, and installing one needs root and apt-get (this is ${isRoot() ? "root without apt-get" : "not root"})`;
}

/**
 * Makes `docker` answer. Returns {how, version, stop}: `stop` ends dockerd if (and only if) this call started it.
 * Throws `EngineUnavailable` when there is no engine and none can be started here (the caller decides to skip).
 */
export async function ensureEngine({ logDir }) {
  if (engineAnswers()) {
    // A dockerd an earlier run started and could not stop (it was killed): this run stops it, as that one would have.
    const orphan = Number(existsSync(DOCKERD_PIDFILE) ? readFileSync(DOCKERD_PIDFILE, "utf8") : 0);
    if (orphan && running(orphan) && readFileSync(`/proc/${orphan}/comm`, "utf8").trim() === "dockerd") {
      return { how: `left running by an earlier run (pid ${orphan}): stopped at the end`, version: serverVersion(), stop: () => stopDockerd(orphan, null) };
    }
    return { how: "already running", version: serverVersion(), stop: async () => {} };
  }
  const why = whyNoEngine();
  if (why) throw new EngineUnavailable(why);
  aptInstall(["docker.io", "iptables", "ca-certificates"]);
  if (existsSync(DOCKER_SOCKET) && (await ping(DOCKER_SOCKET))) {
    return { how: "already running (found after install)", version: serverVersion(), stop: async () => {} };
  }
  const dockerd = which("dockerd") || "/usr/sbin/dockerd";
  mkdirSync(logDir, { recursive: true });
  const logFile = path.join(logDir, "dockerd.log");
  const fd = openSync(logFile, "w");
  // Its own session (detached): a Ctrl-C meant for this script reaches dockerd only through stop().
  // DOCKERD_DATA_ROOT: another image store, e.g. to measure a cold run without losing the cached layers.
  const dataRoot = process.env.DOCKERD_DATA_ROOT || "/var/lib/docker";
  const child = spawn(dockerd, ["--data-root", dataRoot], { detached: true, stdio: ["ignore", fd, fd] });
  const exited = new Promise((resolve) => {
    child.on("exit", (code, signal) => resolve(code ?? signal));
    child.on("error", (err) => resolve(err.message));
  });
  let gone = null;
  exited.then((v) => (gone = v));
  try {
    await waitFor(async () => {
      if (gone !== null) throw new Error(`dockerd exited (${gone}); see ${logFile}`);
      return ping(DOCKER_SOCKET);
    }, 60_000, "dockerd");
  } catch (err) {
    try { process.kill(child.pid, "SIGKILL"); } catch {}
    throw err;
  }
  mkdirSync(CACHE_DIR, { recursive: true });
  writeFileSync(DOCKERD_PIDFILE, String(child.pid));
  const stop = async () => (gone === null ? stopDockerd(child.pid, exited) : rmSync(DOCKERD_PIDFILE, { force: true }));
  return { how: `started here (pid ${child.pid}, data root ${dataRoot}, log ${logFile})`, version: serverVersion(), stop };
}

export class EngineUnavailable extends Error {}

/** SIGTERM (dockerd stops its containers and its containerd), SIGKILL after 30 s; `exited` when it is our child. */
async function stopDockerd(pid, exited) {
  log(`stopping the dockerd this run started (pid ${pid})…`);
  process.kill(pid, "SIGTERM");
  const gone = exited ?? waitFor(() => !running(pid), 60_000, "dockerd to exit").catch(() => undefined);
  const done = await Promise.race([gone.then(() => !running(pid)), new Promise((r) => setTimeout(() => r(false), 30_000))]);
  if (!done && running(pid)) {
    process.kill(pid, "SIGKILL");
    await (exited ?? waitFor(() => !running(pid), 10_000, "dockerd to die"));
  }
  rmSync(DOCKERD_PIDFILE, { force: true });
}

function serverVersion() {
  return sh("docker", ["version", "--format", "{{.Server.Version}} (API {{.Server.APIVersion}})"], { check: false }).stdout.trim();
}

/**
 * The compose v2 CLI as an argv prefix: `docker compose` when the plugin is installed, else our cached build of
 * COMPOSE_VERSION (a compose plugin binary also runs on its own), built with Go from the module proxy when missing.
 */
export function ensureCompose() {
  if (sh("docker", ["compose", "version", "--short"], { check: false }).status === 0) {
    return { argv: ["docker", "compose"], how: `docker compose plugin ${sh("docker", ["compose", "version", "--short"]).stdout.trim()}` };
  }
  const bin = path.join(CACHE_DIR, `docker-compose-${COMPOSE_VERSION}`);
  if (existsSync(bin) && statSync(bin).size > 0) return { argv: [bin], how: `cached ${bin}` };
  const go = which("go") || (existsSync("/usr/local/go/bin/go") ? "/usr/local/go/bin/go" : "");
  if (!go) {
    throw new EngineUnavailable(
      "no compose v2 CLI (`docker compose`), and no Go toolchain to build one: install the docker-compose-plugin package",
    );
  }
  log(`building compose ${COMPOSE_VERSION} from the Go module proxy (a few minutes, once: cached as ${bin})…`);
  const t = Date.now();
  // `go install …@version` is refused (its go.mod has exclude directives): download the module, build in a copy.
  const mod = JSON.parse(sh(go, ["mod", "download", "-json", `${COMPOSE_MODULE}@${COMPOSE_VERSION}`]).stdout);
  const work = mkdtempSync(path.join(os.tmpdir(), "compose-src-"));
  try {
    cpSync(mod.Dir, work, { recursive: true });
    sh("chmod", ["-R", "u+w", work]);
    mkdirSync(CACHE_DIR, { recursive: true });
    const out = `${bin}.partial`;
    sh(go, ["build", "-trimpath", "-ldflags", `-s -w -X ${COMPOSE_MODULE}/internal.Version=${COMPOSE_VERSION}`, "-o", out, "./cmd"],
      { cwd: work, env: { GOFLAGS: "-buildvcs=false" } });
    copyFileSync(out, bin);
    rmSync(out);
    sh("chmod", ["+x", bin]);
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
  log(`compose built in ${((Date.now() - t) / 1000).toFixed(0)} s`);
  return { argv: [bin], how: `built here from the Go module proxy, cached as ${bin}` };
}

/**
 * One test:compose run at a time on a machine: runs share the engine (one may have started it and would stop it
 * under the other) and the image names. A lock directory holding the owner's pid; a dead owner's lock is taken over.
 */
export async function takeLock() {
  const dir = path.join(CACHE_DIR, "test-compose.lock");
  mkdirSync(CACHE_DIR, { recursive: true });
  let said = false;
  await waitFor(() => {
    try {
      mkdirSync(dir);
      writeFileSync(path.join(dir, "pid"), String(process.pid));
      return true;
    } catch {
      const owner = Number(readFileSync(path.join(dir, "pid"), { encoding: "utf8", flag: "a+" }) || 0);
      // No pid yet: its owner is between mkdir and write, unless that was long ago (a crash in between).
      const stale = owner ? !alive(owner) : Date.now() - statSync(dir).mtimeMs > 10_000;
      if (stale) {
        rmSync(dir, { recursive: true, force: true });
        return false;
      }
      if (!said && owner) log(`another test:compose run (pid ${owner}) holds ${dir}: waiting for it`);
      said ||= Boolean(owner);
      return false;
    }
  }, 60 * 60_000, "the test:compose lock");
  return () => rmSync(dir, { recursive: true, force: true });
}

/** Alive and not a zombie (a dockerd re-parented to an init that does not reap would stay one). */
function running(pid) {
  if (!alive(pid)) return false;
  try {
    return !/^\d+ \(.*\) Z/.test(readFileSync(`/proc/${pid}/stat`, "utf8"));
  } catch {
    return false;
  }
}

function alive(pid) {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return err.code === "EPERM";
  }
}
