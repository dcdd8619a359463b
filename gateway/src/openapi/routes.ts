/**
 * The routes Express actually serves, read from the app's router stack (Express 5 / router 2). Used twice: the
 * OpenAPI test checks the document against it (none missing, none invented), and the request metrics label a request
 * that no route handled (e.g. a 401 from the auth middleware) with the route it was aimed at.
 *
 * Paths are given in OpenAPI's syntax: Express's `:id` and `*id` both become `{id}`.
 */
import type { Express, Request, Response } from 'express';

export interface ServedRoute {
  method: string;
  /** OpenAPI path template, e.g. /v1/models/{id}. */
  path: string;
  /** The Express pattern, e.g. /v1/models/*id. */
  pattern: string;
}

interface RouterLayer {
  route?: { path: string | string[]; methods: Record<string, boolean> };
  handle: unknown;
  rawPath?: string | string[];
  slash?: boolean;
  match(path: string): unknown;
}

const stackOf = (handle: unknown): RouterLayer[] | null => {
  const stack = (handle as { stack?: unknown } | null)?.stack;
  return Array.isArray(stack) ? (stack as RouterLayer[]) : null;
};

/** `/v1/models/*id` → `/v1/models/{id}`; `/a/:b` → `/a/{b}`; optional groups `{…}` are dropped (none are used). */
export function toOpenApiPath(pattern: string): string {
  return pattern.replace(/[:*]([A-Za-z_][A-Za-z0-9_]*)/g, '{$1}');
}

interface Found extends ServedRoute {
  prefix: string;
  layer: RouterLayer;
}

function walk(stack: RouterLayer[], prefix: string, out: Found[]): void {
  for (const layer of stack) {
    if (layer.route) {
      const paths = Array.isArray(layer.route.path) ? layer.route.path : [layer.route.path];
      for (const p of paths) {
        if (typeof p !== 'string') continue;
        for (const [m, on] of Object.entries(layer.route.methods)) {
          if (!on || m === '_all') continue;
          const pattern = prefix + p;
          out.push({ method: m.toUpperCase(), pattern, path: toOpenApiPath(pattern), prefix, layer });
        }
      }
      continue;
    }
    const inner = stackOf(layer.handle);
    if (!inner) continue;
    // A router mounted with app.use(path, router): its routes are relative to that path.
    const mount = layer.slash || typeof layer.rawPath !== 'string' ? '' : layer.rawPath.replace(/\/$/, '');
    walk(inner, prefix + mount, out);
  }
}

function found(app: Express): Found[] {
  const out: Found[] = [];
  walk(stackOf((app as unknown as { router: unknown }).router) ?? [], '', out);
  return out;
}

/** Every method + path the app serves (HEAD, which Express adds for GET routes, is not listed). */
export function servedRoutes(app: Express): ServedRoute[] {
  return found(app).map(({ method, path, pattern }) => ({ method, path, pattern }));
}

/**
 * A function that names the route pattern a request was aimed at, for requests no route handler saw. Built once per
 * app on first use (routes are all registered by then).
 */
export function routeMatcher(app: Express): (method: string, path: string) => string | null {
  let routes: Found[] | null = null;
  return (method, path) => {
    routes ??= found(app);
    const m = method === 'HEAD' ? 'GET' : method;
    for (const r of routes) {
      if (r.method !== m || !path.startsWith(r.prefix)) continue;
      if (r.layer.match(path.slice(r.prefix.length) || '/')) return r.path;
    }
    return null;
  };
}

/**
 * The `route` label of a request: its route's pattern, else `res.locals.route` (set by middleware that serves a tree,
 * e.g. the /docs assets), else the pattern it was aimed at, else `unmatched`.
 */
export function routeLabeller(app: Express): (req: Request, res: Response) => string {
  const match = routeMatcher(app);
  return (req, res) => {
    const route = req.route as { path?: unknown } | undefined;
    if (route && typeof route.path === 'string') return toOpenApiPath(req.baseUrl + route.path);
    if (typeof res.locals.route === 'string') return res.locals.route;
    const path = req.originalUrl.split('?')[0];
    return match(req.method, path) ?? 'unmatched';
  };
}
