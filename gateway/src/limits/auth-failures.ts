/**
 * Failed authentications per client address, counted in Redis (so every replica sees them): past AUTH_FAILURE_LIMIT
 * in a window an address gets 429 before its credential is even looked at, so keys cannot be guessed at full speed.
 *
 * Counting failures only after they happen would let concurrent guesses through: a thousand requests sent at once all
 * pass the check before the first failure is counted. So a credential check is reserved first
 * (redis-scripts/auth-attempt.lua): while the address's failures plus its checks in flight reach the limit, a new one
 * waits (a few ms: a check is one lookup) instead of running, so at most `limit` guesses are ever evaluated per window.
 * A credential this gateway already knows to be valid (a static key, a stored key in the authenticator's cache) skips
 * the reservation, so a legitimate burst from one address does not queue; it still gets the 429 of a blocked address,
 * or a blocked guesser could learn that a guess is right. Addresses are counted per IPv4 address and per IPv6 /64 (one
 * host usually owns a whole /64). A Redis error lets the request through (the authentication itself still decides).
 */
import { randomUUID } from 'node:crypto';
import { isIPv4, isIPv6 } from 'node:net';
import type { Request, RequestHandler } from 'express';
import type Redis from 'ioredis';
import { ApiError } from '../errors';
import type { Logger } from '../logger';
import { runScript } from '../redis-scripts';

const failuresKey = (address: string) => `llm:authfail:{${address}}`;
const inFlightKey = (address: string) => `llm:authfail:{${address}}:checking`;
/** How long a reserved check may stay in flight before its reservation lapses (a crashed gateway's). */
const CHECK_LEASE_MS = 10_000;
/** How long a check waits for the address's checks in flight to settle before it is refused. */
const MAX_WAIT_MS = 2000;
/** ioredis states between losing the connection and having it again. */
const LOST = new Set(['reconnecting', 'close', 'end']);

export class AuthFailureLimiter {
  constructor(
    private readonly redis: Redis,
    private readonly limit: number,
    private readonly windowMs: number,
    private readonly logger: Logger,
  ) {}

  /**
   * Runs `check` (a credential check that throws a 401 ApiError when it fails) under this address's limit: refused
   * with 429 when the address has failed too often, failures counted. `known`: whether the credential is already
   * known valid here, so the check needs no reservation (asked again while waiting: another request of the same
   * burst may have made it known meanwhile).
   */
  async guard<T>(req: Request, known: () => boolean, check: () => Promise<T> | T): Promise<T> {
    if (this.limit <= 0) return check();
    const address = clientAddress(req);
    const member = randomUUID();
    const reserved = await this.reserve(address, member, known);
    let failed = false;
    try {
      return await check();
    } catch (err) {
      failed = err instanceof ApiError && err.status === 401;
      throw err;
    } finally {
      if (reserved || failed) await this.settle(address, member, failed);
    }
  }

  /** Returns whether a reservation was taken (false: none needed, or Redis unavailable). */
  private async reserve(address: string, member: string, isKnown: () => boolean): Promise<boolean> {
    // Redis lost and not back yet: let the request through at once (as on an error below) rather than wait for the
    // next reconnect attempt (up to 2 s, queue/redis.ts) to fail the script; a request that needs Redis then gets its
    // 503 without that wait. A first connection (start-up) is waited for: it is not an outage.
    if (LOST.has(this.redis.status)) return false;
    const keys = [failuresKey(address), inFlightKey(address)];
    const started = Date.now();
    for (let pause = 2; ; pause = Math.min(pause * 2, 50)) {
      const known = isKnown();
      let verdict: number;
      let ttl: number;
      try {
        [verdict, ttl] = ((await runScript(this.redis, 'authAttempt', keys, [this.limit, CHECK_LEASE_MS, member, known ? '1' : '0'])) as number[]).map(Number);
      } catch (err) {
        this.logger.warn('auth failure count unavailable; not limiting', { err: String(err) });
        return false;
      }
      if (verdict === 1) return !known;
      if (verdict === 0 || Date.now() - started > MAX_WAIT_MS) {
        throw new ApiError('rate_limit_exceeded', 'Too many failed authentication attempts from this address. Please retry later.', {
          retryAfterMs: verdict === 0 && ttl > 0 ? ttl : 1000,
        });
      }
      // Checks from this address are in flight and could use up the limit: wait for them (each is one lookup).
      await new Promise((resolve) => setTimeout(resolve, pause));
    }
  }

  private async settle(address: string, member: string, failed: boolean): Promise<void> {
    try {
      await runScript(this.redis, 'authSettle', [failuresKey(address), inFlightKey(address)], [member, failed ? '1' : '0', this.windowMs]);
    } catch (err) {
      this.logger.warn('auth failure not counted', { err: String(err) });
    }
  }
}

/**
 * `guard` (any credential check that throws a 401) behind the same per-address limit. For /admin and /metrics, whose
 * credentials are not API keys (never "known": their checks are always reserved).
 */
export function limitFailures(failures: AuthFailureLimiter, guard: RequestHandler): RequestHandler {
  return async (req, res, next) => {
    let passed = false;
    await failures.guard(req, () => false, () =>
      guard(req, res, () => {
        passed = true;
      }),
    );
    if (passed) next();
  };
}

/**
 * The unit an address is counted in: the address as Express sees it (TRUST_PROXY decides whether X-Forwarded-For is
 * believed); an IPv4-mapped IPv6 address as its IPv4 address; any other IPv6 address as its /64.
 */
export function clientAddress(req: Pick<Request, 'ip' | 'socket'>): string {
  const ip = req.ip ?? req.socket.remoteAddress ?? 'unknown';
  const mapped = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(ip);
  if (mapped && isIPv4(mapped[1])) return mapped[1];
  if (!isIPv6(ip)) return ip;
  return `${expandIPv6(ip).slice(0, 4).join(':')}::/64`;
}

/** The eight hextets of an IPv6 address (zone id dropped, `::` expanded, an embedded IPv4 tail as two hextets). */
function expandIPv6(ip: string): string[] {
  let addr = ip.split('%')[0].toLowerCase();
  const v4 = /(\d+)\.(\d+)\.(\d+)\.(\d+)$/.exec(addr);
  if (v4) {
    const [a, b, c, d] = v4.slice(1).map(Number);
    addr = `${addr.slice(0, v4.index)}${((a << 8) | b).toString(16)}:${((c << 8) | d).toString(16)}`;
  }
  const [head, tail] = addr.includes('::') ? addr.split('::') : [addr, null];
  const left = head ? head.split(':') : [];
  const right = tail ? tail.split(':') : [];
  const zeros = tail === null ? [] : Array(8 - left.length - right.length).fill('0');
  return [...left, ...zeros, ...right].map((h) => (parseInt(h, 16) || 0).toString(16));
}
