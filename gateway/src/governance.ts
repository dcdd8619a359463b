/**
 * Builds the request path of one gateway: admission (key limits, cache, backlog), the pipeline every chat request
 * goes through (services/chat-pipeline.ts), the tutorial's service on that pipeline, and the key store.
 */
import type Redis from 'ioredis';
import { KeyStore } from './auth/key-store';
import { ResponseCache } from './cache/response-cache';
import type { Config } from './config';
import { OutputFilter } from './filter/output-filter';
import { ConcurrencyLimiter } from './limits/admission';
import { RateLimiter } from './limits/rate-limiter';
import { QueueBacklog } from './queue/backlog';
import { storedEventsMaxBytes, StreamRecords } from './resume/stream-record';
import type { Logger } from './logger';
import { Breakers } from './routing/breaker';
import type { RoutingTable } from './routing/table';
import type { ChatService } from './services/chat-service';
import { ChatAdmission } from './services/chat-admission';
import { ChatPipeline } from './services/chat-pipeline';
import { TutorialService } from './tutorial/tutorial-service';

export interface Governance {
  admission: ChatAdmission;
  pipeline: ChatPipeline;
  tutorial: TutorialService;
  keys: KeyStore;
}

export function buildGovernance(config: Config, redis: Redis, chat: ChatService, routing: RoutingTable, logger: Logger): Governance {
  const filter = OutputFilter.fromConfig(config);
  const admission = new ChatAdmission({
    config,
    redis,
    chat,
    limiter: new RateLimiter(redis, config.RATE_LIMIT_WINDOW_MS),
    // A slot is leased for the whole request timeout plus a margin: a crashed replica's slots free themselves.
    concurrency: new ConcurrencyLimiter(redis, config.REQUEST_TIMEOUT_MS + 60_000),
    // An entry lives as long as its request can (the deadline is the request timeout from enqueue), plus the margin
    // of the concurrency lease: a crashed replica's entries leave the backlog by then.
    backlog: new QueueBacklog(redis, { queueTimeoutMs: config.QUEUE_TIMEOUT_MS, entryTtlMs: config.REQUEST_TIMEOUT_MS + 60_000 }),
    cache: new ResponseCache(config, redis, logger.child({ module: 'cache' })),
    filterActive: filter.active,
  });
  const records = new StreamRecords(redis, {
    requestTimeoutMs: config.REQUEST_TIMEOUT_MS,
    eventsTtlMs: config.RESUME_EVENTS_TTL_MS,
    eventsMaxBytes: storedEventsMaxBytes(config),
  });
  const pipeline = new ChatPipeline({ config, admission, chat, filter, records, routing, breakers: new Breakers(routing.breaker) });
  return { admission, pipeline, tutorial: new TutorialService(config, pipeline, admission), keys: new KeyStore(redis) };
}
