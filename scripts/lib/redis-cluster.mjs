// A Redis Cluster of `masters` masters (no replicas) on free loopback ports, for the cluster tests
// (scripts/test-cluster.mjs, tests/cluster). Each node is a redis-server child of scripts/lib/stack.mjs (stopAll ends
// them); `redis-cli --cluster create` assigns the 16,384 slots; ready once every node reports cluster_state:ok.
import { spawnSync } from "node:child_process";
import { mkdirSync, rmSync } from "node:fs";
import path from "node:path";
import { RUN_DIR, ensureRedisServer, fail, freePort, startChild, waitFor } from "./stack.mjs";

function cli(port, ...args) {
  return spawnSync("redis-cli", ["-h", "127.0.0.1", "-p", String(port), ...args], { encoding: "utf8" });
}

/** Resolves with `url` (the gateway's and worker's REDIS_URL: redis+cluster://host:port,...) and the node ports. */
export async function startRedisCluster({ masters = 3, name = "redis-cluster" } = {}) {
  const bin = ensureRedisServer();
  const ports = [];
  for (let i = 0; i < masters; i++) {
    const port = await freePort();
    const dir = path.join(RUN_DIR, `${name}-${port}`);
    rmSync(dir, { recursive: true, force: true }); // a node's nodes.conf of an earlier run would name old peers
    mkdirSync(dir, { recursive: true });
    const child = startChild(`${name}-${port}`, bin, [
      "--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--maxmemory-policy", "noeviction",
      "--dir", dir, "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "5000",
    ]);
    ports.push(port);
    await waitFor(() => cli(port, "PING").stdout.trim() === "PONG" || (child.exitCode !== null && fail(`redis-server exited; see ${child.logFile}`)),
      10_000, `cluster node ${port}`);
  }
  const nodes = ports.map((p) => `127.0.0.1:${p}`);
  const created = spawnSync("redis-cli", ["--cluster", "create", ...nodes, "--cluster-replicas", "0", "--cluster-yes"], { encoding: "utf8" });
  if (created.status !== 0) throw new Error(`redis-cli --cluster create failed: ${created.stdout}${created.stderr}`);
  await waitFor(() => ports.every((p) => /cluster_state:ok/.test(cli(p, "CLUSTER", "INFO").stdout)), 30_000, "cluster_state:ok on every node");
  return { ports, url: `redis+cluster://${nodes.join(",")}` };
}

/** Sums, over the nodes, a per-name count read from one INFO section: `count(match)` of each line `pattern` matches. */
function sumInfo(ports, section, pattern, count) {
  const sum = {};
  for (const port of ports) {
    const r = cli(port, "INFO", section);
    if (r.status !== 0) throw new Error(`INFO ${section} on ${port}: ${r.stderr}`);
    for (const m of r.stdout.matchAll(pattern)) {
      const n = count(m);
      if (n) sum[m[1]] = (sum[m[1]] ?? 0) + n;
    }
  }
  return sum;
}

/**
 * The error counts every node of the cluster has replied with since it started (INFO errorstats), summed over the
 * nodes: e.g. {CROSSSLOT: 1, NOSCRIPT: 12}. A CROSSSLOT is a command or script whose keys span slots: the stack
 * must never send one.
 */
export function clusterErrorStats(ports) {
  return sumInfo(ports, "errorstats", /^errorstat_([A-Z_-]+):count=(\d+)/gm, (m) => Number(m[2]));
}

/** Per command, the calls the cluster's nodes refused or that failed (INFO commandstats), summed over the nodes. */
export function clusterFailedCalls(ports) {
  return sumInfo(ports, "commandstats", /^cmdstat_([a-z|_-]+):.*rejected_calls=(\d+),failed_calls=(\d+)/gm,
    (m) => Number(m[2]) + Number(m[3]));
}

/** What grew between two such sums: {name: increase} for the names that grew. */
export function grownCounts(before, after) {
  return Object.fromEntries(Object.entries(after).map(([k, n]) => [k, n - (before[k] ?? 0)]).filter(([, n]) => n > 0));
}
