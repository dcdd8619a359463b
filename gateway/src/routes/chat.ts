/** POST /v1/chat/completions: parse → service → respond. Errors go to the error middleware (Express 5 forwards). */
import { Router } from 'express';
import type { ChatService, RequestContext } from '../services/chat-service';

export function chatRoutes(chat: ChatService): Router {
  const router = Router();
  router.post('/v1/chat/completions', async (req, res) => {
    const ctx: RequestContext = { requestId: res.locals.requestId, log: res.locals.log, signal: res.locals.signal };
    const prepared = await chat.prepare(req.body, ctx);
    if (prepared.stream) await chat.stream(prepared, res, ctx);
    else res.json(await chat.complete(prepared, ctx));
  });
  return router;
}
