/**
 * SIGTERM on the real entry point (src/main.ts as a child process): stop accepting, let open streams finish within
 * SHUTDOWN_GRACE_MS (or end them with an in-stream error when it runs out), close Redis, exit 0.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { join } from 'node:path';
import { FakeWorker } from './helpers/fake-worker';
import { completeEvents, openStream as open, parseSse, TEST_KEY, waitFor } from './helpers/gateway';
import { freePort, useTestRedis } from './helpers/redis-server';

// Each test starts the gateway as a child process through tsx (its start-up alone may take tens of seconds on a loaded
// machine: its wait allows 60 s), then streams.
jest.setTimeout(120_000);

const redis = useTestRedis();
let worker: FakeWorker;
let slow: FakeWorker;
const MODEL = `m-${randomUUID().slice(0, 8)}`;
/** Its worker holds after the first character until the job is cancelled: a stream that outlasts any grace. */
const SLOW_MODEL = `s-${randomUUID().slice(0, 8)}`;
const REPLY = 'abcdefghijklmnopqrstuvwxyz0123456789';

beforeAll(async () => {
  // Each test that uses it gives it a gate of its own (worker.script), to hold its stream open until the gateway drains.
  worker = new FakeWorker({ redisUrl: redis.url, model: MODEL, script: { reply: () => REPLY, pieceChars: 1 } });
  slow = new FakeWorker({ redisUrl: redis.url, model: SLOW_MODEL, script: { reply: () => REPLY, pieceChars: 1, holdAfterDeltas: 1 } });
  await Promise.all([worker.start(), slow.start()]);
});
redis.beforeStop(async () => {
  await Promise.all([worker.close(), slow.close()]);
});

async function startMain(env: Record<string, string>) {
  const port = await freePort();
  const tsx = join(__dirname, '..', '..', 'node_modules', '.bin', 'tsx');
  const child: ChildProcess = spawn(tsx, [join(__dirname, '..', 'src', 'main.ts')], {
    env: { ...process.env, REDIS_URL: redis.url, PORT: String(port), API_KEYS: TEST_KEY, DEFAULT_MODEL: MODEL, LOG_LEVEL: 'info', ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  child.stdout!.on('data', (d) => (out += d));
  child.stderr!.on('data', (d) => (out += d));
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
  const url = `http://127.0.0.1:${port}`;
  await waitFor(async () => (await fetch(`${url}/ready`).catch(() => null))?.status === 200, 60_000, 'gateway ready');
  return { url, child, exited, output: () => out };
}

/** Opens a stream and returns once its first text has arrived: the worker has the job and the stream is under way. */
async function openStream(url: string, model = MODEL) {
  const body = { model, messages: [{ role: 'user', content: 'Hi' }], stream: true };
  const stream = await open(`${url}/v1/chat/completions`, body, { authorization: `Bearer ${TEST_KEY}` });
  await waitFor(() => textOf(completeEvents(stream.received())).text.length > 0, undefined, 'the first text of the stream');
  return stream;
}

function textOf(body: string) {
  const { data } = parseSse(body);
  const chunks = data.filter((d) => d !== '[DONE]') as Array<Record<string, any>>;
  return {
    text: chunks.flatMap((c) => c.choices ?? []).map((c: any) => c.delta?.content ?? '').join(''),
    error: chunks.find((c) => c.error)?.error,
    done: data.at(-1) === '[DONE]',
  };
}

it('lets an open stream finish, refuses new work, and exits 0', async () => {
  // The stream is held after its first character until the gateway drains (then it ends at once): it is open during
  // the drain however fast or slow the machine. The grace is far beyond what the rest of it takes.
  let release!: () => void;
  worker.script = { ...worker.script, holdAfterDeltas: 1, holdGate: new Promise<void>((r) => (release = r)) };
  const gw = await startMain({ SHUTDOWN_GRACE_MS: '60000' });
  const stream = await openStream(gw.url);
  gw.child.kill('SIGTERM');
  await waitFor(() => gw.output().includes('shutting down'), undefined, 'the gateway to start draining');
  // A new connection is refused; a request on a kept-alive one would get 503 shutting_down.
  const late = await fetch(`${gw.url}/health`).then((r) => r.status).catch(() => 'refused');
  expect(['refused', 503]).toContain(late);
  release();
  const s = textOf(await stream.body);
  expect(s.text).toBe(REPLY);
  expect(s.error).toBeUndefined();
  expect(s.done).toBe(true);
  expect(await gw.exited).toBe(0);
  // "stopped" is logged after every Redis connection is closed (wiring.ts close()), the last line before exit.
  const lines = gw.output().split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l));
  expect(lines.at(-1)).toMatchObject({ level: 'info', msg: 'stopped' });
});

it('when the grace period runs out, open streams end with an in-stream error, then exit 0', async () => {
  const gw = await startMain({ SHUTDOWN_GRACE_MS: '300' });
  const stream = await openStream(gw.url, SLOW_MODEL);
  gw.child.kill('SIGTERM');
  const s = textOf(await stream.body);
  expect(s.text.length).toBeLessThan(REPLY.length);
  expect(s.error).toMatchObject({ code: 'shutting_down', type: 'server_error' });
  expect(s.done).toBe(true);
  expect(await gw.exited).toBe(0);
});
