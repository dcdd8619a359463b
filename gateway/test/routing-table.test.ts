/** The routing table file (routing/table.ts): zod-checked at start-up; a bad entry stops start-up naming it. */
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ConfigError } from '../src/config';
import { RoutingTable } from '../src/routing/table';
import { CircuitBreaker, sharePermit } from '../src/routing/breaker';

const good = {
  upstreams: { vllm: { base_url: 'http://127.0.0.1:9/v1', api_key_env: 'ROUTING_UNIT_KEY', timeout_ms: 5000 } },
  models: {
    'llama-70b': { upstream: 'vllm', upstream_model: 'meta-llama/Llama-3.1-70B-Instruct', fallback: ['small'] },
    small: { pool: 'smollm2-135m-instruct' },
  },
};
const env = { ROUTING_UNIT_KEY: 'sk-upstream-secret' };

describe('RoutingTable.fromFile', () => {
  it('maps public names to pools and upstreams, with their fallback chain', () => {
    const t = RoutingTable.fromFile(good, env);
    const [first, second] = t.chain('llama-70b');
    expect(first).toMatchObject({ kind: 'upstream', upstreamModel: 'meta-llama/Llama-3.1-70B-Instruct', breaker: 'upstream:vllm' });
    expect(first.kind === 'upstream' && first.upstream.apiKey).toBe('sk-upstream-secret');
    expect(second).toMatchObject({ kind: 'pool', publicName: 'small', queue: 'smollm2-135m-instruct' });
    // A name outside the table is the pool of that name, with no breaker: the behaviour without a table.
    expect(t.route('other')).toEqual({ publicName: 'other', kind: 'pool', queue: 'other', fallback: [], breaker: null });
  });

  it.each([
    ['an unknown upstream', { ...good, models: { ...good.models, x: { upstream: 'vlm' } } }, /models\.x\.upstream: 'vlm' is not one of upstreams/],
    ['a fallback outside the file', { ...good, models: { ...good.models, x: { pool: 'p', fallback: ['nope'] } } }, /models\.x\.fallback\.0: 'nope' is not a model/],
    ['a misspelt field', { ...good, models: { x: { pool: 'p', falback: [] } } }, /models\.x/],
    ['a base_url that is not http(s)', { ...good, upstreams: { vllm: { base_url: 'ftp://h/v1' } } }, /upstreams\.vllm\.base_url/],
    ['a credential variable that is not set', good, /upstreams\.vllm\.api_key_env: the environment variable ROUTING_UNIT_KEY is not set/],
  ])('refuses %s, naming the entry', (_what, file, message) => {
    const e = file === good ? {} : env;
    expect(() => RoutingTable.fromFile(file, e)).toThrow(ConfigError);
    expect(() => RoutingTable.fromFile(file, e)).toThrow(message);
  });

  it('main.ts exits with code 2 naming the bad entry, and never prints the credential', () => {
    const dir = mkdtempSync(join(tmpdir(), 'routing-'));
    const file = join(dir, 'routing.json');
    writeFileSync(file, JSON.stringify({ ...good, models: { ...good.models, broken: { upstream: 'nowhere' } } }));
    const tsx = join(__dirname, '..', '..', 'node_modules', '.bin', 'tsx');
    const r = spawnSync(tsx, [join(__dirname, '..', 'src', 'main.ts')], {
      env: { ...process.env, API_KEYS: 'k', PORT: '0', ROUTING_FILE: file, ...env },
      encoding: 'utf8',
      timeout: 30_000,
    });
    expect(r.status).toBe(2);
    expect(r.stderr).toMatch(/models\.broken\.upstream: 'nowhere'/);
    expect(r.stdout + r.stderr).not.toContain(env.ROUTING_UNIT_KEY);
  });
});

describe('the documented examples', () => {
  const root = join(__dirname, '..', '..');
  const examples = ['docs/ROUTING.md', 'README.md'].flatMap((doc) =>
    [...readFileSync(join(root, doc), 'utf8').matchAll(/```json\n([\s\S]*?)```/g)]
      .map((m) => m[1])
      .filter((block) => block.includes('"upstreams"'))
      .map((block) => [doc, block] as const),
  );

  it('are there (docs/ROUTING.md and README.md each show a routing file)', () => {
    expect(new Set(examples.map(([doc]) => doc))).toEqual(new Set(['docs/ROUTING.md', 'README.md']));
  });

  it.each(examples)('%s: its routing file passes the start-up checks', (_doc, block) => {
    const t = RoutingTable.fromFile(JSON.parse(block), { VLLM_API_KEY: 'sk-vllm' });
    expect(t.route('llama-70b')).toMatchObject({ kind: 'upstream', upstreamModel: 'meta-llama/Llama-3.1-70B-Instruct' });
  });
});

describe('CircuitBreaker', () => {
  it('opens after consecutive failures, lets one probe through once open_ms has passed, and closes on its success', () => {
    let now = 0;
    const b = new CircuitBreaker('unit', { failure_threshold: 2, open_ms: 1000, latency_ms: 500 }, () => now);
    b.permit()!.failure();
    b.permit()!.success(10); // a success in between resets the count
    b.permit()!.failure();
    expect(b.current).toBe('closed');
    b.permit()!.success(900); // slower than latency_ms: a failure
    expect(b.current).toBe('open');
    expect(b.permit()).toBeNull();
    now = 1000;
    const probe = b.permit();
    expect(b.current).toBe('half_open');
    expect(b.permit()).toBeNull(); // one probe at a time
    probe!.failure();
    expect(b.current).toBe('open');
    now = 2000;
    b.permit()!.release(); // a probe that says nothing lets the next one probe
    b.permit()!.success(1);
    expect(b.current).toBe('closed');
  });

  it('a permit shared by the runs of a list of prompts: any failure is the request\'s, a success needs every run, at the slowest', () => {
    const settings = { failure_threshold: 1, open_ms: 1000, latency_ms: 500 };
    const failing = new CircuitBreaker('shared-failure', settings);
    const [fast, broken] = sharePermit(failing.permit()!, 2);
    fast.success(10);
    expect(failing.current).toBe('closed'); // not yet: the other run is still going
    broken.failure();
    expect(failing.current).toBe('open');

    const slow = new CircuitBreaker('shared-slow', settings);
    const [a, b] = sharePermit(slow.permit()!, 2);
    a.success(10);
    b.success(900); // the slowest run decides the request's latency
    expect(slow.current).toBe('open');

    const left = new CircuitBreaker('shared-release', settings);
    const [done, gone] = sharePermit(left.permit()!, 2);
    done.success(900);
    gone.release(); // a run that ended for reasons of its own: nothing is learnt about the target
    expect(left.current).toBe('closed');
  });
});
