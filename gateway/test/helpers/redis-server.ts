/** Starts a private redis-server on a free port for one test file (real Redis, never a mock). */
import { spawn, type ChildProcess } from 'node:child_process';
import { connect, createServer } from 'node:net';
import Redis from 'ioredis';

export interface TestRedis {
  url: string;
  port: number;
  stop(): Promise<void>;
  /** Kills the server (to test outages); `restart` brings it back on the same port. */
  kill(): Promise<void>;
  restart(): Promise<void>;
}

export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const addr = srv.address();
      const port = typeof addr === 'object' && addr ? addr.port : 0;
      srv.close(() => resolve(port));
    });
  });
}

/** Raw PING over a socket: no client library state (reconnect timers) is left behind between attempts. */
export function pingOnce(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const sock = connect(port, '127.0.0.1');
    const done = (ok: boolean) => {
      sock.destroy();
      resolve(ok);
    };
    sock.setTimeout(500, () => done(false));
    sock.once('error', () => done(false));
    sock.once('connect', () => sock.write('PING\r\n'));
    sock.once('data', (buf) => done(buf.toString().startsWith('+PONG')));
  });
}

async function waitForPing(port: number, ms = 10_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!(await pingOnce(port))) {
    if (Date.now() > deadline) throw new Error(`redis on port ${port} did not start`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

export async function startRedis(): Promise<TestRedis> {
  const port = await freePort();
  const url = `redis://127.0.0.1:${port}`;
  let proc: ChildProcess | null = null;
  const launch = async () => {
    proc = spawn(
      process.env.REDIS_SERVER ?? 'redis-server',
      ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--maxmemory-policy', 'noeviction'],
      { stdio: 'ignore' },
    );
    await waitForPing(port);
  };
  const kill = async () => {
    const p = proc;
    proc = null;
    if (!p || p.exitCode !== null) return;
    await new Promise<void>((resolve) => {
      p.once('exit', () => resolve());
      p.kill('SIGKILL');
    });
  };
  await launch();
  return { url, port, stop: kill, kill, restart: launch };
}

/** What `useTestRedis` hands a test file; only usable once its beforeAll has run (in hooks and tests). */
export interface RedisFixture {
  readonly url: string;
  /** One ioredis client for the file's own reads and writes, opened on first use. */
  readonly client: Redis;
  /** A further client (a subscriber, say); like `client`, it is disconnected when the file ends. */
  connect(): Redis;
  kill(): Promise<void>;
  restart(): Promise<void>;
  /** Teardown that still needs Redis (a gateway, a worker): Jest runs afterAll hooks in declaration order, so a
   * file's own afterAll would run after the server is gone. These run in registration order, before the stop. */
  beforeStop(close: () => Promise<void>): void;
}

/** Registers beforeAll/afterAll that start and stop a private Redis for the calling test file. */
export function useTestRedis(): RedisFixture {
  let server: TestRedis | undefined;
  let shared: Redis | undefined;
  const clients: Redis[] = [];
  const closers: Array<() => Promise<void>> = [];
  const running = () => {
    if (!server) throw new Error('useTestRedis: Redis starts in beforeAll; use the fixture in hooks and tests');
    return server;
  };
  const connect = () => {
    const client = new Redis(running().url);
    clients.push(client);
    return client;
  };
  beforeAll(async () => {
    server = await startRedis();
  });
  afterAll(async () => {
    // finally: a failing close must not leave a redis-server process behind.
    try {
      for (const close of closers) await close();
    } finally {
      for (const client of clients) client.disconnect();
      await server?.stop();
    }
  });
  return {
    get url() {
      return running().url;
    },
    get client() {
      return (shared ??= connect());
    },
    connect,
    kill: () => running().kill(),
    restart: () => running().restart(),
    beforeStop: (close) => {
      closers.push(close);
    },
  };
}
