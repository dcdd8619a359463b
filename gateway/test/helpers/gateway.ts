/** Runs the real gateway wiring (src/wiring.ts) on an ephemeral port against a test Redis. */
import type { Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { loadConfig, type Config } from '../../src/config';
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

export const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export async function waitFor(cond: () => boolean | Promise<boolean>, ms = 5000, what = 'condition'): Promise<void> {
  const deadline = Date.now() + ms;
  while (!(await cond())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(20);
  }
}
