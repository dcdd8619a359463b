/** POST /v1/chat/completions: the request's context → ChatPipeline (admit, source, filter, render, finish); GET
 * /v1/chat/completions/{id}/stream → ChatPipeline.resume. Errors go to the error middleware (Express 5 forwards). */
import { Router } from 'express';
import type { RequestContext } from '../services/chat-service';
import type { ChatPipeline } from '../services/chat-pipeline';
import { Stamps } from '../services/stamps';

export function chatRoutes(pipeline: ChatPipeline): Router {
  const router = Router();
  router.post('/v1/chat/completions', async (req, res) => {
    const stamps = new Stamps();
    stamps.mark('route');
    const ctx: RequestContext = { requestId: res.locals.requestId, log: res.locals.log, signal: res.locals.signal, stamps };
    const noStore = /\bno-store\b/i.test(req.get('cache-control') ?? '');
    await pipeline.completions(req.body, res, ctx, { principal: res.locals.principal, noStore });
  });
  // A resumed stream (README "Resumable streams"): the events after Last-Event-ID (none: all of them), then live.
  router.get('/v1/chat/completions/:id/stream', async (req, res) => {
    const ctx: RequestContext = { requestId: res.locals.requestId, log: res.locals.log, signal: res.locals.signal };
    await pipeline.resume(req.params.id, 'chat', req.get('last-event-id'), res, ctx, res.locals.principal);
  });
  return router;
}
