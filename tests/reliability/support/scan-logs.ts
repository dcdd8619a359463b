// After the whole reliability suite (scripts/test-reliability.mjs runs it with tsx): no log the suite wrote holds any
// key or prompt the suite used (issue 12, "Security"). Reads what the parts registered (support/secrets.ts, used.jsonl)
// and scans every file under .run/ written since the first of them; FaultStack keys (`sk-faults-…`) are also found by
// their shape, so a part that forgot to register its stack's key is still covered. Prints files and bytes scanned and
// the hits (file and kind, never the value); exits 1 on any hit. used.jsonl is removed afterwards: the next run starts
// with its own list.
import { existsSync, readdirSync, readFileSync, renameSync, statSync } from 'node:fs';
import path from 'node:path';
import { figure, FIGURES_FILE, ROOT } from './figures';
import { USED_FILE, type UsedRecord } from './secrets';

const RUN_DIR = path.join(ROOT, '.run');
/** Keys FaultStack makes (tests/e2e/fault-stack.ts); a shorter match would be a key's id, not the key. */
const FAULT_KEY = /sk-faults-[a-z0-9]{6,}/;
/** Shorter values would match by chance (a prompt "hi"); every part uses longer ones. */
const MIN_LENGTH = 8;
/** Not logs: the suite's own records of what it used and measured. */
const NOT_LOGS = new Set([USED_FILE, FIGURES_FILE, `${USED_FILE}.scanned`]);

function readUsed(): UsedRecord[] {
  if (!existsSync(USED_FILE)) return [];
  return readFileSync(USED_FILE, 'utf8').split('\n').filter(Boolean).map((l) => JSON.parse(l) as UsedRecord);
}

function* files(dir: string): Generator<string> {
  for (const entry of readdirSync(dir, { withFileTypes: true })) {
    const p = path.join(dir, entry.name);
    if (entry.isDirectory()) yield* files(p);
    else if (entry.isFile()) yield p;
  }
}

export interface Hit {
  file: string;
  kind: string;
  part: string;
}

export function scan(used: UsedRecord[], sinceMs: number): { files: number; bytes: number; hits: Hit[] } {
  const needles = used.filter((u) => u.value.length >= MIN_LENGTH);
  let count = 0;
  let bytes = 0;
  const hits: Hit[] = [];
  if (!existsSync(RUN_DIR)) return { files: 0, bytes: 0, hits };
  for (const file of files(RUN_DIR)) {
    if (NOT_LOGS.has(file) || statSync(file).mtimeMs < sinceMs) continue;
    const text = readFileSync(file).toString('latin1'); // bytes as they are: a key is ASCII, a prompt is matched by its UTF-8 below
    count += 1;
    bytes += text.length;
    const rel = path.relative(ROOT, file);
    const seen = new Set<string>();
    for (const u of needles) {
      const needle = Buffer.from(u.value, 'utf8').toString('latin1');
      const key = `${u.kind}/${u.part}`;
      if (!seen.has(key) && text.includes(needle)) {
        seen.add(key);
        hits.push({ file: rel, kind: u.kind, part: u.part });
      }
    }
    if (FAULT_KEY.test(text)) hits.push({ file: rel, kind: 'secret', part: 'a FaultStack API key (sk-faults-…)' });
  }
  return { files: count, bytes, hits };
}

function main(): void {
  const used = readUsed();
  // Files written since the first record of this run (a minute's margin for a stack started just before it).
  const first = used.reduce((t, u) => Math.min(t, Date.parse(u.at)), Date.now());
  const { files: n, bytes, hits } = scan(used, first - 60_000);
  const secrets = used.filter((u) => u.kind === 'secret').length;
  const prompts = used.filter((u) => u.kind === 'prompt').length;
  process.stdout.write(`[reliability] log scan: ${secrets} secrets and ${prompts} prompts registered by the suite\n`);
  figure('security', 'log files scanned', n, 'files');
  figure('security', 'log bytes scanned', bytes, 'bytes');
  figure('security', 'keys or prompts found in logs', hits.length, 'hits');
  for (const h of hits) process.stdout.write(`[reliability] log scan: HIT — a ${h.kind} of ${h.part} is in ${h.file}\n`);
  if (used.length === 0) process.stdout.write('[reliability] log scan: no part registered a secret or prompt (support/secrets.ts)\n');
  if (existsSync(USED_FILE)) renameSync(USED_FILE, `${USED_FILE}.scanned`);
  process.exit(hits.length > 0 ? 1 : 0);
}

if (require.main === module) main();
