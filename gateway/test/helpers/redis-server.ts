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

/**
 * Waits until the server answers PING, or fails at once if it exited (e.g. another process took the port between
 * freePort and its bind, or redis-server is missing) — with what it printed, so a CI log says why.
 */
async function waitForPing(port: number, proc: ChildProcess, output: () => string, ms = 30_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!(await pingOnce(port))) {
    if (proc.exitCode !== null || proc.signalCode !== null) throw new RedisExited(port, output());
    if (Date.now() > deadline) throw new Error(`redis on port ${port} did not answer PING within ${ms} ms: ${output()}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

class RedisExited extends Error {
  constructor(
    readonly port: number,
    readonly output: string,
  ) {
    super(`redis-server on port ${port} exited before answering PING: ${output || '(no output)'}`);
  }
}

export async function startRedis(): Promise<TestRedis> {
  let port = await freePort();
  let proc: ChildProcess | null = null;
  const launch = async () => {
    const p = spawn(
      process.env.REDIS_SERVER ?? 'redis-server',
      ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--maxmemory-policy', 'noeviction'],
      { stdio: ['ignore', 'pipe', 'pipe'] },
    );
    proc = p;
    let output = '';
    const keep = (chunk: Buffer) => {
      output = (output + chunk.toString()).slice(-2000);
    };
    p.stdout!.on('data', keep);
    p.stderr!.on('data', keep);
    p.once('error', (err) => keep(Buffer.from(String(err))));
    await waitForPing(port, p, () => output.trim().split('\n').slice(-3).join(' | '));
  };
  const kill = async () => {
    const p = proc;
    proc = null;
    if (!p || p.exitCode !== null || p.signalCode !== null) return;
    await new Promise<void>((resolve) => {
      p.once('exit', () => resolve());
      p.kill('SIGKILL');
    });
  };
  // A free port can be taken by a parallel process before redis binds it: try a few others before giving up.
  for (let attempt = 1; ; attempt++) {
    try {
      await launch();
      break;
    } catch (err) {
      if (!(err instanceof RedisExited) || !/address already in use/i.test(err.output) || attempt === 5) throw err;
      port = await freePort();
    }
  }
  return {
    get url() {
      return `redis://127.0.0.1:${port}`;
    },
    get port() {
      return port;
    },
    stop: kill,
    kill,
    restart: launch,
  };
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
