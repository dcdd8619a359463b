// Shared by the end-to-end suites: the running stack that `npm test` started (real Redis, real worker, real gateway).
import type { RedisOptions } from "ioredis";
import OpenAI from "openai";
import { bullPrefix, connectRedis } from "../../gateway/src/queue/redis";

function need(name: string): string {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set: run the end-to-end tests through \`npm test\`, which starts the stack`);
  return v;
}

export const stack = {
  get baseUrl() {
    return need("STACK_BASE_URL");
  },
  get apiKey() {
    return need("STACK_API_KEY");
  },
  get redisUrl() {
    return need("STACK_REDIS_URL");
  },
  get model() {
    return need("STACK_MODEL");
  },
  get python() {
    return need("STACK_PYTHON");
  },
  /** A client of the stack's Redis: plain, or a Cluster when the stack runs on one (scripts/test-cluster.mjs). */
  redis(options: RedisOptions = {}) {
    return connectRedis(need("STACK_REDIS_URL"), options);
  },
};

export { bullPrefix };

/**
 * An SDK client for the stack. The gateway's response cache is on by default and answers repeated deterministic requests
 * without the worker; tests of generation itself must reach the worker, so they bypass it (`cache-control: no-store`)
 * unless `allowCache` is set.
 */
export function client(opts: { apiKey?: string; maxRetries?: number; allowCache?: boolean } = {}) {
  return new OpenAI({
    baseURL: `${stack.baseUrl}/v1`,
    apiKey: opts.apiKey ?? stack.apiKey,
    maxRetries: opts.maxRetries ?? 0,
    timeout: 120_000,
    defaultHeaders: opts.allowCache ? {} : { "cache-control": "no-store" },
  });
}

export const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/**
 * Polls `check` every 100 ms until it holds; returns the elapsed milliseconds, or throws naming `what` after
 * `timeoutMs`. Tests wait on a state this way, never with a fixed sleep: the deadline only bounds a hang, so make it
 * generous (a loaded or slow machine takes longer, and a passing run never waits for it).
 */
export async function waitFor(check: () => boolean | Promise<boolean>, timeoutMs: number, what: string): Promise<number> {
  const t0 = Date.now();
  while (!(await check())) {
    if (Date.now() - t0 > timeoutMs) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(100);
  }
  return Date.now() - t0;
}

export const PROMPT: OpenAI.ChatCompletionMessageParam[] = [
  { role: "system", content: "You are a concise assistant." },
  { role: "user", content: "Describe the sea in two sentences." },
];

/** Collects a streamed completion: the text of the deltas, finish reasons, usage and every chunk as received. */
export async function collectStream(stream: AsyncIterable<OpenAI.ChatCompletionChunk>) {
  const chunks: OpenAI.ChatCompletionChunk[] = [];
  const texts = new Map<number, string>();
  const finish = new Map<number, string | null>();
  let usage: OpenAI.CompletionUsage | null | undefined;
  for await (const chunk of stream) {
    chunks.push(chunk);
    for (const c of chunk.choices) {
      texts.set(c.index, (texts.get(c.index) ?? "") + (c.delta.content ?? ""));
      if (c.finish_reason) finish.set(c.index, c.finish_reason);
    }
    if (chunk.usage) usage = chunk.usage;
  }
  return { chunks, text: texts.get(0) ?? "", texts, finish, usage };
}
