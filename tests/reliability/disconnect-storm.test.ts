// Disconnect storm (issue 12): N clients mid-stream drop their connections at the same moment, with the resume grace
// set to 0 (a dropped stream is cancelled at once). The workers' running sequences must be back to 0 within 1 s: no
// abandoned generation goes on burning the engine. Read from the workers' own /metrics (llm_worker_running_sequences,
// refreshed every 250 ms), polled every 50 ms.
import { setMaxListeners } from 'node:events';
import { figure, pick } from './support/figures';
import { marker, markedChat, stream } from './support/load';
import { type ReliabilityStack, startLoadStack } from './support/stack';
import { sleep, waitFor } from '../e2e/fault-stack';

const PART = 'disconnect-storm';
const CLIENTS = pick({ short: 50, full: 100 });
/** 100 ms a token, 600 tokens: a stream would run a minute; nothing ends by itself during the test. */
const STEP_MS = 100;
const MAX_TOKENS = 600;
const LIMIT_MS = 1000;
const RUN = Math.random().toString(36).slice(2, 8);

jest.setTimeout(300_000);

let rs: ReliabilityStack;

beforeAll(async () => {
  rs = await startLoadStack(STEP_MS, { RESUME_GRACE_MS: '0' });
});

afterAll(async () => {
  await rs?.stack.stop();
});

/** Running sequences and waiting requests of every worker, from their /metrics. */
async function engineLoad(): Promise<number> {
  const texts = await Promise.all([...rs.stack.workers.values()].map(async (w) => (await fetch(`${w.metricsUrl}/metrics`)).text()));
  let n = 0;
  for (const t of texts) {
    for (const m of t.matchAll(/^llm_worker_(?:running_sequences|waiting_requests) (\S+)$/gm)) n += Number(m[1]);
  }
  return n;
}

test(`${CLIENTS} clients abort mid-stream at once (grace 0): the workers' running sequences are 0 within 1 s`, async () => {
  const { stack } = rs;
  const abort = new AbortController();
  setMaxListeners(CLIENTS + 10, abort.signal); // one listener per client, by design
  const live = new Set<number>();
  const runs = Array.from({ length: CLIENTS }, (_, i) =>
    stream(rs.targets[i % 2], markedChat(stack.model, marker(RUN, i), MAX_TOKENS), { signal: abort.signal, onChunk: (r) => r.content && live.add(i) }),
  );
  await waitFor(() => live.size === CLIENTS, 120_000, 'every stream to have text');
  await waitFor(async () => (await engineLoad()) === CLIENTS, 30_000, `the workers to report ${CLIENTS} running sequences`);

  const abortedAt = Date.now();
  abort.abort();
  const results = await Promise.all(runs);
  let zeroAfter = NaN;
  const deadline = abortedAt + 30_000;
  while (Date.now() < deadline) {
    if ((await engineLoad()) === 0) {
      zeroAfter = Date.now() - abortedAt;
      break;
    }
    await sleep(50);
  }
  figure(PART, 'clients aborted mid-stream', results.filter((r) => r.end === 'aborted' && r.content.length > 0).length);
  figure(PART, 'abort → running sequences 0 on every worker', zeroAfter, 'ms');

  // The workers serve on: a new stream after the storm is answered in full.
  const after = await stream(rs.targets[0], markedChat(stack.model, marker(RUN, 1000), 5));
  expect(results.every((r) => r.end === 'aborted')).toBe(true);
  expect(zeroAfter).toBeLessThanOrEqual(LIMIT_MS);
  expect(after.end).toBe('done');
});
