// Gateway SIGKILL mid-stream under load (issue 12): streams through 2 gateway processes; one gateway is killed with
// SIGKILL while its clients are mid-stream. Each of its clients resumes through the other gateway with the resume route
// (GET /v1/chat/completions/{id}/stream, Last-Event-ID) and must receive its complete answer: what it had before the
// kill followed by the resumed rest equals an uninterrupted answer to the same prompt, each event id once. 0 lost.
import { figure, pick } from './support/figures';
import { marker, markedChat, percentile, resume, stream, type StreamResult } from './support/load';
import { type ReliabilityStack, startLoadStack } from './support/stack';
import { waitFor } from '../e2e/fault-stack';

const PART = 'gateway-kill';
const STREAMS = pick({ short: 40, full: 200 });
/** 100 ms a token, 100 tokens: a stream lasts ~10 s, so the kill lands mid-stream and the rest is generated after it. */
const STEP_MS = 100;
const MAX_TOKENS = 100;
/** The killed gateway's grace never runs (it is dead); the survivor's must outlast a resumed client's reconnect. */
const GRACE_MS = 60_000;
const RUN = Math.random().toString(36).slice(2, 8);

jest.setTimeout(300_000);

let rs: ReliabilityStack;

beforeAll(async () => {
  rs = await startLoadStack(STEP_MS, { RESUME_GRACE_MS: String(GRACE_MS) });
});

afterAll(async () => {
  await rs?.stack.stop();
});

const chat = (i: number) => ({ ...markedChat(rs.stack.model, marker(RUN, i), MAX_TOKENS), stream_options: { include_usage: true } });

interface Resumed {
  i: number;
  before: StreamResult;
  after: StreamResult;
  cutAt: number;
}

test(`SIGKILL of one of 2 gateways under ${STREAMS} streams: every client of it resumes on the other and gets its whole answer`, async () => {
  const [doomed, survivor] = rs.targets;
  const live = new Set<number>();
  const resumed: Promise<Resumed>[] = [];
  let killedAt = 0;
  const runs = Array.from({ length: STREAMS }, (_, i) =>
    stream(rs.targets[i % 2], chat(i), { onChunk: (r) => r.content && live.add(i) }).then((before) => {
      // A client of the killed gateway: it reconnects at once to the other one, from its last event id.
      if (i % 2 === 0 && before.end !== 'done' && killedAt > 0 && before.completionId) {
        const cutAt = Date.now();
        resumed.push(resume(survivor, before.completionId, before.lastEventId).then((after) => ({ i, before, after, cutAt })));
      }
      return before;
    }),
  );
  await waitFor(() => live.size === STREAMS, 120_000, 'every stream to have text');

  killedAt = Date.now();
  process.kill(-rs.stack.gateways[0].proc.child.pid!, 'SIGKILL');
  const firsts = await Promise.all(runs);
  const done = await Promise.all(resumed);

  const onDoomed = firsts.filter((_, i) => i % 2 === 0);
  const cutMidStream = onDoomed.filter((r) => r.end === 'cut');
  // The whole answer of each resumed prompt, uninterrupted, through the survivor (the stand-in's answer is a function
  // of the prompt alone).
  const references = await Promise.all(done.map((d) => stream(survivor, chat(d.i))));
  const wrong = done
    .map((d, k) => {
      const whole = d.before.content + d.after.content;
      const ids = [...d.before.eventIds, ...d.after.eventIds];
      if (d.after.status !== 200 || d.after.end !== 'done') return `${d.i}: resume ${d.after.status} ${d.after.end} ${JSON.stringify(d.after.error)}`;
      if (references[k].end !== 'done') return `${d.i}: reference ${references[k].end}`;
      if (whole !== references[k].content) {
        const ref = references[k].content;
        let at = 0;
        while (at < whole.length && whole[at] === ref[at]) at++;
        return `${d.i}: content differs from the uninterrupted answer at character ${at} (received ${d.before.content.length} before the cut, ` +
          `last event id ${d.before.lastEventId}; resumed events ${d.after.eventIds.slice(0, 3).join(' ')}…): ` +
          `${JSON.stringify(whole.slice(Math.max(0, at - 20), at + 40))} vs ${JSON.stringify(ref.slice(Math.max(0, at - 20), at + 40))}`;
      }
      if (new Set(ids).size !== ids.length) return `${d.i}: an event id twice`;
      if (d.after.finishReason !== 'length' || d.after.completionTokens !== MAX_TOKENS) return `${d.i}: ${d.after.finishReason}, ${d.after.completionTokens} tokens`;
      return null;
    })
    .filter((p) => p !== null);
  const survivorsOwn = firsts.filter((_, i) => i % 2 === 1);
  const resumeToDone = done.map((d) => (d.after.deltaTimes.at(-1) ?? d.after.startedAt) - d.cutAt);
  const resumeTtft = done.filter((d) => d.after.deltaTimes.length > 0).map((d) => d.after.deltaTimes[0] - d.cutAt);

  figure(PART, 'clients of the killed gateway / cut mid-stream / resumed', `${onDoomed.length} / ${cutMidStream.length} / ${done.length}`);
  figure(PART, 'resumed with the complete answer (lost)', `${done.length - wrong.length} (${onDoomed.length - (done.length - wrong.length)})`);
  figure(PART, 'cut → first resumed text, p50', percentile(resumeTtft, 50), 'ms');
  figure(PART, 'cut → first resumed text, max', Math.max(...resumeTtft), 'ms');
  figure(PART, 'cut → resumed stream complete, max', Math.max(...resumeToDone), 'ms');

  expect(cutMidStream.length).toBe(onDoomed.length);
  expect(wrong).toEqual([]);
  expect(done.length).toBe(onDoomed.length);
  expect(survivorsOwn.filter((r) => r.end !== 'done' || r.completionTokens !== MAX_TOKENS).length).toBe(0);
});
