// /docs in a real browser: Debian's headless Chromium (tests/e2e/ensure_chromium.sh installs it), driven by
// playwright-core, which never downloads a browser of its own. The page must render every operation of
// /openapi.json, load nothing from outside the gateway (the machine may have no internet), and raise no error.
import { existsSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { type Browser, chromium } from "playwright-core";
import { stack } from "./helpers";

jest.setTimeout(240_000);

const CHROMIUM = "/usr/bin/chromium";
const ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-dev-shm-usage",
  "--disable-background-networking",
  "--disable-component-update",
  "--no-first-run",
  "--disable-sync",
];

let browser: Browser;

beforeAll(async () => {
  if (!existsSync(CHROMIUM)) throw new Error(`${CHROMIUM} is missing: run tests/e2e/ensure_chromium.sh (Debian's chromium package)`);
  browser = await chromium.launch({ executablePath: CHROMIUM, args: ARGS, headless: true });
});
afterAll(async () => {
  await browser?.close();
});

test("/docs renders every operation of /openapi.json from local files only", async () => {
  const doc = (await (await fetch(`${stack.baseUrl}/openapi.json`)).json()) as { info: { title: string }; paths: object };
  const operations = Object.values(doc.paths as Record<string, Record<string, unknown>>).flatMap((item) =>
    Object.keys(item).filter((k) => ["get", "post", "put", "patch", "delete"].includes(k)),
  ).length;

  const page = await browser.newPage();
  // Playwright's 30 s default for each navigation and action is short for a loaded machine rendering a 1.5 MB bundle.
  page.setDefaultTimeout(60_000);
  const requested: string[] = [];
  const errors: string[] = [];
  page.on("request", (r) => requested.push(r.url()));
  page.on("pageerror", (e) => errors.push(String(e)));
  page.on("console", (m) => {
    if (m.type() === "error") errors.push(m.text());
  });

  const res = await page.goto(`${stack.baseUrl}/docs`, { waitUntil: "load" });
  expect(res?.status()).toBe(200);
  await page.waitForSelector(".swagger-ui .opblock", { timeout: 60_000 });
  expect(await page.locator(".swagger-ui .info .title").innerText()).toContain(doc.info.title);
  expect(await page.locator(".swagger-ui .opblock").count()).toBe(operations);
  // Exactly: /v1/chat/completions/{id}/stream (resumable streams) contains the same text.
  await expect(page.locator('.opblock-summary-path[data-path="/v1/chat/completions"]').count()).resolves.toBe(1);

  // Open the chat operation: its request body schema (from the zod schema) is shown.
  await page.locator(".opblock-post .opblock-summary", { hasText: "/v1/chat/completions" }).first().click();
  await page.waitForSelector(".opblock.is-open .opblock-section-request-body", { timeout: 60_000 });
  expect(await page.locator(".opblock.is-open").innerText()).toContain("messages");
  expect(await page.locator(".opblock.is-open button.try-out__btn").count()).toBe(1);
  await page.screenshot({ path: join(tmpdir(), "llm-gateway-docs.png"), fullPage: false });

  const origin = new URL(stack.baseUrl).origin;
  expect(requested.filter((u) => !u.startsWith(origin) && !u.startsWith("data:"))).toEqual([]);
  expect(requested).toEqual(expect.arrayContaining([`${origin}/openapi.json`, `${origin}/docs/assets/swagger-ui-bundle.js`]));
  expect(errors).toEqual([]);
  await page.close();
});
