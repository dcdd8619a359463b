// Load for the reliability suite: many raw SSE clients at once (node:http, one socket each, no SDK retries hiding
// what happened), each request carrying a marker of its own so that a lost, duplicated or mixed-up response is seen.
// Each client records how its stream ended, every event id (for resuming) and when each content delta arrived.
import http from 'node:http';
import { readdirSync, readFileSync } from 'node:fs';

export interface Target {
  url: string;
  apiKey: string;
}

export type StreamEnd =
  /** `data: [DONE]` after the last chunk. */
  | 'done'
  /** An SSE error event (`data: {"error": …}`), then the end. */
  | 'error-event'
  /** A non-200 status (the body is the OpenAI error). */
  | 'http-error'
  /** The connection ended or failed before `[DONE]` (a killed gateway, a reset). */
  | 'cut'
  /** The client itself dropped it (`abortAfterChunks`, `signal`). */
  | 'aborted';

export interface StreamResult {
  status: number;
  headers: http.IncomingHttpHeaders;
  /** The completion id of the chunks (`chatcmpl-…`), null before the first chunk. */
  completionId: string | null;
  /** The last SSE `id:` seen (Last-Event-ID for a resume). */
  lastEventId: string | null;
  content: string;
  /** Event ids in order of arrival (duplicates show a replay that went wrong). */
  eventIds: string[];
  /** Date.now() of every chunk with content. */
  deltaTimes: number[];
  startedAt: number;
  end: StreamEnd;
  error: { message?: string; type?: string; code?: string | null } | null;
  finishReason: string | null;
  /** The usage chunk's `completion_tokens` (with `stream_options.include_usage`), null without one. */
  completionTokens?: number | null;
}

export interface StreamOptions {
  /** Default POST /v1/chat/completions. */
  method?: 'POST' | 'GET';
  path?: string;
  lastEventId?: string;
  /** Drop the connection after this many content chunks. */
  abortAfterChunks?: number;
  signal?: AbortSignal;
  /** Called after each parsed event (for tests that act mid-stream). */
  onChunk?: (r: StreamResult) => void;
  /** Pause reading for this long after the response headers arrive (a slow reader: the socket fills, TCP pushes back). */
  pauseMs?: number;
  agent?: http.Agent;
}

/** Every client its own socket (no keep-alive pool limits): each stream is one connection, as most SDK users have. */
export const socketPerStream = new http.Agent({ keepAlive: false, maxSockets: Infinity });

/** A stream request; resolves when it ended, however it ended (never rejects for a server's behaviour). */
export function stream(target: Target, body: object | null, opts: StreamOptions = {}): Promise<StreamResult> {
  const url = new URL(opts.path ?? '/v1/chat/completions', target.url);
  const payload = body === null ? null : JSON.stringify(body);
  const headers: Record<string, string | number> = { authorization: `Bearer ${target.apiKey}`, accept: 'text/event-stream', 'cache-control': 'no-store' };
  if (payload !== null) Object.assign(headers, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(payload) });
  if (opts.lastEventId) headers['last-event-id'] = opts.lastEventId;
  const r: StreamResult = {
    status: 0, headers: {}, completionId: null, lastEventId: null, content: '', eventIds: [], deltaTimes: [], startedAt: Date.now(),
    end: 'cut', error: null, finishReason: null,
  };
  return new Promise((resolve) => {
    let settled = false;
    const finish = (end: StreamEnd) => {
      if (settled) return;
      settled = true;
      r.end = end;
      resolve(r);
    };
    const req = http.request(url, { method: opts.method ?? (payload === null ? 'GET' : 'POST'), headers, agent: opts.agent ?? socketPerStream });
    opts.signal?.addEventListener('abort', () => {
      finish('aborted');
      req.destroy();
    });
    req.on('error', () => finish('cut'));
    req.on('response', (res) => {
      r.status = res.statusCode ?? 0;
      r.headers = res.headers;
      res.setEncoding('utf8');
      let buf = '';
      let chunks = 0;
      if (r.status !== 200) {
        res.on('data', (d: string) => (buf += d));
        res.on('end', () => {
          try {
            r.error = JSON.parse(buf).error ?? null;
          } catch {
            r.error = { message: buf };
          }
          finish('http-error');
        });
        res.on('error', () => finish('cut'));
        return;
      }
      if (opts.pauseMs) {
        res.pause();
        setTimeout(() => res.resume(), opts.pauseMs);
      }
      res.on('data', (d: string) => {
        buf += d;
        let cut: number;
        while ((cut = buf.indexOf('\n\n')) >= 0) {
          const block = buf.slice(0, cut);
          buf = buf.slice(cut + 2);
          let data: string | null = null;
          for (const line of block.split('\n')) {
            if (line.startsWith('id: ')) {
              r.lastEventId = line.slice(4);
              r.eventIds.push(r.lastEventId);
            } else if (line.startsWith('data: ')) data = line.slice(6);
          }
          if (data === null) continue;
          if (data === '[DONE]') {
            finish('done');
            req.destroy();
            return;
          }
          const ev = JSON.parse(data);
          if (ev.error) {
            r.error = ev.error;
            finish('error-event');
            req.destroy();
            return;
          }
          r.completionId ??= ev.id ?? null;
          if (ev.usage) r.completionTokens = ev.usage.completion_tokens ?? null;
          for (const c of ev.choices ?? []) {
            if (c.delta?.content) {
              r.content += c.delta.content;
              r.deltaTimes.push(Date.now());
              chunks += 1;
            }
            if (c.finish_reason) r.finishReason = c.finish_reason;
          }
          opts.onChunk?.(r);
          if (opts.abortAfterChunks !== undefined && chunks >= opts.abortAfterChunks) {
            finish('aborted');
            req.destroy();
            return;
          }
        }
      });
      res.on('end', () => finish('cut'));
      res.on('error', () => finish('cut'));
    });
    req.end(payload ?? undefined);
  });
}

/** Resumes a dropped stream through `target` (any replica): the events after `lastEventId`, then the rest live. */
export function resume(target: Target, completionId: string, lastEventId: string | null, opts: StreamOptions = {}): Promise<StreamResult> {
  return stream(target, null, { ...opts, method: 'GET', path: `/v1/chat/completions/${completionId}/stream`, lastEventId: lastEventId ?? undefined });
}

/** A marker unique to one request of one run: the stand-in engine echoes the prompt, so its answer must contain it. */
export function marker(run: string, i: number): string {
  return `mk${run}x${i}q`;
}

/**
 * A chat request whose answer (from the stand-in engine: the prompt's tokens, cycled) contains `mark`. The system
 * message is set, so the model's default system prompt does not push the user's text beyond `max_tokens`.
 */
export function markedChat(model: string, mark: string, maxTokens: number): object {
  return { model, stream: true, max_tokens: maxTokens, messages: [{ role: 'system', content: 'x' }, { role: 'user', content: mark }] };
}

/** Resident set size of a process, in KiB (Linux). */
/**
 * What is wrong with one response, or null: it must end `[DONE]` with finish_reason `length` after exactly `tokens`
 * tokens (the usage chunk), each event id once, and carry its own marker and no other (the stand-in engine echoes the
 * prompt, so a response routed to the wrong client shows someone else's marker). The soak test's check and
 * bench/cpu/fanout.ts's.
 */
export function checkResponse(r: StreamResult, mark: string, markers: RegExp, tokens: number): string | null {
  if (r.status >= 500) return `status ${r.status}`;
  if (r.end !== 'done') return `ended ${r.end} (status ${r.status}, ${JSON.stringify(r.error)})`;
  if (r.finishReason !== 'length') return `finish_reason ${r.finishReason}`;
  if (r.completionTokens !== tokens) return `completion_tokens ${r.completionTokens}`;
  if (new Set(r.eventIds).size !== r.eventIds.length) return 'an event id twice';
  const marks = r.content.match(markers) ?? [];
  if (marks.length === 0 || marks.some((m) => m !== mark)) return `markers ${JSON.stringify([...new Set(marks)])}, want ${mark}`;
  return null;
}

export function rssKiB(pid: number): number {
  const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  return m ? Number(m[1]) : NaN;
}

/** Process CPU time (user + system), in seconds (Linux /proc/<pid>/stat; clock ticks of 100 Hz). */
export function cpuSeconds(pid: number): number {
  const f = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].split(' ');
  return (Number(f[11]) + Number(f[12])) / 100;
}

export function percentile(values: number[], p: number): number {
  if (values.length === 0) return NaN;
  const s = [...values].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.max(0, Math.ceil((p / 100) * s.length) - 1))];
}

/** Gaps between consecutive content deltas of one stream (inter-token latency), ms. */
export function gaps(r: StreamResult): number[] {
  return r.deltaTimes.slice(1).map((t, i) => t - r.deltaTimes[i]);
}

/**
 * The pids of a process group (Linux /proc). A gateway started through tsx is two node processes in its own group
 * (the tsx launcher and the gateway itself); `rssKiB` of the launcher says nothing about the gateway.
 */
export function processGroupPids(pgid: number): number[] {
  const pids: number[] = [];
  for (const name of readdirSync('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    try {
      const f = readFileSync(`/proc/${name}/stat`, 'utf8').split(') ')[1].split(' ');
      if (Number(f[2]) === pgid) pids.push(Number(name));
    } catch {
      // ended between readdir and read
    }
  }
  return pids;
}

/** The largest resident process of a group (the gateway, not its tsx launcher), in KiB. */
export function groupMaxRssKiB(pgid: number): number {
  return Math.max(...processGroupPids(pgid).map((pid) => {
    try {
      return rssKiB(pid);
    } catch {
      return 0;
    }
  }));
}
