// Structured outputs through the official openai Node SDK against the real stack and the bundled 135M model:
// `chat.completions.parse()` with a zod schema (zodResponseFormat) returns the parsed object, json_object answers one
// JSON object, streaming gives the same text, and schemas the grammar library cannot serve are a 400 naming
// response_format (from the worker, through the job's failure).
import { zodResponseFormat } from "openai/helpers/zod";
import { z } from "zod";
import { client, collectStream, stack } from "./helpers";

jest.setTimeout(180_000);

// Bounded strings and list: a sampled 135M model can otherwise repeat list items or run on inside a string until
// max_tokens (finish_reason "length", which parse() refuses).
const City = z.object({
  city: z.string().max(40),
  country: z.string().max(40),
  population: z.number().int(),
  landmarks: z.array(z.string().max(40)).max(3),
  climate: z.enum(["hot", "mild", "cold"]),
});

describe("structured outputs (response_format)", () => {
  const openai = client();

  test("chat.completions.parse() with zodResponseFormat returns the parsed object", async () => {
    const r = await openai.chat.completions.parse({
      model: stack.model,
      messages: [{ role: "user", content: "Describe Paris as JSON: city, country, population, landmarks, climate." }],
      response_format: zodResponseFormat(City, "city"),
      temperature: 0,
      max_tokens: 200,
    });
    const c = r.choices[0];
    expect(c.finish_reason).toBe("stop");
    expect(c.message.refusal).toBeNull();
    const parsed = c.message.parsed!;
    expect(City.parse(parsed)).toEqual(parsed);
    expect(JSON.parse(c.message.content!)).toEqual(parsed);
    // The properties come in the schema's order (the grammar follows it).
    expect(Object.keys(JSON.parse(c.message.content!))).toEqual(["city", "country", "population", "landmarks", "climate"]);
  });

  test("sampled choices (n=3, seeded) all parse against the schema; the stream's text equals the non-stream one", async () => {
    const body = {
      model: stack.model,
      messages: [{ role: "user" as const, content: "Give me a city in Japan as JSON." }],
      response_format: zodResponseFormat(City, "city"),
      temperature: 0.8,
      seed: 7,
      n: 3,
      max_tokens: 200,
    };
    const r = await openai.chat.completions.create(body);
    expect(r.choices).toHaveLength(3);
    for (const c of r.choices) {
      expect(c.finish_reason).toBe("stop");
      City.parse(JSON.parse(c.message.content!));
    }
    const s = await collectStream(await openai.chat.completions.create({ ...body, stream: true }));
    for (const c of r.choices) expect(s.texts.get(c.index)).toBe(c.message.content);
  });

  test("json_object: the answer is one JSON object", async () => {
    const r = await openai.chat.completions.create({
      model: stack.model,
      messages: [{ role: "user", content: "Return a JSON object with the keys name and age for a person called Ann." }],
      response_format: { type: "json_object" },
      temperature: 0,
      max_tokens: 150,
    });
    const c = r.choices[0];
    expect(c.finish_reason).toBe("stop");
    const value = JSON.parse(c.message.content!);
    expect(typeof value === "object" && value !== null && !Array.isArray(value)).toBe(true);
  });

  test("a schema keyword the grammar library does not implement is a 400 naming it and response_format", async () => {
    const bad = { type: "object", properties: { a: { not: { type: "string" } } } };
    const err = await openai.chat.completions
      .create({
        model: stack.model,
        messages: [{ role: "user", content: "hi" }],
        response_format: { type: "json_schema", json_schema: { name: "bad", schema: bad } },
        max_tokens: 5,
      })
      .catch((e) => e);
    expect(err.status).toBe(400);
    expect(err.error).toMatchObject({ type: "invalid_request_error", param: "response_format" });
    expect(err.error.message).toContain('"not"');
    // Through a stream the response has begun (200, SSE) before a worker compiles the schema: the error is the stream's
    // one event, which the SDK raises as an APIError with the same body while iterating (docs/PROTOCOL.md).
    const stream = await openai.chat.completions.create({
      model: stack.model,
      messages: [{ role: "user", content: "hi" }],
      response_format: { type: "json_schema", json_schema: { name: "bad", schema: { type: "integer", minimum: 5, maximum: 1 } } },
      max_tokens: 5,
      stream: true,
    });
    const streamErr = await (async () => {
      for await (const _chunk of stream) return new Error("a chunk came before the error");
      return new Error("the stream ended without an error");
    })().catch((e) => e);
    expect(streamErr.error).toMatchObject({ type: "invalid_request_error", param: "response_format" });
    expect(streamErr.error.message).toContain("minimum");
  });

  test("finish_reason length on a constrained request: the JSON is cut where max_tokens ran out", async () => {
    const r = await openai.chat.completions.create({
      model: stack.model,
      messages: [{ role: "user", content: "Describe Paris as JSON." }],
      response_format: zodResponseFormat(City, "city"),
      temperature: 0,
      max_tokens: 5,
    });
    expect(r.choices[0].finish_reason).toBe("length");
    expect(r.choices[0].message.content!.startsWith('{"city":')).toBe(true);
  });
});
