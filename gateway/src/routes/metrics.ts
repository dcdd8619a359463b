/**
 * GET METRICS_PATH (default /metrics): the Prometheus exposition of src/metrics.ts. Served on the API port, so the
 * ServiceMonitor and compose scrape the gateway where it listens. METRICS_AUTH decides who may read it: `none`
 * (the default: Prometheus inside the cluster, the NetworkPolicy guards it), `api_key` (a Bearer API key, as /v1) or
 * `token` (Bearer METRICS_TOKEN, a scrape-only secret).
 */
import { timingSafeEqual, createHash } from 'node:crypto';
import { type RequestHandler, Router } from 'express';
import type { Authenticator } from '../auth/api-keys';
import type { Config } from '../config';
import { ApiError } from '../errors';
import { type AuthFailureLimiter, limitFailures } from '../limits/auth-failures';
import { registry } from '../metrics';

const digest = (s: string) => createHash('sha256').update(s, 'utf8').digest();

function guard(config: Config, auth: Authenticator): RequestHandler {
  if (config.METRICS_AUTH === 'api_key') {
    return async (req, _res, next) => {
      await auth.authenticate(req.get('authorization'));
      next();
    };
  }
  if (config.METRICS_AUTH === 'token') {
    const expected = digest(config.METRICS_TOKEN ?? '');
    return (req, _res, next) => {
      const m = /^Bearer\s+(\S+)\s*$/i.exec(req.get('authorization') ?? '');
      if (!m || !timingSafeEqual(digest(m[1]), expected)) throw new ApiError('invalid_api_key', 'Incorrect metrics token provided.');
      next();
    };
  }
  return (_req, _res, next) => next();
}

export function metricsRoutes(config: Config, auth: Authenticator, failures: AuthFailureLimiter): Router {
  const router = Router();
  const check = config.METRICS_AUTH === 'none' ? guard(config, auth) : limitFailures(failures, guard(config, auth));
  router.get(config.METRICS_PATH, check, async (_req, res) => {
    res.setHeader('content-type', registry.contentType);
    res.setHeader('cache-control', 'no-store');
    res.send(await registry.metrics());
  });
  return router;
}
