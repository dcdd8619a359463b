// `npm run test:compose`: the stack as `docker compose` runs it, for real. Makes sure an engine and the compose CLI are
// there (lib/engine.mjs), provides the base images (pulled, or stand-ins built locally where the registry cannot be
// reached: lib/standins.mjs), builds the gateway and worker images from docker/*.Dockerfile, runs
// `docker compose --profile cpu up -d --wait`, checks it through the published port and from inside the compose network
// (lib/compose-checks.mjs), restarts the worker under a running stream, and ends with `docker compose down -v`.
//   --short    what `npm test` runs: images built, up --wait, one chat, down
//   --no-cuda  skip the CUDA worker image's build check (the full form builds it on a stand-in base when it must)
// Exit status 0 passed, 1 failed, 3 skipped (no engine can be started here: not root and no docker).
import { spawnSync } from "node:child_process";
import { closeSync, mkdirSync, mkdtempSync, openSync, readFileSync, rmSync, statfsSync, writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { checks } from "./lib/compose-checks.mjs";
import { EngineUnavailable, ensureCompose, ensureEngine, log, sh, takeLock, whyNoEngine } from "./lib/engine.mjs";
import { dockerBuildEnv, ensureBaseImages, human, imageSize } from "./lib/standins.mjs";
import { ROOT, RUN_DIR, devKey, freePort, waitFor } from "./lib/stack.mjs";

const args = new Set(process.argv.slice(2));
const SHORT = args.has("--short");
const CUDA = !SHORT && !args.has("--no-cuda");
// Not the file's own `llm-stack`: a user's deployment on this machine (and its redis-data volume) is left alone.
const PROJECT = "llm-stack-test";
const MODEL = "smollm2-135m-instruct";
const TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu";

const t0 = Date.now();
const secs = (t) => `${((Date.now() - t) / 1000).toFixed(1)} s`;
const results = [];
const cleanups = [];

async function step(name, fn) {
  const t = Date.now();
  log(`▶ ${name}`);
  try {
    const detail = await fn();
    results.push({ name, ok: true, time: secs(t), detail });
    log(`✔ ${name} (${secs(t)})${detail ? `: ${detail}` : ""}`);
    return true;
  } catch (err) {
    results.push({ name, ok: false, time: secs(t), detail: err.message.split("\n")[0] });
    log(`✘ ${name} (${secs(t)}): ${err.message}`);
    return false;
  }
}

async function finish(code) {
  for (const c of cleanups.reverse()) {
    try {
      await c();
    } catch (err) {
      log(`clean-up: ${err.message}`);
      code ||= 1;
    }
  }
  log("summary:");
  for (const r of results) log(`  ${r.ok ? "✔" : "✘"} ${r.name} (${r.time})${r.detail ? `: ${r.detail}` : ""}`);
  const ok = code === 0 && results.every((r) => r.ok);
  log(`${ok ? "passed" : "FAILED"} in ${secs(t0)}`);
  process.exit(ok ? 0 : code || 1);
}
for (const sig of ["SIGINT", "SIGTERM"]) process.on(sig, () => finish(130));

function banner(lines) {
  const width = Math.max(...lines.map((l) => l.length));
  const bar = "!".repeat(width + 4);
  log(bar);
  for (const l of lines) log(`! ${l.padEnd(width)} !`);
  log(bar);
}

/** The default of `ARG NAME=…` in a Dockerfile: the base image it builds on unless told otherwise. */
function argDefault(dockerfile, name) {
  const m = new RegExp(`^ARG ${name}=(\\S+)`, "m").exec(readFileSync(path.join(ROOT, dockerfile), "utf8"));
  if (!m) throw new Error(`${dockerfile} has no ARG ${name}=…`);
  return m[1];
}

/** Free bytes on the engine's data root, where images are written. */
function engineFreeBytes() {
  const root = sh("docker", ["info", "--format", "{{.DockerRootDir}}"]).stdout.trim();
  const fs = statfsSync(root);
  return { root, free: fs.bavail * fs.bsize };
}

/**
 * Removes the dangling images our own Dockerfiles left (every stage carries the label io.llm-gateway.image): each
 * rebuild after a code change leaves the previous build's images untagged, and a machine that runs this test after
 * every commit would otherwise fill its disk. Images without the label, a user's own, are never touched.
 */
function pruneOurDanglingImages() {
  const r = sh("docker", ["image", "prune", "--force", "--filter", "label=io.llm-gateway.image"]);
  return /Total reclaimed space: (.*)/.exec(r.stdout)?.[1]?.trim() ?? "0B";
}

function skip(why) {
  log(`SKIPPED: no container engine can be started here: ${why}.`);
  log("To run it: as root on Debian/Ubuntu (it installs docker.io), or with a running Docker this user may use.");
  process.exit(3);
}

// Decided before anything is written (a user without an engine may not be able to write the cache either).
const noEngine = whyNoEngine();
if (noEngine) skip(noEngine);
mkdirSync(RUN_DIR, { recursive: true });
const release = await takeLock();
cleanups.push(async () => release());

let engine;
let t = Date.now();
try {
  engine = await ensureEngine({ logDir: RUN_DIR });
} catch (err) {
  if (!(err instanceof EngineUnavailable)) throw err;
  release();
  skip(err.message);
}
cleanups.push(() => engine.stop());
log(`engine: Docker ${engine.version}, ${engine.how} (${secs(t)})`);
t = Date.now();

let compose;
try {
  compose = ensureCompose();
} catch (err) {
  // An engine runs, so this is a failure, not a skip: only a machine without an engine may skip.
  results.push({ name: "compose v2 CLI", ok: false, time: secs(t), detail: err.message.split("\n")[0] });
  log(`✘ compose v2 CLI: ${err.message}`);
  await finish(1);
}
log(`compose: ${compose.how} (${secs(t)})`);

// The run's own settings; an empty --env-file so that a user's .env (COMPOSE_PROFILES, API_KEYS, …) does not leak in.
const envDir = mkdtempSync(path.join(os.tmpdir(), "test-compose-"));
const envFile = path.join(envDir, "empty.env");
writeFileSync(envFile, "");
cleanups.push(async () => rmSync(envDir, { recursive: true, force: true }));
const apiKey = devKey();
const port = await freePort();
const torchReachable = await fetch(`${TORCH_CPU_INDEX}/`, { method: "HEAD", signal: AbortSignal.timeout(10_000) }).then(() => true, () => false);
const env = {
  COMPOSE_PROJECT_NAME: PROJECT, API_KEYS: apiKey, GATEWAY_BIND: "127.0.0.1", GATEWAY_PORT: String(port), LOG_LEVEL: "info",
  // The worker's CPU-only torch comes from PyTorch's index; where that cannot be reached, PyPI's (the CUDA build).
  ...(torchReachable ? {} : { TORCH_INDEX_URL: "" }),
  ...dockerBuildEnv(),
};
const composeArgv = [...compose.argv, "--project-directory", ROOT, "-f", path.join(ROOT, "docker-compose.yml"), "--env-file", envFile];
const dc = (profile, rest, opts = {}) => sh(composeArgv[0], [...composeArgv.slice(1), "--profile", profile, ...rest], { env, ...opts });

// A previous run that was killed may have left its containers: start clean.
dc("cpu", ["down", "-v", "--remove-orphans", "-t", "1"], { check: false });

const bases = [argDefault("docker/gateway.Dockerfile", "NODE_IMAGE"), argDefault("docker/worker-cpu.Dockerfile", "PYTHON_IMAGE")];
const config = JSON.parse(dc("cpu", ["config", "--format", "json"]).stdout);
bases.push(config.services.redis.image);
if (CUDA) bases.push(argDefault("docker/worker-cuda.Dockerfile", "CUDA_IMAGE"));

let ok = await step("base images", () => {
  const rows = ensureBaseImages(bases);
  const standins = rows.filter((r) => r.source.startsWith("stand-in"));
  if (standins.length) {
    banner([
      "STAND-IN BASE IMAGES: the container registry cannot be reached from this machine.",
      ...standins.map((r) => `${r.name} is a LOCAL STAND-IN (${r.source}, ${human(r.size)}), not the upstream image.`),
      "Built from a debootstrap'ed Debian/Ubuntu root with the same major versions (scripts/standins/README.md).",
      "Users' machines pull the real images; `docker image rm` these to get them back.",
    ]);
  }
  return rows.map((r) => `${r.name} ${r.source} ${human(r.size)}`).join("; ");
});

const images = [
  { service: "gateway", profile: "cpu", image: config.services.gateway.image },
  { service: "worker-cpu", profile: "cpu", image: config.services["worker-cpu"].image },
];
const cudaImage = CUDA ? JSON.parse(dc("gpu", ["config", "--format", "json"]).stdout).services["worker-gpu"].image : null;
if (CUDA) images.push({ service: "worker-gpu", profile: "gpu", image: cudaImage });
{
  const reclaimed = pruneOurDanglingImages();
  const { root, free } = engineFreeBytes();
  log(`disk: ${human(free)} free on ${root} (dangling images of earlier builds removed: ${reclaimed})`);
  cleanups.push(async () => log(`dangling images of this run's builds removed: ${pruneOurDanglingImages()}`));
}
if (!torchReachable) log(`${TORCH_CPU_INDEX} is not reachable: the worker images get PyPI's torch (the CUDA build, several GB)`);
for (const img of ok ? images : []) {
  const logFile = path.join(RUN_DIR, `compose-build-${img.service}.log`);
  ok = (await step(`build ${img.image} (docker compose --profile ${img.profile} build ${img.service}; log ${path.relative(ROOT, logFile)})`, () => {
    const fd = openSync(logFile, "w");
    const r = spawnSync(composeArgv[0], [...composeArgv.slice(1), "--profile", img.profile, "--progress", "plain", "build", img.service],
      { stdio: ["ignore", fd, fd], env: { ...process.env, ...env } });
    closeSync(fd);
    if (r.status !== 0) {
      const tail = readFileSync(logFile, "utf8").trim().split("\n").slice(-30).join("\n");
      const { root, free } = engineFreeBytes();
      const disk = /no space left on device/i.test(tail) ? ` (out of disk: ${human(free)} free on ${root} now; the worker image needs ~${img.service === "worker-cpu" && !torchReachable ? "13" : "4"} GB free to build from scratch)` : "";
      throw new Error(`build failed${disk}:\n${tail}`);
    }
    return human(imageSize(img.image));
  })) && ok;
}

if (ok && CUDA) {
  // It cannot run without a GPU; its Python environment can still be shown to import (its base has another Python).
  await step(`${cudaImage}: torch, transformers and the worker import (no GPU here)`, () => sh("docker", ["run", "--rm",
    "--entrypoint", "python", cudaImage, "-c",
    "import sys, torch, transformers, llm_worker.__main__; print(f'python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}')"]).stdout.trim());
}

if (ok) {
  cleanups.push(async () => {
    const t = Date.now();
    const r = dc("cpu", ["down", "-v", "--remove-orphans"], { check: false });
    if (r.status !== 0) throw new Error(`docker compose down -v failed: ${r.stderr.trim()}`);
    const label = `label=com.docker.compose.project=${PROJECT}`;
    const left = Object.fromEntries([["containers", ["ps", "-aq"]], ["volumes", ["volume", "ls", "-q"]], ["networks", ["network", "ls", "-q"]]]
      .map(([what, cmd]) => [what, sh("docker", [...cmd, "--filter", label]).stdout.trim()]).filter(([, ids]) => ids));
    if (Object.keys(left).length) throw new Error(`after down -v, still there: ${JSON.stringify(left)}`);
    log(`docker compose down -v (${secs(t)}): no container, volume or network of the project left`);
  });
  ok = await step("docker compose --profile cpu up -d --wait", () => {
    const r = dc("cpu", ["up", "-d", "--wait", "--wait-timeout", "900"], { check: false });
    if (r.status !== 0) {
      const logs = dc("cpu", ["logs", "--no-color", "--tail", "40"], { check: false }).stdout;
      throw new Error(`${r.stderr.trim().split("\n").slice(-10).join("\n")}\n${logs}`);
    }
    return dc("cpu", ["ps", "--format", "{{.Service}} {{.Status}}"]).stdout.trim().split("\n").join("; ");
  });
}

if (ok) {
  const c = checks({ baseUrl: `http://127.0.0.1:${port}`, apiKey, model: MODEL, compose: [...composeArgv, "--profile", "cpu"], env });
  await step("GET /ready through the published port", c.ready);
  if (SHORT) {
    await step("one chat completion (openai SDK)", c.chat);
  } else {
    await step("chat completion, non-stream and stream (openai SDK), answered by the worker container", c.answeredByWorker);
    await step("tutorial route POST /chat", c.tutorialChat);
    await step("GET /openapi.json (generated by zod-openapi, which declares Node ≥ 22.14, on the image's Node 20)", c.openapi);
    await step("/metrics of gateway and worker, scraped inside the compose network", c.metrics);
    await step("non-root users, init as PID 1, the gateway's read-only root", c.processes);
    await step("docker compose restart worker-cpu under a running stream (graceful: the worker drains)", () => c.restartUnderStream({ graceful: true }));
    await step("docker compose restart -t 0 worker-cpu under a running stream (killed: a clean error)", () => c.restartUnderStream({ graceful: false }));
  }
}

await finish(0);
