// Screenshots of the running demo (scripts/demo) for the README, taken with headless Chromium.
//
// Run through scripts/screenshots, which brings the demo up, installs what is missing
// (Debian's chromium, playwright-core from npm) and passes in the demo's URLs and login
// (MYNAS_DEMO_* variables, see scripts/demo.py). Writes docs/*.png:
//
//   docs/integration.png     Settings -> Devices & services -> MyNAS: the node with its
//                            peer and folder subentries
//   docs/invite-code.png     the node's options (gear) -> "Show our invite code"
//   docs/pairing-code.png    "Add peer": a friend's invite code pasted in
//   docs/pairing-confirm.png the next step: who the code names, its fingerprint, our own code
//                            to send back, the space granted
//   docs/dashboard.png       the MyNAS dashboard (dashboards/mynas.yaml)
//
// The pairing shots use a third node's invite code ("Carol", made with the engine's command
// line) and close the dialog before the connection test: Carol is never added.
'use strict';

const { execFileSync } = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');

const { chromium } = require(process.env.PLAYWRIGHT_CORE || 'playwright-core');

const REPO = path.resolve(__dirname, '..');
const OUT = process.env.MYNAS_SCREENSHOTS_DIR || path.join(REPO, 'docs');
const VIEWPORT = { width: 1280, height: 800 };

function env(name) {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set: run scripts/screenshots, not this file`);
  return value;
}

async function post(url, body, form = false) {
  const response = await fetch(url, {
    method: 'POST',
    headers: { 'Content-Type': form ? 'application/x-www-form-urlencoded' : 'application/json' },
    body: form ? new URLSearchParams(body).toString() : JSON.stringify(body),
  });
  if (!response.ok) throw new Error(`POST ${url}: ${response.status} ${await response.text()}`);
  return response.json();
}

// The login flow, as the frontend runs it; returns what the frontend keeps in hassTokens.
async function hassTokens(url, username, password) {
  const clientId = `${url}/`;
  const flow = await post(`${url}/auth/login_flow`, {
    client_id: clientId,
    handler: ['homeassistant', null],
    redirect_uri: clientId,
  });
  const done = await post(`${url}/auth/login_flow/${flow.flow_id}`, {
    client_id: clientId,
    username,
    password,
  });
  if (done.type !== 'create_entry') throw new Error(`login failed: ${JSON.stringify(done)}`);
  const tokens = await post(
    `${url}/auth/token`,
    { grant_type: 'authorization_code', code: done.result, client_id: clientId },
    true,
  );
  return {
    ...tokens,
    // home-assistant-js-websocket's AuthData: camelCase, unlike the token endpoint's reply.
    hassUrl: url,
    clientId,
    expires: Date.now() + tokens.expires_in * 1000,
  };
}

async function openHass(browser, url) {
  const tokens = await hassTokens(url, env('MYNAS_DEMO_USER'), env('MYNAS_DEMO_PASSWORD'));
  const context = await browser.newContext({
    viewport: VIEWPORT,
    deviceScaleFactor: 1,
    colorScheme: 'light',
    locale: 'en-US',
    timezoneId: 'Europe/Berlin',
  });
  await context.addInitScript((stored) => {
    window.localStorage.setItem('hassTokens', JSON.stringify(stored));
    // Keep the sidebar expanded and skip "what's new" style prompts.
    window.localStorage.setItem('dockedSidebar', JSON.stringify('docked'));
  }, tokens);
  const page = await context.newPage();
  page.setDefaultTimeout(60_000);
  return { context, page };
}

async function goto(page, url) {
  await page.goto(url, { waitUntil: 'load' });
  await page.locator('ha-sidebar').first().waitFor();
}

async function settle(page, ms = 1500) {
  // Let lazy-loaded cards and fonts finish; then one more animation frame.
  await page.waitForLoadState('networkidle').catch(() => {});
  await page.waitForTimeout(ms);
  await page.evaluate(() => new Promise((resolve) => requestAnimationFrame(() => resolve())));
}

async function shot(page, name, tall = false) {
  const file = path.join(OUT, name);
  if (tall) {
    // The whole page, by growing the window (a full-page capture would cut the sidebar).
    const height = await page.evaluate(() => {
      const main = document
        .querySelector('home-assistant')
        ?.shadowRoot?.querySelector('home-assistant-main');
      let tallest = document.documentElement.scrollHeight;
      const walk = (root) => {
        for (const el of root.querySelectorAll('*')) {
          if (el.scrollHeight > tallest && el.clientHeight < el.scrollHeight) {
            tallest = Math.max(tallest, el.scrollHeight + el.getBoundingClientRect().top);
          }
          if (el.shadowRoot) walk(el.shadowRoot);
        }
      };
      walk(main?.shadowRoot || document);
      return Math.ceil(tallest);
    });
    await page.setViewportSize({ width: VIEWPORT.width, height: Math.min(1400, height) });
    await settle(page, 800);
  }
  await page.screenshot({ path: file });
  if (tall) await page.setViewportSize(VIEWPORT);
  console.log(`screenshots: wrote ${path.relative(REPO, file)}`);
}

function carolCode() {
  // A third node's invite code, made by the engine's command line (no Home Assistant).
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'mynas-carol-'));
  try {
    const python = env('MYNAS_DEMO_PYTHON');
    const key = path.join(dir, 'carol.key');
    execFileSync(python, ['-m', 'custom_components.mynas.engine', 'keygen', '--key', key], {
      cwd: REPO,
      stdio: 'ignore',
    });
    const out = execFileSync(
      python,
      [
        '-m',
        'custom_components.mynas.engine',
        'invite',
        '--key',
        key,
        '--name',
        'Carol',
        '--address',
        'carol.example.net:8022',
      ],
      { cwd: REPO, encoding: 'utf-8' },
    );
    return out.trim().split('\n').pop().trim();
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

async function integrationPage(page, url) {
  await goto(page, `${url}/config/integrations/integration/mynas`);
  await page.getByText('Family', { exact: true }).first().waitFor();
  await settle(page);
  await shot(page, 'integration.png', true);
}

async function inviteCode(page, url) {
  await goto(page, `${url}/config/integrations/integration/mynas`);
  await page.getByText('Family', { exact: true }).first().waitFor();
  await settle(page, 500);
  // The node's own gear, "Configure" (its options); the peers' and folders' gears are
  // "Change peer" and "Change folder".
  await page.getByRole('button', { name: 'Configure', exact: true }).first().click();
  const dialog = page.locator('dialog-data-entry-flow');
  await dialog.getByText('Show our invite code').first().click();
  await dialog.getByText('Our invite code').first().waitFor();
  await settle(page, 800);
  await shot(page, 'invite-code.png');
  await page.keyboard.press('Escape');
  await dialog.waitFor({ state: 'detached' }).catch(() => {});
}

async function pairing(page, url) {
  await goto(page, `${url}/config/integrations/integration/mynas`);
  await page.getByText('Family', { exact: true }).first().waitFor();
  await settle(page, 500);
  await page.getByRole('button', { name: 'Add peer' }).first().click();
  const dialog = page.locator('dialog-data-entry-flow');
  await dialog.getByText('Pair with a friend').first().waitFor();
  const field = dialog.locator('textarea').first();
  await field.fill(carolCode());
  await settle(page, 800);
  await shot(page, 'pairing-code.png');
  await dialog.getByRole('button', { name: /^(Next|Submit)$/ }).click();
  await dialog.getByText('Pair with Carol').first().waitFor();
  await settle(page, 800);
  await shot(page, 'pairing-confirm.png');
  await page.keyboard.press('Escape');
}

async function dashboard(page, url) {
  await goto(page, `${url}/${env('MYNAS_DEMO_DASHBOARD')}/backups`);
  await page.locator('hui-gauge-card').first().waitFor();
  await page.getByText('Last backup to Bob').first().waitFor();
  await settle(page, 2500);
  await shot(page, 'dashboard.png', true);
}

async function main() {
  fs.mkdirSync(OUT, { recursive: true });
  const url = env('MYNAS_DEMO_ALICE_URL');
  const only = process.argv.slice(2);
  const wanted = (name) => only.length === 0 || only.includes(name);
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-dev-shm-usage',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  });
  try {
    const { page } = await openHass(browser, url);
    if (wanted('integration')) await integrationPage(page, url);
    if (wanted('invite')) await inviteCode(page, url);
    if (wanted('pairing')) await pairing(page, url);
    if (wanted('dashboard')) await dashboard(page, url);
  } finally {
    await browser.close();
  }
}

main().catch((err) => {
  console.error(`screenshots: ${err.stack || err}`);
  process.exit(1);
});
