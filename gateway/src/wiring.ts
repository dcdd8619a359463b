/**
 * The composition root: builds every long-lived object of a gateway from a Config (used by main.ts and by tests, so
 * tests run exactly the wiring that production runs) and knows how to close them in order.
 */
import type { Express } from 'express';
import type Redis from 'ioredis';
import { createApp } from './app';
import type { Authenticator } from './auth/api-keys';
import { GatewayAuthenticator } from './auth/authenticator';
import { buildGovernance } from './governance';
import type { Config } from './config';
import { Lifecycle } from './lifecycle';
import type { Logger } from './logger';
import { attachGaugeSource } from './metrics';
import { JobEventBus } from './queue/job-events';
import { JobQueues, jobOptions } from './queue/job-queue';
import { createRedis } from './queue/redis';
import { RoutingTable } from './routing/table';
import { StreamAttachments } from './resume/attachments';
import { ChatService } from './services/chat-service';
import { TokenizerCache } from './services/tokenizer';
import { WorkerRegistry } from './services/worker-registry';

export interface Gateway {
  app: Express;
  lifecycle: Lifecycle;
  registry: WorkerRegistry;
  queues: JobQueues;
  redis: Redis;
  /** Stops background loops and closes every Redis connection. */
  close(): Promise<void>;
}

/** Throws ConfigError (main.ts exits 2) when ROUTING_FILE names a bad routing table, before any connection is made. */
export function buildGateway(config: Config, logger: Logger, keys: readonly string[], auth?: Authenticator): Gateway {
  const routing = RoutingTable.load(config.ROUTING_FILE);
  const redis = createRedis(config.REDIS_URL, 'commands', logger);
  // A connection in subscriber mode may not run other commands, so job events get their own.
  const sub = createRedis(config.REDIS_URL, 'subscriber', logger);
  const registry = new WorkerRegistry(redis, logger.child({ module: 'registry' }), config.WORKER_REFRESH_MS);
  const tokenizers = new TokenizerCache(redis, logger.child({ module: 'tokenizer' }), {
    threads: config.TOKENIZER_THREADS,
    maxPending: config.TOKENIZER_MAX_PENDING,
    maxPendingChars: config.TOKENIZER_MAX_PENDING_CHARS,
  });
  registry.onRefresh((workers) => tokenizers.warm(workers));
  registry.start();
  const queues = new JobQueues(redis, config.REDIS_URL, logger.child({ module: 'queue' }), jobOptions(config.JOB_RESULT_RETENTION_S));
  const bus = new JobEventBus(sub, logger.child({ module: 'events' }));
  const attachments = new StreamAttachments(redis, config.RESUME_GRACE_MS, logger.child({ module: 'resume' }));
  const chat = new ChatService({ config, redis, registry, tokenizers, queues, bus, attachments, routing, logger: logger.child({ module: 'chat' }) });
  const lifecycle = new Lifecycle();
  const governance = buildGovernance(config, redis, chat, routing, logger);
  // /metrics reads queue depths and live workers of this gateway at scrape time.
  const detachMetrics = attachGaugeSource({
    redis,
    defaultModel: config.DEFAULT_MODEL,
    models: () => registry.models(),
    openRequests: () => lifecycle.openRequests,
    logger: logger.child({ module: 'metrics' }),
  });
  const app = createApp({
    config,
    logger,
    redis,
    registry,
    routing,
    tokenizers,
    auth: auth ?? new GatewayAuthenticator(config, keys, governance.keys, redis),
    lifecycle,
    governance,
  });
  return {
    app,
    lifecycle,
    registry,
    queues,
    redis,
    async close() {
      registry.stop();
      await detachMetrics();
      await tokenizers.close();
      // Jobs still in their resume grace are cancelled now unless resumed elsewhere (this gateway will not be there).
      await attachments.close();
      await queues.close();
      await Promise.allSettled([redis.quit(), sub.quit()]);
      redis.disconnect();
      sub.disconnect();
    },
  };
}
