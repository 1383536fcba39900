#!/usr/bin/env node
// Real-browser test of the page and roomcast.js against a server configured like production:
// access tokens, a listed password room, direct messages, history paging, a tight rate limit,
// CORS for another origin, at desktop width and at 360 px.
//
//   node tests/browser/client.mjs CONFIG.json
//
// CONFIG (written by tests/browser.rs): { base, tokens: {alice,bob,carol,bad}, password,
// corsListedPort, corsOtherPort, artifacts }. Screenshots go to `artifacts`.

import { chromium } from 'playwright-core';
import { check, assert, setupFailed, finish, onFailure } from './harness.mjs';
import http from 'node:http';
import fs from 'node:fs';

const cfg = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const TIMEOUT = 10_000;
const base = cfg.base;
fs.mkdirSync(cfg.artifacts, { recursive: true });


let browser;
const servers = [];
const pageErrors = [];
/** Every page opened, by name: what a failed check shows of each. */
const opened = new Map();
onFailure(async () => {
  for (const [name, page] of opened) {
    if (page.isClosed()) continue;
    await page.screenshot({ path: `${cfg.artifacts}/failed-${name}.png` });
    const state = await page.evaluate(() => ({
      status: document.querySelector('#status')?.textContent,
      rooms: Array.from(document.querySelectorAll('#room-list li'), (li) => `${li.dataset.room}:${li.dataset.password}`),
      tabs: Array.from(document.querySelectorAll('.tab'), (t) => t.dataset.room),
      forms: Array.from(document.querySelectorAll('.password-form'), (f) => `${f.dataset.room}:${f.textContent.trim()}`),
    }));
    console.log(`     ${name}: ${JSON.stringify(state)}`);
  }
});
const watchdog = setTimeout(() => { console.log('FAIL watchdog'); process.exit(1); }, 150_000);

/** A tiny page on another origin that fetches the roomcast API with a token. */
function otherOrigin(port) {
  const html = `<!doctype html><title>other</title><script>
    window.probe = async (url, token) => {
      try { const r = await fetch(url, { headers: token ? { Authorization: 'Bearer ' + token } : {} });
            return 'status ' + r.status; }
      catch (e) { return 'blocked'; } };</script>`;
  const s = http.createServer((_, res) => { res.writeHead(200, { 'content-type': 'text/html' }); res.end(html); });
  servers.push(s);
  return new Promise((ok) => s.listen(port, '127.0.0.1', ok));
}

try {
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium', headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking'],
  });
  async function open(name, { width = 1100, height = 700, hash = '' } = {}) {
    const context = await browser.newContext({ viewport: { width, height } });
    const page = await context.newPage();
    page.setDefaultTimeout(TIMEOUT);
    page.on('pageerror', (e) => pageErrors.push(`${name}: ${e.message}`));
    opened.set(name, page);
    await page.goto(`${base}/${hash}`);
    return page;
  }
  const msgs = (room) => `.messages[data-room="${room}"] .msg`;
  async function join(page, room) {
    await page.fill('#room-input', room);
    await page.click('#join-btn');
    await page.locator(`.tab[data-room="${room}"]`).waitFor();
  }
  async function joined(page, room) {
    await page.waitForFunction((s) => document.querySelector(s)?.dataset.count !== '', `.members[data-room="${room}"]`);
  }
  async function say(page, room, text) {
    await page.click(`.tab[data-room="${room}"]`);
    await page.fill('#message-input', text);
    await page.click('#send-btn');
  }

  let alice, bob, carol;
  await check('without a token the page says why it is refused and asks for one (no endless reconnecting)', async () => {
    const anon = await open('anon');
    await anon.locator('#status[data-state="failed"]').waitFor();
    assert(await anon.locator('#auth').isVisible(), 'no token field');
    const why = await anon.textContent('#auth-error');
    assert(/token/.test(why), `reason shown: ${JSON.stringify(why)}`);
    await anon.fill('#token-input', cfg.tokens.bad);
    await anon.click('#token-btn');
    await anon.locator('#auth-error', { hasText: 'invalid' }).waitFor();
    await anon.screenshot({ path: `${cfg.artifacts}/refused-desktop.png` });
    await anon.fill('#token-input', cfg.tokens.carol);
    await anon.click('#token-btn');
    await anon.locator('#status[data-state="connected"]', { hasText: 'carol' }).waitFor();
    carol = anon;
  });

  await check('alice and bob connect with #token= and chat', async () => {
    bob = await open('bob', { hash: `#token=${cfg.tokens.bob}` });
    await bob.locator('#status[data-state="connected"]').waitFor();
    // bob is in the password room through the library itself, so that it is listed.
    await bob.evaluate((pw) => window.roomcast.client.join('club', { password: pw }), cfg.password);
    alice = await open('alice', { hash: `#token=${cfg.tokens.alice}` });
    for (const [n, p] of [['alice', alice], ['bob', bob]]) {
      await p.locator('#status[data-state="connected"]', { hasText: n }).waitFor();
      assert(!(await p.url()).includes('token='), 'the token stayed in the URL');
    }
    await join(alice, 'general'); await joined(alice, 'general');
    await join(bob, 'general'); await joined(bob, 'general');
    await say(alice, 'general', 'hello bob');
    await bob.locator(msgs('general'), { hasText: 'hello bob' }).waitFor();
    const mine = await alice.locator(msgs('general'), { hasText: 'hello bob' }).getAttribute('class');
    const theirs = await bob.locator(msgs('general'), { hasText: 'hello bob' }).getAttribute('class');
    assert(mine.includes('mine') && !theirs.includes('mine'), `mine by id: ${mine} / ${theirs}`);
  });

  await check('the member list shows who is in the room and follows presence', async () => {
    await alice.locator('.member-list[data-room="general"] li[data-user="bob"]').waitFor();
    await carol.locator('#room-list li[data-room="general"]').waitFor();
    // The joiner's list comes with its welcome: no room-info request.
    const infoReads = [];
    carol.on('request', (req) => { if (new URL(req.url()).pathname === '/api/rooms/general') infoReads.push(req.url()); });
    await join(carol, 'general'); await joined(carol, 'general');
    for (const name of ['alice', 'bob', 'carol']) {
      await carol.locator(`.member-list[data-room="general"] li[data-user="${name}"]`).waitFor();
    }
    assert(infoReads.length === 0, `the page read the room info: ${infoReads.join(', ')}`);
    const roster = await carol.evaluate(() => window.roomcast.client.roster('general'));
    const names = roster.users.map((u) => u.user).sort().join(',');
    assert(names === 'alice,bob,carol' && !roster.more, `roster ${JSON.stringify(roster)}`);
    await alice.locator('.member-list[data-room="general"] li[data-user="carol"]').waitFor();
  });

  await check('a password room is marked in the list; the page asks for the password and says when it is wrong', async () => {
    await alice.locator('#room-list li[data-room="club"][data-password="true"]').waitFor();
    // bob's page was open before the room existed: it learnt the room from $lobby, not from
    // GET /api/rooms, and must mark it all the same.
    await bob.locator('#room-list li[data-room="club"][data-password="true"]').waitFor();
    await alice.click('#room-list li[data-room="club"]');
    const form = alice.locator('.password-form[data-room="club"]');
    await form.waitFor();
    await form.locator('input').fill('wrong');
    await form.locator('button').click();
    await alice.locator('.password-form[data-room="club"]', { hasText: 'wrong password' }).waitFor();
    await form.locator('input').fill(cfg.password);
    await form.locator('button').click();
    await joined(alice, 'club');
    assert(await form.isHidden(), 'the password form stayed open');
  });

  await check('alice opens a DM with bob from the member list; bob joins it; carol is refused', async () => {
    await alice.click('.tab[data-room="general"]');
    await alice.click('.member-list[data-room="general"] li[data-user="bob"]');
    await joined(alice, 'dm:alice+bob');
    await join(bob, 'dm:alice+bob'); await joined(bob, 'dm:alice+bob');
    await say(alice, 'dm:alice+bob', 'just between us');
    await bob.locator(msgs('dm:alice+bob'), { hasText: 'just between us' }).waitFor();
    await join(carol, 'dm:alice+bob');
    await carol.locator('.pane[data-room="dm:alice+bob"] .state', { hasText: 'forbidden_room' }).waitFor();
    assert((await carol.locator(msgs('dm:alice+bob')).count()) === 0, 'carol sees the DM');
  });

  await check('"load older" pages history back through the REST API', async () => {
    for (let i = 1; i <= 60; i++) {
      const r = await fetch(`${base}/api/rooms/paged/messages`, { method: 'POST',
        headers: { Authorization: 'Bearer ' + cfg.tokens.alice, 'content-type': 'application/json' },
        body: JSON.stringify({ text: `old ${i}` }) });
      if (r.status === 404 && i === 1) { await join(bob, 'paged'); await joined(bob, 'paged'); i = 0; continue; }
      assert(r.status === 202, `publish ${i}: ${r.status}`);
    }
    await join(alice, 'paged'); await joined(alice, 'paged');
    await alice.locator(msgs('paged'), { hasText: 'old 60' }).waitFor();
    assert((await alice.locator(msgs('paged'), { hasText: /^.*old 5$/ }).count()) === 0, 'old 5 shown before paging');
    await alice.click('.messages[data-room="paged"] .older');
    await alice.locator(msgs('paged'), { hasText: 'old 10' }).first().waitFor();
    const seqs = await alice.locator(msgs('paged')).evaluateAll((els) => els.map((e) => Number(e.dataset.seq)));
    for (let i = 1; i < seqs.length; i++) assert(seqs[i] > seqs[i - 1], `out of order: ${seqs.join(',')}`);
    assert(await alice.locator('.messages[data-room="paged"] .older').isHidden(), 'load older still offered at the start');
  });

  await check('a rate-limited message stays in the input with the wait shown', async () => {
    await alice.click('.tab[data-room="general"]');
    // Faster than a hand can type: 12 sends in one go against a burst of 8.
    await alice.evaluate(() => {
      const input = document.querySelector('#message-input');
      const form = document.querySelector('#send-form');
      for (let i = 0; i < 12; i++) { input.value = `burst ${i}`; form.requestSubmit(); }
    });
    await alice.locator('#send-hint', { hasText: 'wait' }).waitFor();
    const value = await alice.inputValue('#message-input');
    assert(/^burst \d+$/.test(value), `input after a refusal: ${JSON.stringify(value)}`);
    await alice.screenshot({ path: `${cfg.artifacts}/chat-desktop.png` });
  });

  await check('at 360 px wide the page fits: no horizontal scroll, rooms behind the menu button', async () => {
    const phone = await open('phone', { width: 360, height: 740, hash: `#token=${cfg.tokens.bob}` });
    await phone.locator('#status[data-state="connected"]').waitFor();
    await phone.click('#menu-btn');
    await phone.fill('#room-input', 'general');
    await phone.click('#join-btn');
    await joined(phone, 'general');
    await phone.locator(msgs('general'), { hasText: 'hello bob' }).first().waitFor();
    const overflow = await phone.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    assert(overflow <= 0, `page is ${overflow}px wider than the screen`);
    const send = await phone.locator('#send-btn').boundingBox();
    assert(send && send.x + send.width <= 360, `send button off screen: ${JSON.stringify(send)}`);
    await phone.screenshot({ path: `${cfg.artifacts}/chat-360.png` });
    await phone.click('#menu-btn');
    await phone.screenshot({ path: `${cfg.artifacts}/rooms-360.png` });
  });

  await check('CORS: a listed origin reads the API with a token; another origin is blocked', async () => {
    await otherOrigin(cfg.corsListedPort);
    await otherOrigin(cfg.corsOtherPort);
    const listed = await open('listed');
    await listed.goto(`http://127.0.0.1:${cfg.corsListedPort}/`);
    const ok = await listed.evaluate(([u, t]) => window.probe(u, t), [`${base}/api/rooms`, cfg.tokens.alice]);
    assert(ok === 'status 200', `listed origin: ${ok}`);
    const other = await open('other');
    await other.goto(`http://127.0.0.1:${cfg.corsOtherPort}/`);
    const no = await other.evaluate(([u, t]) => window.probe(u, t), [`${base}/api/rooms`, cfg.tokens.alice]);
    assert(no === 'blocked', `unlisted origin: ${no}`);
  });

  await check('no JavaScript errors on any page', async () => { assert(pageErrors.length === 0, pageErrors.join('; ')); });
} catch (err) {
  setupFailed(err);
} finally {
  clearTimeout(watchdog);
  for (const s of servers) s.close();
  try { await browser?.close(); } catch { /* ignore */ }
}
finish();
