import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { ConfigError, loadConfig } from '../src/config';

describe('config', () => {
  it('has the documented defaults', () => {
    const c = loadConfig({});
    expect(c).toMatchObject({
      PORT: 8000,
      HOST: '127.0.0.1',
      REDIS_URL: 'redis://127.0.0.1:6379',
      API_KEYS: [],
      DEFAULT_MODEL: 'smollm2-135m-instruct',
      DEFAULT_MAX_TOKENS: 512,
      LOG_LEVEL: 'info',
      LOG_PROMPTS: false,
    });
  });

  it('parses numbers, booleans and comma-separated keys; blank means default', () => {
    const c = loadConfig({ PORT: '9001', API_KEYS: ' a, b ,,c ', LOG_PROMPTS: 'true', QUEUE_TIMEOUT_MS: '', HOST: '0.0.0.0' });
    expect(c.PORT).toBe(9001);
    expect(c.API_KEYS).toEqual(['a', 'b', 'c']);
    expect(c.LOG_PROMPTS).toBe(true);
    expect(c.QUEUE_TIMEOUT_MS).toBe(30_000);
    expect(c.HOST).toBe('0.0.0.0');
  });

  it.each([
    ['PORT', 'abc'],
    ['PORT', '70000'],
    ['REDIS_URL', 'localhost:6379'],
    ['LOG_LEVEL', 'verbose'],
    ['MAX_BODY_BYTES', '-1'],
    ['LOG_PROMPTS', 'maybe'],
  ])('refuses %s=%s with a message naming the variable', (key, value) => {
    expect(() => loadConfig({ [key]: value })).toThrow(ConfigError);
    expect(() => loadConfig({ [key]: value })).toThrow(new RegExp(`${key}=`));
  });

  it('main.ts exits with code 2 and a clear message on a bad value', () => {
    const tsx = join(__dirname, '..', '..', 'node_modules', '.bin', 'tsx');
    const r = spawnSync(tsx, [join(__dirname, '..', 'src', 'main.ts')], {
      env: { ...process.env, PORT: 'not-a-port', API_KEYS: 'k' },
      encoding: 'utf8',
      timeout: 30_000,
    });
    expect(r.status).toBe(2);
    expect(r.stderr).toMatch(/invalid configuration/);
    expect(r.stderr).toMatch(/PORT="not-a-port"/);
  });
});
