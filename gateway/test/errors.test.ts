/** The one error contract: every error body is {"error":{message,type,param,code}} with the status of ERROR_TABLE. */
import express from 'express';
import request from 'supertest';
import { ApiError, ERROR_TABLE, errorMiddleware, toApiError } from '../src/errors';
import { createLogger } from '../src/logger';

function appThrowing(err: unknown, opts: { headersFirst?: boolean } = {}) {
  const lines: string[] = [];
  const app = express();
  app.use(express.json({ limit: 64 }));
  app.all('/boom', async (_req, res) => {
    if (opts.headersFirst) {
      res.status(200).write('partial');
    }
    throw err;
  });
  app.use(errorMiddleware(createLogger('debug', (l) => lines.push(l))));
  return { app, lines };
}

describe('error middleware', () => {
  it('writes an ApiError with its status, type, param and code', async () => {
    const { app } = appThrowing(new ApiError('invalid_value', 'bad temperature', { param: 'temperature' }));
    const res = await request(app).get('/boom');
    expect(res.status).toBe(400);
    expect(res.body).toEqual({
      error: { message: 'bad temperature', type: 'invalid_request_error', param: 'temperature', code: 'invalid_value' },
    });
  });

  it('sets retry-after and retry-after-ms on retryable errors', async () => {
    const { app } = appThrowing(new ApiError('no_worker_available', 'none', { retryAfterMs: 1500 }));
    const res = await request(app).get('/boom');
    expect(res.status).toBe(503);
    expect(res.headers['retry-after']).toBe('2');
    expect(res.headers['retry-after-ms']).toBe('1500');
    expect(res.body.error.type).toBe('server_error');
  });

  it('hides the message of an unexpected error behind a 500, and logs it once', async () => {
    const { app, lines } = appThrowing(new Error('secret internals'));
    const res = await request(app).get('/boom');
    expect(res.status).toBe(500);
    expect(res.body.error.code).toBe('internal_error');
    expect(JSON.stringify(res.body)).not.toMatch(/secret internals/);
    expect(lines.filter((l) => l.includes('secret internals'))).toHaveLength(1);
  });

  it('turns a non-Error throw into a 500 too', async () => {
    const { app } = appThrowing('a string');
    const res = await request(app).get('/boom');
    expect(res.status).toBe(500);
  });

  it('maps body-parser errors: malformed JSON → 400, oversized → 413', async () => {
    const { app } = appThrowing(new Error('unreached'));
    const bad = await request(app).post('/boom').set('content-type', 'application/json').send('{"a":');
    expect(bad.status).toBe(400);
    expect(bad.body.error).toMatchObject({ code: 'invalid_json', type: 'invalid_request_error', param: null });
    const big = await request(app).post('/boom').set('content-type', 'application/json').send(JSON.stringify({ a: 'x'.repeat(200) }));
    expect(big.status).toBe(413);
    expect(big.body.error.code).toBe('request_too_large');
  });

  it('maps Redis connection failures to 503 with retry-after', () => {
    const err = toApiError(Object.assign(new Error('Reached the max retries per request limit'), { name: 'MaxRetriesPerRequestError' }));
    expect(err.status).toBe(503);
    expect(err.code).toBe('redis_unavailable');
    expect(err.retryAfterMs).toBeGreaterThan(0);
    expect(toApiError(new Error('connect ECONNREFUSED 127.0.0.1:1')).code).toBe('redis_unavailable');
  });

  it('ends a response whose headers were already sent instead of leaving it hanging', async () => {
    const { app } = appThrowing(new Error('late'), { headersFirst: true });
    const res = await request(app).get('/boom');
    expect(res.status).toBe(200);
    expect(res.text).toBe('partial');
  });

  it('every code in the table has a 4xx/5xx status and an OpenAI type', () => {
    for (const [code, { status, type }] of Object.entries(ERROR_TABLE)) {
      expect(status).toBeGreaterThanOrEqual(400);
      expect(['invalid_request_error', 'server_error', 'rate_limit_error']).toContain(type);
      expect(new ApiError(code as keyof typeof ERROR_TABLE, 'm').toBody().error.code).toBe(code);
    }
  });
});
