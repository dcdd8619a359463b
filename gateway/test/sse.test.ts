/** The SSE writer: the wire format the openai SDKs parse, keep-alive comments, errors as events, then [DONE]. */
import express from 'express';
import request from 'supertest';
import { ApiError } from '../src/errors';
import { SseWriter } from '../src/streaming/sse';
import { parseSse, sleep } from './helpers/gateway';

function app(script: (sse: SseWriter) => Promise<void>, keepAliveMs = 60_000) {
  const a = express();
  a.get('/s', async (_req, res) => {
    const sse = new SseWriter(res, { keepAliveMs });
    sse.open();
    await script(sse);
  });
  return a;
}

describe('SseWriter', () => {
  it('sends SSE headers, one data line per event, and data: [DONE]', async () => {
    const res = await request(
      app(async (sse) => {
        sse.data({ a: 1 });
        sse.data({ text: 'line1\nline2' });
        sse.done();
        sse.data({ after: 'done' }); // ignored: the stream has ended
      }),
    ).get('/s');
    expect(res.status).toBe(200);
    expect(res.headers['content-type']).toBe('text/event-stream; charset=utf-8');
    expect(res.headers['cache-control']).toMatch(/no-cache/);
    expect(res.headers['x-accel-buffering']).toBe('no');
    expect(res.text).toBe('data: {"a":1}\n\ndata: {"text":"line1\\nline2"}\n\ndata: [DONE]\n\n');
  });

  it('writes an error as an OpenAI error event followed by [DONE]', async () => {
    const res = await request(
      app(async (sse) => {
        sse.data({ a: 1 });
        sse.error(new ApiError('worker_lost', 'lost'));
      }),
    ).get('/s');
    expect(parseSse(res.text).data).toEqual([
      { a: 1 },
      { error: { message: 'lost', type: 'server_error', param: null, code: 'worker_lost' } },
      '[DONE]',
    ]);
  });

  it('sends ": keep-alive" comments while idle, and none once it writes often enough', async () => {
    const res = await request(
      app(async (sse) => {
        await sleep(350);
        sse.done();
      }, 100),
    ).get('/s');
    const { comments, data } = parseSse(res.text);
    expect(comments.length).toBeGreaterThanOrEqual(2);
    expect(comments.every((c) => c === 'keep-alive')).toBe(true);
    expect(data).toEqual(['[DONE]']);
  });

  it('holds events written before open() and sends them right after the headers', async () => {
    const a = express();
    a.get('/s', (_req, res) => {
      const sse = new SseWriter(res, { keepAliveMs: 60_000 });
      sse.data({ early: true });
      sse.open();
      sse.data({ late: true });
      sse.done();
    });
    const res = await request(a).get('/s');
    expect(res.headers['content-type']).toBe('text/event-stream; charset=utf-8');
    expect(parseSse(res.text).data).toEqual([{ early: true }, { late: true }, '[DONE]']);
  });

  it('stops writing once the client has gone', async () => {
    let writableAfterClose: boolean | null = null;
    const a = express();
    a.get('/s', (req, res) => {
      const sse = new SseWriter(res, { keepAliveMs: 50 });
      sse.open();
      sse.data({ a: 1 });
      res.on('close', () => {
        writableAfterClose = sse.writable;
        sse.data({ b: 2 }); // must not throw
      });
    });
    const server = a.listen(0);
    const port = (server.address() as { port: number }).port;
    const ctrl = new AbortController();
    const resp = await fetch(`http://127.0.0.1:${port}/s`, { signal: ctrl.signal });
    const reader = resp.body!.getReader();
    await reader.read();
    ctrl.abort();
    await sleep(100);
    server.closeAllConnections();
    await new Promise((r) => server.close(r));
    expect(writableAfterClose).toBe(false);
  });
});
