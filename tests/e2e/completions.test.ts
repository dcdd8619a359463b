// The legacy completions API (POST /v1/completions) through the official openai Node SDK against the running stack:
// gateway → BullMQ/Redis → the real Python worker on the bundled SmolLM2-135M-Instruct → pub/sub → SSE. The prompt
// goes to the model as is (no chat template). Nothing here is mocked.
import OpenAI from "openai";
import { client, stack } from "./helpers";

jest.setTimeout(180_000);

const PROMPT = "Once upon a time, in a small village by the sea,";
const greedy = { temperature: 0, max_tokens: 24 } as const;

/** Collects a completions stream: text per choice, finish reasons, usage and every chunk as received. */
async function collect(stream: AsyncIterable<OpenAI.Completion>) {
  const chunks: OpenAI.Completion[] = [];
  const texts = new Map<number, string>();
  const finish = new Map<number, string>();
  for await (const chunk of stream) {
    chunks.push(chunk);
    for (const c of chunk.choices) {
      texts.set(c.index, (texts.get(c.index) ?? "") + c.text);
      if (c.finish_reason) finish.set(c.index, c.finish_reason);
    }
  }
  return { chunks, text: texts.get(0) ?? "", texts, finish, usage: chunks.at(-1)?.usage };
}

describe("legacy completions through the openai Node SDK", () => {
  const openai = client();
  let reference: OpenAI.Completion;

  beforeAll(async () => {
    reference = await openai.completions.create({ model: stack.model, prompt: PROMPT, ...greedy });
  });

  test("non-stream: the exact text_completion shape; the prompt is not wrapped in the chat template", async () => {
    const r = reference;
    expect(r.id).toMatch(/^cmpl-[0-9a-f]{32}$/);
    expect(r.object).toBe("text_completion");
    expect(r.model).toBe(stack.model);
    expect(Math.abs(r.created - Date.now() / 1000)).toBeLessThan(300);
    expect(r.choices).toHaveLength(1);
    const [c] = r.choices;
    expect(c.index).toBe(0);
    expect(c.text.length).toBeGreaterThan(0);
    expect(c.logprobs).toBeNull();
    expect(["stop", "length"]).toContain(c.finish_reason);
    // The raw prompt is ~13 tokens; the same text as a chat message is more than twice that (system turn, markers).
    const chat = await openai.chat.completions.create({ model: stack.model, messages: [{ role: "user", content: PROMPT }], max_tokens: 1 });
    expect(r.usage!.prompt_tokens).toBeLessThan(20);
    expect(chat.usage!.prompt_tokens).toBeGreaterThan(r.usage!.prompt_tokens + 10);
    expect(r.usage!.completion_tokens).toBeGreaterThan(0);
    expect(r.usage!.completion_tokens).toBeLessThanOrEqual(24);
    expect(r.usage!.total_tokens).toBe(r.usage!.prompt_tokens + r.usage!.completion_tokens);
  });

  test("max_tokens defaults to 16 for completions (OpenAI's default)", async () => {
    const r = await openai.completions.create({ model: stack.model, prompt: PROMPT, temperature: 0, ...({ ignore_eos: true } as object) });
    expect(r.usage!.completion_tokens).toBe(16);
    expect(r.choices[0].finish_reason).toBe("length");
  });

  test("stream with include_usage: chunks reassemble to the non-stream text, usage chunk last", async () => {
    const s = await collect(
      await openai.completions.create({ model: stack.model, prompt: PROMPT, ...greedy, stream: true, stream_options: { include_usage: true } }),
    );
    for (const ch of s.chunks) {
      expect(ch.object).toBe("text_completion");
      expect(ch.id).toBe(s.chunks[0].id);
    }
    expect(s.text).toBe(reference.choices[0].text);
    expect(s.finish.get(0)).toBe(reference.choices[0].finish_reason);
    const last = s.chunks.at(-1)!;
    expect(last.choices).toEqual([]);
    expect(last.usage).toEqual(reference.usage);
    const plain = await collect(await openai.completions.create({ model: stack.model, prompt: PROMPT, ...greedy, stream: true }));
    expect(plain.text).toBe(reference.choices[0].text);
    expect(plain.chunks.every((c) => !c.usage)).toBe(true);
  });

  test("echo: the prompt before the text, and first in a stream", async () => {
    const r = await openai.completions.create({ model: stack.model, prompt: PROMPT, ...greedy, echo: true });
    expect(r.choices[0].text).toBe(PROMPT + reference.choices[0].text);
    const s = await collect(await openai.completions.create({ model: stack.model, prompt: PROMPT, ...greedy, echo: true, stream: true }));
    expect(s.chunks[0].choices[0].text).toBe(PROMPT);
    expect(s.text).toBe(PROMPT + reference.choices[0].text);
  });

  test("logprobs 2: the legacy shape, one entry per completion token, spelling the text", async () => {
    const r = await openai.completions.create({ model: stack.model, prompt: PROMPT, temperature: 0, max_tokens: 12, logprobs: 2, ...({ ignore_eos: true } as object) });
    const [c] = r.choices;
    const lp = c.logprobs!;
    expect(Object.keys(lp).sort()).toEqual(["text_offset", "token_logprobs", "tokens", "top_logprobs"]);
    expect(lp.tokens).toHaveLength(r.usage!.completion_tokens);
    expect(lp.tokens!.join("")).toBe(c.text);
    expect(lp.token_logprobs).toHaveLength(lp.tokens!.length);
    let offset = 0;
    lp.tokens!.forEach((t, i) => {
      expect(lp.token_logprobs![i]).toBeLessThanOrEqual(0);
      const top = lp.top_logprobs![i];
      // Two alternatives and always the sampled token (greedy: it is the most likely, so one of the two).
      expect(Object.keys(top).length).toBeGreaterThanOrEqual(2);
      expect(Object.keys(top).length).toBeLessThanOrEqual(3);
      expect(top[t]).toBeCloseTo(lp.token_logprobs![i], 4);
      expect(lp.text_offset![i]).toBe(offset);
      offset += [...t].length;
    });
    // In a stream, each chunk carries the entries of its own text.
    const s = await openai.completions.create({ model: stack.model, prompt: PROMPT, temperature: 0, max_tokens: 12, logprobs: 0, stream: true, ...({ ignore_eos: true } as object) });
    const tokens: string[] = [];
    let text = "";
    for await (const ch of s) {
      for (const x of ch.choices) {
        if (x.text) expect(x.logprobs!.tokens!.join("")).toBe(x.text);
        tokens.push(...(x.logprobs?.tokens ?? []));
        text += x.text;
      }
    }
    expect(tokens).toHaveLength(12);
    expect(text).toBe(c.text);
  });

  test("n=2 and a stop string", async () => {
    const two = await openai.completions.create({ model: stack.model, prompt: PROMPT, n: 2, max_tokens: 8, temperature: 1, seed: 11 });
    expect(two.choices.map((c) => c.index)).toEqual([0, 1]);
    for (const c of two.choices) expect(c.text.length).toBeGreaterThan(0);
    const text = reference.choices[0].text;
    const cut = Math.floor(text.length / 2);
    const stop = text.slice(cut, cut + 3);
    const r = await openai.completions.create({ model: stack.model, prompt: PROMPT, ...greedy, stop: [stop] });
    expect(r.choices[0].text).toBe(text.slice(0, text.indexOf(stop)));
    expect(r.choices[0].finish_reason).toBe("stop");
  });

  test("a list of prompts: choices indexed prompt-major, usage summed over the prompts", async () => {
    const other = "The three primary colours are";
    const alone = await openai.completions.create({ model: stack.model, prompt: other, max_tokens: 1 });
    const r = await openai.completions.create({ model: stack.model, prompt: [PROMPT, other], n: 2, max_tokens: 6, temperature: 0.8, seed: 5 });
    expect(r.choices.map((c) => c.index)).toEqual([0, 1, 2, 3]);
    for (const c of r.choices) expect(c.text.length).toBeGreaterThan(0);
    expect(r.usage!.prompt_tokens).toBe(reference.usage!.prompt_tokens + alone.usage!.prompt_tokens);
    const s = await collect(await openai.completions.create({ model: stack.model, prompt: [PROMPT, other], max_tokens: 6, stream: true }));
    expect([...s.texts.keys()].sort()).toEqual([0, 1]);
    expect([...s.finish.keys()].sort()).toEqual([0, 1]);
  });

  test("echo with logprobs: the prompt's tokens scored too, from offset 0, the first without a logprob; stream and non-stream alike", async () => {
    const ask = { model: stack.model, prompt: PROMPT, temperature: 0, max_tokens: 6, logprobs: 2, echo: true, ...({ ignore_eos: true } as object) };
    const r = await openai.completions.create(ask as OpenAI.CompletionCreateParamsNonStreaming);
    const [c] = r.choices;
    const lp = c.logprobs!;
    expect(c.text).toBe(PROMPT + reference.choices[0].text.slice(0, c.text.length - PROMPT.length));
    expect(lp.tokens).toHaveLength(r.usage!.prompt_tokens + r.usage!.completion_tokens);
    expect(lp.tokens!.join("")).toBe(c.text);
    expect(lp.token_logprobs![0]).toBeNull();
    expect(lp.top_logprobs![0]).toBeNull();
    let offset = 0;
    lp.tokens!.forEach((t, i) => {
      expect(lp.text_offset![i]).toBe(offset);
      offset += [...t].length;
      if (i === 0) return;
      expect(lp.token_logprobs![i]).toBeLessThanOrEqual(0);
      expect(lp.top_logprobs![i]![t]).toBeCloseTo(lp.token_logprobs![i]!, 4);
    });
    // A stream: the echo chunk carries the prompt's entries, later chunks those of their own text; all of it as above.
    const s = await openai.completions.create({ ...ask, stream: true } as OpenAI.CompletionCreateParamsStreaming);
    const streamed = { tokens: [] as string[], token_logprobs: [] as Array<number | null>, text_offset: [] as number[] };
    let text = "";
    let first = true;
    for await (const ch of s) {
      for (const x of ch.choices) {
        if (first && x.text) {
          expect(x.text).toBe(PROMPT);
          first = false;
        }
        if (x.text) expect(x.logprobs!.tokens!.join("")).toBe(x.text);
        streamed.tokens.push(...(x.logprobs?.tokens ?? []));
        streamed.token_logprobs.push(...(x.logprobs?.token_logprobs ?? []));
        streamed.text_offset.push(...(x.logprobs?.text_offset ?? []));
        text += x.text;
      }
    }
    expect(text).toBe(c.text);
    expect(streamed.tokens).toEqual(lp.tokens);
    expect(streamed.text_offset).toEqual(lp.text_offset);
    streamed.token_logprobs.forEach((v, i) => (v === null ? expect(lp.token_logprobs![i]).toBeNull() : expect(v).toBeCloseTo(lp.token_logprobs![i]!, 4)));
  });

  test("refused with a 400 naming the field: suffix, best_of, token ids, logprobs out of range", async () => {
    const cases: Array<[Record<string, unknown>, string]> = [
      [{ suffix: " The end." }, "suffix"],
      [{ best_of: 3 }, "best_of"],
      [{ prompt: [464, 3139, 286] }, "prompt"],
      [{ prompt: [[464, 3139], [286]] }, "prompt"],
      [{ logprobs: 6 }, "logprobs"],
    ];
    for (const [extra, param] of cases) {
      const err = await openai.completions.create({ model: stack.model, prompt: PROMPT, max_tokens: 4, ...extra } as OpenAI.CompletionCreateParamsNonStreaming).catch((e) => e);
      expect({ param, cls: err?.constructor?.name, status: err.status, got: err.param }).toEqual({ param, cls: "BadRequestError", status: 400, got: param });
    }
    // The stack still serves afterwards.
    expect((await openai.completions.create({ model: stack.model, prompt: PROMPT, max_tokens: 2 })).choices).toHaveLength(1);
  });

  test("authentication applies: a wrong key or none → 401; unknown model → 404", async () => {
    const anon = new OpenAI({ baseURL: `${stack.baseUrl}/v1`, apiKey: "sk-not-a-key", maxRetries: 0 });
    await expect(anon.completions.create({ model: stack.model, prompt: PROMPT })).rejects.toBeInstanceOf(OpenAI.AuthenticationError);
    const bad = await fetch(`${stack.baseUrl}/v1/completions`, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ model: stack.model, prompt: "x" }) });
    expect(bad.status).toBe(401);
    expect(((await bad.json()) as { error: { code: string } }).error.code).toBe("invalid_api_key");
    await expect(openai.completions.create({ model: "nope", prompt: PROMPT })).rejects.toBeInstanceOf(OpenAI.NotFoundError);
  });
});
