/**
 * The gateway's Authenticator: static API_KEYS first (no Redis call), then a JWT when one is configured and the token
 * looks like one, then the keys stored in Redis (auth/key-store.ts).
 * Stored-key lookups are reused in-process for KEY_CACHE_MS (≤ 1000 ms), so a revocation reaches every replica within
 * that time; unknown keys are never cached (a revoked key cannot come back through a negative entry either).
 */
import type Redis from 'ioredis';
import type { Config } from '../config';
import { ApiError } from '../errors';
import { type Authenticator, bearerToken, type Principal, StaticKeyAuthenticator } from './api-keys';
import { JwtVerifier, looksLikeJwt } from './jwt';
import { KeyStore, sha256 } from './key-store';

const MAX_CACHED = 10_000;

export class GatewayAuthenticator implements Authenticator {
  private readonly statics: StaticKeyAuthenticator;
  private readonly jwt: JwtVerifier | null;
  private readonly cache = new Map<string, { principal: Principal; until: number }>();

  constructor(
    config: Config,
    keys: readonly string[],
    private readonly store: KeyStore,
    redis: Redis,
    private readonly cacheMs = config.KEY_CACHE_MS,
  ) {
    this.statics = new StaticKeyAuthenticator(keys);
    this.jwt = JwtVerifier.fromConfig(config, redis);
  }

  async authenticate(authorization: string | undefined): Promise<Principal> {
    const token = bearerToken(authorization);
    const fixed = this.statics.find(token);
    if (fixed) return fixed;
    if (this.jwt && looksLikeJwt(token)) return this.jwt.verify(token);
    return this.lookup(token);
  }

  private async lookup(token: string): Promise<Principal> {
    const digest = sha256(token);
    const now = Date.now();
    const hit = this.cache.get(digest);
    if (hit && hit.until > now) return hit.principal;
    this.cache.delete(digest);
    const record = await this.store.lookup(token);
    if (!record) throw new ApiError('invalid_api_key', 'Incorrect API key provided.');
    const { models, rpm, tpm, max_concurrent, tier } = record;
    const principal: Principal = { keyId: record.id, kind: 'key', limits: { models, rpm, tpm, max_concurrent, tier } };
    if (this.cacheMs > 0) {
      if (this.cache.size >= MAX_CACHED) this.cache.delete(this.cache.keys().next().value!);
      this.cache.set(digest, { principal, until: now + this.cacheMs });
    }
    return principal;
  }
}
