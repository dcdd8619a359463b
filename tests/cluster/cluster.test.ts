// Redis Cluster specifics (issue 17), against the cluster scripts/test-cluster.mjs started (STACK_REDIS_URL is its
// redis+cluster:// URL). The end-to-end suites it runs beside this file show the whole stack works there; these show
// the two things a cluster changes: job channels need sharded pub/sub, and a script's keys must share one slot.
import { spawnSync } from "node:child_process";
import path from "node:path";
import type { Cluster } from "ioredis";
import { JobEventBus } from "../../gateway/src/queue/job-events";
import { backlogKeys, QueueBacklog } from "../../gateway/src/queue/backlog";
import { connectRedis, createRedis, isCluster } from "../../gateway/src/queue/redis";
import { runScript } from "../../gateway/src/redis-scripts";
import { jobChannel } from "../../gateway/src/protocol/job";
import { createLogger } from "../../gateway/src/logger";
import { stack, waitFor } from "../e2e/helpers";

const ROOT = path.resolve(__dirname, "../..");
const quiet = createLogger("error");

/** CROSSSLOT replies the cluster's masters have sent since they started (INFO errorstats), summed. */
async function crossSlotReplies(redis: ReturnType<typeof connectRedis>): Promise<number> {
  if (!isCluster(redis)) throw new Error("not a cluster");
  const masters = (redis as unknown as Cluster).nodes("master");
  const infos = await Promise.all(masters.map((node) => node.info("errorstats")));
  return infos.reduce((sum: number, info: string) => sum + Number(/^errorstat_CROSSSLOT:count=(\d+)/m.exec(info)?.[1] ?? 0), 0);
}

test("the stack's Redis is a cluster of 3 masters", async () => {
  const redis = stack.redis();
  try {
    expect(isCluster(redis)).toBe(true);
    const info = String(await redis.call("CLUSTER", "INFO"));
    expect(info).toMatch(/cluster_state:ok/);
    expect(info).toMatch(/cluster_size:3/);
  } finally {
    redis.disconnect();
  }
});

test("the worker's publish (SPUBLISH on a cluster) reaches the gateway's job-event bus, for channels on every node", async () => {
  const sub = createRedis(stack.redisUrl, "subscriber", quiet);
  const bus = new JobEventBus(sub, quiet);
  const redis = stack.redis();
  try {
    // Job ids whose channels fall on each of the three masters: a subscriber that listens on one node only (a plain
    // SUBSCRIBE) misses those of the other two.
    const slots = (await redis.call("CLUSTER", "SLOTS")) as [number, number, [string, number]][];
    const nodeOf = (slot: number) => slots.find(([a, b]) => slot >= a && slot <= b)![2][1];
    const perNode = new Map<number, string[]>();
    for (let i = 0; perNode.size < 3 || [...perNode.values()].some((l) => l.length < 2); i++) {
      const id = `cluster-test-${process.pid}-${i}`;
      const node = nodeOf(Number(await redis.call("CLUSTER", "KEYSLOT", jobChannel(id))));
      const list = perNode.get(node) ?? [];
      if (list.length < 2) perNode.set(node, [...list, id]);
    }
    const ids = [...perNode.values()].flat();
    const heard = new Map<string, string[]>();
    const leaves = await Promise.all(ids.map((id) => bus.subscribe(id, (m) => heard.set(id, [...(heard.get(id) ?? []), m]))));
    // The worker's own code publishes (worker-py/src/llm_worker/transport/redis_client.py `publish`), one process.
    const py = [
      "import asyncio, sys",
      "from llm_worker.transport.redis_client import publish, redis_client",
      "async def main():",
      "    r = redis_client(sys.argv[1], max_connections=4)",
      "    for jid in sys.argv[2:]:",
      "        await publish(r, 'llm:job:' + jid, 'hello ' + jid)",
      "    await r.aclose()",
      "asyncio.run(main())",
    ].join("\n");
    const r = spawnSync(stack.python, ["-c", py, stack.redisUrl, ...ids], { cwd: path.join(ROOT, "worker-py"), encoding: "utf8" });
    expect(r.stderr).toBe("");
    expect(r.status).toBe(0);
    await waitFor(async () => ids.every((id) => heard.has(id)), 30_000, "every channel's message").catch(() => undefined);
    expect(Object.fromEntries(ids.map((id) => [id, heard.get(id) ?? []]))).toEqual(Object.fromEntries(ids.map((id) => [id, [`hello ${id}`]])));
    await Promise.all(leaves.map((leave) => leave()));
  } finally {
    redis.disconnect();
    sub.disconnect();
  }
});

test("a script's keys must share a slot: the backlog's do, and the same script with keys in two slots is CROSSSLOT", async () => {
  const redis = connectRedis(stack.redisUrl);
  try {
    const k = backlogKeys("cluster-test-model");
    const keys = [k.entries, k.costs, k.state, k.recent];
    const slotsOf = await Promise.all(keys.map(async (key) => Number(await redis.call("CLUSTER", "KEYSLOT", key))));
    expect(new Set(slotsOf).size).toBe(1);
    const backlog = new QueueBacklog(redis, { queueTimeoutMs: 30_000, entryTtlMs: 60_000 });
    await expect(backlog.reserve("cluster-test-model", "req-1", 10)).resolves.toMatchObject({ admitted: true });
    expect(await backlog.release("cluster-test-model", "req-1", false)).toBe(true);
    // What the hash tag prevents: untagged keys land in different slots and Redis refuses the call.
    // It is the only CROSSSLOT the cluster run may see: scripts/test-cluster.mjs counts them (INFO errorstats) after
    // every suite, so this one must reach Redis and be counted once.
    const untagged = ["llm:backlog:x:entries", "llm:backlog:y:costs", "llm:backlog:z:state", "llm:backlog:w:recent"];
    const before = await crossSlotReplies(redis);
    await expect(runScript(redis, "backlogReserve", untagged, ["r", 1, 60_000, 30_000, 5000, 60_000, Date.now(), "", "", 50]))
      .rejects.toThrow(/CROSSSLOT/);
    expect(await crossSlotReplies(redis)).toBe(before + 1);
  } finally {
    redis.disconnect();
  }
});
