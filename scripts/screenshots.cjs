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
//   docs/folder-what.png     "Protect a folder": the folders found on the disk offered
//   docs/folder-when.png     its second step: when, as a menu
//   docs/folder-daily.png    daily: a time without seconds
//   docs/repair-issue.png    a repair issue (Bob's node stopped): since when, what is not
//                            copied, try again now or change the address
//   docs/recovery-kit.png    the "Save your recovery kit" repair issue's dialog: the recovery
//                            code, its QR code, when it is needed (the kit is not confirmed)
//   docs/restore-form.png    Developer tools -> Actions -> mynas.restore, with its selectors
//   docs/dashboard.png       the MyNAS dashboard (dashboards/mynas.yaml)
//   docs/dashboard-fr.png    the same in French (dashboards/mynas.fr.yaml), Home Assistant
//                            in French
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

async function openHass(browser, url, language = 'en') {
  const tokens = await hassTokens(url, env('MYNAS_DEMO_USER'), env('MYNAS_DEMO_PASSWORD'));
  const context = await browser.newContext({
    viewport: VIEWPORT,
    deviceScaleFactor: 1,
    colorScheme: 'light',
    locale: language === 'fr' ? 'fr-FR' : 'en-US',
    timezoneId: 'Europe/Berlin',
  });
  await context.addInitScript(
    ([stored, lang]) => {
      window.localStorage.setItem('hassTokens', JSON.stringify(stored));
      // Keep the sidebar expanded and skip "what's new" style prompts.
      window.localStorage.setItem('dockedSidebar', JSON.stringify('docked'));
      window.localStorage.setItem('selectedLanguage', JSON.stringify(lang));
    },
    [tokens, language],
  );
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

// A websocket command through the page's own connection to Home Assistant.
async function callWS(page, message) {
  return page.evaluate((msg) => document.querySelector('home-assistant').hass.callWS(msg), message);
}

async function mynasEntry(page) {
  const entries = await callWS(page, { type: 'config_entries/get', domain: 'mynas' });
  return entries[0].entry_id;
}

async function folderDialog(page, url) {
  // "Protect a folder": what and where first (the folders found on the backup disk offered,
  // one friend already ticked), then when, as a menu. Closed before anything is created.
  await goto(page, `${url}/config/integrations/integration/mynas`);
  await page.getByText('Family', { exact: true }).first().waitFor();
  await settle(page, 500);
  await page.getByRole('button', { name: 'Protect a folder' }).first().click();
  const dialog = page.locator('dialog-data-entry-flow');
  await dialog.getByText('Next: when to copy it').first().waitFor();
  await dialog.getByRole('textbox', { name: 'Name' }).first().fill('Photos');
  // The folder picker (a select that also takes a typed path), opened on what it found.
  await dialog.locator('ha-selector-select ha-picker-field').first().click();
  const found = page.locator('ha-combo-box-item', { hasText: '/Family' }).first();
  await found.waitFor();
  await settle(page, 800);
  await shot(page, 'folder-what.png');
  await found.click();
  await settle(page, 300);
  // Further down the same form: the copy encrypted, on by default.
  const encrypt = dialog.getByText('Encrypt the copy (recommended)').first();
  await encrypt.scrollIntoViewIfNeeded();
  await settle(page, 500);
  await shot(page, 'folder-encrypt.png');
  await dialog.getByRole('button', { name: /^(Next|Submit)$/ }).click();
  await dialog.getByText('When to copy Photos').first().waitFor();
  await settle(page, 800);
  await shot(page, 'folder-when.png');
  await dialog.getByText('Daily at a time').first().click();
  await dialog.getByText('Copy Photos daily').first().waitFor();
  await settle(page, 800);
  await shot(page, 'folder-daily.png');
  await page.keyboard.press('Escape');
}

async function repairIssue(browser, page, url) {
  // Bob's node stops (his MyNAS entry disabled): Alice's next sync fails, and the repair
  // issue says since when, what is not copied, and offers to try again or change the address.
  const bob = await openHass(browser, env('MYNAS_DEMO_BOB_URL'));
  await goto(bob.page, env('MYNAS_DEMO_BOB_URL'));
  const bobEntry = await mynasEntry(bob.page);
  await callWS(bob.page, { type: 'config_entries/disable', entry_id: bobEntry, disabled_by: 'user' });
  try {
    await goto(page, `${url}/config/repairs`);
    await callWS(page, {
      type: 'call_service',
      domain: 'mynas',
      service: 'sync',
      service_data: { wait: true },
      return_response: true,
    });
    await page.getByText('Bob does not answer').first().waitFor();
    await settle(page, 800);
    await page.getByText('Bob does not answer').first().click();
    const dialog = page.locator('dialog-repairs-issue, dialog-data-entry-flow').first();
    await dialog.getByText('Try again now').first().waitFor();
    await settle(page, 800);
    await shot(page, 'repair-issue.png');
    await page.keyboard.press('Escape');
  } finally {
    await callWS(bob.page, { type: 'config_entries/disable', entry_id: bobEntry, disabled_by: null });
    await bob.context.close();
  }
  // Bob is back: a sync goes through and takes the issue away.
  for (let attempt = 0; attempt < 20; attempt += 1) {
    await page.waitForTimeout(1000);
    const reply = await callWS(page, {
      type: 'call_service',
      domain: 'mynas',
      service: 'sync',
      service_data: { wait: true },
      return_response: true,
    }).catch(() => null);
    const results = reply?.response?.results || [];
    if (results.length && results.every((r) => r.status === 'success')) break;
  }
}

async function recoveryKit(page, url) {
  // Settings -> Repairs -> "Save the recovery kit of Alice": the code, its QR code, the box.
  await goto(page, `${url}/config/repairs`);
  await page.getByText('Save the recovery kit of Alice').first().waitFor();
  await settle(page, 800);
  await page.getByText('Save the recovery kit of Alice').first().click();
  const dialog = page.locator('dialog-data-entry-flow').first();
  await dialog.getByText('I stored the recovery code outside the house').first().waitFor();
  // The QR code is an image in the description's markdown: wait until it is drawn.
  await page.waitForFunction(() => {
    const find = (root) => {
      for (const el of root.querySelectorAll('*')) {
        if (el.tagName === 'IMG' && el.src.startsWith('data:image/svg+xml')) return el;
        const inner = el.shadowRoot && find(el.shadowRoot);
        if (inner) return inner;
      }
      return null;
    };
    const img = find(document);
    return img && img.complete && img.naturalWidth > 0;
  });
  await settle(page, 800);
  await shot(page, 'recovery-kit.png', true);
  await page.keyboard.press('Escape');
  await page.setViewportSize(VIEWPORT);
}

async function restoreForm(page, url) {
  // Developer tools -> Actions -> mynas.restore: folder and peer picked as devices.
  await goto(page, url);
  const devices = await callWS(page, { type: 'config/device_registry/list' });
  const device = (model) => devices.find((d) => d.model === model && d.manufacturer === 'MyNAS');
  const data = {
    folder: device('Protected folder')?.id,
    peer: device('Peer')?.id,
    target: '/media/backup/restored',
  };
  await page.evaluate((picked) => {
    localStorage.setItem(
      'panel-dev-action-state-service-data',
      JSON.stringify({ action: 'mynas.restore', target: {}, data: picked }),
    );
    localStorage.setItem('panel-dev-action-state-yaml-mode', JSON.stringify(false));
  }, data);
  await goto(page, `${url}/developer-tools/action`);
  await page.getByText('The folder to get back', { exact: false }).first().waitFor();
  await settle(page, 1500);
  await shot(page, 'restore-form.png', true);
}

async function dashboardFrench(browser, url) {
  // The French dashboard (dashboards/mynas.fr.yaml), with Home Assistant itself in French.
  const { context, page } = await openHass(browser, url, 'fr');
  await goto(page, url);
  // Entity names are translated when the entry loads: reload it in each language.
  const entry = await mynasEntry(page);
  const reload = (language) =>
    page.evaluate(
      async ({ id, lang }) => {
        const hass = document.querySelector('home-assistant').hass;
        await hass.callWS({ type: 'config/core/update', language: lang });
        await hass.callApi('POST', `config/config_entries/entry/${id}/reload`);
      },
      { id: entry, lang: language },
    );
  await reload('fr');
  try {
    await goto(page, `${url}/${env('MYNAS_DEMO_DASHBOARD_FR')}/sauvegardes`);
    await page.locator('hui-gauge-card').first().waitFor();
    await page.getByText('Copie chez Bob').first().waitFor();
    await settle(page, 2500);
    await shot(page, 'dashboard-fr.png', true);
  } finally {
    await reload('en');
    await context.close();
  }
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
    if (wanted('folder')) await folderDialog(page, url);
    if (wanted('repair')) await repairIssue(browser, page, url);
    if (wanted('kit')) await recoveryKit(page, url);
    if (wanted('restore')) await restoreForm(page, url);
    if (wanted('dashboard')) await dashboard(page, url);
    if (wanted('french')) await dashboardFrench(browser, url);
  } finally {
    await browser.close();
  }
}

main().catch((err) => {
  console.error(`screenshots: ${err.stack || err}`);
  process.exit(1);
});
