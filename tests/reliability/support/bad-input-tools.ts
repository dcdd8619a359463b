// Tools of the reliability suite's "Bad input" part (tests/reliability/bad-input.test.ts): the gateway process's RSS,
// a client that keeps asking for answers while the attack runs, raw HTTP requests with bodies of our choosing, and
// schemathesis run from its own venv (support/fuzz-venv.sh).
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import os from 'node:os';
import http from 'node:http';
import path from 'node:path';
import { ROOT } from './figures';

/** The gateway itself: the deepest process under the tsx launcher that FaultStack spawns (tsx runs main.ts in a child). */
export function gatewayPid(launcherPid: number): number {
  let pid = launcherPid;
  for (;;) {
    const file = `/proc/${pid}/task/${pid}/children`;
    const children = existsSync(file) ? readFileSync(file, 'utf8').trim().split(/\s+/).filter(Boolean).map(Number) : [];
    if (children.length === 0) return pid;
    pid = children[0];
  }
}

/** VmRSS of a process in MiB. */
export function rssMiB(pid: number): number {
  const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  return m ? Number(m[1]) / 1024 : NaN;
}

/** Samples a process's RSS every 100 ms until stopped: the peak and the last value. */
export function rssSampler(pid: number): { peak: () => number; stop: () => number } {
  let peak = rssMiB(pid);
  const timer = setInterval(() => {
    peak = Math.max(peak, rssMiB(pid));
  }, 100);
  return { peak: () => peak, stop: () => (clearInterval(timer), Math.max(peak, rssMiB(pid))) };
}

export interface OtherClient {
  /** Stops asking and resolves with what it saw. */
  stop(): Promise<{ ok: number; failed: string[]; latenciesMs: number[] }>;
}

/** A well-behaved client asking for short chat answers, one after another, until stopped. */
export function otherClient(url: string, apiKey: string, model: string, prompt: string): OtherClient {
  let stopping = false;
  const latenciesMs: number[] = [];
  const failed: string[] = [];
  const loop = (async () => {
    while (!stopping) {
      const t0 = performance.now();
      try {
        const res = await fetch(`${url}/v1/chat/completions`, {
          method: 'POST',
          headers: { authorization: `Bearer ${apiKey}`, 'content-type': 'application/json', 'cache-control': 'no-store' },
          body: JSON.stringify({ model, max_tokens: 4, messages: [{ role: 'user', content: prompt }] }),
          signal: AbortSignal.timeout(60_000),
        });
        const body = (await res.json()) as { choices?: unknown[] };
        if (res.status === 200 && Array.isArray(body.choices)) latenciesMs.push(performance.now() - t0);
        else failed.push(`${res.status} ${JSON.stringify(body).slice(0, 200)}`);
      } catch (err) {
        failed.push(String(err));
      }
    }
  })();
  return {
    async stop() {
      stopping = true;
      await loop;
      return { ok: latenciesMs.length, failed, latenciesMs };
    },
  };
}

export function percentile(values: number[], p: number): number {
  if (values.length === 0) return NaN;
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
}

export interface RawAnswer {
  status: number;
  body: any;
  /** Bytes of the body we managed to send before the server answered or closed. */
  sent: number;
}

/**
 * POSTs `chunks` (generated lazily: a 100 MB body never sits in this process's memory either) and resolves with the
 * answer. The server may answer and close before the body is sent (as it should for an oversized one): then sending
 * stops, and the answer counts.
 */
export function rawPost(url: string, headers: Record<string, string>, chunks: Iterable<Buffer>): Promise<RawAnswer> {
  return new Promise((resolve, reject) => {
    let sent = 0;
    let answered = false;
    const req = http.request(url, { method: 'POST', headers, agent: false }, (res) => {
      answered = true;
      const parts: Buffer[] = [];
      res.on('data', (c: Buffer) => parts.push(c));
      res.on('end', () => {
        const text = Buffer.concat(parts).toString('utf8');
        let body: unknown = text;
        try {
          body = JSON.parse(text);
        } catch {}
        resolve({ status: res.statusCode ?? 0, body, sent });
        req.destroy();
      });
    });
    req.on('error', (err) => {
      if (!answered) reject(err);
    });
    const it = chunks[Symbol.iterator]();
    const pump = () => {
      for (;;) {
        if (answered || req.destroyed) return;
        const next = it.next();
        if (next.done) return void req.end();
        sent += next.value.length;
        if (!req.write(next.value)) return void req.once('drain', pump);
      }
    };
    pump();
  });
}

/** `{"model":…,"messages":[{"role":"user","content":"aaa…"}]}` of about `bytes` bytes, 1 MiB at a time. */
export function bigBody(model: string, bytes: number): { length: number; chunks: Iterable<Buffer> } {
  const head = Buffer.from(`{"model":${JSON.stringify(model)},"messages":[{"role":"user","content":"`);
  const tail = Buffer.from('"}]}');
  const mib = Buffer.alloc(1 << 20, 'a');
  function* chunks(): Generator<Buffer> {
    yield head;
    for (let left = bytes; left > 0; left -= mib.length) yield left >= mib.length ? mib : mib.subarray(0, left);
    yield tail;
  }
  return { length: head.length + bytes + tail.length, chunks: chunks() };
}

const FUZZ_VENV = path.join(ROOT, 'tests/reliability/support/fuzz-venv.sh');

function run(cmd: string, args: string[], timeoutMs: number, cwd = ROOT): Promise<{ code: number | null; out: string }> {
  return new Promise((resolve) => {
    const child = spawn(cmd, args, { cwd, stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, NO_COLOR: '1' } });
    let out = '';
    child.stdout.on('data', (c) => (out += c));
    child.stderr.on('data', (c) => (out += c));
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, out });
    });
  });
}

/** The `st` executable, the venv made first when missing (a minute or two on a fresh machine). */
export async function schemathesis(): Promise<string> {
  const r = await run('bash', [FUZZ_VENV], 600_000);
  const st = r.out.trim().split('\n').pop() ?? '';
  if (r.code !== 0 || !existsSync(st)) throw new Error(`fuzz-venv.sh failed (${r.code}):\n${r.out.slice(-2000)}`);
  return st;
}

export interface FuzzRun {
  code: number | null;
  cases: number;
  out: string;
}

export async function runSchemathesis(st: string, args: string[], timeoutMs: number): Promise<FuzzRun> {
  // In a directory of its own: schemathesis keeps a cache of the failures it found (.schemathesis/) where it runs.
  const dir = mkdtempSync(path.join(os.tmpdir(), 'schemathesis-'));
  const r = await run(st, ['run', ...args], timeoutMs, dir).finally(() => rmSync(dir, { recursive: true, force: true }));
  const m = /(\d+) generated/.exec(r.out);
  return { code: r.code, cases: m ? Number(m[1]) : 0, out: r.out };
}
