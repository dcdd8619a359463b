/** POST /v1/chat/completions: parse → service → respond. Errors go to the error middleware (Express 5 forwards). */
import { Router } from 'express';
import type { ChatService, RequestContext } from '../services/chat-service';
import type { GovernedChat } from '../services/governed-chat';
import { Stamps } from '../services/stamps';

export function chatRoutes(chat: ChatService, governed?: GovernedChat): Router {
  const router = Router();
  router.post('/v1/chat/completions', async (req, res) => {
    const stamps = new Stamps();
    stamps.mark('route');
    const ctx: RequestContext = { requestId: res.locals.requestId, log: res.locals.log, signal: res.locals.signal, stamps };
    if (governed) {
      const noStore = /\bno-store\b/i.test(req.get('cache-control') ?? '');
      return governed.completions(req.body, res, ctx, { principal: res.locals.principal, noStore });
    }
    const prepared = await chat.prepare(req.body, ctx);
    if (prepared.stream) await chat.stream(prepared, res, ctx);
    else res.json(await chat.complete(prepared, ctx));
  });
  return router;
}
