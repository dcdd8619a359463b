/**
 * JWT bearer tokens (jose): HS256 with a shared secret, or RS256/ES256 with a PEM public key. The algorithm is pinned
 * (a token naming another one, `none` included, is refused); `exp` is required, `nbf`/`aud`/`iss` are checked when
 * configured. Claims may carry the caller's limits: `models`, `rpm`, `tpm`, `max_concurrent`, `tier`.
 * A token whose `jti` is on the revocation list (llm:jwt:revoked:{jti}, set through the admin API) is refused.
 */
import { createSecretKey } from 'node:crypto';
import type Redis from 'ioredis';
import { errors as joseErrors, importSPKI, type JWTPayload, jwtVerify, type KeyLike } from 'jose';
import type { Config } from '../config';
import { ApiError } from '../errors';
import type { Principal } from './api-keys';
import { keyLimitsSchema } from './key-store';

export const jwtRevokedKey = (jti: string) => `llm:jwt:revoked:${jti}`;

/** Three base64url segments, the first a JSON header: `eyJ` is `{"` encoded. */
export const looksLikeJwt = (token: string) => /^eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$/.test(token);

export class JwtVerifier {
  private key: Promise<KeyLike | Uint8Array>;

  private constructor(
    private readonly config: Config,
    private readonly redis: Redis,
  ) {
    const alg = config.JWT_ALGORITHM;
    if (alg === 'HS256') {
      if (!config.JWT_SECRET) throw new Error('JWT_ALGORITHM=HS256 needs JWT_SECRET');
      this.key = Promise.resolve(createSecretKey(Buffer.from(config.JWT_SECRET, 'utf8')));
    } else {
      if (!config.JWT_PUBLIC_KEY) throw new Error(`JWT_ALGORITHM=${alg} needs JWT_PUBLIC_KEY (PEM)`);
      this.key = importSPKI(config.JWT_PUBLIC_KEY.replace(/\\n/g, '\n'), alg);
      // An unusable key fails each JWT request with a 500 (logged), not the process with an unhandled rejection.
      this.key.catch(() => undefined);
    }
  }

  /** A verifier when JWT_SECRET or JWT_PUBLIC_KEY is set, else null. Throws on an unusable key (start-up error). */
  static fromConfig(config: Config, redis: Redis): JwtVerifier | null {
    if (!config.JWT_SECRET && !config.JWT_PUBLIC_KEY) return null;
    return new JwtVerifier(config, redis);
  }

  async ready(): Promise<void> {
    await this.key;
  }

  async verify(token: string): Promise<Principal> {
    const { config } = this;
    const key = await this.key; // a key that cannot be imported is our fault: 500, not 401
    let payload: JWTPayload;
    try {
      ({ payload } = await jwtVerify(token, key, {
        algorithms: [config.JWT_ALGORITHM],
        audience: config.JWT_AUDIENCE,
        issuer: config.JWT_ISSUER,
        clockTolerance: config.JWT_CLOCK_TOLERANCE_S,
        requiredClaims: ['exp', 'sub'],
      }));
    } catch (err) {
      throw new ApiError('invalid_api_key', `Invalid bearer token: ${describe(err)}.`, { cause: err });
    }
    if (payload.jti && (await this.redis.exists(jwtRevokedKey(payload.jti))) === 1) {
      throw new ApiError('invalid_api_key', 'Invalid bearer token: it has been revoked.');
    }
    const limits = keyLimitsSchema.safeParse(payload);
    if (!limits.success) {
      throw new ApiError('invalid_api_key', `Invalid bearer token: bad limit claim (${limits.error.issues[0]?.path.join('.')}).`);
    }
    return { keyId: `jwt:${payload.sub}`, kind: 'jwt', limits: limits.data };
  }
}

function describe(err: unknown): string {
  if (err instanceof joseErrors.JWTExpired) return 'it has expired';
  if (err instanceof joseErrors.JWTClaimValidationFailed) return `claim '${err.claim}' check failed (${err.reason})`;
  if (err instanceof joseErrors.JOSEAlgNotAllowed) return 'signing algorithm not allowed';
  if (err instanceof joseErrors.JWSSignatureVerificationFailed) return 'signature verification failed';
  return 'malformed or unverifiable token';
}
