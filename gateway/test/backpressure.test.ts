/**
 * SSE backpressure (issue 11): a client that stops reading must not pile its stream up in the gateway's memory. Past
 * SSE_MAX_BUFFER_BYTES unread, the stream ends with a `stream_buffer_full` error event and the job is cancelled.
 * Real wiring and Redis, a FAKE worker (helpers/fake-worker.ts) that produces output far faster than it is read, and a
 * raw TCP client that never reads its response.
 */
import { randomUUID } from 'node:crypto';
import net from 'node:net';
import { FakeWorker } from './helpers/fake-worker';
import { startGateway, TEST_KEY, type TestGateway, waitFor } from './helpers/gateway';
import { useTestRedis } from './helpers/redis-server';

const MODEL = `m-${randomUUID().slice(0, 8)}`;
const redis = useTestRedis();
let gw: TestGateway;
let worker: FakeWorker;

beforeAll(async () => {
  gw = await startGateway(redis.url, { DEFAULT_MODEL: MODEL, SSE_MAX_BUFFER_BYTES: String(64 * 1024) });
  // 64 MB of output: more than loopback socket buffers can hold, so the rest must wait in the gateway (or be cut).
  worker = new FakeWorker({ redisUrl: redis.url, model: MODEL, contextLength: 100_000, script: { reply: () => 'x'.repeat(64 * 1024 * 1024), pieceChars: 256 * 1024, delayMs: 2 } });
  await worker.start();
});
redis.beforeStop(async () => {
  await worker.close();
  await gw.close();
});

it('a client that stops reading: its stream is cut and its job cancelled, not buffered without end', async () => {
  const { port } = new URL(gw.url);
  const body = JSON.stringify({ model: MODEL, messages: [{ role: 'user', content: 'flood me' }], max_tokens: 90_000, stream: true });
  const socket = net.connect(Number(port), '127.0.0.1');
  socket.pause(); // never read: the kernel's buffers fill, then the gateway's
  socket.write(
    `POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer ${TEST_KEY}\r\ncontent-type: application/json\r\ncontent-length: ${Buffer.byteLength(body)}\r\n\r\n${body}`,
  );
  try {
    await waitFor(() => worker.jobs.length === 1, 20_000, 'the job to start');
    await waitFor(() => worker.cancelled.size === 1, 40_000, 'the job to be cancelled for its unread stream');
    // Once the reader catches up it finds the error event and [DONE] (what a slow SDK client would see).
    socket.resume();
    let tail = ''; // the last 64 KB received: the content is 'x's, so anything else there is the stream's ending
    let ended = false;
    socket.on('data', (b) => (tail = (tail + b.toString('latin1')).slice(-65_536)));
    socket.on('end', () => (ended = true));
    await waitFor(() => ended, 15_000, 'the end of the stream');
    // Exactly one error event, then [DONE], then the end: not an error per buffered write.
    // (jest would print all 64 KB of a failed match: say it in a few hundred bytes instead)
    const errors = tail.split('"code":"stream_buffer_full"').length - 1;
    const endsWithDone = /data: \[DONE\]\n\n(\r\n0\r\n\r\n)?$/.test(tail); // the last HTTP chunk, then chunked encoding's end
    if (errors !== 1 || !endsWithDone) throw new Error(`stream ending: ${errors} error events; last bytes: ${JSON.stringify(tail.slice(-300))}`);
  } finally {
    socket.destroy();
  }
});
