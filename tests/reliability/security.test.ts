// Reliability suite, "Security" (issue 12): against real gateway processes (a private stack, tests/e2e/fault-stack.ts),
// no route but /health, /ready (and /metrics, /docs + /openapi.json where configured public) answers without a
// credential; JWTs signed with `alg: none` or with an algorithm other than the configured one are refused.
// The routes come from the gateway itself: its Express router (servedRoutes over the same wiring and configuration as
// the process) and its /openapi.json, so a route added later is checked without touching this file.
// The keys and prompts used here are registered for the log scan that runs after the suite (support/scan-logs.ts).
import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { exportSPKI, importPKCS8, SignJWT, UnsecuredJWT } from 'jose';
import { loadConfig } from '../../gateway/src/config';
import { createLogger } from '../../gateway/src/logger';
import { servedRoutes } from '../../gateway/src/openapi/routes';
import { buildGateway } from '../../gateway/src/wiring';
import { FaultStack, type FaultGateway } from '../e2e/fault-stack';
import { figure } from './support/figures';
import { usedPrompt, usedSecret, usedStack } from './support/secrets';

jest.setTimeout(180_000);
const PART = 'security';

const stack = new FaultStack();
const ADMIN_KEY = `admin-${randomBytes(16).toString('hex')}`;
const HS_SECRET = randomBytes(32).toString('base64url');
const rsa = generateKeyPairSync('rsa', { modulusLength: 2048 });
const RSA_PUBLIC = rsa.publicKey.export({ type: 'spki', format: 'pem' }).toString();
const RSA_PRIVATE = rsa.privateKey.export({ type: 'pkcs8', format: 'pem' }).toString();
const ec = generateKeyPairSync('ec', { namedCurve: 'P-256' });
const EC_PRIVATE = ec.privateKey.export({ type: 'pkcs8', format: 'pem' }).toString();
const PROMPT = `security-canary-prompt-${randomBytes(6).toString('hex')}: say hello`;

/** The two configurations: HS256 with public metrics (the default), RS256 with metrics behind an API key. */
const ENVS: Record<'hs' | 'rs', Record<string, string>> = {
  hs: { ADMIN_API_KEY: ADMIN_KEY, JWT_ALGORITHM: 'HS256', JWT_SECRET: HS_SECRET, METRICS_AUTH: 'none', STANDIN_STEP_MS: '1' },
  rs: { ADMIN_API_KEY: ADMIN_KEY, JWT_ALGORITHM: 'RS256', JWT_PUBLIC_KEY: RSA_PUBLIC, METRICS_AUTH: 'api_key' },
};
const gw: Partial<Record<'hs' | 'rs', FaultGateway>> = {};

beforeAll(async () => {
  usedStack(PART, stack);
  usedSecret(PART, ADMIN_KEY, HS_SECRET);
  usedPrompt(PART, PROMPT);
  await stack.startRedis();
  const worker = await stack.spawnWorker('security', { ENGINE: 'standin', STANDIN_STEP_MS: '1', MAX_BATCH: '8' });
  gw.hs = await stack.startGateway('security-hs', ENVS.hs);
  gw.rs = await stack.startGateway('security-rs', ENVS.rs);
  await Promise.all([stack.waitWorkerReady(worker, 120_000), stack.waitGatewayUp(gw.hs, 60_000), stack.waitGatewayUp(gw.rs, 60_000)]);
});
afterAll(() => stack.stop());

/** Every METHOD /path the gateway serves with this configuration, read from its own router (the same wiring as main.ts). */
async function routerRoutes(env: Record<string, string>): Promise<string[]> {
  const config = loadConfig({ REDIS_URL: stack.redisUrl, API_KEYS: stack.apiKey, ...env });
  const built = buildGateway(config, createLogger('error', () => undefined), config.API_KEYS);
  try {
    return servedRoutes(built.app).map((r) => `${r.method} ${r.path}`);
  } finally {
    await built.close();
  }
}

async function documentedRoutes(g: FaultGateway): Promise<string[]> {
  const doc = (await (await fetch(`${g.url}/openapi.json`)).json()) as { paths: Record<string, Record<string, unknown>> };
  return Object.entries(doc.paths).flatMap(([p, ops]) => Object.keys(ops).map((m) => `${m.toUpperCase()} ${p}`));
}

const concrete = (p: string) => p.replace(/\{[^}]+\}/g, 'x');

async function call(g: FaultGateway, route: string, authorization?: string): Promise<{ status: number; body: any }> {
  const [method, p] = route.split(' ');
  const headers: Record<string, string> = { 'content-type': 'application/json', 'cache-control': 'no-store' };
  if (authorization) headers.authorization = authorization;
  const body = method === 'GET' || method === 'HEAD' ? undefined : JSON.stringify({ model: stack.model, messages: [{ role: 'user', content: PROMPT }], max_tokens: 4 });
  const res = await fetch(`${g.url}${concrete(p)}`, { method, headers, body });
  const text = await res.text();
  let parsed: unknown = null;
  try {
    parsed = JSON.parse(text);
  } catch {}
  return { status: res.status, body: parsed };
}

describe.each(['hs', 'rs'] as const)('without a credential (%s configuration)', (name) => {
  const publicRoutes = () => new Set(['GET /health', 'GET /ready', 'GET /openapi.json', 'GET /docs', ...(ENVS[name].METRICS_AUTH === 'none' ? ['GET /metrics'] : [])]);

  it('every route but the public ones answers 401 invalid_api_key, with no credential and with a wrong one', async () => {
    const routes = [...new Set([...(await routerRoutes(ENVS[name])), ...(await documentedRoutes(gw[name]!))])].sort();
    // The router and the document must agree (gateway/test/openapi.test.ts) and list the API; a walk that found nothing would pass vacuously.
    expect(routes).toEqual(expect.arrayContaining(['POST /v1/chat/completions', 'GET /v1/models', 'POST /admin/keys', 'POST /chat', 'GET /metrics']));
    const wrongKey = `sk-wrong-${randomBytes(12).toString('hex')}`;
    usedSecret(PART, wrongKey);
    const open: string[] = [];
    let refused = 0;
    for (const route of routes) {
      if (publicRoutes().has(route)) {
        expect([200, 503]).toContain((await call(gw[name]!, route)).status); // /ready is 503 until the tokenizer is built
        continue;
      }
      for (const authorization of [undefined, `Bearer ${wrongKey}`, 'Basic dXNlcjpwYXNz']) {
        const r = await call(gw[name]!, route, authorization);
        if (r.status !== 401 || r.body?.error?.code !== 'invalid_api_key') open.push(`${route} (${authorization ? authorization.split(' ')[0] : 'none'}): ${r.status} ${JSON.stringify(r.body)?.slice(0, 120)}`);
        else refused += 1;
      }
    }
    figure(PART, `${name}: routes checked`, routes.length, 'routes');
    figure(PART, `${name}: unauthenticated or wrongly authenticated calls refused with 401`, refused, 'calls');
    figure(PART, `${name}: protected-route calls answered without a valid credential`, open.length, 'calls');
    expect(open).toEqual([]);
  });

  it('the same routes answer with the right credential (the 401s above are about the credential)', async () => {
    const models = await call(gw[name]!, 'GET /v1/models', `Bearer ${stack.apiKey}`);
    expect(models.status).toBe(200);
    const chat = await call(gw[name]!, 'POST /v1/chat/completions', `Bearer ${stack.apiKey}`);
    expect(chat.status).toBe(200);
    expect((await call(gw[name]!, 'GET /admin/keys', `Bearer ${ADMIN_KEY}`)).status).toBe(200);
    if (ENVS[name].METRICS_AUTH === 'api_key') expect((await call(gw[name]!, 'GET /metrics', `Bearer ${stack.apiKey}`)).status).toBe(200);
  });
});

const now = () => Math.floor(Date.now() / 1000);
const claims = () => ({ sub: `sec-${randomBytes(4).toString('hex')}`, exp: now() + 600, iat: now() });

async function signed(alg: 'HS256' | 'RS256' | 'ES256', key: string | Uint8Array): Promise<string> {
  const k = alg === 'HS256' ? (typeof key === 'string' ? new TextEncoder().encode(key) : key) : await importPKCS8(key as string, alg);
  return new SignJWT(claims()).setProtectedHeader({ alg, typ: 'JWT' }).sign(k);
}

/** `alg: none`, unsigned (as jose writes it) and with a stray signature segment (as some attackers send it). */
function unsigned(): string[] {
  const token = new UnsecuredJWT(claims()).encode();
  return [token, `${token}${randomBytes(16).toString('base64url')}`];
}

async function status(g: FaultGateway, token: string): Promise<{ status: number; code?: string }> {
  usedSecret(PART, token);
  const r = await call(g, 'GET /v1/models', `Bearer ${token}`);
  return { status: r.status, code: r.body?.error?.code };
}

describe('JWTs', () => {
  it('HS256 configured: a valid HS256 token is accepted; alg none, RS256, ES256 and HS256 under another secret are refused', async () => {
    expect((await status(gw.hs!, await signed('HS256', HS_SECRET))).status).toBe(200);
    const bad = [
      ...unsigned(),
      await signed('RS256', RSA_PRIVATE),
      await signed('ES256', EC_PRIVATE),
      await signed('HS256', randomBytes(32).toString('base64url')),
    ];
    const answers = await Promise.all(bad.map((t) => status(gw.hs!, t)));
    figure(PART, 'hs: forged or wrong-algorithm JWTs refused', answers.filter((a) => a.status === 401).length, `of ${bad.length}`);
    expect(answers).toEqual(bad.map(() => ({ status: 401, code: 'invalid_api_key' })));
  });

  it('RS256 configured: a valid RS256 token is accepted; alg none, ES256, and HS256 keyed with the public key (key confusion) are refused', async () => {
    expect((await status(gw.rs!, await signed('RS256', RSA_PRIVATE))).status).toBe(200);
    const spki = await exportSPKI(rsa.publicKey as never);
    const bad = [
      ...unsigned(),
      await signed('ES256', EC_PRIVATE),
      await signed('HS256', RSA_PUBLIC), // the classic confusion: the public key used as an HMAC secret
      await signed('HS256', spki),
      await signed('HS256', HS_SECRET),
    ];
    const answers = await Promise.all(bad.map((t) => status(gw.rs!, t)));
    figure(PART, 'rs: forged or wrong-algorithm JWTs refused', answers.filter((a) => a.status === 401).length, `of ${bad.length}`);
    expect(answers).toEqual(bad.map(() => ({ status: 401, code: 'invalid_api_key' })));
  });
});
