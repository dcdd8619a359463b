// The Grafana dashboard (deploy/grafana/llm-gateway.json) against the running stack: real traffic through the openai
// Node SDK to the real worker, then every metric name the dashboard queries must be served, with samples, by the
// gateway's /metrics or the worker's (STACK_WORKER_METRICS_URL). Plus the gateway's own numbers moving with the traffic.
import { randomUUID } from "node:crypto";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { parsePrometheus, type Sample, select, sumOf } from "../../gateway/test/helpers/prom-text";
import { client, stack, waitFor } from "./helpers";

jest.setTimeout(240_000);

const DASHBOARD = join(__dirname, "..", "..", "deploy", "grafana", "llm-gateway.json");

function workerMetricsUrl(): string {
  const v = process.env.STACK_WORKER_METRICS_URL;
  if (!v) throw new Error("STACK_WORKER_METRICS_URL is not set: run the end-to-end tests through `npm test`");
  return v;
}

async function scrape(url: string): Promise<Sample[]> {
  const res = await fetch(url);
  expect(res.status).toBe(200);
  return parsePrometheus(await res.text());
}

// PromQL words that are not metric names: functions are recognised by their "(", these by name.
const KEYWORDS = new Set(["by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset"]);

/** Metric names in a PromQL expression: strings, label matchers, ranges and grouping clauses removed, functions skipped. */
export function metricNames(expr: string): string[] {
  const bare = expr
    .replace(/"(?:[^"\\]|\\.)*"/g, '""')
    .replace(/\{[^}]*\}/g, " ")
    .replace(/\[[^\]]*\]/g, " ")
    .replace(/\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)/g, " ");
  const names: string[] = [];
  for (const m of bare.matchAll(/[A-Za-z_:][A-Za-z0-9_:]*/g)) {
    const rest = bare.slice(m.index! + m[0].length);
    if (/^\s*\(/.test(rest) || KEYWORDS.has(m[0]) || /^\d/.test(m[0])) continue;
    if (m.index! > 0 && /[\d.]/.test(bare[m.index! - 1])) continue; // exponent of a number such as 1e-9
    names.push(m[0]);
  }
  return names;
}

/** Every expression of the dashboard: panel targets (rows nested or not) and template-variable queries. */
function dashboardExprs(): string[] {
  const dash = JSON.parse(readFileSync(DASHBOARD, "utf8"));
  const panels = (dash.panels as any[]).flatMap((p) => [p, ...(p.panels ?? [])]);
  const targets = panels.flatMap((p) => (p.targets ?? []).map((t: any) => t.expr as string));
  const vars = (dash.templating?.list ?? [])
    .filter((v: any) => v.type === "query")
    .map((v: any) => String(typeof v.query === "string" ? v.query : v.query.query).replace(/^label_values\(([^,)]+).*$/, "$1"));
  return [...targets, ...vars];
}

test("metricNames reads PromQL as the dashboard writes it", () => {
  expect(
    metricNames('histogram_quantile(0.95, sum by (le, route) (rate(a_seconds_bucket{route=~"/v1.*"}[$__rate_interval])))'),
  ).toEqual(["a_seconds_bucket"]);
  expect(metricNames('sum(rate(x_total{s=~"5.."}[5m])) / clamp_min(sum(rate(y_total[5m])), 1e-9)')).toEqual(["x_total", "y_total"]);
  expect(metricNames("max by (model, state) (llm_queue_jobs)")).toEqual(["llm_queue_jobs"]);
});

describe("the dashboard's metrics, after real traffic", () => {
  const openai = client({ allowCache: true });
  let before: Sample[];
  let after: Sample[];
  let worker: Sample[];
  let usage = { prompt: 0, completion: 0 };

  beforeAll(async () => {
    before = await scrape(`${stack.baseUrl}/metrics`);
    // A fresh prompt per generation, so the response cache (on by default) cannot answer instead of the worker; the
    // first request is then repeated to show a cache hit.
    const ask = (nonce: string) => [{ role: "user" as const, content: `Count from one to twenty. (${nonce})` }];
    // ignore_eos (vLLM's extension): exactly max_tokens tokens, so inter-token latency has gaps to measure.
    const params = { model: stack.model, max_tokens: 6, temperature: 0, ignore_eos: true } as const;
    const first = ask(randomUUID());
    const r = await openai.chat.completions.create({ ...params, messages: first } as any);
    usage.prompt += r.usage!.prompt_tokens;
    usage.completion += r.usage!.completion_tokens;
    await openai.chat.completions.create({ ...params, messages: first } as any);
    const s = await openai.chat.completions.create({
      ...params, messages: ask(randomUUID()), stream: true, stream_options: { include_usage: true },
    } as any);
    for await (const chunk of s as any) {
      if (chunk.usage) {
        usage.prompt += chunk.usage.prompt_tokens;
        usage.completion += chunk.usage.completion_tokens;
      }
    }
    after = await scrape(`${stack.baseUrl}/metrics`);
    // The worker counts a job just after publishing its end, and its token counter follows the engine's stats every
    // 0.25 s: read until both show the traffic (if they never do, the test below fails on the last reading).
    await waitFor(async () => {
      worker = await scrape(`${workerMetricsUrl()}/metrics`);
      return sumOf(worker, "llm_worker_generated_tokens_total") > 0 && sumOf(worker, "llm_worker_generation_seconds_count") >= 2;
    }, 30_000, "the worker's metrics to show the traffic").catch(() => undefined);
  });

  test("every metric the dashboard queries is served with samples", () => {
    const names = [...new Set(dashboardExprs().flatMap(metricNames))].sort();
    expect(names.length).toBeGreaterThan(15);
    const served = new Set([...after, ...worker].map((s) => s.name));
    const missing = names.filter((n) => !served.has(n));
    expect(missing).toEqual([]);
  });

  test("the traffic shows in the gateway's counters and histograms", () => {
    const delta = (name: string, labels: Record<string, string> = {}) => sumOf(after, name, labels) - sumOf(before, name, labels);
    const chat = { route: "/v1/chat/completions", method: "POST", status: "200" };
    expect(delta("llm_gateway_requests_total", chat)).toBeGreaterThanOrEqual(3);
    expect(delta("llm_gateway_request_duration_seconds_count", chat)).toBeGreaterThanOrEqual(3);
    expect(delta("llm_gateway_cache_lookups_total", { result: "hit" })).toBeGreaterThanOrEqual(1);
    for (const stream of ["true", "false"]) {
      expect(delta("llm_gateway_time_to_first_token_seconds_count", { model: stack.model, stream })).toBeGreaterThanOrEqual(1);
      expect(delta("llm_gateway_inter_token_latency_seconds_count", { model: stack.model, stream })).toBeGreaterThanOrEqual(1);
    }
    expect(delta("llm_gateway_prompt_tokens_total", { model: stack.model })).toBeGreaterThanOrEqual(usage.prompt);
    expect(delta("llm_gateway_completion_tokens_total", { model: stack.model })).toBeGreaterThanOrEqual(usage.completion);
    expect(usage.completion).toBe(12);
  });

  test("queue depth per state for the served model, and its live worker", () => {
    for (const state of ["waiting", "prioritized", "active", "delayed"]) {
      expect(select(after, "llm_queue_jobs", { model: stack.model, state })).toHaveLength(1);
    }
    expect(sumOf(after, "llm_gateway_live_workers", { model: stack.model })).toBeGreaterThanOrEqual(1);
  });

  test("the worker's metrics moved too", () => {
    // Generated tokens are published from the engine's stats a moment later: only check they are counted at all.
    expect(sumOf(worker, "llm_worker_generated_tokens_total")).toBeGreaterThan(0);
    expect(sumOf(worker, "llm_worker_generation_seconds_count")).toBeGreaterThanOrEqual(2);
    expect(sumOf(worker, "llm_worker_model_load_seconds")).toBeGreaterThan(0);
  });
});
