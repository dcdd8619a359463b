/**
 * API key administration from a shell, straight against Redis (REDIS_URL), the same store the admin API uses:
 *   npm run keys -- create --name NAME [--models a,b] [--rpm N] [--tpm N] [--max-concurrent N] [--tier high|standard|low]
 *   npm run keys -- list
 *   npm run keys -- show ID
 *   npm run keys -- update ID [--name NAME] [--models a,b|none] [--rpm N|none] [--tpm …] [--max-concurrent …] [--tier …]
 *   npm run keys -- revoke ID
 * Output is JSON (one object); `create` prints the key once, in the `key` field. Exit code 2 on bad usage.
 */
import { parseArgs } from 'node:util';
import Redis from 'ioredis';
import { type KeyLimits, KeyStore } from '../src/auth/key-store';
import { TIERS, type Tier } from '../src/limits/governance-config';

const USAGE = `usage: npm run keys -- <create|list|show|update|revoke> [ID] [--name NAME] [--models a,b|none]
  [--rpm N|none] [--tpm N|none] [--max-concurrent N|none] [--tier high|standard|low|none]`;

function fail(msg: string): never {
  process.stderr.write(`keys: ${msg}\n${USAGE}\n`);
  process.exit(2);
}

function count(flag: string, v: string | undefined): number | null | undefined {
  if (v === undefined) return undefined;
  if (v === 'none') return null;
  if (!/^\d+$/.test(v)) fail(`--${flag} must be a whole number or "none"`);
  return Number(v);
}

function limitsFrom(values: Record<string, string | undefined>): Partial<KeyLimits> {
  const out: Partial<KeyLimits> = {};
  if (values.models !== undefined) out.models = values.models === 'none' ? null : values.models.split(',').map((s) => s.trim()).filter(Boolean);
  const rpm = count('rpm', values.rpm);
  const tpm = count('tpm', values.tpm);
  const mc = count('max-concurrent', values['max-concurrent']);
  if (rpm !== undefined) out.rpm = rpm;
  if (tpm !== undefined) out.tpm = tpm;
  if (mc !== undefined) out.max_concurrent = mc;
  if (values.tier !== undefined) {
    if (values.tier !== 'none' && !(TIERS as readonly string[]).includes(values.tier)) fail(`--tier must be one of ${TIERS.join(', ')}`);
    out.tier = values.tier === 'none' ? null : (values.tier as Tier);
  }
  return out;
}

async function main(): Promise<void> {
  let parsed;
  try {
    parsed = parseArgs({
      allowPositionals: true,
      options: {
        name: { type: 'string' },
        models: { type: 'string' },
        rpm: { type: 'string' },
        tpm: { type: 'string' },
        'max-concurrent': { type: 'string' },
        tier: { type: 'string' },
      },
    });
  } catch (err) {
    fail((err as Error).message);
  }
  const [command, id] = parsed.positionals;
  const values = parsed.values as Record<string, string | undefined>;
  const redis = new Redis(process.env.REDIS_URL || 'redis://127.0.0.1:6379', { maxRetriesPerRequest: 1, lazyConnect: true });
  await redis.connect();
  const store = new KeyStore(redis);
  const need = () => id ?? fail(`${command} needs a key id`);
  try {
    let out: unknown;
    switch (command) {
      case 'create': {
        if (!values.name) fail('create needs --name');
        const { key, record } = await store.create(values.name, limitsFrom(values));
        out = { ...record, key };
        break;
      }
      case 'list':
        out = { object: 'list', data: await store.list() };
        break;
      case 'show':
        out = await store.get(need());
        break;
      case 'update':
        out = await store.update(need(), { ...limitsFrom(values), ...(values.name ? { name: values.name } : {}) });
        break;
      case 'revoke':
        out = await store.revoke(need());
        break;
      default:
        fail(command ? `unknown command '${command}'` : 'missing command');
    }
    if (out === null) {
      process.stderr.write(`keys: no API key with id '${id}'\n`);
      process.exitCode = 1;
    } else process.stdout.write(JSON.stringify(out, null, 2) + '\n');
  } finally {
    redis.disconnect();
  }
}

main().catch((err) => {
  process.stderr.write(`keys: ${err instanceof Error ? err.message : String(err)}\n`);
  process.exit(1);
});
