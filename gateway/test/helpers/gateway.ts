/** Runs the real gateway wiring (src/wiring.ts) on an ephemeral port against a test Redis. */
import type { Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { loadConfig, type Config } from '../../src/config';
import { answerClientErrors } from '../../src/errors';
import { createLogger, type LogLevel } from '../../src/logger';
import { buildGateway, type Gateway } from '../../src/wiring';

export const TEST_KEY = 'sk-test-0123456789abcdef';

export interface TestGateway {
  url: string;
  config: Config;
  gateway: Gateway;
  logs: string[];
  close(): Promise<void>;
}

export async function startGateway(redisUrl: string, env: Record<string, string> = {}): Promise<TestGateway> {
  const config = loadConfig({
    REDIS_URL: redisUrl,
    API_KEYS: TEST_KEY,
    PORT: '0',
    WORKER_REFRESH_MS: '100',
    JOB_POLL_MS: '500',
    LOG_LEVEL: (process.env.TEST_LOG_LEVEL as LogLevel) ?? 'error',
    ...env,
  });
  const logs: string[] = [];
  const logger = createLogger(config.LOG_LEVEL, (line) => {
    logs.push(line);
    if (process.env.TEST_LOG_LEVEL) process.stdout.write(line + '\n');
  });
  const gateway = buildGateway(config, logger, config.API_KEYS);
  const server: Server = await new Promise((resolve) => {
    const s = gateway.app.listen(0, '127.0.0.1', () => resolve(s));
    answerClientErrors(s); // as main.ts does
  });
  const { port } = server.address() as AddressInfo;
  return {
    url: `http://127.0.0.1:${port}`,
    config,
    gateway,
    logs,
    async close() {
      server.closeAllConnections();
      await new Promise<void>((r) => server.close(() => r()));
      await gateway.close();
    },
  };
}

/** Parses an SSE body into its events: data payloads (JSON or "[DONE]") and comments. */
export function parseSse(body: string): { data: unknown[]; comments: string[] } {
  const data: unknown[] = [];
  const comments: string[] = [];
  for (const block of body.split('\n\n')) {
    for (const line of block.split('\n')) {
      if (line.startsWith(':')) comments.push(line.slice(1).trim());
      else if (line.startsWith('data: ')) {
        const payload = line.slice(6);
        data.push(payload === '[DONE]' ? '[DONE]' : JSON.parse(payload));
      }
    }
  }
  return { data, comments };
}

/** The complete events of a stream still under way (its last block may hold half a line): for `parseSse`. */
export const completeEvents = (body: string): string => body.slice(0, body.lastIndexOf('\n\n') + 2);

export const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/**
 * Deadlines of the waits below. Generous on purpose: a wait ends as soon as its condition holds, so a long deadline costs
 * nothing on a fast machine and only keeps a slow or loaded one (2 cores busy twice over, one core) from failing. Below
 * jest's testTimeout (jest.config.js), so that a wait that runs out says what it waited for.
 */
export const WAIT_MS = 15_000;

/** Polls `cond` until it holds; throws (failing the test) when `ms` runs out first. Never a fixed sleep for a state. */
export async function waitFor(cond: () => boolean | Promise<boolean>, ms = WAIT_MS, what = 'condition'): Promise<void> {
  const deadline = Date.now() + ms;
  while (!(await cond())) {
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await sleep(20);
  }
}

/**
 * Waits until `g` answers /ready with 200. A fresh gateway answers once its registry has seen a worker and a tokenizer
 * thread has built the model's tokenizer: seconds on a loaded machine, so suites wait for it in beforeAll rather than
 * in their first test.
 */
export async function waitReady(g: { url: string }): Promise<void> {
  await waitFor(async () => (await fetch(`${g.url}/ready`)).status === 200, 120_000, 'the gateway to be ready');
}

/** Like `waitFor`, but returns the value that satisfied `ok` (e.g. the response whose header shows the new limit). */
export async function pollUntil<T>(probe: () => Promise<T>, ok: (v: T) => boolean, what: string, ms = WAIT_MS): Promise<T> {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = await probe();
    if (ok(v)) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what} (last: ${JSON.stringify(v)})`);
    await sleep(20);
  }
}

/** A streamed response read as it arrives: lets a test act on a state of the stream (its first chunk, a keep-alive). */
export interface OpenStream {
  status: number;
  /** Everything received so far. */
  received(): string;
  /** The whole body, once the server ends it. */
  body: Promise<string>;
  /** Drops the connection, as a client that goes away. */
  abort(): void;
}

export async function openStream(url: string, body: unknown, headers: Record<string, string> = {}): Promise<OpenStream> {
  const ctrl = new AbortController();
  const resp = await fetch(url, {
    method: body === undefined ? 'GET' : 'POST',
    headers: { 'content-type': 'application/json', ...headers },
    body: body === undefined ? undefined : JSON.stringify(body),
    signal: ctrl.signal,
  });
  const reader = resp.body!.getReader();
  const decoder = new TextDecoder();
  let text = '';
  const all = (async () => {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return text;
      text += decoder.decode(value, { stream: true });
    }
  })();
  all.catch(() => undefined); // an aborted stream rejects; only a caller that awaits `body` cares
  return { status: resp.status, received: () => text, body: all, abort: () => ctrl.abort() };
}
