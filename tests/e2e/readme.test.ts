// Every curl example in README.md runs against the stack, with --fail-with-body so that an error status fails it.
import { spawnSync } from "node:child_process";
import { readFileSync } from "node:fs";
import path from "node:path";
import { z } from "zod";
import { stack } from "./helpers";

jest.setTimeout(120_000);

const readme = readFileSync(path.join(__dirname, "../../README.md"), "utf8");
const blocks = [...readme.matchAll(/```(?:bash|sh)\n([\s\S]*?)```/g)].map((m) => m[1]).filter((b) => /\bcurl\b/.test(b));

test("README has curl examples, each with --fail-with-body", () => {
  expect(blocks.length).toBeGreaterThanOrEqual(3);
  for (const b of blocks) for (const line of b.split("\n").filter((l) => /^\s*curl\b/.test(l))) expect(line).toMatch(/--fail-with-body/);
});

/** The JSON body an example sends (`-d '…'`), if it sends one. */
function sentBody(block: string): Record<string, any> | undefined {
  const m = /-d '([\s\S]*?)'/.exec(block);
  return m ? JSON.parse(m[1]) : undefined;
}

test("README has a structured-output (json_schema) curl example", () => {
  expect(blocks.some((b) => sentBody(b)?.response_format?.type === "json_schema")).toBe(true);
});

test.each(blocks.map((b, i) => [i + 1, b]))("README curl example %i succeeds", (_i, block) => {
  const r = spawnSync("bash", ["-euo", "pipefail", "-c", block as string], {
    env: { ...process.env, OPENAI_BASE_URL: `${stack.baseUrl}/v1`, OPENAI_API_KEY: stack.apiKey, LLM_GATEWAY: stack.baseUrl },
    encoding: "utf8",
    timeout: 100_000,
  });
  if (r.status !== 0) throw new Error(`exit ${r.status}\nstdout: ${r.stdout}\nstderr: ${r.stderr}`);
  expect(r.stdout.length).toBeGreaterThan(0);
  const format = sentBody(block as string)?.response_format;
  if (format?.type === "json_schema") {
    // What the README promises: the answer ends by itself, and its content parses and validates against the schema.
    const choice = JSON.parse(r.stdout).choices[0];
    expect(choice.finish_reason).toBe("stop");
    const value = JSON.parse(choice.message.content);
    const checked = z.fromJSONSchema(format.json_schema.schema).safeParse(value);
    if (!checked.success) throw new Error(`${choice.message.content}\n${checked.error.message}`);
    for (const key of format.json_schema.schema.required) expect(value).toHaveProperty(key);
  }
});
