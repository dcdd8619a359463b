/**
 * The fallback chain of a model of the routing table (routing/table.ts): the model asked for, then its `fallback`
 * entries in order. A model whose breaker is open is skipped without a request; one that fails as a target
 * (routing/breaker.ts isTargetFailure: 5xx, timeouts, an upstream's 429) before anything was sent to the client
 * hands the request to the next. The model that answered is the response's `model` and its `x-routed-model` header.
 * Once a stream's headers are out, a failure is the stream's error (the client already reads one model's answer).
 * Models outside the table have no chain: they are answered as before.
 */
import type { Response } from 'express';
import { ApiError, toApiError } from '../errors';
import type { Logger } from '../logger';
import { type Breakers, fallbacks, isTargetFailure, type Permit } from './breaker';
import type { Route, RoutingTable } from './table';

export const ROUTED_MODEL_HEADER = 'x-routed-model';

type Answer = (body: unknown, permit: Permit | null) => Promise<void>;

export async function answerWithFallback(
  deps: { routing: RoutingTable; breakers: Breakers },
  body: unknown,
  res: Response,
  ctx: { log: Logger },
  answer: Answer,
): Promise<void> {
  const asked = typeof (body as { model?: unknown } | null)?.model === 'string' ? (body as { model: string }).model : null;
  const chain = asked === null ? [] : deps.routing.chain(asked);
  if (asked === null || chain[0].breaker === null) return answer(body, null);
  let failure: unknown = null;
  let reason: 'breaker_open' | 'failed' = 'failed';
  for (const [i, route] of chain.entries()) {
    const breaker = deps.breakers.get(route.breaker ?? `pool:${route.publicName}`);
    const permit = breaker.permit();
    if (!permit) {
      failure ??= breakerOpen(route, breaker.retryInMs);
      reason = 'breaker_open';
      ctx.log.info('model skipped: its breaker is open', { model: route.publicName, breaker: breaker.name });
      continue;
    }
    res.setHeader(ROUTED_MODEL_HEADER, route.publicName);
    // Counted as the request is handed over (a stream's answer ends after its client has read it all).
    if (i > 0) fallbacks.inc({ model: asked, to: route.publicName, reason });
    try {
      await answer(i === 0 ? body : { ...(body as object), model: route.publicName }, permit);
      permit.release(); // answered without a run (the cache): nothing learnt
      return;
    } catch (err) {
      const targetFailed = isTargetFailure(err);
      if (targetFailed) permit.failure();
      else permit.release();
      // A fallback the caller's key may not use is passed over, as if it were not in the chain.
      const denied = i > 0 && toApiError(err).code === 'model_not_found';
      if (res.headersSent || !(targetFailed || denied)) throw err;
      if (targetFailed) {
        failure = err;
        reason = 'failed';
        ctx.log.warn('model failed: trying its fallback', { model: route.publicName, code: toApiError(err).code });
      }
    }
  }
  res.removeHeader(ROUTED_MODEL_HEADER);
  throw failure ?? new ApiError('model_not_found', `The model \`${asked}\` does not exist or you do not have access to it.`, { param: 'model' });
}

function breakerOpen(route: Route, retryInMs: number): ApiError {
  const message = `The model '${route.publicName}' is unavailable right now (too many recent failures). Please retry shortly.`;
  return new ApiError(route.kind === 'upstream' ? 'upstream_unavailable' : 'no_worker_available', message, { retryAfterMs: Math.max(1000, retryInMs) });
}
