/**
 * The routing table (docs/ROUTING.md): which public model name is served by which source — one of our worker pools
 * (its queue) or an external OpenAI-compatible upstream — and what answers when it fails (a fallback chain).
 *
 * A JSON file named by ROUTING_FILE, parsed by zod once at start-up. A bad entry stops start-up (main.ts exits 2) with
 * a message naming the entry and the field. An upstream's credential is read from the environment variable the file
 * names (never from the file, never logged). Without ROUTING_FILE every model name is the pool of that name, as
 * before: no upstreams, no fallbacks, no breakers.
 */
import { readFileSync } from 'node:fs';
import { z } from 'zod';
import { ConfigError } from '../config';

const modelName = z.string().min(1).max(256);

const upstreamSchema = z.strictObject({
  /** Where the OpenAI API of the upstream lives, up to and including its `/v1` (we append `/chat/completions` or `/completions`). */
  base_url: z.url({ protocol: /^https?$/, error: 'must be an http:// or https:// URL' }),
  /** The environment variable that holds its Bearer key; absent: no Authorization header is sent. */
  api_key_env: z.string().regex(/^[A-Za-z_][A-Za-z0-9_]*$/, 'must be an environment variable name').optional(),
  /** How long the upstream may take to send its response headers, and then each next chunk of a stream. */
  timeout_ms: z.number().int().min(100).max(3_600_000).default(60_000),
  /** `owned_by` of its models in /v1/models. */
  owned_by: z.string().min(1).default('upstream'),
});

const fallback = z.array(modelName).max(8).default([]);

const poolRouteSchema = z.strictObject({
  /** The queue (the model id our workers register) that serves this public name. */
  pool: modelName,
  fallback,
});

const upstreamRouteSchema = z.strictObject({
  upstream: modelName,
  /** The model name the upstream knows (the request's `model` is rewritten to it); default: the public name. */
  upstream_model: modelName.optional(),
  fallback,
});

const breakerSchema = z.strictObject({
  /** Consecutive failures (errors, timeouts, answers slower than latency_ms) that open a breaker. */
  failure_threshold: z.number().int().min(1).max(1000).default(5),
  /** How long an open breaker refuses before it lets one probe request through (half-open). */
  open_ms: z.number().int().min(100).max(3_600_000).default(30_000),
  /** Time to the first output (a stream's first text; a whole answer when not streaming) over this is a failure; 0: never. */
  latency_ms: z.number().int().min(0).max(3_600_000).default(0),
});

export const routingFileSchema = z.strictObject({
  upstreams: z.record(z.string().min(1), upstreamSchema).default({}),
  models: z.record(modelName, z.union([poolRouteSchema, upstreamRouteSchema])),
  breaker: breakerSchema.default({ failure_threshold: 5, open_ms: 30_000, latency_ms: 0 }),
});
export type RoutingFile = z.infer<typeof routingFileSchema>;
export type BreakerSettings = RoutingFile['breaker'];

export interface UpstreamTarget {
  kind: 'upstream';
  /** The upstream's name in the file (its breaker's name). */
  name: string;
  baseUrl: string;
  /** The credential itself, read from api_key_env at start-up; never logged. */
  apiKey: string | null;
  timeoutMs: number;
  ownedBy: string;
}

/** Where one public model name is served. `breaker`: the breaker it answers to (null: none, no table). */
export type Route =
  | { publicName: string; kind: 'pool'; queue: string; fallback: readonly string[]; breaker: string | null }
  | { publicName: string; kind: 'upstream'; upstream: UpstreamTarget; upstreamModel: string; fallback: readonly string[]; breaker: string };

export class RoutingTable {
  private constructor(
    private readonly routes: ReadonlyMap<string, Route>,
    readonly breaker: BreakerSettings,
  ) {}

  /** No ROUTING_FILE: every name is the pool of that name. */
  static empty(): RoutingTable {
    return new RoutingTable(new Map(), { failure_threshold: 5, open_ms: 30_000, latency_ms: 0 });
  }

  /** Reads and checks the file; throws ConfigError naming the file, the entry and the problem. */
  static load(path: string | undefined, env: NodeJS.ProcessEnv = process.env): RoutingTable {
    if (!path) return RoutingTable.empty();
    let raw: unknown;
    try {
      raw = JSON.parse(readFileSync(path, 'utf8'));
    } catch (err) {
      throw new ConfigError(`invalid configuration:\n  ROUTING_FILE=${JSON.stringify(path)}: ${err instanceof Error ? err.message : String(err)}`);
    }
    return RoutingTable.fromFile(raw, env, path);
  }

  static fromFile(raw: unknown, env: NodeJS.ProcessEnv, source = 'routing file'): RoutingTable {
    const fail = (lines: string[]) => new ConfigError(`invalid configuration: ROUTING_FILE ${JSON.stringify(source)}:\n${lines.map((l) => `  ${l}`).join('\n')}`);
    const parsed = routingFileSchema.safeParse(raw);
    if (!parsed.success) {
      throw fail(parsed.error.issues.map((i) => `${i.path.map(String).join('.') || '(file)'}: ${i.message}`));
    }
    const file = parsed.data;
    const problems: string[] = [];
    const upstreams = new Map<string, UpstreamTarget>();
    for (const [name, u] of Object.entries(file.upstreams)) {
      const key = u.api_key_env === undefined ? null : (env[u.api_key_env] ?? '');
      if (key === '') problems.push(`upstreams.${name}.api_key_env: the environment variable ${u.api_key_env} is not set`);
      upstreams.set(name, { kind: 'upstream', name, baseUrl: u.base_url.replace(/\/+$/, ''), apiKey: key || null, timeoutMs: u.timeout_ms, ownedBy: u.owned_by });
    }
    const routes = new Map<string, Route>();
    for (const [publicName, entry] of Object.entries(file.models)) {
      for (const [i, next] of entry.fallback.entries()) {
        if (!(next in file.models)) problems.push(`models.${publicName}.fallback.${i}: '${next}' is not a model of this file`);
        if (next === publicName) problems.push(`models.${publicName}.fallback.${i}: a model cannot fall back to itself`);
      }
      if ('pool' in entry) {
        routes.set(publicName, { publicName, kind: 'pool', queue: entry.pool, fallback: entry.fallback, breaker: `pool:${entry.pool}` });
        continue;
      }
      const upstream = upstreams.get(entry.upstream);
      if (!upstream) {
        problems.push(`models.${publicName}.upstream: '${entry.upstream}' is not one of upstreams (${[...upstreams.keys()].join(', ') || 'none defined'})`);
        continue;
      }
      routes.set(publicName, {
        publicName,
        kind: 'upstream',
        upstream,
        upstreamModel: entry.upstream_model ?? publicName,
        fallback: entry.fallback,
        breaker: `upstream:${upstream.name}`,
      });
    }
    if (problems.length > 0) throw fail(problems);
    return new RoutingTable(routes, file.breaker);
  }

  /** The route of a public name: its table entry, else the pool of that name (no breaker, no fallback). */
  route(publicName: string): Route {
    return this.routes.get(publicName) ?? { publicName, kind: 'pool', queue: publicName, fallback: [], breaker: null };
  }

  /**
   * The routes to try for a request, in order: the model asked for, then its fallbacks (each once; a fallback's own
   * fallbacks are not followed, so a chain is exactly what its entry lists).
   */
  chain(publicName: string): Route[] {
    const first = this.route(publicName);
    return [first, ...first.fallback.map((name) => this.route(name))];
  }

  /** Every upstream route (listed by /v1/models next to the pools that live workers serve). */
  upstreamRoutes(): Extract<Route, { kind: 'upstream' }>[] {
    return [...this.routes.values()].filter((r): r is Extract<Route, { kind: 'upstream' }> => r.kind === 'upstream');
  }

  /** Pool entries whose public name differs from their queue (aliases), listed when their queue is live. */
  poolAliases(): Extract<Route, { kind: 'pool' }>[] {
    return [...this.routes.values()].filter((r): r is Extract<Route, { kind: 'pool' }> => r.kind === 'pool' && r.queue !== r.publicName);
  }
}
