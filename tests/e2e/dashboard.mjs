// Drives the operator dashboard of a live `whist serve` in headless Chromium, as a developer would:
// enter the admin token, see the regions and hosts, drain a host with its button, see it change state.
// Then opens the API reference at /docs, as a client developer would: Swagger UI, served by the server itself,
// renders every operation of the server's own /openapi.json (the Stripe webhook, which only the completed
// document has, among them).
//
//   node dashboard.mjs BASE_URL ADMIN_TOKEN SCREENSHOT_PATH
//
// Chromium is Debian's (`/usr/bin/chromium`, or CHROMIUM_PATH); playwright-core only drives it.
import { chromium } from "playwright-core";

const [baseUrl, token, screenshot] = process.argv.slice(2);
if (!baseUrl || !token || !screenshot) {
  console.error("usage: node dashboard.mjs BASE_URL ADMIN_TOKEN SCREENSHOT_PATH");
  process.exit(2);
}

const step = (message) => console.log(`[dashboard e2e] ${message}`);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM_PATH || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-dev-shm-usage"],
});
let failed = false;
const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
// Nothing may be fetched from anywhere but the server itself.
const foreign = [];
page.on("request", (request) => {
  if (!request.url().startsWith(baseUrl) && !request.url().startsWith("data:")) foreign.push(request.url());
});
const consoleErrors = [];
page.on("console", (message) => { if (message.type() === "error") consoleErrors.push(message.text()); });
page.on("dialog", (dialog) => dialog.accept());
try {
  await page.goto(`${baseUrl}/dashboard`);
  step("page loaded");
  // Keyboard only: the token field is labelled and the form submits with Enter.
  await page.getByLabel("Admin token").fill(token);
  await page.getByLabel("Admin token").press("Enter");
  await page.waitForSelector("body[data-connected=true]", { timeout: 15000 });
  step("connected");

  const region = page.locator("#regions tr[data-region='us-east-1']");
  await region.waitFor({ timeout: 15000 });
  step(`region row: ${(await region.innerText()).replace(/\s+/g, " ")}`);

  const active = page.locator("#hosts tr").filter({ has: page.locator("td[data-column=status]", { hasText: /^ACTIVE$/ }) });
  await active.first().waitFor({ timeout: 30000 });
  const count = await active.count();
  step(`${count} ACTIVE host(s) listed`);
  const instanceId = await active.first().getAttribute("data-instance-id");
  step(`draining ${instanceId}`);
  await page.getByRole("button", { name: `Drain host ${instanceId}` }).click();

  const status = page.locator(`#hosts tr[data-instance-id='${instanceId}'] td[data-column=status]`);
  await page.waitForFunction(
    (id) => {
      const cell = document.querySelector(`#hosts tr[data-instance-id='${id}'] td[data-column=status]`);
      return cell && cell.textContent !== "ACTIVE";
    },
    instanceId,
    { timeout: 15000 },
  );
  step(`host ${instanceId} is now ${await status.innerText()}`);
  // The latest events show the drain, with the developer as its actor.
  await page.waitForFunction(
    () => [...document.querySelectorAll("#events tr")].some((row) => row.textContent.includes("InstanceDrainStarted") && row.textContent.includes("user:")),
    null,
    { timeout: 15000 },
  );
  step("the drain is in the latest events with its actor");
  await page.waitForTimeout(500);
  await page.screenshot({ path: screenshot, fullPage: true });
  step(`screenshot saved to ${screenshot}`);

  const documentLoaded = page.waitForResponse((response) => response.url() === `${baseUrl}/openapi.json`, { timeout: 15000 });
  await page.goto(`${baseUrl}/docs`);
  const served = await (await documentLoaded).json();
  const operations = Object.values(served.paths).reduce((count, item) => count + Object.keys(item).length, 0);
  step(`/docs loaded /openapi.json (${operations} operations)`);
  await page.locator(".opblock-summary", { hasText: "/stripe/webhook" })
    .filter({ hasText: "Receive a signed Stripe event." })
    .waitFor({ timeout: 15000 });
  const rendered = await page.locator(".opblock").count();
  if (rendered !== operations) throw new Error(`/docs renders ${rendered} operations, /openapi.json has ${operations}`);
  step(`/docs renders all ${rendered} operations of /openapi.json, the Stripe webhook among them`);
  if (foreign.length > 0) throw new Error(`requests to other origins: ${foreign.join(", ")}`);
  if (consoleErrors.length > 0) throw new Error(`console errors: ${consoleErrors.join(" | ")}`);
} catch (error) {
  failed = true;
  console.error(`[dashboard e2e] FAILED: ${error.message}`);
  await page.screenshot({ path: screenshot.replace(/\.png$/, "-failure.png"), fullPage: true }).catch(() => {});
} finally {
  await browser.close();
}
process.exit(failed ? 1 : 0);
