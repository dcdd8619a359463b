/**
 * The gateway's Authenticator: static API_KEYS first (no Redis call), then a JWT when one is configured and the token
 * looks like one, then the keys stored in Redis (auth/key-store.ts).
 * Stored-key lookups are reused in-process for KEY_CACHE_MS (≤ 1000 ms), so a revocation reaches every replica within
 * that time; unknown keys are never cached (a revoked key cannot come back through a negative entry either).
 */
import type Redis from 'ioredis';
import { LRUCache } from 'lru-cache';
import type { Config } from '../config';
import { ApiError } from '../errors';
import { type Authenticator, bearerOf, bearerToken, type Principal, StaticKeyAuthenticator } from './api-keys';
import { JwtVerifier, looksLikeJwt } from './jwt';
import { KeyStore, sha256 } from './key-store';

const MAX_CACHED = 10_000;

export class GatewayAuthenticator implements Authenticator {
  private readonly statics: StaticKeyAuthenticator;
  private readonly jwt: JwtVerifier | null;
  /** Stored-key lookups by the key's SHA-256, each for KEY_CACHE_MS (null when 0). */
  private readonly cache: LRUCache<string, Principal> | null;

  constructor(
    config: Config,
    keys: readonly string[],
    private readonly store: KeyStore,
    redis: Redis,
    private readonly cacheMs = config.KEY_CACHE_MS,
  ) {
    this.statics = new StaticKeyAuthenticator(keys);
    this.cache = cacheMs > 0 ? new LRUCache<string, Principal>({ max: MAX_CACHED, ttl: cacheMs }) : null;
    this.jwt = JwtVerifier.fromConfig(config, redis);
  }

  async authenticate(authorization: string | undefined): Promise<Principal> {
    const token = bearerToken(authorization);
    const fixed = this.statics.find(token);
    if (fixed) return fixed;
    if (this.jwt && looksLikeJwt(token)) return this.jwt.verify(token);
    return this.lookup(token);
  }

  /** A static key, or a stored key looked up here within KEY_CACHE_MS. */
  knows(authorization: string | undefined): boolean {
    if (this.statics.knows(authorization)) return true;
    const token = bearerOf(authorization);
    return token !== null && this.cache?.has(sha256(token)) === true;
  }

  private async lookup(token: string): Promise<Principal> {
    const digest = sha256(token);
    const hit = this.cache?.get(digest);
    if (hit) return hit;
    const record = await this.store.lookup(token);
    if (!record) throw new ApiError('invalid_api_key', 'Incorrect API key provided.');
    const { models, rpm, tpm, max_concurrent, tier } = record;
    const principal: Principal = { keyId: record.id, kind: 'key', limits: { models, rpm, tpm, max_concurrent, tier } };
    this.cache?.set(digest, principal);
    return principal;
  }
}
