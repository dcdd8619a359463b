/**
 * API keys stored in Redis. A key is shown once, at creation; Redis holds only its SHA-256 and a visible prefix.
 *   HASH   llm:key:{id}          the record (name, prefix, limits, created/revoked times, usage counters)
 *   STRING llm:keyhash:{sha256}  → id (deleted on revocation, so a revoked key no longer resolves anywhere)
 *   ZSET   llm:keys              ids by creation time (listing)
 * A lookup reads hash → id, then the record: a revocation deletes the link and marks the record in one MULTI, so every
 * replica sees it on its next lookup, whichever of the two reads it lands between.
 */
import { createHash, randomBytes } from 'node:crypto';
import type Redis from 'ioredis';
import { inOrder } from '../queue/redis';
import { z } from 'zod';
import { TIERS, type Tier } from '../limits/governance-config';

export const KEYS_ZSET = 'llm:keys';
export const keyRecordKey = (id: string) => `llm:key:${id}`;
export const keyHashKey = (sha: string) => `llm:keyhash:${sha}`;
export const usageKey = (principalId: string) => `llm:usage:${principalId}`;

export const sha256 = (s: string) => createHash('sha256').update(s, 'utf8').digest('hex');

/** Limits a key (or a JWT's claims) may carry; null = the configured default. */
export const keyLimitsSchema = z.object({
  models: z.array(z.string().min(1)).nullable().default(null),
  rpm: z.number().int().min(0).nullable().default(null),
  tpm: z.number().int().min(0).nullable().default(null),
  max_concurrent: z.number().int().min(0).nullable().default(null),
  tier: z.enum(TIERS).nullable().default(null),
});
export type KeyLimits = z.infer<typeof keyLimitsSchema>;

export interface KeyUsage {
  requests: number;
  prompt_tokens: number;
  completion_tokens: number;
  cache_hits: number;
}

export interface KeyRecord extends KeyLimits {
  id: string;
  name: string;
  prefix: string;
  created_at: number;
  revoked_at: number | null;
  usage: KeyUsage;
}


const num = (v: string | undefined) => (v === undefined || v === '' ? null : Number(v));

function toRecord(id: string, h: Record<string, string>, usage: Record<string, string>): KeyRecord {
  return {
    id,
    name: h.name ?? '',
    prefix: h.prefix ?? '',
    models: h.models ? (JSON.parse(h.models) as string[]) : null,
    rpm: num(h.rpm),
    tpm: num(h.tpm),
    max_concurrent: num(h.max_concurrent),
    tier: (h.tier || null) as Tier | null,
    created_at: Number(h.created_at ?? 0),
    revoked_at: num(h.revoked_at),
    usage: {
      requests: Number(usage.requests ?? 0),
      prompt_tokens: Number(usage.prompt_tokens ?? 0),
      completion_tokens: Number(usage.completion_tokens ?? 0),
      cache_hits: Number(usage.cache_hits ?? 0),
    },
  };
}

function limitFields(l: Partial<KeyLimits>): Record<string, string> {
  const out: Record<string, string> = {};
  if (l.models !== undefined) out.models = l.models === null ? '' : JSON.stringify(l.models);
  for (const f of ['rpm', 'tpm', 'max_concurrent', 'tier'] as const) {
    if (l[f] !== undefined) out[f] = l[f] === null ? '' : String(l[f]);
  }
  return out;
}

export class KeyStore {
  constructor(private readonly redis: Redis) {}

  /** Creates a key; the plaintext is returned here and never stored. */
  async create(name: string, limits: Partial<KeyLimits>): Promise<{ key: string; record: KeyRecord }> {
    const id = `key_${randomBytes(8).toString('hex')}`;
    const key = `sk-llm-${randomBytes(24).toString('base64url')}`;
    const prefix = key.slice(0, 11);
    const now = Date.now();
    const fields = { name, prefix, hash: sha256(key), created_at: String(now), ...limitFields(limits) };
    // The record before the link that resolves to it (on a cluster these run one after another: queue/redis.ts).
    await inOrder(this.redis, [
      ['hset', keyRecordKey(id), ...Object.entries(fields).flat()],
      ['set', keyHashKey(fields.hash), id],
      ['zadd', KEYS_ZSET, now, id],
    ]);
    return { key, record: (await this.get(id))! };
  }

  async get(id: string): Promise<KeyRecord | null> {
    const [h, usage] = await Promise.all([this.redis.hgetall(keyRecordKey(id)), this.redis.hgetall(usageKey(id))]);
    if (!h.prefix) return null;
    return toRecord(id, h, usage);
  }

  async list(): Promise<KeyRecord[]> {
    const ids = await this.redis.zrange(KEYS_ZSET, 0, -1);
    const all = await Promise.all(ids.map((id) => this.get(id)));
    return all.filter((r): r is KeyRecord => r !== null);
  }

  async update(id: string, patch: Partial<KeyLimits> & { name?: string }): Promise<KeyRecord | null> {
    const existing = await this.get(id);
    if (!existing) return null;
    const fields = { ...limitFields(patch), ...(patch.name !== undefined ? { name: patch.name } : {}) };
    if (Object.keys(fields).length > 0) await this.redis.hset(keyRecordKey(id), fields);
    return this.get(id);
  }

  /** Revokes: the hash → id link is deleted at once, so the next lookup on any replica fails. */
  async revoke(id: string): Promise<KeyRecord | null> {
    const hash = await this.redis.hget(keyRecordKey(id), 'hash');
    if (!hash) return null;
    // HSETNX: revoking again keeps the first revocation time (the audit trail's "when"), and is still a 200.
    await inOrder(this.redis, [['del', keyHashKey(hash)], ['hsetnx', keyRecordKey(id), 'revoked_at', Date.now()]]);
    return this.get(id);
  }

  /** Resolves a plaintext key to its record (limits only; usage is not read on the hot path). */
  async lookup(key: string): Promise<KeyRecord | null> {
    // Two reads, not a script that builds the record's key from the id it read: every key a script touches must be
    // declared to it (Redis Cluster routes by them). Only lookups that miss the authenticator's cache pay the second.
    const id = await this.redis.get(keyHashKey(sha256(key)));
    if (!id) return null;
    const h = await this.redis.hgetall(keyRecordKey(id));
    if (!h.prefix || h.revoked_at) return null;
    return toRecord(id, h, {});
  }
}

/** Usage counters of any caller (stored key, static key, JWT subject). */
export async function addUsage(redis: Redis, principalId: string, u: Partial<KeyUsage>): Promise<void> {
  const m = redis.multi();
  for (const [f, v] of Object.entries(u)) if (v) m.hincrby(usageKey(principalId), f, v);
  await m.exec();
}
