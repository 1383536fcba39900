#!/usr/bin/env node
// Real-browser test of roomcast's embedded chat page (web/index.html).
//
//   node tests/browser/chat.mjs http://127.0.0.1:PORT
//
// Needs a running roomcast server at that address and a chromium binary
// ($CHROMIUM, default /usr/bin/chromium); playwright-core never downloads one.
// Set SCREENSHOT=/path/to/file.png to save a screenshot of one page at the end.
// Prints one line per check and exits 0 only if every check passed.

import { chromium } from 'playwright-core';
import { check, assert, setupFailed, finish } from './harness.mjs';

const TIMEOUT = 10_000;          // per auto-wait
const QUIET_MS = 1_000;          // how long to wait before asserting that something did NOT arrive
const WATCHDOG_MS = 120_000;     // whole run

const base = (process.argv[2] || '').replace(/\/+$/, '');
if (!/^https?:\/\/[^/]+$/.test(base)) {
  console.error('usage: node tests/browser/chat.mjs http://127.0.0.1:PORT');
  process.exit(2);
}

const LOBBY = 'lobby-test';
const OTHER = 'other-test';
const SECOND = 'second-test';
const XSS = '<img src=x onerror=window.__xss=1>';
const nonce = Math.random().toString(36).slice(2, 8);

const started = Date.now();

// ---- selectors (the page's stable hooks) ----
const sel = {
  status: '#status',
  tab: (room) => `.tab[data-room="${room}"]`,
  msgs: (room) => `.messages[data-room="${room}"] .msg`,
  members: (room) => `.members[data-room="${room}"]`,
  presence: (room) => `.messages[data-room="${room}"] .presence`,
};

/** wait until a message with this text is in the room's pane (visible or not). */
async function waitMsg(page, room, text) {
  try {
    await page.locator(sel.msgs(room), { hasText: text }).first().waitFor({ state: 'attached', timeout: TIMEOUT });
  } catch (err) {
    const who = await page.evaluate(() => window.roomcast?.user).catch(() => '?');
    throw new Error(`${who} did not show ${JSON.stringify(text)} in ${room} within ${TIMEOUT / 1000}s`);
  }
}

/** number of messages anywhere on the page containing `text`. */
async function countMsgAnywhere(page, text) {
  return page.locator('.msg', { hasText: text }).count();
}

async function countMsgIn(page, room, text) {
  return page.locator(sel.msgs(room), { hasText: text }).count();
}

async function joinRoom(page, room) {
  await page.fill('#room-input', room);
  await page.click('#join-btn');
  await page.locator(sel.tab(room)).waitFor({ state: 'visible', timeout: TIMEOUT });
  // joined once the server's welcome filled in the member count
  await page.waitForFunction(
    (s) => { const m = document.querySelector(s); return m && m.dataset.count !== ''; },
    sel.members(room), { timeout: TIMEOUT });
}

async function sendIn(page, room, text) {
  await page.click(sel.tab(room));
  await page.locator(`${sel.tab(room)}.active`).waitFor({ timeout: TIMEOUT });
  await page.fill('#message-input', text);
  await page.click('#send-btn', { timeout: TIMEOUT });   // auto-waits until enabled (joined + connected)
}

async function membersCount(page, room) {
  return page.locator(sel.members(room)).getAttribute('data-count', { timeout: TIMEOUT });
}

let browser;
const watchdog = setTimeout(async () => {
  console.log(`FAIL watchdog: test still running after ${WATCHDOG_MS / 1000}s`);
  try { await browser?.close(); } catch { /* ignore */ }
  process.exit(1);
}, WATCHDOG_MS);

const pageErrors = [];
const sockets = new Map();   // name -> number of WebSockets the page opened
const roomListFetches = new Map();   // name -> GET /api/rooms requests the page made

try {
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });

  async function openUser(name) {
    const context = await browser.newContext({ viewport: { width: 1100, height: 700 } });
    const page = await context.newPage();
    page.setDefaultTimeout(TIMEOUT);
    sockets.set(name, 0);
    page.on('websocket', () => sockets.set(name, sockets.get(name) + 1));
    roomListFetches.set(name, 0);
    page.on('request', (r) => {
      if (new URL(r.url()).pathname === '/api/rooms') roomListFetches.set(name, roomListFetches.get(name) + 1);
    });
    page.on('pageerror', (e) => pageErrors.push(`${name}: ${e.message}`));
    await page.goto(`${base}/?user=${encodeURIComponent(name)}`, { timeout: TIMEOUT });
    return page;
  }

  let alice, bob, carol;

  await check('page loads (GET /) in three browser contexts', async () => {
    [alice, bob, carol] = await Promise.all([openUser('alice'), openUser('bob'), openUser('carol')]);
    for (const p of [alice, bob, carol]) {
      assert((await p.title()) === 'roomcast', `unexpected title ${JSON.stringify(await p.title())}`);
    }
  });

  await check('status shows connected on every page', async () => {
    for (const [name, p] of [['alice', alice], ['bob', bob], ['carol', carol]]) {
      await p.locator(`${sel.status}[data-state="connected"]`).waitFor({ timeout: TIMEOUT });
      const text = await p.textContent(sel.status);
      assert(/connected/.test(text) && text.includes(name), `${name}: status text ${JSON.stringify(text)}`);
    }
  });

  await check('the browser offers permessage-deflate and the server agrees', async () => {
    // A socket of the test's own, on a page of its own (the others count their sockets): what
    // Chromium negotiated with the server.
    const context = await browser.newContext();
    const page = await context.newPage();
    await page.goto(`${base}/healthz`, { timeout: TIMEOUT });
    const ext = await page.evaluate((url) => new Promise((resolve, reject) => {
      const ws = new WebSocket(url);
      ws.onopen = () => { resolve(ws.extensions); ws.close(); };
      ws.onerror = () => reject(new Error('socket failed'));
    }), base.replace(/^http/, 'ws') + `/ws/deflate-${nonce}?user=zip`);
    await context.close();
    assert(ext.startsWith('permessage-deflate') && ext.includes('server_no_context_takeover')
      && ext.includes('client_no_context_takeover'), `extensions ${JSON.stringify(ext)}`);
  });

  await check('invalid room name is refused client-side', async () => {
    await carol.fill('#room-input', 'bad room!');
    await carol.click('#join-btn');
    await carol.locator('#room-error').filter({ hasText: 'Room names' }).waitFor({ timeout: TIMEOUT });
    assert((await carol.locator('.tab').count()) === 0, 'a tab was opened for an invalid room');
    await carol.fill('#room-input', '');
  });

  await check(`alice and bob join ${LOBBY}, carol joins ${OTHER}`, async () => {
    await joinRoom(alice, LOBBY);
    await joinRoom(bob, LOBBY);
    await joinRoom(carol, OTHER);
  });

  await check(`member count shows 2 in ${LOBBY} (bob from welcome, alice from presence)`, async () => {
    for (const [name, p] of [['bob', bob], ['alice', alice]]) {
      await p.waitForFunction(
        (s) => document.querySelector(s)?.dataset.count === '2', sel.members(LOBBY), { timeout: TIMEOUT },
      ).catch(async () => {
        throw new Error(`${name} shows ${await membersCount(p, LOBBY)} members, expected 2`);
      });
    }
    const text = await bob.textContent(sel.members(LOBBY));
    assert(text.trim() === '2 members', `bob's members label is ${JSON.stringify(text)}`);
  });

  await check(`carol's room list (live from $lobby) shows ${LOBBY} with 2 members`, async () => {
    const item = carol.locator(`#room-list li[data-room="${LOBBY}"]`);
    await carol.waitForFunction(
      (s) => document.querySelector(s)?.querySelector('.count')?.textContent === '2',
      `#room-list li[data-room="${LOBBY}"]`, { timeout: TIMEOUT },
    ).catch(async () => {
      const txt = (await item.count()) ? await item.textContent() : 'nothing';
      throw new Error(`room list shows ${JSON.stringify(txt)} for ${LOBBY}`);
    });
  });

  await check('a room opened elsewhere appears in carol\'s list live, and goes when it closes', async () => {
    const fresh = `fresh-${nonce}`;
    const item = `#room-list li[data-room="${fresh}"]`;
    const fetchesBefore = roomListFetches.get('carol');
    await bob.evaluate((room) => window.roomcast.join(room), fresh);
    await carol.locator(item).waitFor({ state: 'attached', timeout: TIMEOUT })
      .catch(() => { throw new Error(`${fresh} never appeared in carol's room list`); });
    await carol.waitForFunction(
      (s) => document.querySelector(s)?.querySelector('.count')?.textContent === '1', item, { timeout: TIMEOUT },
    ).catch(() => { throw new Error(`${fresh} does not show 1 member in carol's list`); });
    await bob.evaluate((room) => window.roomcast.leave(room), fresh);
    await carol.locator(item).waitFor({ state: 'detached', timeout: TIMEOUT })
      .catch(() => { throw new Error(`${fresh} is still in carol's list after it closed`); });
    assert(roomListFetches.get('carol') === fetchesBefore,
      `carol's page polled GET /api/rooms ${roomListFetches.get('carol') - fetchesBefore} times meanwhile`);
    assert((await carol.locator('#room-list li[data-room="$lobby"]').count()) === 0, '$lobby is listed as a room');
    assert((await carol.locator('.tab[data-room="$lobby"]').count()) === 0, '$lobby has a tab');
  });

  await check('alice sees a presence line "bob joined"', async () => {
    await alice.locator(sel.presence(LOBBY), { hasText: 'bob joined' }).first()
      .waitFor({ state: 'attached', timeout: TIMEOUT });
  });

  const fromAlice = `hello from alice ${nonce}`;
  const fromBob = `reply from bob ${nonce}`;
  const fromCarol = `carol elsewhere ${nonce}`;

  await check("alice's message reaches alice (echo) and bob", async () => {
    await sendIn(alice, LOBBY, fromAlice);
    await waitMsg(alice, LOBBY, fromAlice);
    await waitMsg(bob, LOBBY, fromAlice);
    const line = bob.locator(sel.msgs(LOBBY), { hasText: fromAlice }).first();
    assert((await line.locator('.user').textContent()) === 'alice', 'sender name is not alice');
    assert(/\d/.test(await line.locator('.time').textContent()), 'no time shown');
    assert((await alice.inputValue('#message-input')) === '', 'input not cleared after send');
  });

  await check("bob's reply reaches bob and alice", async () => {
    await sendIn(bob, LOBBY, fromBob);
    await waitMsg(bob, LOBBY, fromBob);
    await waitMsg(alice, LOBBY, fromBob);
  });

  await check(`carol (in ${OTHER}) sees neither`, async () => {
    await carol.waitForTimeout(QUIET_MS);
    assert((await countMsgAnywhere(carol, fromAlice)) === 0, "carol received alice's message");
    assert((await countMsgAnywhere(carol, fromBob)) === 0, "carol received bob's message");
  });

  await check("carol's message reaches carol but not alice or bob", async () => {
    await sendIn(carol, OTHER, fromCarol);
    await waitMsg(carol, OTHER, fromCarol);
    await alice.waitForTimeout(QUIET_MS);
    assert((await countMsgAnywhere(alice, fromCarol)) === 0, "alice received carol's message");
    assert((await countMsgAnywhere(bob, fromCarol)) === 0, "bob received carol's message");
  });

  await check('HTML in a message is shown literally and never executed', async () => {
    await sendIn(alice, LOBBY, XSS);
    for (const [name, p] of [['alice', alice], ['bob', bob]]) {
      await waitMsg(p, LOBBY, XSS);
      const texts = await p.locator(`${sel.msgs(LOBBY)} .text`).allTextContents();
      assert(texts.includes(XSS), `${name}: payload not shown verbatim (got ${JSON.stringify(texts)})`);
      assert((await p.locator('.messages img').count()) === 0, `${name}: an <img> was injected`);
    }
    await alice.waitForTimeout(300);   // give a (wrongly) injected onerror handler time to fire
    for (const [name, p] of [['alice', alice], ['bob', bob], ['carol', carol]]) {
      const v = await p.evaluate(() => typeof window.__xss);
      assert(v === 'undefined', `${name}: window.__xss is ${v}`);
    }
  });

  await check(`a page opening ${LOBBY} later shows its recent history, marked as past`, async () => {
    const dave = await openUser('dave');
    await joinRoom(dave, LOBBY);
    for (const text of [fromAlice, fromBob, XSS]) {
      await dave.locator(`${sel.msgs(LOBBY)}.history`, { hasText: text }).first()
        .waitFor({ state: 'attached', timeout: TIMEOUT })
        .catch(() => { throw new Error(`dave does not show ${JSON.stringify(text)} as history`); });
    }
    await dave.locator(`.messages[data-room="${LOBBY}"] [data-testid="history"]`)
      .filter({ hasText: 'earlier message' }).first().waitFor({ state: 'attached', timeout: TIMEOUT });
    assert((await countMsgIn(dave, LOBBY, fromAlice)) === 1, 'history shown more than once');
    // live messages after the history are not marked as past
    const live = `live after history ${nonce}`;
    await sendIn(alice, LOBBY, live);
    await waitMsg(dave, LOBBY, live);
    const cls = await dave.locator(sel.msgs(LOBBY), { hasText: live }).first().getAttribute('class');
    assert(!cls.includes('history'), `a live message is marked as history (${cls})`);
    await dave.context().close();
  });

  const inLobby = `alice in lobby ${nonce}`;
  const inSecond = `alice in second ${nonce}`;

  await check(`alice has ${LOBBY} and ${SECOND} open at once over one WebSocket`, async () => {
    await joinRoom(alice, SECOND);
    assert((await alice.locator('.tab').count()) === 2, 'alice does not have exactly two tabs');
    await sendIn(alice, SECOND, inSecond);
    await sendIn(alice, LOBBY, inLobby);
    await waitMsg(alice, SECOND, inSecond);
    await waitMsg(alice, LOBBY, inLobby);
    await waitMsg(bob, LOBBY, inLobby);
    await alice.waitForTimeout(QUIET_MS / 2);
    assert((await countMsgIn(alice, LOBBY, inSecond)) === 0, `${SECOND} message shown in the ${LOBBY} tab`);
    assert((await countMsgIn(alice, SECOND, inLobby)) === 0, `${LOBBY} message shown in the ${SECOND} tab`);
    assert((await countMsgIn(alice, SECOND, inSecond)) === 1, `${SECOND} message shown more than once`);
    assert((await countMsgAnywhere(bob, inSecond)) === 0, `bob (not in ${SECOND}) received its message`);
    assert(sockets.get('alice') === 1, `alice's page opened ${sockets.get('alice')} WebSockets, expected 1`);
  });

  await check('after a dropped connection bob reconnects with backoff and re-joins his room', async () => {
    // record every status the page goes through (the reconnecting phase lasts ~0.5 s)
    await bob.evaluate(() => {
      window.__statusLog = [];
      const s = document.querySelector('#status');
      new MutationObserver(() => window.__statusLog.push(`${s.dataset.state}|${s.textContent}`))
        .observe(s, { attributes: true, childList: true, characterData: true, subtree: true });
    });
    const joinsBefore = await bob.locator(sel.presence(LOBBY), { hasText: 'you joined' }).count();
    await bob.evaluate(() => window.roomcast.drop());
    await bob.waitForFunction(
      () => window.__statusLog.some((e) => e.startsWith('reconnecting|')), null, { timeout: TIMEOUT });
    await bob.locator(`${sel.status}[data-state="connected"]`).waitFor({ timeout: TIMEOUT });
    const log = await bob.evaluate(() => window.__statusLog);
    assert(log.some((e) => /^reconnecting\|reconnecting in \d+(\.\d)?s$/.test(e)),
      `no "reconnecting in Ns" status seen: ${JSON.stringify(log.slice(0, 5))}`);
    await bob.locator(sel.presence(LOBBY), { hasText: 'you joined' }).nth(joinsBefore)
      .waitFor({ state: 'attached', timeout: TIMEOUT });   // a second welcome: re-joined
    const afterReconnect = `after reconnect ${nonce}`;
    await bob.waitForFunction(
      (s) => document.querySelector(s)?.dataset.count === '2', sel.members(LOBBY), { timeout: TIMEOUT });
    await sendIn(alice, LOBBY, afterReconnect);
    await waitMsg(bob, LOBBY, afterReconnect);
    assert(sockets.get('bob') === 2, `bob's page opened ${sockets.get('bob')} WebSockets, expected 2`);
  });

  await check('after being offline bob recovers what was said meanwhile, once each, in order', async () => {
    await bob.evaluate(() => window.roomcast.offline());
    await bob.locator(`${sel.status}[data-state="offline"]`).waitFor({ timeout: TIMEOUT });
    const missed = [1, 2, 3].map((i) => `while bob was away ${i} ${nonce}`);
    for (const text of missed) {
      await sendIn(alice, LOBBY, text);
      await waitMsg(alice, LOBBY, text);
    }
    assert((await countMsgAnywhere(bob, missed[0])) === 0, 'bob got a message while offline');
    await bob.evaluate(() => window.roomcast.online());
    await bob.locator(`${sel.status}[data-state="connected"]`).waitFor({ timeout: TIMEOUT });
    for (const text of missed) await waitMsg(bob, LOBBY, text);
    await bob.locator(`.messages[data-room="${LOBBY}"] [data-testid="recovery"]`)
      .filter({ hasText: 'recovered 3 missed messages' }).first()
      .waitFor({ state: 'attached', timeout: TIMEOUT });
    await bob.waitForTimeout(QUIET_MS / 2);
    for (const text of missed) {
      assert((await countMsgIn(bob, LOBBY, text)) === 1, `${JSON.stringify(text)} shown more than once`);
    }
    const seqs = (await bob.locator(sel.msgs(LOBBY)).evaluateAll(
      (els) => els.map((e) => Number(e.dataset.seq))));
    for (let i = 1; i < seqs.length; i++) {
      assert(seqs[i] > seqs[i - 1], `bob's ${LOBBY} messages out of order or duplicated: ${seqs.join(',')}`);
    }
    assert((await countMsgIn(bob, LOBBY, fromAlice)) === 1, 'old messages were replayed again');
  });

  await check('an error frame from the server is shown visibly', async () => {
    await carol.evaluate(() => window.roomcast.sendRaw({ type: 'no-such-type' }));
    await carol.locator('#errors .error', { hasText: 'unknown_type' }).first().waitFor({ timeout: TIMEOUT })
      .catch(() => { throw new Error('no visible "unknown_type" error after sending an unknown frame type'); });
    // a message to a room carol is not in: refused with not_joined, delivered to nobody
    const sneaky = `sneaky ${nonce}`;
    await carol.evaluate(([room, text]) => window.roomcast.sendRaw({ type: 'message', room, text }), [LOBBY, sneaky]);
    await carol.locator('#errors .error', { hasText: 'not_joined' }).first().waitFor({ timeout: TIMEOUT })
      .catch(() => { throw new Error('no visible "not_joined" error after messaging a room not joined'); });
    await alice.waitForTimeout(QUIET_MS / 2);
    assert((await countMsgAnywhere(alice, sneaky)) === 0, 'alice received a message from a non-member');
    assert((await countMsgAnywhere(bob, sneaky)) === 0, 'bob received a message from a non-member');
  });

  await check('the room list is read over HTTP only once per connection', async () => {
    for (const name of ['alice', 'bob', 'carol']) {
      const n = roomListFetches.get(name);
      assert(n >= 1 && n <= sockets.get(name), `${name}: ${n} GET /api/rooms for ${sockets.get(name)} WebSockets`);
    }
  });

  await check('no JavaScript errors on any page', async () => {
    assert(pageErrors.length === 0, pageErrors.join('; '));
  });

  if (process.env.SCREENSHOT) {
    await alice.click(sel.tab(LOBBY));
    await alice.fill('#message-input', 'typing…');
    await alice.screenshot({ path: process.env.SCREENSHOT, fullPage: true });
    console.log(`screenshot saved to ${process.env.SCREENSHOT}`);
  }
} catch (err) {
  setupFailed(err);
} finally {
  clearTimeout(watchdog);
  try { await browser?.close(); } catch { /* ignore */ }
}

console.log(`browser test took ${((Date.now() - started) / 1000).toFixed(1)}s`);
finish();
