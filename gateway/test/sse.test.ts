/** The SSE writer: the wire format the openai SDKs parse, keep-alive comments, errors as events, then [DONE]. */
import type { Server } from 'node:http';
import express from 'express';
import request from 'supertest';
import { ApiError } from '../src/errors';
import { SseWriter } from '../src/streaming/sse';
import { completeEvents, openStream, parseSse, waitFor } from './helpers/gateway';

function app(script: (sse: SseWriter) => Promise<void>, keepAliveMs = 60_000) {
  const a = express();
  a.get('/s', async (_req, res) => {
    const sse = new SseWriter(res, { keepAliveMs });
    sse.open();
    await script(sse);
  });
  return a;
}

async function listen(a: express.Express): Promise<{ url: string; close(): Promise<void> }> {
  const server: Server = await new Promise((resolve) => {
    const s = a.listen(0, '127.0.0.1', () => resolve(s));
  });
  const { port } = server.address() as { port: number };
  return {
    url: `http://127.0.0.1:${port}/s`,
    async close() {
      server.closeAllConnections();
      await new Promise((r) => server.close(r));
    },
  };
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
    // The stream stays idle until the client has seen two keep-alives (however long a loaded machine takes), then ends.
    let finish!: () => void;
    const finished = new Promise<void>((r) => (finish = r));
    const srv = await listen(
      app(async (sse) => {
        await finished;
        sse.done();
      }, 100),
    );
    try {
      const stream = await openStream(srv.url, undefined);
      await waitFor(() => parseSse(completeEvents(stream.received())).comments.length >= 2, undefined, 'two keep-alive comments');
      finish();
      const { comments, data } = parseSse(await stream.body);
      expect(comments.length).toBeGreaterThanOrEqual(2);
      expect(comments.every((c) => c === 'keep-alive')).toBe(true);
      expect(data).toEqual(['[DONE]']);
    } finally {
      finish();
      await srv.close();
    }
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
    const srv = await listen(a);
    try {
      const stream = await openStream(srv.url, undefined);
      await waitFor(() => stream.received().length > 0, undefined, 'the first event');
      stream.abort();
      await waitFor(() => writableAfterClose !== null, undefined, "the server to see the client's close");
      expect(writableAfterClose).toBe(false);
    } finally {
      await srv.close();
    }
  });
});
