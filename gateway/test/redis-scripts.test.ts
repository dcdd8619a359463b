/**
 * The Lua scripts (gateway/src/redis-scripts): each file is registered, each declares every key it touches (a key built
 * inside a script is what Redis Cluster cannot route), and they run by SHA, surviving a Redis that forgot them.
 */
import { readdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { runScript, SCRIPT_DIR, SCRIPTS } from '../src/redis-scripts';
import { RateLimiter } from '../src/limits/rate-limiter';
import { useTestRedis } from './helpers/redis-server';

const redis = useTestRedis();

describe('redis scripts', () => {
  const files = readdirSync(SCRIPT_DIR).filter((f) => f.endsWith('.lua'));

  it('every .lua file is registered, and every registered script has its file', () => {
    const sources = Object.values(SCRIPTS);
    expect(files.length).toBe(sources.length);
    for (const f of files) expect(sources).toContain(readFileSync(path.join(SCRIPT_DIR, f), 'utf8'));
  });

  it.each(files)('%s touches only keys passed in KEYS', (file) => {
    const lua = readFileSync(path.join(SCRIPT_DIR, file), 'utf8').replace(/--.*$/gm, '');
    const calls = [...lua.matchAll(/redis\.call\(\s*'(\w+)'\s*(?:,\s*([^,)]+))?/g)];
    expect(calls.length).toBeGreaterThan(0);
    for (const [, command, firstArg] of calls) {
      if (command === 'TIME') continue;
      expect(`${command} ${firstArg?.trim()}`).toMatch(/^\w+ KEYS\[\w+\]$/);
    }
  });

  it('run by SHA, and sent again when Redis has forgotten them (SCRIPT FLUSH, as after a restart)', async () => {
    const rl = new RateLimiter(redis.client, 60_000);
    const bucket = { scope: 'scripts-test', name: 'all', rpm: 10, tpm: 0 };
    expect((await rl.admit([bucket], 0)).admitted).toBe(true);
    await redis.client.script('FLUSH');
    expect((await rl.admit([bucket], 0)).states[0].usedRequests).toBe(2);
    expect(await runScript(redis.client, 'concurrencyAcquire', ['llm:inflight:{scripts-test}'], ['m', 1, 1000])).toBe(1);
  });
});
