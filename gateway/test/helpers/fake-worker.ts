/**
 * A FAKE worker, for the gateway's unit tests only: it speaks docs/PROTOCOL.md (registration, heartbeat, BullMQ queue,
 * events on llm:job:{id}, cancellation) but generates nothing: it replies with scripted text. It exists to test the
 * gateway's queue/stream layer in isolation, including the failures a real worker rarely shows (lost messages, a dead
 * worker). The real Python worker is tested end to end by tests/e2e.
 */
import { UnrecoverableError, Worker, type Job } from 'bullmq';
import Redis from 'ioredis';
import {
  CANCEL_CHANNEL,
  cancelledKey,
  eventsKey,
  type JobData,
  jobDataSchema,
  jobChannel,
  type JobResult,
  queueName,
  tokenizerKey,
  TRUNCATED_EVENT,
  WORKERS_ZSET,
  workerKey,
} from '../../src/protocol/job';
import { tokenizerFixture } from './tokenizer-fixture';

export interface FakeScript {
  /** The reply of choice i (default: "Hello from the fake worker!" with the choice index). */
  reply?: (data: JobData, index: number) => string;
  /** Characters per delta. */
  pieceChars?: number;
  /**
   * Pause between deltas: the fake job's pace (a job that takes time), never a way to order a test's steps — a test
   * that needs the job to be at a given point holds it there with `holdAfterDeltas`/`holdGate` or `startGate`.
   */
  delayMs?: number;
  /** Hold after picking the job up, before `started`, until this settles: the test decides when the job starts. */
  startGate?: Promise<unknown>;
  /**
   * Hold after this many deltas until `holdGate` settles or the job is cancelled (whichever comes first), then go on
   * (or end as cancelled): the test decides when the job moves on. A gate that never settles holds the job until it is
   * cancelled — a job that is still running, however long the test takes.
   */
  holdAfterDeltas?: number;
  holdGate?: Promise<unknown>;
  /** These seq numbers are not published (simulates lost pub/sub messages); the result is still stored. */
  dropSeqs?: number[];
  /** Fail the job with this protocol error after `failAfterDeltas` deltas. */
  fail?: { code: string; message: string };
  failAfterDeltas?: number;
  /** Stop heartbeating and hang after this many deltas (simulates a dead worker). */
  dieAfterDeltas?: number;
  finishReason?: 'stop' | 'length';
}

/** One OpenAI ChatCompletionTokenLogprob per delta when the job asks for logprobs (a fake "token" = one delta). */
function fakeLogprob(text: string, topN: number) {
  const bytes = [...Buffer.from(text, 'utf8')];
  const top = Array.from({ length: topN }, (_, i) => ({ token: i === 0 ? text : `alt${i}`, logprob: -0.5 - i, bytes }));
  return { token: text, logprob: -0.5, bytes, top_logprobs: top };
}

export interface FakeWorkerOptions {
  redisUrl: string;
  model?: string;
  workerId?: string;
  contextLength?: number;
  /** kv_token_budget reported in the worker's info (absent: not reported, as an older worker). */
  kvTokenBudget?: number;
  /**
   * How long a heartbeat keeps the worker registered (default 3000; beats come every 200 ms). Generous so that a busy
   * test process cannot look like a dead worker; `die` and `close` unregister at once, so tests of a dead worker do
   * not wait for it.
   */
  heartbeatTtlMs?: number;
  /** false: register and heartbeat but never take jobs (they stay queued). */
  consume?: boolean;
  /** Put the chat template in tokenizer_config_json (true) or in a separate chat_template hash field (false). */
  templateInConfig?: boolean;
  /** false: ignore the job's store_events (as a worker older than resumable streams does). */
  storeEvents?: boolean;
  script?: FakeScript;
}

// unref: a scripted pause of a job that a test abandoned (closed worker, cancelled run) must not keep jest from exiting.
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms).unref());

export class FakeWorker {
  readonly model: string;
  readonly workerId: string;
  script: FakeScript;
  readonly jobs: JobData[] = [];
  readonly cancelled = new Set<string>();
  /** Held jobs waiting for their cancel message (see `FakeScript.holdAfterDeltas`). */
  private readonly onCancel = new Map<string, () => void>();
  private readonly redis: Redis;
  private readonly sub: Redis;
  private worker: Worker | null = null;
  private workerConn: Redis | null = null;
  private heartbeat: NodeJS.Timeout | null = null;
  private dead = false;
  private readonly ttl: number;

  constructor(private readonly opts: FakeWorkerOptions) {
    this.model = opts.model ?? 'fake-model';
    this.workerId = opts.workerId ?? `w-fake-${Math.random().toString(16).slice(2, 8)}`;
    this.script = opts.script ?? {};
    this.ttl = opts.heartbeatTtlMs ?? 3000;
    this.redis = new Redis(opts.redisUrl, { maxRetriesPerRequest: null });
    this.sub = new Redis(opts.redisUrl, { maxRetriesPerRequest: null });
  }

  async start(): Promise<void> {
    const fx = tokenizerFixture();
    const inConfig = this.opts.templateInConfig ?? true;
    await this.redis.hset(tokenizerKey(this.model), {
      hash: fx.hash,
      tokenizer_json: fx.tokenizerJson,
      tokenizer_config_json: inConfig ? fx.configWithTemplateJson : fx.configJson,
      ...(inConfig ? {} : { chat_template: fx.chatTemplate }),
    });
    await this.sub.subscribe(CANCEL_CHANNEL);
    this.sub.on('message', (_ch, jobId: string) => {
      this.cancelled.add(jobId);
      this.onCancel.get(jobId)?.();
    });
    if (this.opts.consume !== false) await this.startConsuming();
    await this.beat();
    this.heartbeat = setInterval(() => void this.beat().catch(() => undefined), 200);
  }

  private async startConsuming(): Promise<void> {
    this.workerConn = new Redis(this.opts.redisUrl, { maxRetriesPerRequest: null });
    this.worker = new Worker(queueName(this.model), (job) => this.process(job), {
      connection: this.workerConn,
      concurrency: 8,
      lockDuration: 2000,
      stalledInterval: 1000,
      maxStalledCount: 1,
    });
    this.worker.on('error', () => undefined); // connection errors while a test stops Redis on purpose
    await this.worker.waitUntilReady();
  }

  private async beat(): Promise<void> {
    const info = {
      worker_id: this.workerId,
      model: this.model,
      queue: queueName(this.model),
      context_length: this.opts.contextLength ?? 2048,
      max_batch: 8,
      device: 'cpu',
      dtype: 'float32',
      engine: 'fake',
      tokenizer_hash: tokenizerFixture().hash,
      started_at_ms: 1764100000000,
      ready: true,
      pid: process.pid,
      host: 'test',
      version: '0.0.0-fake',
      ...(this.opts.kvTokenBudget !== undefined ? { kv_token_budget: this.opts.kvTokenBudget } : {}),
    };
    await this.redis.set(workerKey(this.workerId), JSON.stringify(info), 'PX', this.ttl);
    await this.redis.zadd(WORKERS_ZSET, Date.now() + this.ttl, this.workerId);
  }

  /**
   * Behaves like a killed process: no heartbeat, no lock renewal (so BullMQ's stalled check hands its active jobs to
   * another worker once the lock expires), no more events.
   */
  async die(): Promise<void> {
    if (this.heartbeat) clearInterval(this.heartbeat);
    this.heartbeat = null;
    this.dead = true;
    await this.redis.zrem(WORKERS_ZSET, this.workerId);
    void this.worker?.close(true).catch(() => undefined);
  }

  private async process(job: Job<JobData>): Promise<JobResult> {
    // What the gateway enqueues must satisfy the contract (the real worker's pydantic model checks the same).
    const data = jobDataSchema.parse(job.data);
    const id = job.id as string;
    this.jobs.push(data);
    const s = this.script;
    if (await this.redis.get(cancelledKey(id))) throw new UnrecoverableError('cancelled: cancelled before start');
    if (s.startGate) await s.startGate;
    let seq = 0;
    const drop = new Set(s.dropSeqs ?? []);
    // As the real worker (transport/publisher.py): with store_events, each event is appended to the job's list before
    // it is published, until max_bytes (then the truncated marker, nothing more). A dropped message is lost on
    // pub/sub only: it is still in the list.
    const store = this.opts.storeEvents === false ? undefined : data.store_events;
    let storedBytes = 0;
    let storeFull = false;
    const publish = async (event: Record<string, unknown>) => {
      if (this.dead) return;
      if (event.type !== 'started') seq += 1;
      const message = JSON.stringify({ ...event, ...(event.type !== 'started' ? { seq } : {}), ts_ms: Date.now() });
      const pipe = this.redis.pipeline();
      if (store && !storeFull) {
        const size = Buffer.byteLength(message);
        storeFull = storedBytes + size > store.max_bytes;
        storedBytes += size;
        pipe.rpush(eventsKey(id), storeFull ? TRUNCATED_EVENT : message).pexpire(eventsKey(id), store.ttl_ms);
      }
      if (event.type === 'started' || !drop.has(seq)) pipe.publish(jobChannel(id), message);
      await pipe.exec();
    };
    await publish({ type: 'started', worker_id: this.workerId, prompt_tokens: data.prompt_tokens });
    const replies = Array.from({ length: data.params.n }, (_, i) => (s.reply ?? defaultReply)(data, i));
    const piece = s.pieceChars ?? 4;
    let deltas = 0;
    const logprobs: Array<Array<Record<string, unknown>>> = replies.map(() => []);
    // Echo + logprobs (job param prompt_logprobs), as the real worker sends them: the prompt's entries, flagged, one
    // per character here, first in each choice's first delta and in its result; the first without a logprob.
    const promptEntries =
      data.params.prompt_logprobs !== undefined && data.prompt !== undefined
        ? [...data.prompt].map((ch, i) => ({ ...fakeLogprob(ch, i === 0 ? 0 : data.params.prompt_logprobs!), ...(i === 0 ? { logprob: null } : {}), prompt: true }))
        : [];
    for (const l of logprobs) l.push(...promptEntries);
    const promptUnsent = new Set(replies.map((_, i) => i));
    const longest = Math.max(...replies.map((r) => r.length));
    for (let at = 0; at < longest; at += piece) {
      if (s.holdAfterDeltas === deltas) await this.hold(id, s.holdGate);
      if (this.cancelled.has(id)) throw new UnrecoverableError('cancelled: cancelled by the client');
      if (s.fail && deltas === (s.failAfterDeltas ?? 0)) {
        await publish({ type: 'error', error: s.fail });
        throw new UnrecoverableError(`${s.fail.code}: ${s.fail.message}`);
      }
      if (s.dieAfterDeltas !== undefined && deltas === s.dieAfterDeltas) {
        await this.die();
        await new Promise(() => undefined); // hang forever, like a killed process (the test closes us)
      }
      const choices = replies
        .map((r, index) => {
          const text = r.slice(at, at + piece);
          let lp: Array<Record<string, unknown>> | null = data.params.logprobs ? [fakeLogprob(text, data.params.top_logprobs)] : null;
          if (lp) logprobs[index].push(lp[0]);
          if (lp && promptUnsent.delete(index)) lp = [...promptEntries, ...lp];
          return { index, text, tokens: 1, logprobs: lp };
        })
        .filter((c) => c.text.length > 0);
      await publish({ type: 'delta', choices });
      deltas += 1;
      if (s.delayMs) await sleep(s.delayMs);
    }
    const result: JobResult = {
      choices: replies.map((text, index) => ({
        index,
        text,
        finish_reason: s.finishReason ?? 'stop',
        logprobs: data.params.logprobs ? (logprobs[index] as JobResult['choices'][number]['logprobs']) : null,
      })),
      usage: { prompt_tokens: data.prompt_tokens, completion_tokens: Math.max(1, deltas) },
      worker_id: this.workerId,
      timing: { picked_up_ms: Date.now(), first_token_ms: Date.now(), finished_ms: Date.now() },
    };
    await publish({ type: 'done', result });
    return result;
  }

  /** Until `gate` settles or job `id` is cancelled. */
  private async hold(id: string, gate: Promise<unknown> = new Promise(() => undefined)): Promise<void> {
    if (this.cancelled.has(id)) return;
    const cancelled = new Promise<void>((resolve) => this.onCancel.set(id, resolve));
    try {
      await Promise.race([gate, cancelled]);
    } finally {
      this.onCancel.delete(id);
    }
  }

  async close(): Promise<void> {
    if (this.heartbeat) clearInterval(this.heartbeat);
    this.heartbeat = null;
    await this.redis.zrem(WORKERS_ZSET, this.workerId).catch(() => undefined);
    await this.worker?.close(true).catch(() => undefined);
    this.workerConn?.disconnect();
    this.sub.disconnect();
    this.redis.disconnect();
  }
}

function defaultReply(_data: JobData, index: number): string {
  return index === 0 ? 'Hello from the fake worker!' : `Hello from the fake worker, choice ${index}!`;
}
