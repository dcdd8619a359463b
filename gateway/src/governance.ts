/** Builds the governance objects of one gateway (issue 5): key store, limiters, cache, output filter, tutorial routes. */
import type Redis from 'ioredis';
import { KeyStore } from './auth/key-store';
import { ResponseCache } from './cache/response-cache';
import type { Config } from './config';
import { OutputFilter } from './filter/output-filter';
import { ConcurrencyLimiter } from './limits/admission';
import { RateLimiter } from './limits/rate-limiter';
import { QueueBacklog } from './queue/backlog';
import type { Logger } from './logger';
import type { ChatService } from './services/chat-service';
import { GovernedChat } from './services/governed-chat';
import { TutorialService } from './tutorial/tutorial-service';

export interface Governance {
  governed: GovernedChat;
  tutorial: TutorialService;
  keys: KeyStore;
}

export function buildGovernance(config: Config, redis: Redis, chat: ChatService, logger: Logger): Governance {
  const governed = new GovernedChat({
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
    filter: OutputFilter.fromConfig(config),
  });
  return { governed, tutorial: new TutorialService(config, chat, governed), keys: new KeyStore(redis) };
}
