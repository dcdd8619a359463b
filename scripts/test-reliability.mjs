// `npm run test:reliability` (issue 12): the reliability suite at full size — soak, kills, restarts, storms, slow
// readers, hostile input, security — against private stacks of real processes (tests/reliability; each file starts what
// it needs on free ports). `--short`: the same checks, smaller, as `npm test` runs them. Prints every figure at the end
// (recorded in RELIABILITY.md). Extra arguments go to jest (e.g. `npm run test:reliability -- -t soak`).
import { spawnSync } from "node:child_process";
import { existsSync, readFileSync, rmSync } from "node:fs";
import path from "node:path";
import { ROOT, ensureNodeDeps, ensureRedisServer, ensureWorkerVenv, log } from "./lib/stack.mjs";

const short = process.argv.includes("--short");
const jestArgs = process.argv.slice(2).filter((a) => a !== "--short");
const env = { ...process.env, RELIABILITY_SCALE: short ? "short" : "full" };
const figures = path.join(ROOT, ".run/reliability/figures.jsonl");
const t0 = Date.now();

ensureNodeDeps();
ensureWorkerVenv({ withTestDeps: true });
ensureRedisServer();
rmSync(figures, { force: true });

const steps = [
  ["jest: tests/reliability", process.execPath, [path.join(ROOT, "node_modules/jest/bin/jest.js"), "--selectProjects", "reliability", "--runInBand", "--forceExit", "--passWithNoTests", ...jestArgs]],
];
// After every part has run: the logs of the whole suite must hold none of the keys and prompts it used.
const scan = path.join(ROOT, "tests/reliability/support/scan-logs.ts");
if (existsSync(scan)) steps.push(["log scan: no key or prompt in any log of the suite", process.execPath, [path.join(ROOT, "node_modules/tsx/dist/cli.mjs"), scan]]);

let ok = true;
for (const [name, cmd, args] of steps) {
  log(`▶ ${name}`);
  const r = spawnSync(cmd, args, { cwd: ROOT, stdio: "inherit", env });
  log(`${r.status === 0 ? "✔" : "✘"} ${name}`);
  ok &&= r.status === 0;
}

log(`figures (${short ? "short" : "full"} scale):`);
if (existsSync(figures)) {
  for (const line of readFileSync(figures, "utf8").split("\n").filter(Boolean)) {
    const f = JSON.parse(line);
    log(`  ${f.part}: ${f.name} = ${f.value}${f.unit ? ` ${f.unit}` : ""} (load ${f.load1})`);
  }
}
log(`${ok ? "all passed" : "FAILED"} in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
process.exit(ok ? 0 : 1);
