// The tutorial's curl examples (/work/shared/seed, section 4.1.1), translated to our host and key, against the running
// stack (real Redis, the real Python worker), plus its other routes: /chat/stream, /chat/batch, /chat/secure.
// The one other change: max_length 200 → 16, because the CPU test machine generates a few tokens per second.
// The tutorial's 10/minute limit is on by default for these routes: this suite makes 4 such calls.
import { execFile } from "node:child_process";
import { promisify } from "node:util";
import { stack } from "./helpers";

jest.setTimeout(180_000);
const run = promisify(execFile);

async function curl(args: string[]): Promise<{ status: number; body: string; headers: string }> {
  const { stdout } = await run("curl", ["-sS", "-D", "-", ...args], { maxBuffer: 10 * 1024 * 1024, timeout: 170_000 });
  const split = stdout.indexOf("\r\n\r\n");
  const headers = stdout.slice(0, split);
  return { status: Number(/^HTTP\/[\d.]+ (\d+)/.exec(headers)![1]), headers, body: stdout.slice(split + 4) };
}

const auth = () => ["-H", `Authorization: Bearer ${stack.apiKey}`];

test('curl -X GET "…/health" → {"status": "healthy", "service": "llm-api", …}', async () => {
  const r = await curl(["-X", "GET", `${stack.baseUrl}/health`]);
  expect(r.status).toBe(200);
  expect(JSON.parse(r.body)).toMatchObject({ status: "healthy", service: "llm-api" });
});

test("curl -X POST …/chat with the tutorial's body → {response, history, tokens_used, processing_time}", async () => {
  const r = await curl([
    "-X", "POST", `${stack.baseUrl}/chat`,
    "-H", "Content-Type: application/json",
    ...auth(),
    "-d", '{\n"prompt": "你好,请介绍一下你自己",\n"max_length": 16,\n"temperature": 0.7\n}',
  ]);
  expect(r.status).toBe(200);
  const body = JSON.parse(r.body);
  expect(Object.keys(body).sort()).toEqual(["history", "processing_time", "response", "tokens_used"]);
  expect(body.response.length).toBeGreaterThan(0);
  expect(body.history).toEqual([["你好,请介绍一下你自己", body.response]]);
  expect(body.tokens_used).toBeGreaterThan(10);
  expect(body.processing_time).toBeGreaterThan(0);
  expect(r.headers).toMatch(/x-ratelimit-limit-requests: 10/i);
});

test("/chat/stream: text/event-stream of `data: <text>`, ending with `data: [DONE]`", async () => {
  const r = await curl([
    "-N", "-X", "POST", `${stack.baseUrl}/chat/stream`, "-H", "Content-Type: application/json", ...auth(),
    "-d", JSON.stringify({ prompt: "Name three colours.", max_length: 12, history: [["Hi", "Hello!"]] }),
  ]);
  expect(r.status).toBe(200);
  expect(r.headers).toMatch(/content-type: text\/event-stream/i);
  const events = r.body.split("\n\n").filter((e) => e.length > 0);
  expect(events.at(-1)).toBe("data: [DONE]");
  const text = events.slice(0, -1).map((e) => e.split("\n").map((l) => l.replace(/^data: ?/, "")).join("\n")).join("");
  expect(text.trim().length).toBeGreaterThan(0);
});

test("/chat/batch: a list → {\"results\": [...]} in order, run concurrently through the queue", async () => {
  const r = await curl([
    "-X", "POST", `${stack.baseUrl}/chat/batch`, "-H", "Content-Type: application/json", ...auth(),
    "-d", JSON.stringify([{ prompt: "Say one word.", max_length: 4 }, { prompt: "Say two words.", max_length: 4, temperature: 0.2 }]),
  ]);
  expect(r.status).toBe(200);
  const { results } = JSON.parse(r.body);
  expect(results).toHaveLength(2);
  for (const [i, p] of ["Say one word.", "Say two words."].entries()) {
    expect(results[i].history).toEqual([[p, results[i].response]]);
    expect(results[i].tokens_used).toBeGreaterThan(0);
  }
});

test("/chat/secure: 401 without a token, {response, history} with one", async () => {
  const body = JSON.stringify({ prompt: "Hello", max_length: 4 });
  const anon = await curl(["-X", "POST", `${stack.baseUrl}/chat/secure`, "-H", "Content-Type: application/json", "-d", body]);
  expect(anon.status).toBe(401);
  const r = await curl(["-X", "POST", `${stack.baseUrl}/chat/secure`, "-H", "Content-Type: application/json", ...auth(), "-d", body]);
  expect(r.status).toBe(200);
  expect(Object.keys(JSON.parse(r.body)).sort()).toEqual(["history", "response"]);
});
