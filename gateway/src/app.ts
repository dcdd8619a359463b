/**
 * createApp(deps): the Express application, with no listen() (main.ts listens; tests use supertest).
 * Order matters: request id → drain guard → unauthenticated probes → auth → body parsing → routes → 404 → errors.
 * Auth runs before the body is read, so an unauthenticated client cannot make us parse megabytes.
 */
import { isUtf8 } from 'node:buffer';
import { randomBytes } from 'node:crypto';
import express, { type Express, type Request, type RequestHandler, type Response } from 'express';
import type Redis from 'ioredis';
import { type Authenticator, requireAuth } from './auth/api-keys';
import type { Config } from './config';
import { ApiError, errorMiddleware, writeError } from './errors';
import type { Lifecycle } from './lifecycle';
import type { Logger } from './logger';
import { effectiveLimits } from './limits/admission';
import { AuthFailureLimiter } from './limits/auth-failures';
import { observeRequest } from './metrics';
import { routeLabeller } from './openapi/routes';
import { adminRoutes } from './admin/routes';
import { chatRoutes } from './routes/chat';
import { completionRoutes } from './routes/completions';
import { docsRoutes } from './routes/docs';
import { healthRoutes } from './routes/health';
import { metricsRoutes } from './routes/metrics';
import { modelRoutes } from './routes/models';
import type { Governance } from './governance';
import { rateLimitHeaders } from './services/chat-admission';
import { tutorialRoutes } from './tutorial/routes';
import type { TokenizerCache } from './services/tokenizer';
import type { WorkerRegistry } from './services/worker-registry';
import type { RoutingTable } from './routing/table';

export interface AppDeps {
  config: Config;
  logger: Logger;
  redis: Redis;
  registry: WorkerRegistry;
  /** The routing table: /v1/models lists its upstream models next to the pools. */
  routing: RoutingTable;
  tokenizers: TokenizerCache;
  auth: Authenticator;
  lifecycle: Lifecycle;
  /** Keys, limits, cache, filter, admin API and the tutorial's routes: every chat request runs through them. */
  governance: Governance;
}

const PROBES = new Set(['/health', '/ready']);

function refuseInvalidUtf8(_req: unknown, _res: unknown, body: Buffer): void {
  if (!isUtf8(body)) throw new ApiError('invalid_json', 'The request body is not valid UTF-8.');
}
const VALID_REQUEST_ID = /^[A-Za-z0-9._:\-]{1,128}$/;

/** x-request-id on every response: the client's own when it is sane, else ours. Also the per-request logger/signal. */
function requestContext(logger: Logger, lifecycle: Lifecycle, routeOf: (req: Request, res: Response) => string): RequestHandler {
  return (req, res, next) => {
    const incoming = req.get('x-request-id');
    const requestId = incoming && VALID_REQUEST_ID.test(incoming) ? incoming : `req_${randomBytes(16).toString('hex')}`;
    res.setHeader('x-request-id', requestId);
    res.locals.requestId = requestId;
    res.locals.log = logger.child({ requestId });
    const controller = new AbortController();
    res.locals.signal = controller.signal;
    const untrack = lifecycle.track(controller);
    const startedAt = process.hrtime.bigint();
    res.on('close', () => {
      untrack();
      // 'close' before the response finished: the client went away. Aborting cancels its job.
      if (!res.writableFinished && !controller.signal.aborted) controller.abort('client');
      const ms = Number(process.hrtime.bigint() - startedAt) / 1e6;
      // Probes arrive every few seconds from orchestrators; keep them out of the info log. /ready's 503 is its answer
      // "not yet", not a failure (health.ts logs when that answer changes); any other 5xx of a probe stays visible.
      const probeAnswer = PROBES.has(req.path) && (res.statusCode < 500 || (req.path === '/ready' && res.statusCode === 503));
      const level = probeAnswer ? 'debug' : 'info';
      res.locals.log[level]('request', {
        method: req.method,
        path: req.path,
        status: res.statusCode,
        ms: Math.round(ms * 10) / 10,
        aborted: !res.writableFinished || undefined,
      });
      observeRequest(routeOf(req, res), req.method, res.writableFinished ? res.statusCode : 499, ms / 1000);
    });
    next();
  };
}

function drainGuard(lifecycle: Lifecycle): RequestHandler {
  return (_req, res, next) => {
    if (!lifecycle.draining) return next();
    res.setHeader('connection', 'close');
    writeError(res, new ApiError('shutting_down', 'The server is restarting. Please retry.', { retryAfterMs: 1000 }));
  };
}

export function createApp(deps: AppDeps): Express {
  const { config, logger, lifecycle } = deps;
  const app = express();
  app.disable('x-powered-by');
  app.disable('etag');
  app.set('query parser', 'simple');
  // Behind a proxy (ingress, load balancer), the client's address comes from X-Forwarded-For only when trusted.
  app.set('trust proxy', config.TRUST_PROXY);

  app.use(requestContext(logger, lifecycle, routeLabeller(app)));
  app.use(drainGuard(lifecycle));
  app.use(healthRoutes(config, deps.redis, deps.registry, deps.tokenizers, logger.child({ module: 'health' })));
  // One shared count of failed authentications per client address (Redis): /v1, the tutorial's routes, /admin, /metrics.
  const failures = new AuthFailureLimiter(deps.redis, config.AUTH_FAILURE_LIMIT, config.AUTH_FAILURE_WINDOW_MS, logger.child({ module: 'auth' }));
  app.use(metricsRoutes(config, deps.auth, failures));
  app.use(docsRoutes(config));

  const gov = deps.governance;
  // Any content type is read as JSON, as OpenAI does; a body that is not a JSON object is a 400 (strict).
  // Bytes that are not UTF-8 are refused (400 invalid_json), not decoded into U+FFFD and passed on as the prompt.
  const jsonBody = express.json({ limit: config.MAX_BODY_BYTES, type: () => true, strict: true, verify: refuseInvalidUtf8 });
  app.use(adminRoutes(config, gov.keys, deps.redis, failures));
  app.use('/v1', requireAuth(deps.auth, failures), jsonBody, rateLimitHeaders(gov.admission));
  app.use('/chat', requireAuth(deps.auth, failures), jsonBody);
  app.use(chatRoutes(gov.pipeline));
  app.use(completionRoutes(gov.pipeline));
  app.use(tutorialRoutes(gov.tutorial, gov.admission));
  app.use(modelRoutes(deps.registry, deps.routing, (principal) => (principal ? effectiveLimits(config, principal).models : null)));

  app.use((req, _res, next) => {
    next(new ApiError('unknown_url', `Invalid URL (${req.method} ${req.path})`));
  });
  app.use(errorMiddleware(logger));
  return app;
}
