// Drives Debian's Chromium (headless, through playwright-core; each run in a fresh user-data-dir)
// through Stowage's web UI, with JavaScript on and then off, as
// tests/ui.rs sets it up: a server with authentication on, public/app (v1 with annotations and a
// referrer, v2), public/multi (an index of two platforms) and private/secret pushed, and a user
// who may pull and delete everywhere. Prints one `ok - …` line per check and exits non-zero on
// the first failure. Screenshots go to $SCREENSHOT_DIR.
//
// Environment: STOWAGE_URL (http://127.0.0.1:port), SCREENSHOT_DIR, UI_USER, UI_PASSWORD.

import { chromium } from "playwright-core";
import { mkdtempSync, mkdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";

const base = process.env.STOWAGE_URL;
const shots = process.env.SCREENSHOT_DIR;
const user = process.env.UI_USER;
const password = process.env.UI_PASSWORD;
if (!base || !shots || !user || !password) {
  console.error("STOWAGE_URL, SCREENSHOT_DIR, UI_USER and UI_PASSWORD must be set");
  process.exit(2);
}
const host = new URL(base).host;
mkdirSync(shots, { recursive: true });

/** The last check passed, to say where a console message came from. */
let lastCheck = "start";

function check(cond, what) {
  if (!cond) throw new Error(`check failed: ${what}`);
  console.log(`ok - ${what}`);
  lastCheck = what;
}

async function shot(page, name) {
  // caret "initial": Playwright's default hides the caret with an injected <style>, which the
  // pages' Content-Security-Policy blocks (and reports, failing the no-violation check).
  await page.screenshot({ path: path.join(shots, name), fullPage: true, caret: "initial" });
  console.log(`screenshot ${name}`);
}

/** The repository names the repositories page lists. */
async function listedRepos(page) {
  await page.locator("main h1").waitFor();
  return page.locator("a.repo").allTextContents();
}

const userDataDir = mkdtempSync(path.join(tmpdir(), "stowage-ui-chromium-"));
const noScriptDir = mkdtempSync(path.join(tmpdir(), "stowage-ui-chromium-nojs-"));
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
    if (/Content.Security.Policy/i.test(m.text())) {
      const at = m.location();
      policyViolations.push(`${m.text()} [after "${lastCheck}", on ${page.url()}, from ${at.url}:${at.lineNumber}:${at.columnNumber}]`);
    }
  });
  page.on("pageerror", (e) => scriptErrors.push(String(e)));
  page.on("dialog", (d) => d.accept());

  // Anonymous: only the anonymous_pull repositories.
  let resp = await page.goto(`${base}/`);
  check(new URL(page.url()).pathname === "/ui/", "/ redirects to /ui/");
  check(resp.headers()["content-security-policy"]?.includes("script-src 'self'"), "the page has a strict CSP");
  let repos = await listedRepos(page);
  check(repos.includes("public/app") && repos.includes("public/multi"), "anonymous sees the public repositories");
  check(!repos.includes("private/secret"), "anonymous does not see private/secret");
  await shot(page, "repositories-anonymous.png");
  resp = await page.goto(`${base}/ui/repos/private/secret`);
  check(resp.status() === 404, "private/secret's page answers 404 to anonymous");
  check(!(await page.content()).includes("private/secret:v1"), "the 404 page names no tag of it");

  // Sign in.
  await page.goto(`${base}/ui/`);
  await page.click("#sign-in-link");
  await page.locator("#username").waitFor();
  await page.fill("#username", user);
  await page.fill("#password", password);
  await shot(page, "sign-in.png");
  await Promise.all([page.waitForURL(`${base}/ui/`), page.click("#sign-in")]);
  await page.locator("#signed-in-user").waitFor();
  check((await page.locator("#signed-in-user").textContent()) === user, `signed in as ${user}`);
  repos = await listedRepos(page);
  check(repos.includes("private/secret"), "signed in, private/secret is listed");
  await shot(page, "repositories.png");

  // Browse a repository (a boosted link: htmx swaps the page in).
  await page.click('a.repo:text-is("public/app")');
  await page.locator("#repo-name").waitFor();
  check((await page.locator("#repo-name").textContent()) === "public/app", "the repository page opened");
  let tags = await page.locator("a.tag").allTextContents();
  check(tags.includes("v1") && tags.includes("v2"), "its tags v1 and v2 are listed");
  const docker = await page.locator("#tag-v1 code[data-tool=docker]").textContent();
  check(docker === `docker pull ${host}/public/app:v1`, `the docker pull line is ${docker}`);
  const oras = await page.locator("#tag-v1 code[data-tool=oras]").textContent();
  check(oras === `oras pull ${host}/public/app:v1`, "the oras pull line");
  check(await page.locator("#tag-v1 button.copy").first().isVisible(), "copy buttons show with JavaScript on");
  check(await page.locator('button[data-delete="v2"]').isVisible(), "a delete button for a user who may delete");
  await shot(page, "repository.png");

  // Filter as one types (htmx replaces the results).
  await page.fill("#q", "v1");
  await page.waitForFunction(() => document.querySelectorAll("a.tag").length === 1);
  tags = await page.locator("a.tag").allTextContents();
  check(tags.length === 1 && tags[0] === "v1", "typing v1 in the filter leaves only v1");

  // A manifest: layers, config, annotations, referrers by artifact type.
  await page.click('a.tag:text-is("v1")');
  await page.locator("#manifest-digest").waitFor();
  check((await page.locator("#layers tbody tr").count()) === 2, "the manifest page lists its two layers");
  check((await page.locator("#config tbody tr").count()) === 1, "and its config");
  const annotations = await page.locator("#annotations").textContent();
  check(annotations.includes("org.opencontainers.image.description"), "and its annotations");
  const kinds = await page.locator("#referrers h3.artifact-type").allTextContents();
  check(kinds.includes("application/spdx+json"), `referrers grouped by artifact type: ${kinds.join(", ")}`);
  await shot(page, "manifest.png");

  // An index: its platforms.
  await page.goto(`${base}/ui/repos/public/multi`);
  const listed = await page.locator("#tag-latest .platforms").textContent();
  check(listed === "linux/amd64, linux/arm64/v8", `the tag list shows the index's platforms (${listed})`);
  await page.click('a.tag:text-is("latest")');
  await page.locator("#platforms").waitFor();
  const platforms = await page.locator("#platforms td.platform").allTextContents();
  check(platforms.includes("linux/amd64") && platforms.includes("linux/arm64/v8"), `platforms ${platforms.join(", ")}`);
  await shot(page, "index.png");

  // A Spack build cache: narrow by a facet, search a package, open its spec page and DAG,
  // follow a node of the DAG and a dependent.
  await page.goto(`${base}/ui/repos/public/spack`);
  await page.click("#spack-link");
  await page.locator("#spec-name").waitFor();
  check((await page.locator("#facet-compiler a.facet-link").count()) > 0, "the search page shows compiler facets");
  await shot(page, "spack.png");
  await Promise.all([
    page.waitForURL(/compiler=gcc%4012\.2\.0/),
    page.click('a.facet-link[data-facet="compiler"][data-value="gcc@12.2.0"]'),
  ]);
  await page.locator(".facet-chosen").waitFor();
  const narrowed = await page.locator("a.spec").allTextContents();
  check(narrowed.join() === "appc,liba,libb", `the gcc@12.2.0 facet narrows to appc, liba, libb (${narrowed.join(", ")})`);
  await page.fill("#spec-name", "liba");
  await page.click('form.filter button[type="submit"]');
  await page.waitForFunction(() => document.querySelectorAll("a.spec").length === 1);
  check((await page.locator("a.spec").textContent()) === "liba", "searching liba within the facet finds one spec");
  await page.click('a.spec:text-is("liba")');
  await page.locator("#dependencies").waitFor();
  check((await page.locator("#spec-title").textContent()) === "liba@1.0", "liba's spec page opened");
  const deps = await page.locator("#dependencies .dep").allTextContents();
  check(deps.some((d) => d.startsWith("gcc-runtime@")), `its DAG lists gcc-runtime (${deps.join(", ")})`);
  const drawn = await page.locator("#dag g.node").count();
  check(drawn === deps.length + 1, `the DAG's SVG draws one node per dependency and the spec (${drawn})`);
  const box = await page.locator("#dag").boundingBox();
  check(box !== null && box.width > 100 && box.height > 100, "the DAG's SVG is laid out with a size");
  // A dependent: libb; then appc, which depends on liba through libb.
  await page.click("#transitive-link");
  await page.locator('a.dependent:text-is("appc@0.3")').waitFor();
  await page.click('a.dependent:text-is("appc@0.3")');
  await page.waitForFunction(() => document.querySelector("#spec-title")?.textContent === "appc@0.3");
  await page.locator("#dag").waitFor();
  await shot(page, "spack-spec.png");
  // A node of the DAG links to its spec page.
  await page.click('#dag g.node.cached[data-hash="zgl5yzcqzdnkd7scv2tq3qoi5fyw7vh3"]');
  await page.waitForFunction(() => document.querySelector("#spec-title")?.textContent === "libb@2.1");
  check(true, "clicking libb in appc's DAG opens libb's spec page");

  // Delete a tag (the confirmation dialog is accepted).
  await page.goto(`${base}/ui/repos/public/app`);
  await page.click('button[data-delete="v2"]');
  await page.locator("#deleted-notice").waitFor();
  tags = await page.locator("a.tag").allTextContents();
  check(!tags.includes("v2") && tags.includes("v1"), "v2 is deleted, v1 stays");

  // Sign out: the private repository is hidden again.
  await page.click("#sign-out");
  await page.locator("#sign-in-link").waitFor();
  await page.goto(`${base}/ui/`);
  repos = await listedRepos(page);
  check(!repos.includes("private/secret"), "signed out, private/secret is hidden again");

  check(policyViolations.length === 0, `no Content-Security-Policy violation (${policyViolations.join(" | ")})`);
  check(scriptErrors.length === 0, `no script error (${scriptErrors.join(" | ")})`);
  await context.close();
  context = undefined;

  // The same pages with JavaScript off: plain links and forms.
  context = await chromium.launchPersistentContext(noScriptDir, { ...launchOptions, javaScriptEnabled: false });
  const plain = context.pages()[0] ?? (await context.newPage());
  plain.setDefaultTimeout(20_000);
  await plain.goto(`${base}/ui/`);
  await Promise.all([plain.waitForURL(`${base}/ui/repos/public/multi`), plain.click('a.repo:text-is("public/multi")')]);
  check((await plain.locator("a.tag").count()) === 3, "without JavaScript a repository page opens");
  check(!(await plain.locator("button.copy").first().isVisible()), "without JavaScript the copy buttons are hidden");
  await plain.fill("#q", "arm");
  await Promise.all([plain.waitForURL(/q=arm/), plain.press("#q", "Enter")]);
  const filtered = await plain.locator("a.tag").allTextContents();
  check(filtered.join() === "arm64", `without JavaScript the filter form works (${filtered.join(", ")})`);
  await Promise.all([plain.waitForURL(/-\/manifests\//), plain.click('a.tag:text-is("arm64")')]);
  check((await plain.locator("#layers tbody tr").count()) === 1, "without JavaScript the manifest page opens");
  console.log("browser checks passed");
} catch (e) {
  console.error(String(e?.stack ?? e));
  process.exitCode = 1;
} finally {
  await context?.close();
  rmSync(userDataDir, { recursive: true, force: true });
  rmSync(noScriptDir, { recursive: true, force: true });
}
