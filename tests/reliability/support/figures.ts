// The reliability suite's scale and figures (issue 12). `RELIABILITY_SCALE=full` (npm run test:reliability) runs each
// part at the size the issue names; `short` (inside npm test) runs the same checks smaller, so that a broken guarantee
// still fails CI within minutes. Every part prints its figures and appends them to .run/reliability/figures.jsonl,
// from which scripts/test-reliability.mjs prints the summary recorded in RELIABILITY.md.
import { appendFileSync, mkdirSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';

export const ROOT = path.resolve(__dirname, '../../..');
export const FIGURES_FILE = path.join(ROOT, '.run/reliability/figures.jsonl');

export type Scale = 'short' | 'full';

export function scale(): Scale {
  return process.env.RELIABILITY_SCALE === 'full' ? 'full' : 'short';
}

/** `full` at the issue's size, `short` otherwise: `pick({ short: 50, full: 500 })`. */
export function pick<T>(v: { short: T; full: T }): T {
  return v[scale()];
}

export interface Figure {
  part: string;
  name: string;
  value: number | string | boolean;
  unit?: string;
}

/** Prints one figure and records it (with the scale, the time and the machine's load, which colour every figure here). */
export function figure(part: string, name: string, value: Figure['value'], unit = ''): void {
  const rec = { part, name, value, unit, scale: scale(), at: new Date().toISOString(), load1: Number(os.loadavg()[0].toFixed(2)) };
  mkdirSync(path.dirname(FIGURES_FILE), { recursive: true });
  appendFileSync(FIGURES_FILE, `${JSON.stringify(rec)}\n`);
  process.stdout.write(`[reliability] ${part}: ${name} = ${value}${unit ? ` ${unit}` : ''}\n`);
}
