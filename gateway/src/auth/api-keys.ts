/**
 * Bearer API keys from configuration (API_KEYS). The full key system (Redis-stored hashed keys, JWT, per-key limits)
 * is issue 5: it replaces the Authenticator, not the middleware. Keys are compared by SHA-256 digest, so lookup time
 * does not depend on how much of a guess matches, and only a short key id ever reaches the logs.
 */
import { createHash } from 'node:crypto';
import type { RequestHandler } from 'express';
import { ApiError } from '../errors';
import type { AuthFailureLimiter } from '../limits/auth-failures';
import type { KeyLimits } from './key-store';

export interface Principal {
  /** Safe to log: a prefix of the key's SHA-256 (static keys), the key's id (stored keys) or `jwt:<sub>`; never the key. */
  keyId: string;
  kind?: 'static' | 'key' | 'jwt';
  /** Limits from the stored key or the JWT's claims; null fields (or none) mean the configured defaults. */
  limits?: KeyLimits;
}

export interface Authenticator {
  /** Resolves the caller from the Authorization header, or throws a 401 ApiError. */
  authenticate(authorization: string | undefined): Promise<Principal> | Principal;
  /** Whether this credential is already known valid here without asking anyone (no I/O); see limits/auth-failures.ts. */
  knows?(authorization: string | undefined): boolean;
}

const digest = (key: string) => createHash('sha256').update(key, 'utf8').digest('hex');

export const keyIdOf = (key: string): string => `key_${digest(key).slice(0, 12)}`;

/** The Bearer token of an Authorization header, or null. */
export function bearerOf(authorization: string | undefined): string | null {
  const match = authorization ? /^Bearer\s+(\S+)\s*$/i.exec(authorization) : null;
  return match ? match[1] : null;
}

/** The Bearer token of an Authorization header, or a 401. */
export function bearerToken(authorization: string | undefined): string {
  const token = bearerOf(authorization);
  if (token === null) {
    throw new ApiError(
      'invalid_api_key',
      "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
    );
  }
  return token;
}

export class StaticKeyAuthenticator implements Authenticator {
  private readonly byDigest = new Map<string, Principal>();

  constructor(keys: readonly string[]) {
    for (const key of keys) this.byDigest.set(digest(key), { keyId: keyIdOf(key), kind: 'static' });
  }

  authenticate(authorization: string | undefined): Principal {
    const principal = this.find(bearerToken(authorization));
    if (!principal) throw new ApiError('invalid_api_key', 'Incorrect API key provided.');
    return principal;
  }

  find(token: string): Principal | undefined {
    return this.byDigest.get(digest(token));
  }

  knows(authorization: string | undefined): boolean {
    const token = bearerOf(authorization);
    return token !== null && this.byDigest.has(digest(token));
  }
}

/** Authenticates the request; with `failures`, an address that failed too often is refused first, and failures count. */
export function requireAuth(auth: Authenticator, failures?: AuthFailureLimiter): RequestHandler {
  return async (req, res, next) => {
    const authorization = req.get('authorization');
    const authenticate = () => auth.authenticate(authorization);
    const principal = failures ? await failures.guard(req, () => auth.knows?.(authorization) ?? false, authenticate) : await authenticate();
    res.locals.principal = principal;
    res.locals.log = res.locals.log.child({ keyId: principal.keyId });
    next();
  };
}
