// The keys and prompts each part of the reliability suite used, so that scan-logs.ts (run after the whole suite by
// scripts/test-reliability.mjs) can check that no log of the suite holds any of them (issue 12, "Security").
// Each part registers what it sends: `usedSecret(stack.apiKey)`, `usedPrompt(text)`, or `usedStack(stack)` for a
// FaultStack's key. Records go to .run/reliability/used.jsonl; scan-logs.ts consumes the file when it has scanned.
import { appendFileSync, mkdirSync } from 'node:fs';
import path from 'node:path';
import { ROOT } from './figures';

export const USED_FILE = path.join(ROOT, '.run/reliability/used.jsonl');

export type UsedKind = 'secret' | 'prompt';

export interface UsedRecord {
  kind: UsedKind;
  value: string;
  /** Which part used it: named in a hit, never the value. */
  part: string;
  at: string;
}

function record(kind: UsedKind, part: string, values: string[]): void {
  mkdirSync(path.dirname(USED_FILE), { recursive: true });
  const at = new Date().toISOString();
  const lines = values.filter((v) => v.length > 0).map((value) => JSON.stringify({ kind, value, part, at } satisfies UsedRecord));
  if (lines.length > 0) appendFileSync(USED_FILE, `${lines.join('\n')}\n`);
}

/** API keys, admin keys, JWTs, JWT secrets, metrics tokens: anything that must never be logged. */
export function usedSecret(part: string, ...values: string[]): void {
  record('secret', part, values);
}

/** Prompt text sent to the stack (logged only with LOG_PROMPTS, which the suite never sets). */
export function usedPrompt(part: string, ...values: string[]): void {
  record('prompt', part, values);
}

/** A FaultStack's (or anything's) API key. */
export function usedStack(part: string, stack: { apiKey: string }): void {
  usedSecret(part, stack.apiKey);
}
