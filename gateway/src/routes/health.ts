/**
 * /health: the process is up (the tutorial's shape). /ready: Redis answers, a live worker serves DEFAULT_MODEL and its
 * tokenizer is built; 503 otherwise, so a load balancer or `depends_on` waits for a gateway that can actually answer
 * at once. Neither needs auth. Orchestrators poll both every few seconds (a start-up script every 200 ms), so a poll is
 * not logged at info (app.ts); what an operator wants to see is the moment /ready's answer changes, logged here once.
 */
import { Router } from 'express';
import type Redis from 'ioredis';
import type { Config } from '../config';
import type { Logger } from '../logger';
import type { TokenizerCache } from '../services/tokenizer';
import type { WorkerRegistry } from '../services/worker-registry';

const VERSION = '0.1.0';
const started = Date.now();

export function healthRoutes(
  config: Config,
  redis: Redis,
  registry: WorkerRegistry,
  tokenizers: TokenizerCache,
  logger: Logger,
): Router {
  const router = Router();
  let lastAnswer: boolean | undefined;
  router.get('/health', (_req, res) => {
    res.json({ status: 'healthy', service: 'llm-api', version: VERSION, uptime_s: Math.round((Date.now() - started) / 1000) });
  });
  router.get('/ready', async (_req, res) => {
    const checks = { redis: false, model: config.DEFAULT_MODEL, workers: 0, tokenizer: false };
    try {
      checks.redis = (await withTimeout(redis.ping(), 1000)) === 'PONG';
      const model = checks.redis ? await registry.model(config.DEFAULT_MODEL) : null;
      checks.workers = model?.workers ?? 0;
      if (model) {
        // Ready means a request will not wait for the tokenizer to be built; start building it if nobody has.
        checks.tokenizer = tokenizers.isLoaded(model.tokenizerHash);
        if (!checks.tokenizer) tokenizers.get(model.id, model.tokenizerHash).catch(() => undefined);
      }
    } catch {
      checks.redis = false;
    }
    const ready = checks.redis && checks.workers > 0 && checks.tokenizer;
    if (ready !== lastAnswer) {
      lastAnswer = ready;
      logger.info(ready ? 'ready' : 'not ready', checks);
    }
    if (!ready) res.setHeader('retry-after', '1');
    res.status(ready ? 200 : 503).json({ status: ready ? 'ready' : 'not_ready', service: 'llm-api', ...checks });
  });
  return router;
}

/** Resolves null after `ms`: a Redis that does not answer is not ready, and /ready must answer anyway. */
function withTimeout<T>(p: Promise<T>, ms: number): Promise<T | null> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<null>((resolve) => {
    timer = setTimeout(() => resolve(null), ms);
  });
  return Promise.race([p, timeout]).finally(() => clearTimeout(timer));
}
