/**
 * The OpenAPI document (src/openapi/document.ts, generated from the zod schemas): valid OpenAPI 3.1 by an independent
 * validator, equal to the routes Express actually serves (walked from the router stack: none missing, none invented),
 * served at /openapi.json, and describing real responses. /docs in a real browser: tests/e2e/docs.test.ts.
 */
import { spawnSync } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { join } from 'node:path';
import express from 'express';
import request from 'supertest';
import { type Config, loadConfig } from '../src/config';
import { buildOpenApiDocument } from '../src/openapi/document';
import { routeMatcher, servedRoutes } from '../src/openapi/routes';
import { errorBodySchema, healthSchema, readySchema } from '../src/openapi/schemas';
import { modelListSchema } from '../src/protocol/models';
import { startGateway, TEST_KEY, type TestGateway } from './helpers/gateway';
import { useTestRedis } from './helpers/redis-server';

const METHODS = ['get', 'put', 'post', 'delete', 'options', 'head', 'patch', 'trace'];
const ADMIN_KEY = `admin-${randomUUID()}`;
/** Every optional route on, and metrics moved and guarded. */
const FULL_ENV = { ADMIN_API_KEY: ADMIN_KEY, METRICS_PATH: '/internal/metrics', METRICS_AUTH: 'token', METRICS_TOKEN: `mt-${randomUUID()}` };

function validate(doc: unknown): { valid: boolean; version: string; errors: unknown } {
  const r = spawnSync(process.execPath, [join(__dirname, 'helpers', 'validate-openapi.mjs')], { input: JSON.stringify(doc), encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`validator failed: ${r.stderr}`);
  return JSON.parse(r.stdout);
}

const documented = (doc: ReturnType<typeof buildOpenApiDocument>) =>
  Object.entries(doc.paths ?? {})
    .flatMap(([path, item]) => METHODS.filter((m) => (item as Record<string, unknown>)[m]).map((m) => `${m.toUpperCase()} ${path}`))
    .sort();

const redis = useTestRedis();

describe.each([
  ['the default configuration', {}],
  ['admin routes on, metrics moved and guarded', FULL_ENV],
])('with %s', (_name, env: Record<string, string>) => {
  let gw: TestGateway;
  let config: Config;
  beforeAll(async () => {
    gw = await startGateway(redis.url, env);
    config = gw.config;
  });
  afterAll(async () => {
    await gw.close();
  });

  it('is a valid OpenAPI 3.1 document', () => {
    const result = validate(buildOpenApiDocument(config));
    expect(result.errors).toBeNull();
    expect(result).toMatchObject({ valid: true, version: '3.1' });
  });

  it('documents exactly the routes Express serves: none missing, none invented', () => {
    const served = servedRoutes(gw.gateway.app).map((r) => `${r.method} ${r.path}`);
    expect(new Set(served).size).toBe(served.length);
    expect(served.length).toBeGreaterThan(5);
    expect(documented(buildOpenApiDocument(config))).toEqual([...served].sort());
  });

  it('is served at /openapi.json, as generated', async () => {
    const res = await request(gw.url).get('/openapi.json');
    expect(res.status).toBe(200);
    expect(res.headers['content-type']).toMatch(/^application\/json/);
    expect(res.body).toEqual(JSON.parse(JSON.stringify(buildOpenApiDocument(config))));
    expect(res.body.openapi).toBe('3.1.0');
  });
});

describe('the document and the gateway agree', () => {
  let gw: TestGateway;
  beforeAll(async () => {
    gw = await startGateway(redis.url, FULL_ENV);
  });
  afterAll(async () => {
    await gw.close();
  });
  const doc = () => buildOpenApiDocument(gw.config);

  it('the walker sees routes mounted under a prefix and every method of a path', () => {
    const served = servedRoutes(gw.gateway.app).map((r) => `${r.method} ${r.path}`);
    expect(served).toEqual(expect.arrayContaining(['GET /v1/models/{id}', 'PATCH /admin/keys/{id}', 'DELETE /admin/keys/{id}', 'GET /internal/metrics']));
    expect(served).not.toContain('GET /metrics');
  });

  it('the validator is not a rubber stamp', () => {
    const broken = JSON.parse(JSON.stringify(doc()));
    broken.paths['/health'].get.responses = { twohundred: { description: 'x' } };
    expect(validate(broken).valid).toBe(false);
  });

  it('operations name their auth, and errors use the one error schema', () => {
    const d = doc();
    const chat = d.paths!['/v1/chat/completions']!.post!;
    expect(chat.security).toEqual([{ bearerAuth: [] }]);
    expect(d.paths!['/health']!.get!.security).toEqual([]);
    expect(d.paths!['/internal/metrics']!.get!.security).toEqual([{ metricsAuth: [] }]);
    expect(d.paths!['/admin/keys']!.post!.security).toEqual([{ adminAuth: [] }]);
    const r401 = chat.responses!['401'] as { content: Record<string, { schema: unknown }> };
    expect(r401.content['application/json'].schema).toEqual({ $ref: '#/components/schemas/Error' });
    const r503 = chat.responses!['503'] as { headers: Record<string, unknown> };
    expect(Object.keys(r503.headers).sort()).toEqual(['retry-after', 'retry-after-ms', 'x-request-id']);
    for (const item of Object.values(d.paths!)) {
      for (const op of Object.values(item as object)) {
        for (const r of Object.values((op as { responses: Record<string, { headers?: object }> }).responses)) {
          expect(r.headers).toHaveProperty('x-request-id');
        }
      }
    }
    // The request schema keeps OpenAI's fields and ranges from protocol/chat.ts.
    const req = d.components!.schemas!.ChatCompletionRequest as { properties: Record<string, unknown>; required: string[] };
    expect(req.required).toEqual(expect.arrayContaining(['model', 'messages']));
    expect(req.properties.temperature).toEqual({ anyOf: [{ type: 'number', minimum: 0, maximum: 2 }, { type: 'null' }] });
    // Structured outputs and tools are described as served: their shapes, not an opaque "unknown".
    const described = JSON.stringify(req.properties);
    for (const field of ['response_format', 'tools', 'tool_choice', 'parallel_tool_calls']) expect(req.properties).toHaveProperty(field);
    for (const shape of ['json_schema', 'json_object', '"required"', 'parameters', 'tool_call_id']) expect(described).toContain(shape);
    const completion = JSON.stringify(d.components!.schemas!);
    expect(completion).toContain('tool_calls');
  });

  it('real responses parse with the schemas the document is made from', async () => {
    const health = await request(gw.url).get('/health');
    expect(health.headers['x-request-id']).toMatch(/^req_/);
    healthSchema.parse(health.body);
    readySchema.parse((await request(gw.url).get('/ready')).body);
    errorBodySchema.parse((await request(gw.url).get('/v1/models')).body);
    errorBodySchema.parse((await request(gw.url).get('/nowhere')).body);
    modelListSchema.parse((await request(gw.url).get('/v1/models').set('authorization', `Bearer ${TEST_KEY}`)).body);
  });

  it('/docs is a page that loads Swagger UI from this gateway, and only the files it needs', async () => {
    const page = await request(gw.url).get('/docs');
    expect(page.status).toBe(200);
    expect(page.headers['content-type']).toMatch(/^text\/html/);
    const refs = [...page.text.matchAll(/(?:src|href)="([^"]+)"/g)].map((m) => m[1]);
    expect(refs.length).toBeGreaterThanOrEqual(3);
    for (const ref of refs) {
      expect(ref.startsWith('/')).toBe(true); // nothing from a CDN
      expect((await request(gw.url).get(ref)).status).toBe(200);
    }
    expect(page.text).toContain("url: '/openapi.json'");
    expect((await request(gw.url).get('/docs/assets/swagger-initializer.js')).status).toBe(404);
    expect((await request(gw.url).get('/docs/assets/../package.json')).status).toBe(404);
  });
});

it('the walker follows routers mounted under a path, and routeMatcher names what a request aimed at', () => {
  const inner = express.Router();
  inner.get('/items/:id', (_req, res) => res.end());
  inner.route('/items').post((_req, res) => res.end()).delete((_req, res) => res.end());
  const app = express();
  app.use('/api/', inner);
  app.get('/files/*rest', (_req, res) => res.end());
  expect(servedRoutes(app).map((r) => `${r.method} ${r.path}`).sort()).toEqual(
    ['DELETE /api/items', 'GET /api/items/{id}', 'GET /files/{rest}', 'POST /api/items'].sort(),
  );
  const match = routeMatcher(app);
  expect(match('GET', '/api/items/42')).toBe('/api/items/{id}');
  expect(match('HEAD', '/files/a/b/c')).toBe('/files/{rest}');
  expect(match('PUT', '/api/items')).toBeNull();
});

it('config errors name the variable', () => {
  expect(() => loadConfig({ METRICS_PATH: 'x' })).toThrow(/METRICS_PATH/);
});
