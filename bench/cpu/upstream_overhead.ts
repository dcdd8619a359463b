/**
 * What routing a model to an external upstream adds (docs/ROUTING.md): the same requests sent straight to a small
 * OpenAI-compatible server on loopback (gateway/test/helpers/fake-upstream.ts) and through a gateway (real wiring, a
 * private redis-server) whose routing file points a model at it. Prints p50/p95 of the time to the first content chunk
 * of a stream and of a whole non-stream answer, and the difference. A figure to read, not a test.
 *
 *   npx tsx bench/cpu/upstream_overhead.ts [requests=200]
 */
import { mkdtempSync, writeFileSync } from 'node:fs';
import { loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { FakeUpstream } from '../../gateway/test/helpers/fake-upstream';
import { startGateway, TEST_KEY } from '../../gateway/test/helpers/gateway';
import { startRedis } from '../../gateway/test/helpers/redis-server';

const N = Number(process.argv[2] ?? 200);
const body = { model: 'remote', messages: [{ role: 'user', content: 'Hello!' }] };

async function timeOne(url: string, headers: Record<string, string>, stream: boolean): Promise<number> {
  const t0 = performance.now();
  const resp = await fetch(`${url}/chat/completions`, { method: 'POST', headers: { 'content-type': 'application/json', ...headers }, body: JSON.stringify({ ...body, stream }) });
  if (!stream) {
    await resp.json();
    return performance.now() - t0;
  }
  let first = 0;
  const decoder = new TextDecoder();
  for await (const chunk of resp.body!) {
    if (first === 0 && decoder.decode(chunk).includes('"content":"Hello"')) first = performance.now() - t0;
  }
  return first;
}

const pct = (xs: number[], p: number) => [...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.floor((p / 100) * xs.length))];

async function series(url: string, headers: Record<string, string>, stream: boolean): Promise<{ p50: number; p95: number }> {
  for (let i = 0; i < 20; i++) await timeOne(url, headers, stream); // warm-up (connections, JIT)
  const xs: number[] = [];
  for (let i = 0; i < N; i++) xs.push(await timeOne(url, headers, stream));
  return { p50: pct(xs, 50), p95: pct(xs, 95) };
}

async function main(): Promise<void> {
  const redis = await startRedis();
  const upstream = new FakeUpstream();
  upstream.chunkDelayMs = 0;
  await upstream.start();
  const file = join(mkdtempSync(join(tmpdir(), 'routing-bench-')), 'routing.json');
  writeFileSync(file, JSON.stringify({ upstreams: { up: { base_url: upstream.url } }, models: { remote: { upstream: 'up' } } }));
  const gw = await startGateway(redis.url, { ROUTING_FILE: file, CACHE_ENABLED: 'false' });
  try {
    const auth = { authorization: `Bearer ${TEST_KEY}` };
    const rows: string[] = [];
    for (const stream of [true, false]) {
      const direct = await series(upstream.url, {}, stream);
      const routed = await series(`${gw.url}/v1`, auth, stream);
      const what = stream ? 'stream: first content chunk' : 'non-stream: whole answer';
      const f = (x: number) => x.toFixed(2).padStart(7);
      rows.push(`${what.padEnd(30)} direct p50 ${f(direct.p50)} p95 ${f(direct.p95)}  via gateway p50 ${f(routed.p50)} p95 ${f(routed.p95)}  added p50 ${f(routed.p50 - direct.p50)} ms`);
    }
    console.log(`upstream overhead, ${N} sequential requests each, load average (1 min) ${loadavg()[0].toFixed(2)}`);
    for (const r of rows) console.log(r);
  } finally {
    await gw.close();
    await upstream.close();
    await redis.stop();
  }
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
