// Drives Debian's Chromium (headless, through playwright-core; fresh user-data-dirs) through
// Stowage's admin pages, as tests/ui.rs sets it up: a server with authentication on, users
// alice (may pull everywhere) and the admin $ADMIN_USER, and private/secret pushed. An admin
// signs in, adds a user, creates an API token for alice, reads its secret once, uses it against
// /token and /v2/, revokes it and sees it refused, finds both in the audit trail, and (with
// JavaScript off) removes the user through the confirmation page. Prints one `ok - …` line per
// check and exits non-zero on the first failure. Screenshots go to $SCREENSHOT_DIR (the
// token's secret blurred).
//
// Environment: STOWAGE_URL, SCREENSHOT_DIR, ADMIN_USER, ADMIN_PASSWORD.

import { chromium } from "playwright-core";
import { mkdtempSync, mkdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";

const base = process.env.STOWAGE_URL;
const shots = process.env.SCREENSHOT_DIR;
const admin = process.env.ADMIN_USER;
const adminPassword = process.env.ADMIN_PASSWORD;
if (!base || !shots || !admin || !adminPassword) {
  console.error("STOWAGE_URL, SCREENSHOT_DIR, ADMIN_USER and ADMIN_PASSWORD must be set");
  process.exit(2);
}
mkdirSync(shots, { recursive: true });

let lastCheck = "start";
function check(cond, what) {
  if (!cond) throw new Error(`check failed: ${what}`);
  console.log(`ok - ${what}`);
  lastCheck = what;
}

async function shot(page, name) {
  await page.screenshot({ path: path.join(shots, name), fullPage: true, caret: "initial" });
  console.log(`screenshot ${name}`);
}

function basic(user, password) {
  return "Basic " + Buffer.from(`${user}:${password}`).toString("base64");
}

/** The status of /token for alice's secret, and the registry token it gave (if any). */
async function tokenFor(secret) {
  const resp = await fetch(`${base}/token?scope=repository:private/secret:pull`, {
    headers: { Authorization: basic("alice", secret) },
  });
  const body = resp.ok ? await resp.json() : {};
  return { status: resp.status, token: body.token ?? body.access_token };
}

async function tagsWithBearer(token) {
  const resp = await fetch(`${base}/v2/private/secret/tags/list`, { headers: { Authorization: `Bearer ${token}` } });
  return resp.status;
}

async function signIn(page) {
  await page.goto(`${base}/ui/login`);
  await page.fill("#username", admin);
  await page.fill("#password", adminPassword);
  await Promise.all([page.waitForURL(`${base}/ui/`), page.click("#sign-in")]);
}

const userDataDir = mkdtempSync(path.join(tmpdir(), "stowage-ui-admin-"));
const noScriptDir = mkdtempSync(path.join(tmpdir(), "stowage-ui-admin-nojs-"));
const launchOptions = {
  executablePath: "/usr/bin/chromium",
  headless: true,
  args: [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-quic",
    "--disable-sync",
  ],
  viewport: { width: 1280, height: 860 },
  timeout: 60_000,
};
let context;
try {
  context = await chromium.launchPersistentContext(userDataDir, launchOptions);
  const page = context.pages()[0] ?? (await context.newPage());
  page.setDefaultTimeout(20_000);
  const policyViolations = [];
  const scriptErrors = [];
  page.on("console", (m) => {
    if (/Content.Security.Policy/i.test(m.text())) policyViolations.push(`${m.text()} [after "${lastCheck}"]`);
  });
  page.on("pageerror", (e) => scriptErrors.push(String(e)));
  page.on("dialog", (d) => d.accept());

  await page.goto(`${base}/ui/`);
  check((await page.locator("#admin-link").count()) === 0, "an anonymous viewer sees no Admin link");
  await signIn(page);
  check(await page.locator("#admin-link").isVisible(), "the admin sees the Admin link");
  await Promise.all([page.waitForURL(`${base}/ui/admin/users`), page.click("#admin-link")]);

  // Add a user.
  await page.fill("#new-name", "carol");
  await page.fill("#new-password", "carol-pw");
  await page.fill("#new-again", "carol-pw");
  await page.click("#add-user-button");
  await page.locator("#notice").waitFor();
  check((await page.locator("#notice").textContent()).includes("Added user carol"), "the admin added carol");
  const users = await page.locator("a.user").allTextContents();
  check(users.includes("carol") && users.includes("alice"), `the users page lists carol (${users.join(", ")})`);
  await shot(page, "admin-users.png");

  // Create a token for alice: the secret appears once, on the POST's answer.
  await page.click('nav.tabs a[href="/ui/admin/tokens"]');
  await page.locator("#create-token").waitFor();
  const tokenName = `ci <b>"x"</b> & 'y'`;
  await page.fill("#token-user", "alice");
  await page.fill("#token-name", tokenName);
  await page.fill("#token-scopes", "private/**:pull");
  await page.fill("#token-expiry", "30");
  const [created] = await Promise.all([
    page.waitForResponse((r) => r.url() === `${base}/ui/admin/tokens` && r.request().method() === "POST"),
    page.click("#create-token-button"),
  ]);
  check(created.status() === 200, "the token form is answered with a page (200), not a redirect");
  check(created.headers()["cache-control"] === "no-store", "the page with the secret is not to be stored");
  const secret = (await page.locator("#token-secret").textContent()).trim();
  check(secret.startsWith("stw_") && secret.length === 47, "the secret is shown");
  check(!page.url().includes(secret), "the secret is not in the URL");
  check((await page.locator("#new-token-name").textContent()) === tokenName, "the token's name is shown as text");
  check(!(await page.content()).includes("<b>\"x\"</b>"), "the token's name is escaped");
  const row = page.locator("#tokens tbody tr", { has: page.locator("td.token-name", { hasText: "ci <b>" }) });
  const tokenId = (await row.getAttribute("id")).replace("token-", "");
  check((await row.locator("td.status").textContent()) === "live", `token ${tokenId} is listed as live`);
  await page.evaluate(() => document.getElementById("token-secret").classList.add("blurred"));
  await shot(page, "admin-tokens.png");

  // The secret works against /token and /v2/.
  let got = await tokenFor(secret);
  check(got.status === 200 && got.token, "the secret gets a registry token at /token");
  check((await tagsWithBearer(got.token)) === 200, "that registry token lists private/secret's tags at /v2/");
  const bearer = got.token;

  // The list never shows the secret again.
  await page.goto(`${base}/ui/admin/tokens`);
  check(!(await page.content()).includes(secret), "reloading the tokens page does not show the secret");
  check((await page.locator("#token-secret").count()) === 0, "no secret box on the list");

  // Revoke it in the browser: refused at /token and /v2/ from then on.
  await page.click(`button[data-revoke="${tokenId}"]`);
  await page.locator("#notice").waitFor();
  check(
    (await page.locator(`#token-${tokenId} td.status`).textContent()) === "revoked",
    "the token is listed as revoked",
  );
  got = await tokenFor(secret);
  check(got.status === 401, `the revoked secret is refused at /token (${got.status})`);
  check((await tagsWithBearer(bearer)) === 401, "the registry token it gave is refused at /v2/");
  const v2 = await fetch(`${base}/v2/`, { headers: { Authorization: basic("alice", secret) } });
  check(v2.status === 401, `the revoked secret is refused at /v2/ (${v2.status})`);

  // The audit trail shows both, done by the admin.
  await page.click('nav.tabs a[href="/ui/admin/audit"]');
  await page.locator("#audit").waitFor();
  const actions = await page.locator("#audit tbody tr").evaluateAll((rows) =>
    rows.map((r) => `${r.dataset.action}/${r.querySelector(".actor").firstChild.textContent.trim()}`),
  );
  check(actions.includes(`token.create/${admin}`), `the audit trail lists the creation by ${admin}`);
  check(actions.includes(`token.revoke/${admin}`), `the audit trail lists the revocation by ${admin}`);
  check(actions.includes(`user.add/${admin}`), "the audit trail lists carol's addition");
  await shot(page, "admin-audit.png");

  await page.click('nav.tabs a[href="/ui/admin/gc"]');
  await page.locator("#gc-status").waitFor();
  await shot(page, "admin-gc.png");

  check(policyViolations.length === 0, `no Content-Security-Policy violation (${policyViolations.join(" | ")})`);
  check(scriptErrors.length === 0, `no script error (${scriptErrors.join(" | ")})`);
  await context.close();
  context = undefined;

  // Without JavaScript: remove carol through the confirmation page.
  context = await chromium.launchPersistentContext(noScriptDir, { ...launchOptions, javaScriptEnabled: false });
  const plain = context.pages()[0] ?? (await context.newPage());
  plain.setDefaultTimeout(20_000);
  await signIn(plain);
  await plain.goto(`${base}/ui/admin/users/carol`);
  await Promise.all([plain.waitForURL(`${base}/ui/admin/users/carol/remove`), plain.click("#remove-link")]);
  check((await plain.locator("#user-name").textContent()) === "carol", "without JavaScript the confirmation page opens");
  await Promise.all([plain.waitForURL(/\/ui\/admin\/users\?done=removed/), plain.click("#confirm-remove-button")]);
  const left = await plain.locator("a.user").allTextContents();
  check(!left.includes("carol"), `carol is removed (${left.join(", ")})`);
  console.log("admin browser checks passed");
} catch (e) {
  console.error(String(e?.stack ?? e));
  process.exitCode = 1;
} finally {
  await context?.close();
  rmSync(userDataDir, { recursive: true, force: true });
  rmSync(noScriptDir, { recursive: true, force: true });
}
