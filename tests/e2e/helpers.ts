// Shared by the end-to-end suites: the running stack that `npm test` started (real Redis, real worker, real gateway).
import OpenAI from "openai";

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
};

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
