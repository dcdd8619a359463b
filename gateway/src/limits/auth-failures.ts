/**
 * Failed authentications per client address, counted in Redis (so every replica sees them): past
 * AUTH_FAILURE_LIMIT in a window an address gets 429 before its key is even looked at, so keys cannot be guessed at
 * full speed. O(1) per request (GET, and INCR + PEXPIRE on a failure); a Redis error lets the request through (the
 * authentication itself still decides).
 */
import type { Request, RequestHandler } from 'express';
import type Redis from 'ioredis';
import { ApiError } from '../errors';
import type { Logger } from '../logger';

const failuresKey = (address: string) => `llm:authfail:{${address}}`;

export class AuthFailureLimiter {
  constructor(
    private readonly redis: Redis,
    private readonly limit: number,
    private readonly windowMs: number,
    private readonly logger: Logger,
  ) {}

  /** Throws 429 when this address has failed too often in the current window. */
  async check(req: Request): Promise<void> {
    if (this.limit <= 0) return;
    const key = failuresKey(addressOf(req));
    let count: string | null;
    let ttl: number;
    try {
      [[, count], [, ttl]] = (await this.redis.multi().get(key).pttl(key).exec()) as [[null, string | null], [null, number]];
    } catch (err) {
      this.logger.warn('auth failure count unavailable; not limiting', { err: String(err) });
      return;
    }
    if (Number(count ?? 0) >= this.limit) {
      throw new ApiError('rate_limit_exceeded', 'Too many failed authentication attempts from this address. Please retry later.', {
        retryAfterMs: ttl > 0 ? ttl : this.windowMs,
      });
    }
  }

  async recordFailure(req: Request): Promise<void> {
    if (this.limit <= 0) return;
    const key = failuresKey(addressOf(req));
    try {
      const [[, n]] = (await this.redis.multi().incr(key).pttl(key).exec()) as [[null, number], [null, number]];
      if (n === 1) await this.redis.pexpire(key, this.windowMs);
    } catch (err) {
      this.logger.warn('auth failure not counted', { err: String(err) });
    }
  }
}

/**
 * `guard` (any credential check that throws a 401) behind the same per-address limit: refused first when the address
 * failed too often, and its failures counted. For /admin and /metrics, whose credentials are not API keys.
 */
export function limitFailures(failures: AuthFailureLimiter, guard: RequestHandler): RequestHandler {
  return async (req, res, next) => {
    await failures.check(req);
    let passed = false;
    try {
      await guard(req, res, () => {
        passed = true;
      });
    } catch (err) {
      if (err instanceof ApiError && err.status === 401) await failures.recordFailure(req);
      throw err;
    }
    if (passed) next();
  };
}

/** The client's address as Express sees it (TRUST_PROXY decides whether X-Forwarded-For is believed). */
function addressOf(req: Request): string {
  return req.ip ?? req.socket.remoteAddress ?? 'unknown';
}
