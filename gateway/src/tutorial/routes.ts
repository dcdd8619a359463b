/**
 * The tutorial's routes: POST /chat, /chat/stream, /chat/batch, /chat/secure. All behind the same auth, limits and
 * cache as /v1; each call also draws on the tutorial's own per-caller budget (TUTORIAL_RPM, the tutorial's 10/minute).
 * GET /health (the tutorial's shape) is served by routes/health.ts.
 */
import { type Request, type Response, Router } from 'express';
import { ApiError } from '../errors';
import { tutorialBatchRequestSchema } from '../protocol/tutorial';
import type { RequestContext } from '../services/chat-service';
import type { ChatAdmission, GovernOptions } from '../services/chat-admission';
import { parseOrThrow } from '../services/validation';
import type { TutorialService } from './tutorial-service';

export const TUTORIAL_PATHS = ['/chat', '/chat/stream', '/chat/batch', '/chat/secure'];
/** Items of one /chat/batch call. */
export const MAX_BATCH_ITEMS = 32;

export function tutorialRoutes(tutorial: TutorialService, admission: ChatAdmission): Router {
  const router = Router();
  const context = async (req: Request, res: Response): Promise<[RequestContext, GovernOptions]> => {
    const ctx: RequestContext = { requestId: res.locals.requestId, log: res.locals.log, signal: res.locals.signal };
    const principal = res.locals.principal;
    const extraStates = await admission.admitTutorialCall(res, principal);
    return [ctx, { principal, noStore: /\bno-store\b/i.test(req.get('cache-control') ?? ''), extraStates }];
  };

  router.post('/chat', async (req, res) => {
    const [ctx, opts] = await context(req, res);
    res.json(await tutorial.chatOnce(req.body, res, ctx, opts));
  });
  router.post('/chat/secure', async (req, res) => {
    const [ctx, opts] = await context(req, res);
    const { response, history } = await tutorial.chatOnce(req.body, res, ctx, opts);
    res.json({ response, history });
  });
  router.post('/chat/stream', async (req, res) => {
    const [ctx, opts] = await context(req, res);
    await tutorial.stream(req.body, res, ctx, opts);
  });
  router.post('/chat/batch', async (req, res) => {
    const items = parseOrThrow(tutorialBatchRequestSchema, req.body);
    if (items.length > MAX_BATCH_ITEMS) {
      throw new ApiError('invalid_value', `At most ${MAX_BATCH_ITEMS} requests per batch (got ${items.length}).`, { param: null });
    }
    const [ctx, opts] = await context(req, res);
    res.json(await tutorial.batch(items, res, ctx, opts));
  });
  return router;
}
