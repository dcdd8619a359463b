/**
 * The gateway's Lua scripts, one file each beside this module, registered on a connection with ioredis'
 * `defineCommand`: sent once, then run by SHA (EVALSHA; ioredis sends the source again after a NOSCRIPT, e.g. when
 * Redis restarted), as BullMQ does with its own scripts. Every key a script touches is passed in KEYS (never built
 * inside the script), which is what Redis Cluster needs to route it; the keys of one call share a hash tag.
 */
import { readFileSync } from 'node:fs';
import path from 'node:path';
import type Redis from 'ioredis';

const FILES = {
  rateAdmit: 'rate-admit.lua',
  rateAdjust: 'rate-adjust.lua',
  concurrencyAcquire: 'concurrency-acquire.lua',
  cacheReserve: 'cache-reserve.lua',
  authAttempt: 'auth-attempt.lua',
  authSettle: 'auth-settle.lua',
  backlogReserve: 'backlog-reserve.lua',
  backlogRelease: 'backlog-release.lua',
} as const;

export type ScriptName = keyof typeof FILES;

/** Where the .lua files are: beside this module (the build copies them next to the compiled .js). */
export const SCRIPT_DIR = __dirname;

/** The sources, read once per process. */
export const SCRIPTS: Record<ScriptName, string> = Object.fromEntries(
  Object.entries(FILES).map(([name, file]) => [name, readFileSync(path.join(SCRIPT_DIR, file), 'utf8')]),
) as Record<ScriptName, string>;

const commandName = (name: ScriptName) => `llm_${name}`;
type ScriptCommand = (numKeys: number, ...keysAndArgs: string[]) => Promise<unknown>;
const registered = new WeakSet<Redis>();

function register(redis: Redis): void {
  for (const name of Object.keys(FILES) as ScriptName[]) redis.defineCommand(commandName(name), { lua: SCRIPTS[name] });
  registered.add(redis);
}

/** Runs one script on `redis` (registered there on first use). */
export function runScript(redis: Redis, name: ScriptName, keys: readonly string[], args: ReadonlyArray<string | number>): Promise<unknown> {
  if (!registered.has(redis)) register(redis);
  const command = (redis as unknown as Record<string, ScriptCommand>)[commandName(name)];
  return command.call(redis, keys.length, ...keys, ...args.map(String));
}
