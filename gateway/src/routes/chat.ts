/** POST /v1/chat/completions: parse the request's context → GovernedChat (admit, source, render). Errors go to the
 * error middleware (Express 5 forwards). */
import { Router } from 'express';
import type { RequestContext } from '../services/chat-service';
import type { GovernedChat } from '../services/governed-chat';
import { Stamps } from '../services/stamps';

export function chatRoutes(governed: GovernedChat): Router {
  const router = Router();
  router.post('/v1/chat/completions', async (req, res) => {
    const stamps = new Stamps();
    stamps.mark('route');
    const ctx: RequestContext = { requestId: res.locals.requestId, log: res.locals.log, signal: res.locals.signal, stamps };
    const noStore = /\bno-store\b/i.test(req.get('cache-control') ?? '');
    await governed.completions(req.body, res, ctx, { principal: res.locals.principal, noStore });
  });
  return router;
}
