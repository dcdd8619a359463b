/**
 * Prints the gateway's own latency: requests through the real wiring + real Redis + BullMQ to a FAKE worker that
 * answers at once, so what remains is gateway + Redis + BullMQ pick-up. Not a test (no assertions), just figures.
 *   npx tsx gateway/bench/overhead.ts [requests=200] [concurrency=1]
 */
import { FakeWorker } from '../test/helpers/fake-worker';
import { startGateway, TEST_KEY } from '../test/helpers/gateway';
import { startRedis } from '../test/helpers/redis-server';

const N = Number(process.argv[2] ?? 200);
const C = Number(process.argv[3] ?? 1);

function pct(xs: number[], p: number): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))];
}

async function main() {
  const redis = await startRedis();
  const gw = await startGateway(redis.url);
  const worker = new FakeWorker({ redisUrl: redis.url, model: 'bench', script: { reply: () => 'ok', pieceChars: 64 } });
  await worker.start();
  const body = JSON.stringify({ model: 'bench', messages: [{ role: 'user', content: 'Hello there, how are you today?' }], max_tokens: 8 });
  const one = async (stream: boolean) => {
    const t0 = performance.now();
    const r = await fetch(`${gw.url}/v1/chat/completions`, {
      method: 'POST',
      headers: { authorization: `Bearer ${TEST_KEY}`, 'content-type': 'application/json' },
      body: stream ? body.replace('{', '{"stream":true,') : body,
    });
    await r.text();
    if (r.status !== 200) throw new Error(`status ${r.status}`);
    return performance.now() - t0;
  };
  for (let i = 0; i < 20; i++) await one(false); // warm-up
  for (const stream of [false, true]) {
    const times: number[] = [];
    let next = 0;
    const t0 = performance.now();
    await Promise.all(
      Array.from({ length: C }, async () => {
        while (next++ < N) times.push(await one(stream));
      }),
    );
    const wall = (performance.now() - t0) / 1000;
    console.log(
      `${stream ? 'stream    ' : 'non-stream'} n=${N} c=${C}: p50 ${pct(times, 50).toFixed(2)} ms, p90 ${pct(times, 90).toFixed(2)} ms, ` +
        `p99 ${pct(times, 99).toFixed(2)} ms, ${(N / wall).toFixed(0)} req/s`,
    );
  }
  await worker.close();
  await gw.close();
  await redis.stop();
}

void main();
