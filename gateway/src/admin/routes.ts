/**
 * The admin API, guarded by ADMIN_API_KEY (compared in constant time); without ADMIN_API_KEY it does not exist (404).
 *   POST   /admin/keys            create (the key is in this response only)
 *   GET    /admin/keys            list, with usage counters
 *   GET    /admin/keys/:id        one key
 *   PATCH  /admin/keys/:id        name and limits
 *   DELETE /admin/keys/:id        revoke (refused on every replica within KEY_CACHE_MS)
 *   POST   /admin/jwt/revocations revoke a JWT by its jti
 */
import { createHash, timingSafeEqual } from 'node:crypto';
import express, { type RequestHandler, Router } from 'express';
import type Redis from 'ioredis';
import { jwtRevokedKey } from '../auth/jwt';
import type { KeyStore } from '../auth/key-store';
import type { Config } from '../config';
import { ApiError } from '../errors';
import { type AuthFailureLimiter, limitFailures } from '../limits/auth-failures';
import { createKeyRequestSchema, revokeJwtRequestSchema, updateKeyRequestSchema } from '../protocol/admin';
import { parseOrThrow } from '../services/validation';

const sha = (s: string) => createHash('sha256').update(s, 'utf8').digest();

function requireAdmin(adminKey: string): RequestHandler {
  const expected = sha(adminKey);
  return (req, _res, next) => {
    const m = /^Bearer\s+(\S+)\s*$/i.exec(req.get('authorization') ?? '');
    if (!m || !timingSafeEqual(sha(m[1]), expected)) throw new ApiError('invalid_api_key', 'Incorrect admin key provided.');
    next();
  };
}

const notFound = (id: string) => new ApiError('unknown_url', `No API key with id '${id}'.`, { param: 'id' });

export function adminRoutes(config: Config, store: KeyStore, redis: Redis, failures: AuthFailureLimiter): Router {
  const router = Router();
  if (!config.ADMIN_API_KEY) return router;
  router.use('/admin', limitFailures(failures, requireAdmin(config.ADMIN_API_KEY)), express.json({ limit: '64kb', type: () => true, strict: true }));

  router.post('/admin/keys', async (req, res) => {
    const { name, ...limits } = parseOrThrow(createKeyRequestSchema, req.body);
    const { key, record } = await store.create(name, limits);
    res.status(201).json({ ...record, key });
  });
  router.get('/admin/keys', async (_req, res) => {
    res.json({ object: 'list', data: await store.list() });
  });
  router.get('/admin/keys/:id', async (req, res) => {
    const record = await store.get(req.params.id);
    if (!record) throw notFound(req.params.id);
    res.json(record);
  });
  router.patch('/admin/keys/:id', async (req, res) => {
    const record = await store.update(req.params.id, parseOrThrow(updateKeyRequestSchema, req.body));
    if (!record) throw notFound(req.params.id);
    res.json(record);
  });
  router.delete('/admin/keys/:id', async (req, res) => {
    const record = await store.revoke(req.params.id);
    if (!record) throw notFound(req.params.id);
    res.json(record);
  });
  router.post('/admin/jwt/revocations', async (req, res) => {
    const { jti, exp } = parseOrThrow(revokeJwtRequestSchema, req.body);
    const ttl = exp ? Math.max(1, exp - Math.floor(Date.now() / 1000)) : 86_400;
    await redis.set(jwtRevokedKey(jti), '1', 'EX', ttl);
    res.json({ jti, revoked: true, expires_in_s: ttl });
  });
  return router;
}
