/**
 * Streaming passthrough of an upstream model (docs/ROUTING.md) read by the official openai *Python* SDK (the worker's
 * venv has it; `npm test` builds that venv before jest runs), as routing.test.ts reads it with the Node SDK: a real
 * gateway and Redis, the loopback upstream of helpers/fake-upstream.ts holding its last chunk until the Python client
 * has printed its first one.
 */
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { FakeUpstream } from './helpers/fake-upstream';
import { startGateway, TEST_KEY, type TestGateway, waitFor } from './helpers/gateway';
import { useTestRedis } from './helpers/redis-server';

const PYTHON = join(__dirname, '..', '..', 'worker-py', '.venv', 'bin', 'python');
const CLIENT = `
import sys, openai
client = openai.OpenAI(base_url=sys.argv[1], api_key=sys.argv[2], max_retries=0)
stream = client.chat.completions.create(model="remote", messages=[{"role": "user", "content": "Hello!"}], stream=True)
text = ""
for chunk in stream:
    assert chunk.model == "remote", chunk.model
    assert chunk.usage is None, "usage shown although the client did not ask for it"
    piece = (chunk.choices[0].delta.content or "") if chunk.choices else ""
    if piece and not text:
        print("FIRST", flush=True)
        sys.stdin.readline()  # the test checks the upstream is still mid-stream, releases it, then says go on
    text += piece
print("TEXT " + text, flush=True)
`;

const redis = useTestRedis();
const upstream = new FakeUpstream();
let gw: TestGateway;

beforeAll(async () => {
  await upstream.start();
  const file = join(mkdtempSync(join(tmpdir(), 'routing-py-')), 'routing.json');
  writeFileSync(file, JSON.stringify({ upstreams: { up: { base_url: upstream.url } }, models: { remote: { upstream: 'up' } } }));
  gw = await startGateway(redis.url, { ROUTING_FILE: file });
}, 60_000);
redis.beforeStop(async () => {
  await gw.close();
  await upstream.close();
});

it('the Python SDK gets the first chunk before the upstream has finished, under our model name', async () => {
  expect(existsSync(PYTHON)).toBe(true); // worker-py/.venv: `npm test` (or worker-py's setup) builds it
  let release!: () => void;
  upstream.holdBeforeLast = new Promise<void>((r) => (release = r));
  const py = spawn(PYTHON, ['-c', CLIENT, `${gw.url}/v1`, TEST_KEY], { stdio: ['pipe', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  py.stdout.on('data', (d: Buffer) => (out += d.toString()));
  py.stderr.on('data', (d: Buffer) => (err += d.toString()));
  const exited = new Promise<number | null>((r) => py.on('close', r));
  try {
    await waitFor(() => out.includes('FIRST') || py.exitCode !== null, 60_000, 'the Python client to print its first chunk');
    expect({ out, err }).toMatchObject({ out: expect.stringContaining('FIRST') });
    expect(upstream.requests.at(-1)!.finished).toBe(false);
    release();
    py.stdin.write('\n');
    expect(await exited).toBe(0);
    expect(out).toContain('TEXT Hello from the upstream!');
  } finally {
    if (py.exitCode === null) py.kill();
  }
}, 90_000);
