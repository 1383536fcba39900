#!/usr/bin/env node
// Real-browser test of the page's built-in accounts (a server run with --accounts-db and a
// short --accounts-token-ttl): register, log in, chat, the token refreshed while the socket
// stays up, a reload that stays logged in, a wrong password, log out.
//
//   node tests/browser/accounts.mjs http://127.0.0.1:PORT
//
// Prints one line per check and exits 0 only if every check passed.

import { chromium } from 'playwright-core';
import { check, assert, setupFailed, finish } from './harness.mjs';

const TIMEOUT = 10_000;
const base = (process.argv[2] || '').replace(/\/+$/, '');
if (!/^https?:\/\/[^/]+$/.test(base)) {
  console.error('usage: node tests/browser/accounts.mjs http://127.0.0.1:PORT');
  process.exit(2);
}
const ROOM = 'accounts-test';
const PASSWORD = 'correct horse battery';
const nonce = Math.random().toString(36).slice(2, 8);


let browser;
const pageErrors = [];
const watchdog = setTimeout(() => { console.log('FAIL watchdog'); process.exit(1); }, 120_000);
const msgs = (room) => `.messages[data-room="${room}"] .msg`;

try {
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium', headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking'],
  });
  /** A page in a context of its own, counting its WebSockets and its logins. */
  async function open(name) {
    const context = await browser.newContext({ viewport: { width: 1100, height: 700 } });
    const page = await context.newPage();
    page.setDefaultTimeout(TIMEOUT);
    page.on('pageerror', (e) => pageErrors.push(`${name}: ${e.message}`));
    page.sockets = 0;
    page.logins = 0;
    page.on('websocket', () => { page.sockets += 1; });
    page.on('request', (r) => { if (new URL(r.url()).pathname === '/token') page.logins += 1; });
    await page.goto(`${base}/`);
    return page;
  }
  async function connected(page, name) {
    await page.locator('#status[data-state="connected"]').waitFor({ timeout: TIMEOUT });
    const text = await page.textContent('#status');
    assert(text.includes(name), `status ${JSON.stringify(text)}`);
  }
  async function join(page, room) {
    await page.fill('#room-input', room);
    await page.click('#join-btn');
    await page.waitForFunction((s) => document.querySelector(s)?.dataset.count !== '',
      `.members[data-room="${room}"]`, { timeout: TIMEOUT });
  }
  async function say(page, room, text) {
    await page.click(`.tab[data-room="${room}"]`);
    await page.fill('#message-input', text);
    await page.click('#send-btn');
  }
  async function sees(page, room, text) {
    await page.locator(msgs(room), { hasText: text }).first().waitFor({ state: 'attached', timeout: TIMEOUT });
  }
  const stored = (page) => page.evaluate(() => sessionStorage.getItem('roomcast.token'));

  let alice, bob;

  await check('the page asks to log in or register instead of a name or a raw token', async () => {
    alice = await open('alice');
    await alice.locator('#account').waitFor({ state: 'visible' });
    assert(await alice.isVisible('#register-btn'), 'no register button (registration is open)');
    assert(!(await alice.isVisible('#user')), 'the free name field is shown');
    assert(!(await alice.isVisible('#auth')), 'the raw token field is shown');
    assert(alice.sockets === 0, 'a socket was opened before logging in');
  });

  await check('a password against the rules is refused with the rule, and nothing is stored', async () => {
    await alice.fill('#account-user', 'alice');
    await alice.fill('#account-password', 'short');
    await alice.click('#register-btn');
    await alice.locator('#account-error', { hasText: 'shorter than 8' }).waitFor();
    assert((await stored(alice)) === null, 'a token was stored');
  });

  await check('alice registers and is connected as herself', async () => {
    await alice.fill('#account-password', PASSWORD);
    await alice.click('#register-btn');
    await connected(alice, 'alice');
    assert((await alice.textContent('#account-name')) === 'alice', 'account name not shown');
    assert(!(await alice.isVisible('#account')), 'the login form is still shown');
    assert((await alice.inputValue('#account-password')) === '', 'the password stays in the field');
  });

  const hello = `hello from alice ${nonce}`;
  await check('alice chats in a room', async () => {
    await join(alice, ROOM);
    await say(alice, ROOM, hello);
    await sees(alice, ROOM, hello);
  });

  await check('bob registers in another browser and they talk', async () => {
    bob = await open('bob');
    await bob.fill('#account-user', 'bob');
    await bob.fill('#account-password', PASSWORD);
    await bob.click('#register-btn');
    await connected(bob, 'bob');
    await join(bob, ROOM);
    await sees(bob, ROOM, hello);
    const reply = `reply from bob ${nonce}`;
    await say(bob, ROOM, reply);
    await sees(alice, ROOM, reply);
    const who = await alice.locator(msgs(ROOM), { hasText: reply }).first().locator('.user').textContent();
    assert(who === 'bob', `the reply is from ${who}`);
  });

  await check('a wrong password gets the server\'s refusal and no token', async () => {
    const mallory = await open('mallory');
    await mallory.fill('#account-user', 'alice');
    await mallory.fill('#account-password', 'not her password');
    await mallory.click('#login-btn');
    await mallory.locator('#account-error', { hasText: 'wrong user name or password' }).waitFor();
    assert((await stored(mallory)) === null, 'a token was stored');
    assert(mallory.sockets === 0, 'a socket was opened');
    await mallory.context().close();
  });

  await check('the short-lived token is refreshed while the socket stays up', async () => {
    const first = await stored(alice);
    await alice.waitForFunction((t) => {
      const now = sessionStorage.getItem('roomcast.token');
      return now && now !== t;
    }, first, { timeout: TIMEOUT });
    const later = `after a refresh ${nonce}`;
    await say(alice, ROOM, later);
    await sees(bob, ROOM, later);
    assert(alice.sockets === 1, `alice's page opened ${alice.sockets} WebSockets`);
    assert(alice.logins === 1, `alice's page posted /token ${alice.logins} times`);
  });

  await check('a reload keeps alice logged in, without her password', async () => {
    await alice.reload();
    await connected(alice, 'alice');
    assert(!(await alice.isVisible('#account')), 'the login form is shown after a reload');
    assert(alice.logins === 1, `the reload logged in again (${alice.logins} POST /token)`);
    await join(alice, ROOM);
    await sees(alice, ROOM, hello);
  });

  await check('log out forgets the token; a reload stays logged out; logging in again works', async () => {
    await alice.click('#logout-btn');
    await alice.locator('#account').waitFor({ state: 'visible' });
    assert((await stored(alice)) === null, 'the token is still stored');
    await alice.reload();
    await alice.locator('#account').waitFor({ state: 'visible' });
    await alice.fill('#account-user', 'ALICE');
    await alice.fill('#account-password', PASSWORD);
    await alice.click('#login-btn');
    await connected(alice, 'alice');
  });

  await check('no JavaScript errors on any page', async () => {
    assert(pageErrors.length === 0, pageErrors.join('; '));
  });
} catch (err) {
  setupFailed(err);
} finally {
  clearTimeout(watchdog);
  try { await browser?.close(); } catch { /* ignore */ }
}
finish();
