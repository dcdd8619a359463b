// Tool calling through the official openai Node SDK against the real stack and the bundled 135M model. A model that
// small rarely chooses a tool by itself ("auto"), so the calls here are forced (a named function, "required"), which the
// worker enforces with a grammar: the arguments always parse and validate. The loop runs through the SDK's runTools().
import OpenAI from "openai";
import type { RunnableToolFunctionWithParse } from "openai/lib/RunnableFunction";
import { client, collectStream, stack } from "./helpers";

jest.setTimeout(180_000);

const weatherParams = {
  type: "object",
  properties: { city: { type: "string", maxLength: 40 }, unit: { type: "string", enum: ["celsius", "fahrenheit"] } },
  required: ["city", "unit"],
  additionalProperties: false,
};
const tools: OpenAI.ChatCompletionTool[] = [
  { type: "function", function: { name: "get_weather", description: "Current weather in a city", parameters: weatherParams } },
  { type: "function", function: { name: "get_time", description: "Current time in a timezone", parameters: { type: "object", properties: { tz: { type: "string", maxLength: 40 } }, required: ["tz"] } } },
];
const ask: OpenAI.ChatCompletionMessageParam[] = [{ role: "user", content: "What is the weather in Paris right now?" }];

describe("tool calls (tools, tool_choice)", () => {
  const openai = client();

  test("a named function: message.tool_calls with call_ id, parsed arguments, content null, finish_reason tool_calls", async () => {
    const r = await openai.chat.completions.create({
      model: stack.model, messages: ask, tools, tool_choice: { type: "function", function: { name: "get_weather" } },
      temperature: 0, max_tokens: 80,
    });
    const c = r.choices[0];
    expect(c.finish_reason).toBe("tool_calls");
    expect(c.message.content).toBeNull();
    expect(c.message.tool_calls).toHaveLength(1);
    const call = c.message.tool_calls![0] as OpenAI.ChatCompletionMessageFunctionToolCall;
    expect(call.id).toMatch(/^call_[A-Za-z0-9_-]+$/);
    expect(call.type).toBe("function");
    expect(call.function.name).toBe("get_weather");
    const args = JSON.parse(call.function.arguments);
    expect(Object.keys(args).sort()).toEqual(["city", "unit"]);
    expect(["celsius", "fahrenheit"]).toContain(args.unit);
  });

  test("stream: delta.tool_calls fragments (id, type and name first, then argument pieces) reassemble to the non-stream call", async () => {
    const body = {
      model: stack.model, messages: ask, tools, tool_choice: "required" as const, parallel_tool_calls: false,
      temperature: 0, max_tokens: 80,
    };
    const whole = await openai.chat.completions.create(body);
    const expected = whole.choices[0].message.tool_calls![0] as OpenAI.ChatCompletionMessageFunctionToolCall;
    const s = await collectStream(await openai.chat.completions.create({ ...body, stream: true }));
    const fragments = s.chunks.flatMap((ch) => ch.choices.flatMap((c) => c.delta.tool_calls ?? []));
    expect(fragments.length).toBeGreaterThan(1);
    expect(fragments[0]).toMatchObject({ index: 0, type: "function", function: { name: expected.function.name, arguments: "" } });
    expect(fragments[0].id).toMatch(/^call_/);
    for (const f of fragments.slice(1)) {
      expect(f.id).toBeUndefined();
      expect(f.function?.name).toBeUndefined();
    }
    expect(fragments.map((f) => f.function?.arguments ?? "").join("")).toBe(expected.function.arguments);
    expect(s.text).toBe("");
    expect(s.finish.get(0)).toBe("tool_calls");
    // The SDK's stream helper assembles the same call.
    const final = await openai.chat.completions.stream({ ...body }).finalChatCompletion();
    expect((final.choices[0].message.tool_calls![0] as OpenAI.ChatCompletionMessageFunctionToolCall).function.arguments).toBe(expected.function.arguments);
  });

  test("runTools(): the call runs our function with parsed arguments; its result goes back into the prompt for the final answer", async () => {
    const calls: unknown[] = [];
    const getWeather: RunnableToolFunctionWithParse<{ city: string; unit: string }> = {
      type: "function",
      function: {
        name: "get_weather",
        description: "Current weather in a city",
        parameters: weatherParams,
        parse: (raw: string) => JSON.parse(raw),
        function: (args: { city: string; unit: string }) => {
          calls.push(args);
          return { city: args.city, temperature: 18, unit: args.unit, sky: "sunny" };
        },
      },
    };
    const runner = openai.chat.completions.runTools({
      model: stack.model, messages: ask, tools: [getWeather], tool_choice: { type: "function", function: { name: "get_weather" } },
      temperature: 0, max_tokens: 80,
    });
    await runner.done();
    expect(calls).toHaveLength(1);
    expect(typeof (calls[0] as { city: unknown }).city).toBe("string");
    const history = runner.messages;
    expect(history.map((m) => m.role)).toEqual(["user", "assistant", "tool"]);
    // Step two: the tool's result in the history, the model answers in text.
    const answer = await openai.chat.completions.create({
      model: stack.model, messages: history, tools, tool_choice: "none", temperature: 0, max_tokens: 40,
    });
    expect(answer.choices[0].message.tool_calls).toBeUndefined();
    expect(answer.choices[0].message.content!.length).toBeGreaterThan(0);
    // The history really reached the model: the prompt holds the call and the tool's result.
    const bare = await openai.chat.completions.create({ model: stack.model, messages: ask, tool_choice: "none", tools, max_tokens: 1 });
    expect(answer.usage!.prompt_tokens).toBeGreaterThan(bare.usage!.prompt_tokens + 20);
  });

  test("auto: the answer is read for calls either way; text stays content with finish_reason stop or length", async () => {
    const r = await openai.chat.completions.create({
      model: stack.model, messages: [{ role: "user", content: "Say hello." }], tools, temperature: 0, max_tokens: 30,
    });
    const c = r.choices[0];
    if (c.message.tool_calls?.length) expect(c.finish_reason).toBe("tool_calls");
    else {
      expect(typeof c.message.content).toBe("string");
      expect(c.message.content).not.toContain("<tool_call>");
      expect(["stop", "length"]).toContain(c.finish_reason);
    }
  });

  test("errors name the field: unknown tool_call_id, unknown named function, parameters the grammar cannot serve", async () => {
    const unknownId = await openai.chat.completions
      .create({ model: stack.model, messages: [...ask, { role: "tool", tool_call_id: "call_nope", content: "x" }], tools, max_tokens: 5 })
      .catch((e) => e);
    expect(unknownId.status).toBe(400);
    expect(unknownId.error.param).toBe("messages[1].tool_call_id");
    const unknownFn = await openai.chat.completions
      .create({ model: stack.model, messages: ask, tools, tool_choice: { type: "function", function: { name: "nope" } }, max_tokens: 5 })
      .catch((e) => e);
    expect(unknownFn.status).toBe(400);
    expect(unknownFn.error.param).toBe("tool_choice");
    const unsupported = await openai.chat.completions
      .create({
        model: stack.model, messages: ask, max_tokens: 5, tool_choice: "required",
        tools: [{ type: "function", function: { name: "f", parameters: { type: "object", properties: { a: { not: { type: "string" } } } } } }],
      })
      .catch((e) => e);
    expect(unsupported.status).toBe(400);
    expect(unsupported.error.param).toBe("tools");
    expect(unsupported.error.message).toContain('"not"');
  });
});
