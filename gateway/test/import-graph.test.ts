/**
 * The request path only descends: routes → pipeline → admission / chat service → queue. Before, GovernedChat and
 * ChatService called back and forth (a job's output went through an object GovernedChat had put on the context);
 * this reads every import of gateway/src (type imports too, since a type cycle is a design cycle) and fails on any
 * cycle, and on a module of the request path importing one above it.
 */
import { readdirSync, readFileSync, statSync } from 'node:fs';
import path from 'node:path';

const SRC = path.join(__dirname, '..', 'src');

function sources(dir: string): string[] {
  return readdirSync(dir).flatMap((name) => {
    const p = path.join(dir, name);
    if (statSync(p).isDirectory()) return sources(p);
    return p.endsWith('.ts') ? [p] : [];
  });
}

function resolve(from: string, spec: string): string | null {
  if (!spec.startsWith('.')) return null;
  const base = path.resolve(path.dirname(from), spec);
  for (const candidate of [`${base}.ts`, path.join(base, 'index.ts')]) {
    try {
      if (statSync(candidate).isFile()) return candidate;
    } catch {
      // not this one
    }
  }
  throw new Error(`${path.relative(SRC, from)} imports ${spec}, which does not exist`);
}

const rel = (p: string) => path.relative(SRC, p).replace(/\\/g, '/');

function graph(): Map<string, string[]> {
  const g = new Map<string, string[]>();
  const importRe = /^\s*(?:import|export)\s[^;]*?from\s+['"]([^'"]+)['"]/gms;
  for (const file of sources(SRC)) {
    const text = readFileSync(file, 'utf8');
    const deps = [...text.matchAll(importRe)].map((m) => resolve(file, m[1])).filter((d): d is string => d !== null);
    g.set(rel(file), [...new Set(deps.map(rel))]);
  }
  return g;
}

function findCycle(g: Map<string, string[]>): string[] | null {
  const state = new Map<string, 'open' | 'done'>();
  const stack: string[] = [];
  const visit = (n: string): string[] | null => {
    if (state.get(n) === 'done') return null;
    if (state.get(n) === 'open') return [...stack.slice(stack.indexOf(n)), n];
    state.set(n, 'open');
    stack.push(n);
    for (const d of g.get(n) ?? []) {
      const c = visit(d);
      if (c) return c;
    }
    stack.pop();
    state.set(n, 'done');
    return null;
  };
  for (const n of g.keys()) {
    const c = visit(n);
    if (c) return c;
  }
  return null;
}

/** Everything `from` reaches through its imports. */
function reach(g: Map<string, string[]>, from: string): Set<string> {
  const seen = new Set<string>();
  const todo = [from];
  while (todo.length > 0) {
    const n = todo.pop()!;
    for (const d of g.get(n) ?? []) if (!seen.has(d)) todo.push(d), seen.add(d);
  }
  return seen;
}

describe('gateway/src import graph', () => {
  const g = graph();

  it('reads the whole source tree (the parser finds imports)', () => {
    expect(g.size).toBeGreaterThan(30);
    expect(g.get('routes/chat.ts')).toContain('services/chat-pipeline.ts');
  });

  it('has no import cycle, type imports included', () => {
    expect(findCycle(g)).toBeNull();
  });

  it('the request path descends: routes → pipeline → admission and chat service → queue', () => {
    const layers = [
      ['routes/chat.ts', 'routes/completions.ts', 'tutorial/routes.ts'],
      ['tutorial/tutorial-service.ts'],
      ['services/chat-pipeline.ts', 'services/stream-parts.ts'],
      ['services/chat-admission.ts'],
      ['services/chat-service.ts'],
      ['queue/job-run.ts'],
    ];
    for (const [i, layer] of layers.entries()) {
      for (const mod of layer) {
        expect(g.has(mod)).toBe(true);
        const reached = reach(g, mod);
        for (const above of layers.slice(0, i).flat()) {
          expect({ mod, imports: reached.has(above) ? above : null }).toEqual({ mod, imports: null });
        }
      }
    }
  });

  it('running a job renders nothing: chat-service and the queue reach neither the SSE writer nor a renderer', () => {
    for (const mod of ['services/chat-service.ts', 'queue/job-run.ts']) {
      const reached = reach(g, mod);
      for (const renderer of ['services/chat-stream.ts', 'streaming/sse.ts', 'filter/output-filter.ts']) {
        expect({ mod, imports: reached.has(renderer) ? renderer : null }).toEqual({ mod, imports: null });
      }
    }
  });

  it('a cycle would be found (the checker itself can fail)', () => {
    const cyclic = new Map([['a.ts', ['b.ts']], ['b.ts', ['c.ts']], ['c.ts', ['a.ts']]]);
    expect(findCycle(cyclic)).toEqual(['a.ts', 'b.ts', 'c.ts', 'a.ts']);
  });
});
