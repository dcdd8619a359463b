/**
 * tests/fixtures/protocol/*.json are the shared examples of docs/PROTOCOL.md; the worker's pydantic models parse them
 * too (worker-py/tests/test_protocol.py). Every fixture must be covered here, so a new one cannot go unchecked.
 */
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import type { z } from 'zod';
import {
  deltaEventSchema,
  doneEventSchema,
  errorEventSchema,
  jobDataSchema,
  jobEventSchema,
  jobResultSchema,
  parseFailedReason,
  queueName,
  startedEventSchema,
  workerInfoSchema,
} from '../src/protocol/job';
import { failedReasonToApiError } from '../src/queue/worker-errors';

const DIR = join(__dirname, '..', '..', 'tests', 'fixtures', 'protocol');
const SCHEMAS: Record<string, z.ZodType> = {
  job: jobDataSchema,
  job_full: jobDataSchema,
  job_structured: jobDataSchema,
  event_error_param: errorEventSchema,
  job_prompt: jobDataSchema,
  worker_info: workerInfoSchema,
  job_result: jobResultSchema,
  event_started: startedEventSchema,
  event_delta: deltaEventSchema,
  event_delta_logprobs: deltaEventSchema,
  event_done: doneEventSchema,
  event_error: errorEventSchema,
};
const files = readdirSync(DIR).filter((f) => f.endsWith('.json'));

describe('shared protocol fixtures', () => {
  it('every fixture has a schema here', () => {
    expect(files.length).toBeGreaterThan(0);
    for (const f of files) expect(Object.keys(SCHEMAS)).toContain(f.replace(/\.json$/, ''));
  });

  it.each(files)('%s parses', (file) => {
    const raw = JSON.parse(readFileSync(join(DIR, file), 'utf8'));
    const parsed = SCHEMAS[file.replace(/\.json$/, '')].safeParse(raw);
    if (!parsed.success) throw new Error(parsed.error.message);
    if (file.startsWith('event_')) expect(jobEventSchema.safeParse(raw).success).toBe(true);
  });
});

describe('job data: a chat or a raw prompt', () => {
  const fixture = (name: string) => JSON.parse(readFileSync(join(DIR, `${name}.json`), 'utf8'));

  it('carries exactly one of messages and prompt', () => {
    expect(jobDataSchema.parse(fixture('job_prompt')).prompt).toMatch(/^Once upon a time/);
    const chat = fixture('job');
    expect(jobDataSchema.safeParse({ ...chat, prompt: 'also this' }).success).toBe(false);
    const { messages: _m, ...neither } = chat;
    expect(jobDataSchema.safeParse(neither).success).toBe(false);
  });
});

describe('names and failure reasons', () => {
  it('maps model ids to BullMQ-safe queue names like the worker does', () => {
    expect(queueName('smollm2-135m-instruct')).toBe('gen.smollm2-135m-instruct');
    expect(queueName('qwen:7b/chat')).toBe('gen.qwen_7b_chat');
  });

  it('reads "<code>: <message>" failed reasons, quoted or not, and BullMQ stall failures', () => {
    expect(parseFailedReason('invalid_request: token 99 is out of range')).toEqual({ code: 'invalid_request', message: 'token 99 is out of range' });
    expect(parseFailedReason('something odd')).toEqual({ code: 'internal_error', message: 'something odd' });
    // "<code>[<param>]: <message>": the request field at fault reaches the client's 400.
    expect(parseFailedReason('invalid_request[response_format]: Unimplemented keys: ["not"]')).toEqual({
      code: 'invalid_request',
      message: 'Unimplemented keys: ["not"]',
      param: 'response_format',
    });
    const refused = failedReasonToApiError('invalid_request[response_format]: the JSON schema cannot be used');
    expect({ status: refused.status, param: refused.param }).toEqual({ status: 400, param: 'response_format' });
    expect(failedReasonToApiError('"context_length_exceeded: too long"').message).toBe('too long');
    expect(failedReasonToApiError('job stalled more than allowable limit').code).toBe('worker_lost');
    expect(failedReasonToApiError('queue_timeout: waited too long').status).toBe(503);
  });
});
