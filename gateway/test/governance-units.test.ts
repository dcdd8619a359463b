/**
 * Governance pieces on their own: configuration, the streaming output filter (every split of a blocked phrase), the
 * L1 LRU bounds, and the Redis cache keeping inside its byte budget (real Redis: it runs with noeviction).
 */
import { randomUUID } from 'node:crypto';
import { CACHE_BYTES, CACHE_INDEX, CACHE_SIZES, cacheKey, isCacheable, ResponseCache } from '../src/cache/response-cache';
import { ConfigError, loadConfig } from '../src/config';
import { OutputFilter } from '../src/filter/output-filter';
import { createLogger } from '../src/logger';
import type { JobData, JobResult } from '../src/protocol/job';
import { useTestRedis } from './helpers/redis-server';

describe('governance configuration', () => {
  it('has the documented defaults: no limits on static keys, the tutorial at 10/minute, cache on', () => {
    expect(loadConfig({})).toMatchObject({
      DEFAULT_RPM: 0,
      DEFAULT_TPM: 0,
      DEFAULT_MAX_CONCURRENT: 0,
      TUTORIAL_RPM: 10,
      RATE_LIMIT_WINDOW_MS: 60_000,
      KEY_CACHE_MS: 500,
      CACHE_ENABLED: true,
      MAX_QUEUE_DEPTH: 1000,
      DEGRADE_QUEUE_DEPTH: 0,
      OUTPUT_FILTER_BLOCKLIST: [],
    });
  });

  it('refuses bad values and never echoes secrets', () => {
    expect(() => loadConfig({ OUTPUT_FILTER_PATTERNS: 'ok;;(unclosed' })).toThrow(/OUTPUT_FILTER_PATTERNS/);
    expect(() => loadConfig({ KEY_CACHE_MS: '5000' })).toThrow(/KEY_CACHE_MS/);
    expect(() => loadConfig({ JWT_PUBLIC_KEY: 'not a pem' })).toThrow(/JWT_PUBLIC_KEY/);
    try {
      loadConfig({ JWT_SECRET: 'short-secret-value' });
      throw new Error('accepted');
    } catch (err) {
      expect(err).toBeInstanceOf(ConfigError);
      expect(String(err)).toContain('JWT_SECRET=<redacted>');
      expect(String(err)).not.toContain('short-secret-value');
    }
  });
});

describe('OutputFilter', () => {
  const f = new OutputFilter(['secret plan'], ['\\d{3}-\\d{4}'], '[x]', 16);
  const text = 'Our Secret Plan: call 555-1234 now. secret plan again';
  const expected = 'Our [x]: call [x] now. [x] again';

  it('replaces phrases (case-insensitive) and patterns in whole text', () => {
    expect(f.apply(text)).toBe(expected);
  });

  it('streamed in any two or three pieces, the output is the same and never contains a blocked part', () => {
    for (let i = 1; i < text.length; i++) {
      for (const j of [i + 1, i + 5, text.length - 1]) {
        if (j <= i || j >= text.length) continue;
        const s = f.stream();
        const sent = [s.push(0, text.slice(0, i)), s.push(0, text.slice(i, j)), s.push(0, text.slice(j)), s.flush(0)];
        expect(sent.join('')).toBe(expected);
        for (const piece of sent) expect(piece).not.toMatch(/secret|plan|555|1234/i);
      }
    }
  });

  it('one character at a time, choices apart', () => {
    const s = f.stream();
    let a = '';
    let b = '';
    for (const ch of text) {
      a += s.push(0, ch);
      b += s.push(1, ch.toUpperCase());
    }
    expect(a + s.flush(0)).toBe(expected);
    expect(b + s.flush(1)).toBe(expected.toUpperCase().replace(/\[X\]/g, '[x]'));
  });

  it('is a no-op without rules', () => {
    const none = new OutputFilter([], [], '[x]', 16);
    expect(none.active).toBe(false);
    expect(none.stream().push(0, 'abc')).toBe('abc');
  });
});

describe('ResponseCache (L2 in Redis)', () => {
  const redis = useTestRedis();

  const data = (content: string, extra: Partial<JobData['params']> = {}): JobData =>
    ({
      v: 1,
      request_id: 'r',
      model: 'm',
      messages: [{ role: 'user', content }],
      params: { max_tokens: 5, temperature: 0, top_p: 1, seed: null, stop: [], n: 1, presence_penalty: 0, frequency_penalty: 0, logit_bias: {}, logprobs: false, top_logprobs: 0, top_k: 0, min_p: 0, repetition_penalty: 1, ignore_eos: false, ...extra },
      stream: false,
      prompt_tokens: 3,
      enqueued_at_ms: 0,
      deadline_ms: null,
    }) as unknown as JobData;
  const result = (text: string): JobResult => ({ choices: [{ index: 0, text, finish_reason: 'stop', logprobs: null }], usage: { prompt_tokens: 3, completion_tokens: 4 } });

  it('keys ignore stream and request ids, differ by scope (caller), and only deterministic requests are cacheable', () => {
    const a = data('hi');
    expect(cacheKey(a, 'k1')).toBe(cacheKey({ ...a, stream: true, request_id: 'other' }, 'k1'));
    expect(cacheKey(a, 'k1')).not.toBe(cacheKey(data('hi', { max_tokens: 6 }), 'k1'));
    expect(cacheKey(a, 'k1')).not.toBe(cacheKey(a, 'k2'));
    expect(cacheKey(a, 'shared')).not.toBe(cacheKey(a, 'k1'));
    expect(isCacheable(a)).toBe(true);
    expect(isCacheable(data('hi', { temperature: 0.7 }))).toBe(false);
    expect(isCacheable(data('hi', { temperature: 0.7, seed: 1 }))).toBe(true);
  });

  it('shares answers between replicas and stays inside CACHE_L2_MAX_BYTES', async () => {
    const budget = 20_000;
    const config = loadConfig({ CACHE_L2_MAX_BYTES: String(budget), CACHE_L1_MAX_ENTRIES: '0' });
    const log = createLogger('error', () => undefined);
    const one = new ResponseCache(config, redis.client, log);
    const two = new ResponseCache(config, redis.client, log);
    const k0 = cacheKey(data(`first ${randomUUID()}`), 's');
    await one.put(k0, result('zero'));
    expect((await two.get(k0))?.choices[0].text).toBe('zero');
    for (let i = 0; i < 200; i++) await one.put(cacheKey(data(`n${i}`), 's'), result('x'.repeat(500)));
    expect(Number(await redis.client.get(CACHE_BYTES))).toBeLessThanOrEqual(budget);
    const keys = await redis.client.keys('llm:cache:*');
    const entries = keys.filter((k) => ![CACHE_BYTES, CACHE_INDEX, CACHE_SIZES].includes(k));
    let real = 0;
    for (const k of entries) real += (await redis.client.strlen(k)) + k.length;
    expect(real).toBeLessThanOrEqual(budget);
    expect(entries.length).toBe(await redis.client.zcard(CACHE_INDEX));
    expect(await two.get(k0)).toBeNull(); // the oldest went first
  });

  it('L1 (lru-cache) is bounded by entries and bytes, and an answer larger than it stays in L2 only', async () => {
    const config = loadConfig({ CACHE_L2_MAX_BYTES: '0', CACHE_L1_MAX_ENTRIES: '2', CACHE_L1_MAX_BYTES: '2000' });
    const c = new ResponseCache(config, redis.client, createLogger('error', () => undefined));
    const [a, b, d] = ['a', 'b', 'd'].map((x) => cacheKey(data(`${x} ${randomUUID()}`), 's'));
    await c.put(a, result('A'));
    await c.put(b, result('B'));
    expect((await c.get(a))?.choices[0].text).toBe('A'); // a is now the most recent
    await c.put(d, result('D'));
    expect(await c.get(b)).toBeNull(); // two entries at most: the least recent went
    expect((await c.get(a))?.choices[0].text).toBe('A');
    const big = cacheKey(data(`big ${randomUUID()}`), 's');
    await c.put(big, result('x'.repeat(3000))); // over CACHE_L1_MAX_BYTES: not kept (and no error)
    expect(await c.get(big)).toBeNull();
  });
});
