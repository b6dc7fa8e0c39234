// Drives Debian's chromium (headless, through playwright-core) against the
// dashboard, for tests/e2e/tests/dashboard.rs. Usage:
//
//   node dashboard.mjs '{"url": "http://127.0.0.1:PORT/balancer/ui",
//     "username": "admin", "password": "secret", "minPoints": 5,
//     "screenshotPoints": 20, "screenshot": "/tmp/dashboard.png", "timeoutMs": 60000,
//     "expect": {"/predict": {"in_flight": 4}}}'
//
// Checks: without credentials the page answers 401 with a Basic challenge;
// with them, every endpoint's chart reaches minPoints points and the numbers
// on the page equal what /balancer/stats says at the same moment, once the
// page shows what `expect` says (the burst has fully arrived). Prints a
// JSON report on stdout; exits non-zero with the reason on stderr.
import { chromium } from "playwright-core";

const opts = JSON.parse(process.argv[2]);
const fail = (why) => {
  console.error(`dashboard check failed: ${why}`);
  process.exit(1);
};

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  // Playwright gives each launch a fresh profile directory of its own.
  args: [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});
try {
  const report = await check(browser);
  console.log(JSON.stringify(report));
} catch (e) {
  fail(e.stack || String(e));
} finally {
  await browser.close();
}

async function check(browser) {
  // Without credentials: 401 and the challenge, for the page and the stats.
  const anonymous = await browser.newContext();
  const denied = {};
  for (const url of [opts.url, new URL("/balancer/stats", opts.url).href]) {
    // The browser, holding no credentials, gives up on the challenge...
    const browserSaw = await (await anonymous.newPage()).goto(url).then(
      (res) => `loaded with ${res.status()}`,
      (e) => e.message.split("\n")[0],
    );
    // ...whose status and header the same context's HTTP client reads.
    const res = await anonymous.request.get(url, { maxRedirects: 0 });
    denied[new URL(url).pathname] = {
      status: res.status(),
      challenge: res.headers()["www-authenticate"] ?? null,
      browser: browserSaw,
    };
  }
  await anonymous.close();

  const context = await browser.newContext({
    httpCredentials: { username: opts.username, password: opts.password },
    viewport: { width: 1280, height: 860 },
  });
  const page = await context.newPage();
  const outside = [];
  page.on("request", (r) => {
    if (new URL(r.url()).host !== new URL(opts.url).host) outside.push(r.url());
  });
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  const res = await page.goto(opts.url);
  if (res.status() !== 200) throw new Error(`page answered ${res.status()}`);

  const chartHas = (n) =>
    page.waitForFunction(
      (n) => {
        const charts = [...document.querySelectorAll("section.card svg")];
        return charts.length > 0 && charts.every((c) => Number(c.dataset.points) >= n);
      },
      n,
      { timeout: opts.timeoutMs, polling: 100 },
    );
  await chartHas(opts.minPoints);

  // The page's numbers against the stats, read right after; retried until
  // one poll and one read agree (the numbers move while requests arrive).
  let last;
  const deadline = Date.now() + opts.timeoutMs;
  for (;;) {
    const shown = await page.evaluate(readPage);
    const stats = await page.evaluate(async () => (await fetch("/balancer/stats")).json());
    const expected = fromStats(stats);
    last = { shown, expected };
    const arrived = Object.entries(opts.expect ?? {}).every(([path, want]) =>
      Object.entries(want).every(([k, v]) => shown[path]?.[k] === v));
    if (arrived && JSON.stringify(shown) === JSON.stringify(expected)) break;
    if (Date.now() > deadline) throw new Error(`page never matched the stats: ${JSON.stringify(last)}`);
    await page.waitForTimeout(200);
  }
  const points = await page.evaluate(() =>
    Object.fromEntries([...document.querySelectorAll("section.card")].map((c) => [
      c.dataset.endpoint, Number(c.querySelector("svg").dataset.points)])));

  if (opts.screenshot) {
    await chartHas(opts.screenshotPoints ?? opts.minPoints);
    await page.screenshot({ path: opts.screenshot, fullPage: true });
  }
  await context.close();
  return { denied, matched: last.shown, points, outside, errors };
}

/// What a person sees, per endpoint.
function readPage() {
  const out = {};
  for (const card of document.querySelectorAll("section.card")) {
    const text = (f) => card.querySelector(`[data-field="${f}"]`).textContent;
    const badge = card.querySelector('[data-field="queue-badge"]');
    out[card.dataset.endpoint] = {
      capacity: Number(text("capacity")),
      in_flight: Number(text("in_flight")),
      available: Number(text("available")),
      queued: Number(text("queued")),
      utilisation: text("utilisation"),
      colour: ["green", "yellow", "red"].find((c) => card.classList.contains(c)),
      badge: badge.hidden ? null : badge.textContent,
    };
    const classes = card.querySelector('[data-field="classes"]');
    if (!classes.hidden) {
      out[card.dataset.endpoint].classes = Object.fromEntries(
        [...classes.tBodies[0].rows].map((r) => [r.dataset.class, {
          queued: Number(r.cells[2].textContent),
          admitted: r.cells[3].textContent,
        }]));
    }
  }
  return out;
}

/// What the page should show for a stats document.
function fromStats(doc) {
  const out = {};
  for (const [path, ep] of Object.entries(doc.endpoints)) {
    const u = Math.round((100 * ep.active_requests) / ep.capacity);
    out[path] = {
      capacity: ep.capacity,
      in_flight: ep.active_requests,
      available: ep.available_slots,
      queued: ep.queued,
      utilisation: `${u} %`,
      colour: u >= 100 ? "red" : u >= 80 ? "yellow" : "green",
      badge: ep.queued > 0 ? `${ep.queued} waiting` : null,
    };
    if (ep.classes) {
      out[path].classes = Object.fromEntries(Object.entries(ep.classes).map(([name, k]) => [name, {
        queued: k.queued,
        admitted: String((k.outcomes?.admitted_at_once ?? 0) + (k.outcomes?.admitted_after_wait ?? 0)),
      }]));
    }
  }
  return out;
}
