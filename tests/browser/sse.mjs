#!/usr/bin/env node
// Real-browser test of Server-Sent Events (GET /sse/{room}) with the browser's own EventSource.
//
//   node tests/browser/sse.mjs http://127.0.0.1:PORT
//
// The page reaches the server through a small TCP relay run here, so the test can cut the
// stream's connection as a network would; EventSource must then reconnect by itself, send
// Last-Event-ID, and miss nothing that was published while it was away.
// Prints one line per check and exits 0 only if every check passed.

import net from 'node:net';
import { chromium } from 'playwright-core';
import { check, assert, setupFailed, finish } from './harness.mjs';

const TIMEOUT = 15_000;
const WATCHDOG_MS = 90_000;

const base = (process.argv[2] || '').replace(/\/+$/, '');
if (!/^https?:\/\/[^/]+$/.test(base)) {
  console.error('usage: node tests/browser/sse.mjs http://127.0.0.1:PORT');
  process.exit(2);
}
const target = new URL(base);
const ROOM = `sse-${Math.random().toString(36).slice(2, 8)}`;

// A relay to the server whose connections can all be cut at once.
const relayed = new Set();
const relay = net.createServer((client) => {
  const upstream = net.connect(Number(target.port), target.hostname);
  relayed.add(client);
  relayed.add(upstream);
  client.pipe(upstream);
  upstream.pipe(client);
  const gone = () => { client.destroy(); upstream.destroy(); relayed.delete(client); relayed.delete(upstream); };
  client.on('error', gone); upstream.on('error', gone);
  client.on('close', gone); upstream.on('close', gone);
});
await new Promise((resolve) => relay.listen(0, '127.0.0.1', resolve));
const relayBase = `http://127.0.0.1:${relay.address().port}`;

async function publish(text) {
  const res = await fetch(`${base}/api/rooms/${ROOM}/messages`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ text }),
  });
  assert(res.status === 202, `publish answered ${res.status}`);
  return (await res.json()).seq;
}

// Opens an EventSource in the page and records what it sees on window.seen.
async function listen(page, user) {
  await page.evaluate(([room, user]) => {
    window.seen = { messages: [], ids: [], resets: 0, opens: 0, errors: 0 };
    const es = new EventSource(`/sse/${room}?user=${user}`);
    window.es = es;
    es.addEventListener('open', () => { window.seen.opens += 1; });
    es.addEventListener('error', () => { window.seen.errors += 1; });
    es.addEventListener('reset', () => { window.seen.resets += 1; });
    es.addEventListener('message', (e) => {
      const m = JSON.parse(e.data);
      window.seen.messages.push({ seq: m.seq, text: m.text });
      window.seen.ids.push(e.lastEventId);
    });
  }, [ROOM, user]);
}

async function waitFor(page, what, predicate, arg) {
  await page.waitForFunction(predicate, arg, { timeout: TIMEOUT })
    .catch(async () => {
      const seen = await page.evaluate(() => JSON.stringify(window.seen));
      throw new Error(`${what}; seen ${seen}`);
    });
}

async function waitForFb(page, what, predicate) {
  await page.waitForFunction(predicate, undefined, { timeout: TIMEOUT })
    .catch(async () => {
      const fb = await page.evaluate(() => JSON.stringify(window.fb));
      throw new Error(`${what}; saw ${fb}`);
    });
}

const chromiumPath = process.env.CHROMIUM || '/usr/bin/chromium';
let browser;
const watchdog = setTimeout(() => {
  console.log('FAIL watchdog: the run took too long');
  process.exit(1);
}, WATCHDOG_MS);

try {
  browser = await chromium.launch({ executablePath: chromiumPath, args: ['--no-sandbox'] });
  // Through the relay: the one whose connection is cut.
  const reader = await browser.newPage();
  await reader.goto(`${relayBase}/healthz`);
  // Straight to the server: keeps the room (and its numbering) alive while the reader is away.
  const keeper = await browser.newPage();
  await keeper.goto(`${base}/healthz`);

  await check('EventSource receives the room\'s messages with their positions', async () => {
    await listen(keeper, 'keeper');
    await waitFor(keeper, 'keeper never opened', () => window.seen.opens === 1);
    await listen(reader, 'reader');
    await waitFor(reader, 'reader never opened', () => window.seen.opens === 1);
    for (const text of ['one', 'two', 'three']) await publish(text);
    await waitFor(reader, 'three messages', () => window.seen.messages.length === 3);
    const seen = await reader.evaluate(() => window.seen);
    assert(JSON.stringify(seen.messages.map((m) => m.seq)) === '[1,2,3]', `seqs ${JSON.stringify(seen.messages)}`);
    // Each id is the room's position, `<epoch>.<seq>`, all in one epoch.
    const seqs = seen.ids.map((id) => id.split(".")[1]);
    const epochs = new Set(seen.ids.map((id) => id.split(".")[0]));
    assert(JSON.stringify(seqs) === '["1","2","3"]' && epochs.size === 1 && [...epochs][0].length === 12,
      `ids ${JSON.stringify(seen.ids)}`);
  });

  await check('after the connection drops, EventSource reconnects with Last-Event-ID and misses nothing', async () => {
    for (const s of relayed) s.destroy();
    await waitFor(reader, 'no error after the cut', () => window.seen.errors >= 1);
    // Published while the reader is away.
    await publish('four');
    await publish('five');
    await waitFor(reader, 'no reconnect', () => window.seen.opens >= 2);
    await publish('six');
    await waitFor(reader, 'six messages', () => window.seen.messages.length >= 6);
    await reader.waitForTimeout(300);
    const seen = await reader.evaluate(() => window.seen);
    const seqs = seen.messages.map((m) => m.seq);
    assert(JSON.stringify(seqs) === '[1,2,3,4,5,6]', `missed or repeated: ${JSON.stringify(seqs)}`);
    assert(seen.resets === 0, 'a reset event although nothing was too old');
    assert(seen.ids.at(-1).split(".")[1] === '6', `last id ${seen.ids.at(-1)}`);
    const keeperSeqs = await keeper.evaluate(() => window.seen.messages.map((m) => m.seq));
    assert(JSON.stringify(keeperSeqs) === JSON.stringify(seqs), `the keeper saw ${JSON.stringify(keeperSeqs)}`);
  });

  await check('closing the EventSource releases its membership', async () => {
    await reader.evaluate(() => window.es.close());
    const deadline = Date.now() + TIMEOUT;
    for (;;) {
      const info = await (await fetch(`${base}/api/rooms/${ROOM}`)).json();
      if (info.members === 1) break;
      assert(Date.now() < deadline, `members stayed ${info.members}`);
      await new Promise((r) => setTimeout(r, 50));
    }
  });

  await check('roomcast.js falls back to SSE and REST when WebSockets are blocked', async () => {
    const page = await browser.newPage();
    await page.goto(`${base}/healthz`);
    const room = `${ROOM}-fb`;
    await page.evaluate(async (room) => {
      const { connect } = await import('/roomcast.js');
      // A proxy that refuses every upgrade: the socket errors and closes without opening.
      class Blocked {
        constructor() {
          this.readyState = 0;
          setTimeout(() => { this.readyState = 3; this.onerror?.({}); this.onclose?.({ code: 1006, reason: '' }); }, 0);
        }
        send() {}
        close() {}
      }
      window.fb = { states: [], messages: [], acks: [] };
      const c = connect({ user: 'fallback', WebSocket: Blocked, backoff: { baseMs: 20, maxMs: 50 }, history: 0 });
      window.client = c;
      c.on('state', (s) => window.fb.states.push(`${s.state}:${s.transport || ''}`));
      c.on('message', (m) => window.fb.messages.push({ text: m.text, mine: m.mine, seq: m.seq }));
      await c.join(room);
      window.fb.acks.push(await c.publish(room, 'from the page'));
    }, room);
    await waitForFb(page, 'own message', () => window.fb.messages.some((m) => m.text === 'from the page'));
    const res = await fetch(`${base}/api/rooms/${room}/messages`, {
      method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ text: 'from outside' }),
    });
    assert(res.status === 202, `outside publish ${res.status}`);
    await waitForFb(page, 'the other message', () => window.fb.messages.some((m) => m.text === 'from outside'));
    const fb = await page.evaluate(() => ({ ...window.fb, transport: window.client.transport }));
    assert(fb.transport === 'sse', `transport ${fb.transport}`);
    assert(fb.states.includes('connected:sse'), `states ${JSON.stringify(fb.states)}`);
    const mine = fb.messages.find((m) => m.text === 'from the page');
    assert(mine.mine === true && fb.acks[0]?.seq === mine.seq, `own message ${JSON.stringify(fb)}`);
    assert(fb.messages.find((m) => m.text === 'from outside').mine === false, 'not mine');
    await page.close();
  });
} catch (err) {
  setupFailed(err);
} finally {
  clearTimeout(watchdog);
  try { await browser?.close(); } catch { /* ignore */ }
  relay.close();
  for (const s of relayed) s.destroy();
}

finish();
