// Reliability suite, "Bad input" (issue 12), against real processes (a private stack: tests/e2e/fault-stack.ts, the
// stand-in engine so that a thousand requests take minutes): schemathesis fuzzes every route of /openapi.json (no
// status >= 500, every response as documented, the stack healthy afterwards); then 10 MB and 100 MB bodies, 100 k
// nesting levels, invalid UTF-8 and 150 slow-loris sockets are each refused while another client keeps getting answers,
// and the gateway's RSS stays bounded. Unit-level hostile input is in gateway/test/hostile-input.test.ts.
import net from 'node:net';
import { randomBytes } from 'node:crypto';
import OpenAI from 'openai';
import { FaultStack, type FaultGateway, waitFor } from '../e2e/fault-stack';
import { figure, pick, scale } from './support/figures';
import { bigBody, gatewayPid, otherClient, percentile, rawPost, rssMiB, rssSampler, runSchemathesis, schemathesis } from './support/bad-input-tools';
import { usedPrompt, usedStack } from './support/secrets';

jest.setTimeout(pick({ short: 300_000, full: 900_000 }));
const PART = 'bad input';
const HEADERS_TIMEOUT_MS = 3000;
const RECEIVE_TIMEOUT_MS = 5000;
const MAX_BODY_BYTES = 4 * 1024 * 1024;
const PROMPT = `bad-input-canary-${randomBytes(6).toString('hex')}: answer briefly`;

const stack = new FaultStack();
let gw: FaultGateway;
let pid: number;

beforeAll(async () => {
  usedStack(PART, stack);
  usedPrompt(PART, PROMPT);
  await stack.startRedis();
  // 2 ms a token: a 4,000-token stream outlasts REQUEST_RECEIVE_TIMEOUT_MS (which must never cut a response).
  const worker = await stack.spawnWorker('bad-input', { ENGINE: 'standin', STANDIN_STEP_MS: '2', MAX_BATCH: '64' });
  gw = await stack.startGateway('bad-input', {
    DEFAULT_MAX_TOKENS: '8', TUTORIAL_RPM: '0', MAX_BODY_BYTES: String(MAX_BODY_BYTES),
    HEADERS_TIMEOUT_MS: String(HEADERS_TIMEOUT_MS), REQUEST_RECEIVE_TIMEOUT_MS: String(RECEIVE_TIMEOUT_MS),
  });
  await Promise.all([stack.waitWorkerReady(worker, 120_000), stack.waitGatewayUp(gw, 60_000)]);
  await waitFor(async () => (await fetch(`${gw.url}/ready`)).status === 200, 60_000, 'the gateway to be ready');
  pid = gatewayPid(gw.proc.child.pid!);
});
afterAll(() => stack.stop());

const auth = () => ({ authorization: `Bearer ${stack.apiKey}`, 'content-type': 'application/json' });

async function expectHealthy(): Promise<void> {
  expect((await fetch(`${gw.url}/ready`)).status).toBe(200);
  const sdk = new OpenAI({ baseURL: `${gw.url}/v1`, apiKey: stack.apiKey, maxRetries: 0, defaultHeaders: { 'cache-control': 'no-store' } });
  const chat = await sdk.chat.completions.create({ model: stack.model, max_tokens: 4, messages: [{ role: 'user', content: PROMPT }] });
  expect(chat.choices[0].finish_reason).toBe('length');
}

const expectError = (r: { status: number; body: any }, status: number, code: string) =>
  expect({ status: r.status, code: r.body?.error?.code, shape: Object.keys(r.body?.error ?? {}).sort() }).toEqual({
    status, code, shape: ['code', 'message', 'param', 'type'],
  });

describe('property-based fuzzing of every route in /openapi.json (schemathesis)', () => {
  it(`${pick({ short: '≥ 200', full: '≥ 1,000' })} cases: no status >= 500, every response as documented, the stack healthy afterwards`, async () => {
    const st = await schemathesis();
    const common = [
      `${gw.url}/openapi.json`, '--header', `Authorization: Bearer ${stack.apiKey}`, '--seed', String(Date.now() % 100_000),
      '--workers', '2', '--request-timeout', '60', '--output-truncate', 'true',
      // What the issue asks: no 5xx, only documented statuses, content types, headers and bodies; and ignored_auth
      // (each operation refused without its credential). Not run, as not applicable here: negative_data_rejection
      // (unknown request fields are accepted on purpose, STYLE.md), positive_data_acceptance (a request the schema
      // allows is still refused for reasons outside it: an unknown model, the context length), missing_required_header,
      // unsupported_method and allow_header_conformance (a method a path does not serve is 404 unknown_url, as OpenAI
      // answers, not 405), use_after_free / ensure_resource_availability / object_level_authorization (stateful: the
      // document declares no links).
      '--checks', 'not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance,ignored_auth',
    ];
    const runs = [
      // Random cases for every operation.
      await runSchemathesis(st, [...common, '--phases', 'fuzzing', '--max-examples', String(pick({ short: 40, full: 80 }))], 600_000),
    ];
    if (scale() === 'full') {
      // The coverage phase's boundary and negative cases, for every operation but the tutorial's: schemathesis 4.32
      // crashes generating them from TutorialChatRequest (a SystemError in its own code, not a response of ours);
      // the tutorial routes get the fuzzing phase above.
      runs.push(await runSchemathesis(st, [...common, '--phases', 'coverage', '--exclude-path-regex', '^/chat'], 600_000));
    }
    const cases = runs.reduce((n, r) => n + r.cases, 0);
    // schemathesis 4.32's coverage phase sometimes crashes inside Python while building a strategy ("SystemError: AST
    // constructor recursion depth mismatch", in hypothesis' reflection code; seen on a full run, an operation at a
    // time): a crash of the tool, not a response of ours. Such a run still counts as failed if any case it ran failed.
    const toolCrash = (r: { out: string }) =>
      /SystemError: AST constructor recursion depth mismatch/.test(r.out) && !/^Failures:/m.test(r.out) && /(\d+) generated, \1 passed/.test(r.out);
    const crashed = runs.filter((r) => r.code !== 0 && toolCrash(r));
    figure(PART, 'schemathesis runs ended by its own crash (all their cases passed)', crashed.length, `of ${runs.length}`);
    const failed = runs.filter((r) => r.code !== 0 && !toolCrash(r));
    figure(PART, 'schemathesis cases', cases, 'cases');
    figure(PART, 'schemathesis runs with a failure (5xx, undocumented status/body/header) or error', failed.length, `of ${runs.length}`);
    for (const r of failed) process.stdout.write(`schemathesis exited ${r.code}:\n${r.out.slice(-6000)}\n`);
    expect(failed.map((r) => r.code)).toEqual([]);
    expect(cases).toBeGreaterThanOrEqual(pick({ short: 200, full: 1000 }));
    await expectHealthy();
  });
});

describe('hostile bodies, refused while another client is served', () => {
  it('10 MB and 100 MB bodies are 413, 100 k nesting levels and invalid UTF-8 are 400; RSS bounded; the other client answered', async () => {
    const before = rssMiB(pid);
    const rss = rssSampler(pid);
    const other = otherClient(gw.url, stack.apiKey, stack.model, PROMPT);
    const url = `${gw.url}/v1/chat/completions`;
    const mib = 1024 * 1024;

    const sized = (bytes: number) => {
      const b = bigBody(stack.model, bytes);
      return rawPost(url, { ...auth(), 'content-length': String(b.length) }, b.chunks);
    };
    const tenMb = await sized(10 * mib);
    // Chunked: no length to refuse up front, the limit has to stop it while it arrives.
    const hundredMbChunked = await rawPost(url, { ...auth(), 'transfer-encoding': 'chunked' }, bigBody(stack.model, 100 * mib).chunks);
    const hundredMb = await sized(100 * mib);
    const depth = 100_000;
    const nestedArrays = `{"model":"${stack.model}","messages":${'['.repeat(depth)}${']'.repeat(depth)}}`;
    const nestedObjects = `{"model":"${stack.model}","messages":[{"role":"user","content":${'{"a":'.repeat(depth)}1${'}'.repeat(depth)}}]}`;
    const arrays = await rawPost(url, auth(), [Buffer.from(nestedArrays)]);
    const objects = await rawPost(url, auth(), [Buffer.from(nestedObjects)]);
    const invalidUtf8 = Buffer.concat([Buffer.from(`{"model":"${stack.model}","max_tokens":4,"messages":[{"role":"user","content":"${PROMPT} `), Buffer.from([0xff, 0xfe, 0xc3]), Buffer.from('"}]}')]);
    const utf8Chat = await rawPost(url, auth(), [invalidUtf8]);
    const utf8Completion = await rawPost(`${gw.url}/v1/completions`, auth(), [Buffer.from(invalidUtf8.toString('latin1').replace('"messages":[{"role":"user","content":', '"prompt":').replace(/}]}$/, '}'), 'latin1')]);

    const seen = await other.stop();
    const peak = rss.stop();
    const after = rssMiB(pid);
    figure(PART, 'gateway RSS before / peak / after the hostile bodies', `${before.toFixed(0)} / ${peak.toFixed(0)} / ${after.toFixed(0)}`, 'MiB');
    figure(PART, 'other client during the hostile bodies: answered / failed', `${seen.ok} / ${seen.failed.length}`, 'requests');
    figure(PART, 'other client latency during the hostile bodies p50 / max', `${percentile(seen.latenciesMs, 50).toFixed(0)} / ${Math.max(...seen.latenciesMs).toFixed(0)}`, 'ms');

    expectError(tenMb, 413, 'request_too_large');
    expectError(hundredMbChunked, 413, 'request_too_large');
    expectError(hundredMb, 413, 'request_too_large');
    expectError(arrays, 400, 'invalid_type');
    expectError(objects, 400, 'invalid_type');
    expectError(utf8Chat, 400, 'invalid_json');
    expectError(utf8Completion, 400, 'invalid_json');
    expect(seen.failed).toEqual([]);
    expect(seen.ok).toBeGreaterThan(0);
    // Bounded: never a 100 MB body held in memory (its text alone would add 100+ MiB), at most a few MAX_BODY_BYTES.
    expect(peak - before).toBeLessThan(64);
    await expectHealthy();
  });
});

interface Loris {
  closedAtMs: number | null;
  answer: string;
}

/** A socket that opens a request and never finishes it: headers a byte at a time, or (`body`) a body a byte at a time. */
function slowLoris(port: number, kind: 'headers' | 'body', t0: number, apiKey: string): Loris {
  const l: Loris = { closedAtMs: null, answer: '' };
  const s = net.connect(port, '127.0.0.1');
  let timer: NodeJS.Timeout | undefined;
  s.on('connect', () => {
    s.write(kind === 'headers'
      ? 'POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: '
      : `POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${apiKey}\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{`);
    timer = setInterval(() => s.writable && s.write('a'), 500);
  });
  s.on('data', (d) => (l.answer += d.toString('utf8')));
  s.on('error', () => undefined);
  s.on('close', () => {
    clearInterval(timer);
    l.closedAtMs = performance.now() - t0;
  });
  return l;
}

describe('slow-loris', () => {
  it('150 sockets that never finish their request are answered 408 and closed by the server; a stream and another client go on', async () => {
    const port = Number(new URL(gw.url).port);
    const before = rssMiB(pid);
    const rss = rssSampler(pid);
    // A stream that outlasts REQUEST_RECEIVE_TIMEOUT_MS: the timeouts bound receiving a request, never a response.
    const sdk = new OpenAI({ baseURL: `${gw.url}/v1`, apiKey: stack.apiKey, maxRetries: 0, defaultHeaders: { 'cache-control': 'no-store' } });
    const streamStarted = performance.now();
    const stream = (async () => {
      let chunks = 0;
      let finish: string | null = null;
      for await (const c of await sdk.chat.completions.create({ model: stack.model, max_tokens: 4000, stream: true, messages: [{ role: 'user', content: PROMPT }] })) {
        chunks += 1;
        finish = c.choices[0]?.finish_reason ?? finish;
      }
      return { chunks, finish, ms: performance.now() - streamStarted };
    })();
    const other = otherClient(gw.url, stack.apiKey, stack.model, PROMPT);
    const t0 = performance.now();
    const sockets = Array.from({ length: 150 }, (_, i) => slowLoris(port, i % 3 === 2 ? 'body' : 'headers', t0, stack.apiKey));
    await waitFor(() => sockets.every((s) => s.closedAtMs !== null), 60_000, 'the server to close every slow-loris socket');
    const seen = await other.stop();
    const streamed = await stream;
    const peak = rss.stop();
    const closed = sockets.map((s) => s.closedAtMs!);
    const answered408 = sockets.filter((s) => /^HTTP\/1\.1 408 /.test(s.answer) && s.answer.includes('"code":"request_receive_timeout"')).length;
    figure(PART, 'slow-loris sockets closed by the server / answered 408', `${closed.length} / ${answered408}`, 'of 150');
    figure(PART, 'slow-loris sockets: last closed after', (Math.max(...closed) / 1000).toFixed(1), `s (HEADERS_TIMEOUT_MS ${HEADERS_TIMEOUT_MS}, REQUEST_RECEIVE_TIMEOUT_MS ${RECEIVE_TIMEOUT_MS})`);
    figure(PART, 'other client during slow-loris: answered / failed', `${seen.ok} / ${seen.failed.length}`, 'requests');
    figure(PART, 'other client latency during slow-loris p50 / max', `${percentile(seen.latenciesMs, 50).toFixed(0)} / ${Math.max(...seen.latenciesMs).toFixed(0)}`, 'ms');
    figure(PART, 'gateway RSS before / peak during slow-loris', `${before.toFixed(0)} / ${peak.toFixed(0)}`, 'MiB');
    figure(PART, 'stream running through the slow-loris', `${streamed.chunks} chunks in ${(streamed.ms / 1000).toFixed(1)} s`, '');

    expect(answered408).toBe(150);
    expect(seen.failed).toEqual([]);
    expect(seen.ok).toBeGreaterThan(0);
    expect(streamed.finish).toBe('length');
    expect(streamed.ms).toBeGreaterThan(RECEIVE_TIMEOUT_MS);
    expect(peak - before).toBeLessThan(64);
    await expectHealthy();
  });
});
