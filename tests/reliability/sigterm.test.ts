/**
 * Gateway SIGTERM under load (issue 12): LOAD streams are open on gateway g0 (stand-in engine) when it gets SIGTERM.
 * Checked, against real processes (tests/reliability/support/stack.ts), with SHUTDOWN_GRACE_MS set:
 *   - every open stream finishes with its whole answer and [DONE] within the grace (figures: drain time, streams finished);
 *   - new requests to g0 while it drains are refused, as docs/OBSERVABILITY.md "Graceful shutdown" says: a new
 *     connection finds the listener closed (ECONNREFUSED), and a request on a connection kept alive from before gets
 *     503 `shutting_down` with retry-after (and `connection: close`); none is served, none hangs;
 *   - the other gateway serves throughout, and g0's process exits 0.
 */
import http from 'node:http';
import os from 'node:os';
import { sleep, waitFor } from '../e2e/fault-stack';
import { figure, pick } from './support/figures';
import { markedChat, marker, stream, type Target } from './support/load';
import { type ReliabilityStack, startStack } from './support/stack';

const PART = 'sigterm';
const LOAD = pick({ short: 20, full: 50 });
/** Each stream's length: a token per 20 ms, so the drain lasts about this long (short 3 s, full 10 s). */
const TOKENS = pick({ short: 150, full: 500 });
const SHUTDOWN_GRACE_MS = 30_000;
const ANSWER_BOUND_MS = 15_000;

jest.setTimeout(pick({ short: 240_000, full: 300_000 }));

let rs: ReliabilityStack;
let targets: Target[];

beforeAll(async () => {
  rs = await startStack({ gateways: 2, workers: 1, standin: true, gatewayEnv: { SHUTDOWN_GRACE_MS: String(SHUTDOWN_GRACE_MS), LOG_LEVEL: 'info' } });
  targets = rs.targets;
});
afterAll(async () => {
  await rs?.stack.stop();
});

interface Answer {
  status: number;
  headers: http.IncomingHttpHeaders;
  body: string;
  /** The socket error (ECONNREFUSED, ECONNRESET) when there was no response. */
  failure: string | null;
}

/** One plain (non-stream) request, on `agent` (a kept-alive connection when the agent has one free). */
function plain(target: Target, agent: http.Agent, body: object): Promise<Answer> {
  const payload = JSON.stringify(body);
  return new Promise((resolve) => {
    const req = http.request(new URL('/v1/chat/completions', target.url), {
      method: 'POST', agent,
      headers: { authorization: `Bearer ${target.apiKey}`, 'content-type': 'application/json', 'content-length': Buffer.byteLength(payload) },
    });
    req.setTimeout(ANSWER_BOUND_MS, () => req.destroy(new Error('no answer within the bound')));
    req.on('error', (err: NodeJS.ErrnoException) => resolve({ status: 0, headers: {}, body: '', failure: err.code ?? err.message }));
    req.on('response', (res) => {
      let text = '';
      res.setEncoding('utf8');
      res.on('data', (d: string) => (text += d));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body: text, failure: null }));
      res.on('error', (err: NodeJS.ErrnoException) => resolve({ status: res.statusCode ?? 0, headers: res.headers, body: text, failure: err.code ?? 'error' }));
    });
    req.end(payload);
  });
}

test(`SIGTERM with ${LOAD} open streams: they finish within the grace, new requests are refused, exit 0`, async () => {
  const model = rs.stack.model;
  const [g0, g1] = targets;
  const proc = rs.stack.gateways[0].proc;
  for (const t of targets) expect((await stream(t, markedChat(model, marker('warm', 0), 5))).end).toBe('done');

  // A connection kept alive from before the signal, busy at the signal (so the drain's closing of idle connections
  // leaves it), free again during the drain: the case the drain guard's 503 is for.
  const keptAlive = new http.Agent({ keepAlive: true, maxSockets: 1 });
  expect((await plain(g0, keptAlive, markedChat(model, marker('ka', 0), 5))).status).toBe(200); // opens the connection

  let started = 0;
  const open = Array.from({ length: LOAD }, (_, i) => {
    let counted = false;
    return stream(g0, markedChat(model, marker('open', i), TOKENS), {
      onChunk: (r) => {
        if (!counted && r.content.length > 0) {
          counted = true;
          started += 1;
        }
      },
    });
  });
  await waitFor(() => started === LOAD, 60_000, `all ${LOAD} streams to have their first text`);
  const busy = plain(g0, keptAlive, { ...markedChat(model, marker('ka', 1), 50), stream: false });
  await sleep(50); // the request is on the wire before the signal (its answer, 50 tokens, takes ~1 s)

  const exit = new Promise<number | null>((resolve) => {
    if (proc.child.exitCode !== null) resolve(proc.child.exitCode);
    proc.child.once('exit', (code) => resolve(code));
  });
  const signalledAt = Date.now();
  process.kill(proc.child.pid!, 'SIGTERM');

  // The busy request on the kept-alive connection is answered (it came before the signal); the next one on the same
  // connection meets the drain guard.
  expect((await busy).status).toBe(200);
  const onKeptAlive = await plain(g0, keptAlive, markedChat(model, marker('ka', 2), 5));
  // A new connection: the listener is closed.
  const onNewConnection = await plain(g0, new http.Agent({ keepAlive: false }), markedChat(model, marker('new', 0), 5));
  const otherGateway = await stream(g1, markedChat(model, marker('g1', 0), 20));
  figure(PART, 'during the drain: kept-alive connection / new connection / other gateway',
    `${onKeptAlive.status || onKeptAlive.failure} / ${onNewConnection.status || onNewConnection.failure} / ${otherGateway.end}`, '');

  const ends = await Promise.all(open);
  const lastStreamEndMs = Math.max(...ends.map((r) => r.deltaTimes.at(-1) ?? 0)) - signalledAt;
  const code = await Promise.race([exit, sleep(SHUTDOWN_GRACE_MS + 30_000).then(() => 'still running')]);
  const drainMs = Date.now() - signalledAt;
  const finished = ends.filter((r) => r.end === 'done' && r.finishReason === 'length');
  figure(PART, `streams finished after SIGTERM`, `${finished.length}/${LOAD}`, '');
  figure(PART, 'SIGTERM → last stream done / → exit', `${lastStreamEndMs}/${drainMs}`, `ms (grace ${SHUTDOWN_GRACE_MS} ms, streams of ${TOKENS} tokens)`);
  figure(PART, 'exit code', String(code), '');
  figure(PART, 'load average (1 min) at the end', os.loadavg()[0].toFixed(2), '');
  keptAlive.destroy();

  expect(ends.map((r) => `${r.end}:${r.finishReason}`)).toEqual(Array(LOAD).fill('done:length'));
  ends.forEach((r, i) => expect(r.content).toContain(marker('open', i)));
  expect(drainMs).toBeLessThan(SHUTDOWN_GRACE_MS);
  expect(code).toBe(0);

  // Refused as documented: 503 shutting_down with retry-after on the kept-alive connection (or, had the server closed
  // that connection first, refused like a new one), the listener closed for a new connection.
  if (onKeptAlive.failure === null) {
    expect(onKeptAlive.status).toBe(503);
    expect(JSON.parse(onKeptAlive.body).error).toMatchObject({ code: 'shutting_down', type: 'server_error', message: expect.any(String) });
    expect(Number(onKeptAlive.headers['retry-after'])).toBeGreaterThan(0);
    expect(onKeptAlive.headers.connection).toBe('close');
  } else {
    expect(['ECONNREFUSED', 'ECONNRESET']).toContain(onKeptAlive.failure);
  }
  expect(onNewConnection).toMatchObject({ status: 0, failure: 'ECONNREFUSED' });
  expect(otherGateway.end).toBe('done');
});
