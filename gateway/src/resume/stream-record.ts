/**
 * What a resumed stream needs besides the job's events (README "Resumable streams"): who started it, and how it was
 * rendered. STRING llm:stream:{completion id} = JSON, written when a /v1 stream starts, before its job is queued; read
 * by whichever replica the client resumes on.
 *
 * Its life: the request's whole possible duration plus RESUME_EVENTS_TTL_MS at first, shortened to
 * RESUME_EVENTS_TTL_MS when the stream's jobs have ended, so it expires with (or soon after) the events it points to.
 * After that a resume is a 404, as for an id that never existed.
 */
import type Redis from 'ioredis';
import { z } from 'zod';
import type { Config } from '../config';
import { eventsKey, type JobResult, type TokenLogprob, TRUNCATED_EVENT } from '../protocol/job';

export const streamKey = (completionId: string): string => `llm:stream:${completionId}`;

/**
 * Bytes of events stored per job: RESUME_EVENTS_MAX_BYTES, but at most a quarter of SSE_MAX_BUFFER_BYTES. A resume
 * writes the stored events out at once, before its client can read any, and their chunks take up to about twice
 * their size: a larger list would overflow the resumed stream's buffer (stream_buffer_full) by construction.
 */
export const storedEventsMaxBytes = (c: Pick<Config, 'RESUME_EVENTS_MAX_BYTES' | 'SSE_MAX_BUFFER_BYTES'>): number =>
  Math.min(c.RESUME_EVENTS_MAX_BYTES, Math.floor(c.SSE_MAX_BUFFER_BYTES / 4));

export const streamRecordSchema = z.object({
  v: z.literal(1),
  /** The principal that started the stream (its keyId: key id or `jwt:<sub>`); only it may resume. */
  owner: z.string(),
  /** Which route's chunks: chat.completion.chunk or text_completion. */
  shape: z.enum(['chat', 'completion']),
  meta: z.object({ id: z.string(), created: z.number().int(), model: z.string() }),
  /** One job per prompt (a chat: one), in order; what following each of them needs. */
  jobs: z.array(z.object({ id: z.string(), deadline_ms: z.number().nullable(), start_deadline_ms: z.number().nullable().optional() })).min(1),
  n: z.number().int().positive(),
  include_usage: z.boolean(),
  /** chat: the answer is read for tool calls. */
  tools: z.boolean(),
  /** completion: what its chunks need (the prompts only when they are echoed, empty strings otherwise). */
  completion: z.object({ prompts: z.array(z.string()), echo: z.boolean(), logprobs: z.number().int().nullable() }).optional(),
});
export type StreamRecord = z.infer<typeof streamRecordSchema>;

/** A choice of a cached answer as its stream renders it (and as its stored events replay it). */
export interface CachedChoice {
  index: number;
  text: string;
  logprobs: TokenLogprob[] | null;
}

/** The records and, for a streamed cached answer, its events; TTLs from the configuration. */
export class StreamRecords {
  constructor(
    private readonly redis: Redis,
    private readonly ttl: { requestTimeoutMs: number; eventsTtlMs: number; eventsMaxBytes: number },
  ) {}

  /**
   * Writes the record, to live as long as the request can plus the events' TTL. Callers need not await it on the hot
   * path: it is sent on the commands connection before the job's Queue.add, so Redis has it before the job exists
   * (and the client learns the id only from the stream).
   */
  write(record: StreamRecord): Promise<unknown> {
    return this.redis.set(streamKey(record.meta.id), JSON.stringify(record), 'PX', this.ttl.requestTimeoutMs + this.ttl.eventsTtlMs);
  }

  /** The stream's jobs have ended: the record need not outlive their events. */
  ended(completionId: string): Promise<unknown> {
    return this.redis.pexpire(streamKey(completionId), this.ttl.eventsTtlMs);
  }

  async read(completionId: string): Promise<StreamRecord | null> {
    const raw = await this.redis.get(streamKey(completionId));
    if (raw === null) return null;
    const parsed = streamRecordSchema.safeParse(JSON.parse(raw));
    return parsed.success ? parsed.data : null;
  }

  /**
   * A cached answer that is streamed has no job: its events are stored here as a worker would have published them
   * (one delta with every choice's text, then done), under the id its stream carries, so that it resumes like any
   * other stream. The pipeline renders the cached answer from the same two events.
   */
  writeCachedEvents(jobId: string, choices: readonly CachedChoice[], result: JobResult): Promise<unknown> {
    const { eventsTtlMs, eventsMaxBytes } = this.ttl;
    const delta = JSON.stringify({ type: 'delta', seq: 1, choices: choices.map((c) => ({ ...c, tokens: 0 })) });
    const done = JSON.stringify({ type: 'done', seq: 2, result });
    const events = Buffer.byteLength(delta) + Buffer.byteLength(done) <= eventsMaxBytes ? [delta, done] : [TRUNCATED_EVENT];
    return this.redis.multi().del(eventsKey(jobId)).rpush(eventsKey(jobId), ...events).pexpire(eventsKey(jobId), eventsTtlMs).exec();
  }
}
