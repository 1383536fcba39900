// roomcast.js: the browser (and Node >= 22) client of a roomcast server. No dependencies, one
// ES module: `import { connect } from "/roomcast.js"`. The wire protocol it speaks is
// docs/PROTOCOL.md; how to use it is docs/CLIENT.md.
//
// One socket carries every room. The library owns reconnection (exponential backoff with full
// jitter, or the server's own hint), token refresh, re-joining with `since` so that nothing is
// lost or shown twice, and publish acknowledgements. Where WebSockets are blocked (a proxy that
// refuses upgrades) while the HTTP API answers, it falls back to Server-Sent Events for
// receiving and REST for publishing (`SseTransport`), with the same events and promises.

const LOBBY = "$lobby";
const ROOM_RE = /^[A-Za-z0-9_\-.:#@]{1,64}$/;
const DM_RE = /^dm:[A-Za-z0-9_\-.:#@+]{1,61}$/;

/** Close codes and error codes after which retrying the same thing cannot succeed. */
const TERMINAL_JOIN = new Set(["bad_password", "room_full", "forbidden_room", "bad_room",
  "reserved_room", "too_many_rooms", "token_expired"]);
/** Error-frame codes that refuse a chat message (the frame names the message's `id`). */
const MESSAGE_ERRORS = new Set(["rate_limited", "not_joined", "room_required", "bad_id",
  "bad_message", "reserved_room", "cluster_unavailable", "bad_room"]);

/** An error with the server's machine-readable `code`. */
export class RoomcastError extends Error {
  constructor(code, reason, extra = {}) {
    super(reason ? `${code}: ${reason}` : code);
    this.name = "RoomcastError";
    this.code = code;
    this.reason = reason || "";
    /** HTTP status, when the answer was one. */
    this.status = extra.status;
    this.room = extra.room;
    /** When to try again, for `rate_limited`, `too_many_failures`, 429 and 503. */
    this.retryAfterMs = extra.retryAfterMs;
    /** Retrying the same request cannot succeed (a wrong password, a refused token, ...). */
    this.terminal = !!extra.terminal;
  }
}

/** Whether `name` is a valid room name (dm: names: sorted, distinct users joined by `+`). */
export function validRoom(name) {
  if (typeof name !== "string") return false;
  if (name.startsWith("dm:")) {
    if (!DM_RE.test(name)) return false;
    const users = name.slice(3).split("+");
    return users.every((u, i) => u !== "" && (i === 0 || users[i - 1] < u));
  }
  return ROOM_RE.test(name);
}

/** A roster from a page of members (`users`, by id) and the cursor past it. */
function newRoster(users, after, partial) {
  const map = new Map();
  for (const u of users) map.set(u.id, String(u.user));
  return { users: map, after: after ?? null, partial: !!partial, limit: Math.max(users.length, 100), reloading: null };
}

/** Applies `[id, user]` changes in order: a user name adds the member, `null` removes it. */
function applyChanges(roster, changes) {
  for (const [id, user] of changes) {
    if (user === null) roster.users.delete(id); else roster.users.set(id, user);
  }
}

/** The direct-message room of a set of users: `dmRoom("bob", "alice")` is `dm:alice+bob`. */
export function dmRoom(...users) {
  const sorted = Array.from(new Set(users.map(String))).sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
  return "dm:" + sorted.join("+");
}

// ---- built-in accounts (a server run with --accounts-db) ----

async function call(path, init, options = {}) {
  const g = globalThis;
  const base = String(options.url || (g.location ? g.location.origin : "")).replace(/\/+$/, "");
  const f = options.fetch || g.fetch.bind(g);
  let res;
  try {
    res = await f(base + path, { cache: "no-store", ...init });
  } catch (e) {
    throw new RoomcastError("unreachable", String((e && e.message) || e));
  }
  const body = await res.json().catch(() => ({}));
  if (!res.ok) {
    const after = res.headers.get("retry-after");
    throw new RoomcastError(body.error || "http_" + res.status, body.reason, {
      status: res.status, retryAfterMs: body.retry_after_ms ?? (after ? Number(after) * 1000 : undefined),
      terminal: [400, 401, 403, 404, 409].includes(res.status),
    });
  }
  return body;
}

/** `GET /api/server`: `{accounts, register, tokens_required, version}`, what to show. */
export function serverInfo(options) {
  return call("/api/server", {}, options);
}

/** `POST /register`: resolves `{username}` (the name as registered); rejects with the rule broken. */
export function register(username, password, options) {
  return call("/register", {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ username, password }),
  }, options);
}

/** `POST /token` (the OAuth2 password grant): resolves `{token, expiresIn}` (seconds). */
export async function login(username, password, options) {
  const body = new URLSearchParams({ grant_type: "password", username, password });
  const v = await call("/token", { method: "POST", body }, options);
  return { token: v.access_token, expiresIn: v.expires_in };
}

/** `POST /token/refresh`: a fresh token for a valid one, while its account exists. */
export async function refreshToken(token, options) {
  const v = await call("/token/refresh", { method: "POST", headers: { Authorization: "Bearer " + token } }, options);
  return { token: v.access_token, expiresIn: v.expires_in };
}

/** A token's `exp` in milliseconds since the epoch (`null` if it has none or does not parse). */
export function tokenExpiry(token) { return jwtExpiry(token); }

/**
 * Where a room's stream stands: the last seq shown. A rejoin asks for what follows it, so
 * nothing is lost and nothing shown twice. Kept in one place so that a room epoch (a numbering
 * that restarts) can be added beside the seq without touching the rest.
 */
class Position {
  constructor() {
    this.seq = null;      // last seq shown; null before the first welcome
    this.epoch = null;    // the room's epoch that seq counts in (from the welcome)
    this.sentEpoch = null; // the epoch the last join's `since` was in
    this.welcome = 0;     // the last welcome's seq
    this.replay = 0;      // replayed messages still to come
    this.asked = false;   // whether the last join asked for a replay
  }
  /** The fields a (re)join sends: `since` once the room was joined, `history` before. */
  joinFields(historyOnFirstJoin) {
    const fields = this.seq === null
      ? (historyOnFirstJoin > 0 ? { history: historyOnFirstJoin } : {})
      : (this.epoch ? { since: this.seq, epoch: this.epoch } : { since: this.seq });
    this.asked = Object.keys(fields).length > 0;
    return fields;
  }
  welcomed(seq, epoch) {
    this.sentEpoch = this.epoch;
    if (typeof epoch === "string") this.epoch = epoch;
    this.welcome = typeof seq === "number" ? seq : 0;
    this.replay = 0;
    if (this.seq === null) this.seq = 0;
    if (!this.asked) this.seq = Math.max(this.seq, this.welcome);
  }
  /** A `history` or `recovery` announcement: `count` past messages follow. */
  replaying(frame) {
    // The room's numbering started again (a new epoch; or, from a server without epochs, a
    // `since` beyond its last seq): the old position means nothing. The server replays
    // nothing for another epoch and says `complete: false`: the app reloads what it shows.
    const otherEpoch = this.sentEpoch && frame.epoch && frame.epoch !== this.sentEpoch;
    if (frame.type === "recovery" && (otherEpoch || frame.since > this.welcome)) this.seq = 0;
    this.replay = frame.count || 0;
    if (this.replay === 0) this.seq = Math.max(this.seq, this.welcome);
  }
  /** A message: whether it is `past` (replayed) and `fresh` (not shown before). */
  take(seq) {
    const past = this.replay > 0;
    if (past) this.replay -= 1;
    let fresh = true;
    if (typeof seq === "number") {
      fresh = seq > this.seq;
      if (fresh) this.seq = seq;
    }
    // Everything up to the welcome is now either shown or deliberately not asked for.
    if (past && this.replay === 0) this.seq = Math.max(this.seq, this.welcome);
    return { past, fresh };
  }
}

function backoffDelay(attempt, baseMs, maxMs, random) {
  // Full jitter (AWS architecture blog, "Exponential Backoff And Jitter"): uniform in
  // [0, min(max, base * 2^attempt)], so a crowd of clients spreads instead of pulsing.
  const cap = Math.min(maxMs, baseMs * 2 ** Math.min(attempt, 30));
  return Math.floor(random() * cap);
}

function jwtExpiry(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const json = typeof atob === "function" ? atob(part) : Buffer.from(part, "base64").toString();
    const exp = JSON.parse(json).exp;
    return typeof exp === "number" ? exp * 1000 : null;
  } catch { return null; }
}

function b64url(text) {
  const bytes = new TextEncoder().encode(text);
  let bin = "";
  for (const b of bytes) bin += String.fromCharCode(b);
  return btoa(bin).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

/**
 * Connects to a roomcast server and keeps the connection up until `close()`.
 *
 * options:
 * - `url`: the server's http(s) base URL (default: the page's origin);
 * - `user`: the user name when the server has no `--jwt-secret`;
 * - `getToken`: `async () => jwt` when it has; called before each connection and again before
 *   the token's `exp`, the new token then goes over the open socket (`refresh`);
 * - `lobby`: also join `$lobby` and emit its frames as `lobby` events;
 * - `history`: past messages to show on a room's first join (default 50);
 * - `backoff`: `{ baseMs: 500, maxMs: 30000 }`; `refreshBeforeMs`: 60000;
 * - `sse`: `"auto"` (default: fall back to Server-Sent Events after `sseAfter` (2) upgrades in
 *   a row fail while the HTTP API answers), `"always"`, or `"never"`;
 * - `WebSocket`, `fetch`, `random`: injectable (Node without a global WebSocket, tests).
 */
export function connect(options = {}) {
  return new Client(options);
}

export class Client {
  constructor(options) {
    const g = globalThis;
    this.base = String(options.url || (g.location ? g.location.origin : "")).replace(/\/+$/, "");
    this.user = options.user || null;
    this.getToken = options.getToken || null;
    this.lobby = !!options.lobby;
    this.historyOnJoin = options.history ?? 50;
    this.baseMs = options.backoff?.baseMs ?? 500;
    this.maxMs = options.backoff?.maxMs ?? 30000;
    this.refreshBeforeMs = options.refreshBeforeMs ?? 60000;
    this.WebSocket = options.WebSocket || g.WebSocket;
    this.EventSource = options.EventSource || g.EventSource;
    this.sse = options.sse || "auto";
    this.sseAfter = options.sseAfter ?? 2;
    /** "websocket" or "sse": what the connection uses now. */
    this.transport = this.sse === "always" && this.EventSource ? "sse" : "websocket";
    this.refusedUpgrades = 0;
    this.fetch = options.fetch || g.fetch.bind(g);
    this.random = options.random || Math.random;
    this.state = "idle";
    /** room -> { password, position, joined, pending: {resolve,reject} | null } */
    this.rooms = new Map();
    this.pending = new Map(); // message id -> { resolve, reject, room }
    this.listeners = new Map();
    this.token = null;
    this.attempt = 0;
    this.ws = null;
    this.generation = 0;
    this.timers = new Set();
    this.held = false;
    this.idPrefix = Math.floor(this.random() * 2 ** 32).toString(36) + "-";
    this.nextId = 1;
    this._open();
  }

  // ---- events ----
  /** Subscribes to `type` ("state", "message", "presence", "roster", "welcome", "replay",
   * "lagged", "left", "lobby", "error", "frame"); returns the unsubscribe function. */
  on(type, fn) {
    if (!this.listeners.has(type)) this.listeners.set(type, new Set());
    this.listeners.get(type).add(fn);
    return () => this.listeners.get(type).delete(fn);
  }
  _emit(type, value) {
    for (const fn of this.listeners.get(type) || []) {
      try { fn(value); } catch (e) { setTimeout(() => { throw e; }); }
    }
  }
  _state(state, extra = {}) {
    this.state = state;
    this._emit("state", { state, ...extra });
  }
  _later(ms, fn) {
    const t = setTimeout(() => { this.timers.delete(t); fn(); }, ms);
    this.timers.add(t);
    return t;
  }
  _clearTimers() { for (const t of this.timers) clearTimeout(t); this.timers.clear(); }

  // ---- the connection ----
  async _open() {
    const gen = ++this.generation;
    this._state("connecting");
    if (this.getToken) {
      try { this.token = await this.getToken(); } catch (e) { this.token = null; }
      if (gen !== this.generation) return;
    }
    const url = new URL(this.base + "/ws");
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    if (this.user && !this.token) url.searchParams.set("user", this.user);
    // Browsers cannot set headers on a WebSocket: the token travels as a subprotocol, which
    // keeps it out of URLs (and proxy logs).
    const protocols = ["roomcast"];
    if (this.token) protocols.push("bearer." + this.token);
    let ws;
    try {
      ws = this.transport === "sse"
        ? new SseTransport(this)
        : new this.WebSocket(url.toString(), protocols);
    } catch (e) {
      this._failed(gen, { code: 1006, reason: "" }, false);
      return;
    }
    this.ws = ws;
    let opened = false;
    ws.onopen = () => {
      if (gen !== this.generation) return;
      opened = true;
      this.attempt = 0;
      this.refusedUpgrades = 0;
      this._state("connected", { transport: this.transport });
      if (this.lobby) this._send({ type: "join", room: LOBBY });
      for (const [room, r] of this.rooms) this._sendJoin(room, r);
      this._scheduleRefresh(gen);
      const ping = setInterval(() => this._send({ type: "ping" }), 25000);
      this.timers.add(ping);
    };
    ws.onmessage = (ev) => {
      if (gen !== this.generation || typeof ev.data !== "string") return;
      let f;
      try { f = JSON.parse(ev.data); } catch { return; }
      this._frame(f);
    };
    let ended = false;
    const end = (ev) => {
      if (ended || gen !== this.generation) return;
      ended = true;
      this._failed(gen, ev, opened);
    };
    ws.onclose = end;
    // Some implementations (Node 20's experimental WebSocket) report a refused connection
    // with an error and no close: treat an error before the open as the end.
    ws.onerror = () => { if (!opened) end({ code: 1006, reason: "" }); };
  }

  /** The socket ended (or never opened): decide when, and whether, to try again. */
  async _failed(gen, ev, opened) {
    this._clearTimers();
    this.ws = null;
    for (const r of this.rooms.values()) r.joined = false;
    // Messages in flight may or may not have been published: a retry with the same id is
    // acknowledged, never doubled, so callers may resend them.
    for (const [id, p] of this.pending) {
      p.reject(new RoomcastError("disconnected", "the connection closed before the server answered", { room: p.room }));
      this.pending.delete(id);
    }
    if (this.held || this.state === "closed") { if (this.held) this._state("offline"); return; }
    let delay = null;
    if (ev.code === 1012) {
      // The server is restarting and says when this client should come back (spread over the
      // drain): honour it instead of our own backoff.
      try { delay = Number(JSON.parse(ev.reason).retry_after_ms); } catch { /* not JSON */ }
      if (!Number.isFinite(delay) || delay < 0) delay = null;
    } else if (ev.code === 4001) {
      delay = 0; // token expired: a fresh one from getToken, at once
    } else if (!opened) {
      // A browser cannot see why an upgrade was refused (it reports 1006): ask the REST API
      // the same question with the same credentials. 401/403 end here; 429/503 carry the wait.
      const verdict = await this._probe();
      if (gen !== this.generation) return;
      if (verdict.terminal) {
        this._state("failed", { error: verdict.error });
        return;
      }
      if (verdict.retryAfterMs != null) delay = verdict.retryAfterMs;
      // The API answers but the upgrade does not go through: something on the way refuses
      // WebSockets. After a few in a row, receive over Server-Sent Events instead.
      if (verdict.reachable && this.transport === "websocket") this.refusedUpgrades += 1;
      if (this.sse === "auto" && this.EventSource && this.refusedUpgrades >= this.sseAfter
          && this.transport === "websocket") {
        this.transport = "sse";
        delay = 0;
      }
    }
    if (delay === null) delay = backoffDelay(this.attempt, this.baseMs, this.maxMs, this.random);
    this.attempt += 1;
    this._state("reconnecting", { delay, code: ev.code, at: Date.now() + delay });
    this._later(delay, () => { if (gen === this.generation) this._open(); });
  }

  async _probe() {
    try {
      const res = await this._get("/api/rooms?limit=1");
      if (res.status === 401 || res.status === 403) {
        const body = await res.json().catch(() => ({}));
        return { terminal: true, error: new RoomcastError(body.error || "unauthorized", body.reason, { status: res.status, terminal: true }) };
      }
      const after = res.headers.get("retry-after");
      return { terminal: false, reachable: res.ok, retryAfterMs: after ? Number(after) * 1000 : null };
    } catch {
      return { terminal: false, retryAfterMs: null }; // the server is down: back off
    }
  }

  _scheduleRefresh(gen) {
    if (!this.getToken || !this.token) return;
    const exp = jwtExpiry(this.token);
    if (exp === null) return;
    const wait = Math.max(1000, exp - Date.now() - this.refreshBeforeMs);
    this._later(wait, async () => {
      if (gen !== this.generation) return;
      let token;
      try { token = await this.getToken(); } catch { token = null; }
      if (gen !== this.generation || !token || token === this.token) {
        this._scheduleRefresh(gen);
        return;
      }
      this.token = token;
      this._send({ type: "refresh", token });
      // And again before the new token's exp: a socket outlives many tokens.
      this._scheduleRefresh(gen);
    });
  }

  _send(obj) {
    if (this.ws && this.ws.readyState === 1) { this.ws.send(JSON.stringify(obj)); return true; }
    return false;
  }

  _sendJoin(room, r) {
    const frame = { type: "join", room, ...r.position.joinFields(r.history ?? this.historyOnJoin) };
    if (r.password) frame.password = r.password;
    this._send(frame);
  }

  // ---- frames ----
  _frame(f) {
    this._emit("frame", f);
    const r = f.room !== undefined ? this.rooms.get(f.room) : undefined;
    switch (f.type) {
      case "welcome":
        if (f.room === LOBBY) { this._emit("lobby", f); return; }
        if (!r) { this._send({ type: "leave", room: f.room }); return; }
        r.joined = true;
        r.position.welcomed(f.seq, f.epoch);
        // The welcome lists the room's first members (rooms whose presence names nobody list
        // none): the roster starts from it, presence keeps it current.
        r.roster = Array.isArray(f.users) ? newRoster(f.users, f.next_users_after, f.users_partial) : null;
        this._emit("welcome", f);
        if (r.roster) this._emit("roster", this.roster(f.room));
        if (r.waiter) { r.waiter.resolve(f); r.waiter = null; }
        return;
      case "history": case "recovery":
        if (!r) return;
        r.position.replaying(f);
        this._emit("replay", f);
        return;
      case "message": {
        if (f.id && this.pending.has(f.id)) {
          this.pending.get(f.id).resolve({ room: f.room, seq: f.seq, duplicate: false });
          this.pending.delete(f.id);
        }
        if (!r) return;
        const { past, fresh } = r.position.take(f.seq);
        if (!fresh) return; // already shown
        this._emit("message", { ...f, past, mine: this.isMine(f) });
        return;
      }
      case "ack":
        if (this.pending.has(f.id)) {
          this.pending.get(f.id).resolve({ room: f.room, seq: f.seq, duplicate: true });
          this.pending.delete(f.id);
        }
        return;
      case "presence":
        if (!r) return;
        this._emit("presence", f);
        if (r.roster) this._presence(f.room, r, f);
        return;
      case "lagged": if (r) this._emit("lagged", f); return;
      case "left":
        if (f.reason && r) { this.rooms.delete(f.room); this._emit("left", f); }
        return;
      case "refreshed": this._emit("refreshed", f); return;
      case "room_created": case "room_closed": case "rooms_changed": case "room_counts":
        this._emit("lobby", f);
        return;
      case "error": this._error(f); return;
      default: return;
    }
  }

  /** Applies a presence frame to a room's roster by member id, so hearing of a change twice
   * (around the welcome, or in cluster mode) changes nothing. A frame that left names out, or
   * names without ids (an older server), sends the roster back to the server's first page. */
  _presence(room, r, f) {
    const roster = r.roster;
    const joined = f.joined || [], left = f.left || [];
    const ids = Array.isArray(f.joined_ids) && Array.isArray(f.left_ids)
      && f.joined_ids.length === joined.length && f.left_ids.length === left.length;
    if (f.truncated || !ids) {
      if (joined.length || left.length || f.truncated) this._reloadRoster(room, r);
      return;
    }
    const changes = [];
    joined.forEach((user, i) => changes.push([f.joined_ids[i], String(user)]));
    left.forEach((_, i) => changes.push([f.left_ids[i], null]));
    applyChanges(roster, changes);
    if (roster.reloading) roster.reloading.push(...changes);
    this._emit("roster", this.roster(room));
  }

  /** Reads the roster's first page again (`GET /api/rooms/{room}`); changes heard while it is
   * on its way are applied again on top of it. */
  async _reloadRoster(room, r) {
    const roster = r.roster;
    if (!roster || roster.reloading) return;
    roster.reloading = [];
    try {
      const info = await this.roomInfo(room, { usersLimit: roster.limit });
      if (r.roster !== roster) return;
      const fresh = newRoster(info.users || [], info.next_users_after, info.users_partial);
      applyChanges(fresh, roster.reloading);
      Object.assign(roster, fresh, { reloading: null });
      this._emit("roster", this.roster(room));
    } catch {
      roster.reloading = null; // the next presence frame tries again
    }
  }

  _error(f) {
    const err = new RoomcastError(f.code, f.reason, { room: f.room, retryAfterMs: f.retry_after_ms });
    if (f.id && this.pending.has(f.id)) {
      this.pending.get(f.id).reject(err);
      this.pending.delete(f.id);
      return;
    }
    const r = f.room !== undefined ? this.rooms.get(f.room) : undefined;
    if (r && !r.joined && TERMINAL_JOIN.has(f.code)) {
      // A join that cannot succeed by retrying: forget the room rather than rejoin forever.
      err.terminal = true;
      this.rooms.delete(f.room);
      if (r.waiter) { r.waiter.reject(err); r.waiter = null; }
      this._emit("error", err);
      return;
    }
    if (r && !r.joined && f.code === "too_many_failures" && r.waiter) {
      this.rooms.delete(f.room);
      r.waiter.reject(err);
      r.waiter = null;
      return;
    }
    if (f.code === "already_joined" && r) { r.joined = true; if (r.waiter) { r.waiter.resolve({ room: f.room }); r.waiter = null; } return; }
    this._emit("error", err);
  }

  // ---- the API ----
  /** Joins `room` (rejoined after every reconnect until `leave`). Resolves with the welcome;
   * rejects with a terminal RoomcastError for `bad_password`, `room_full`, `forbidden_room`. */
  join(room, { password, history } = {}) {
    if (!validRoom(room) && room !== LOBBY) {
      return Promise.reject(new RoomcastError("bad_room", "not a valid room name", { room, terminal: true }));
    }
    let r = this.rooms.get(room);
    if (r && r.joined) return Promise.resolve({ room });
    if (!r) {
      r = { password: password || null, history, position: new Position(), joined: false, waiter: null };
      this.rooms.set(room, r);
    } else if (password) r.password = password;
    return new Promise((resolve, reject) => {
      if (r.waiter) r.waiter.reject(new RoomcastError("superseded", "joined again"));
      r.waiter = { resolve, reject };
      this._sendJoin(room, r);
    });
  }

  leave(room) {
    const r = this.rooms.get(room);
    this.rooms.delete(room);
    if (r && r.joined) this._send({ type: "leave", room });
  }

  /** Publishes `text` into `room`. Resolves `{ room, seq, duplicate }` when the server has it
   * (the sender's own copy, or an `ack` for a repeated id); rejects with the error frame's
   * RoomcastError (`rate_limited` carries `retryAfterMs`) or `disconnected`. Pass the same
   * `id` to retry a message safely. */
  publish(room, text, { id } = {}) {
    id = id || this.idPrefix + this.nextId++;
    return new Promise((resolve, reject) => {
      if (!this._send({ type: "message", room, text, id })) {
        reject(new RoomcastError("disconnected", "not connected", { room }));
        return;
      }
      this.pending.set(id, { resolve, reject, room });
    });
  }

  /** Whether `message` (from a `message` event) was sent by this client. */
  isMine(message) { return !!message.id && message.id.startsWith(this.idPrefix); }

  /** One page of a room's past messages, newest first: `{ messages, nextBefore }`; pass
   * `nextBefore` as `before` for the next page (`null`: no older message). */
  async history(room, { before, limit = 50 } = {}) {
    const q = new URLSearchParams({ limit: String(limit) });
    if (before != null) q.set("before", String(before));
    const body = await this._json(`/api/rooms/${encodeURIComponent(room)}/messages?` + q, room);
    return { messages: body.messages || [], nextBefore: body.next_before ?? null };
  }

  /** The members of `room` this client knows, by id: `{ room, users: [{id, user}], more, partial }`
   * (`more`: the room has members past these, `moreMembers` reads them; `partial`: in cluster
   * mode, other servers' members could not be read). `null` before the welcome, and in rooms
   * whose presence names nobody. Kept current from presence frames: listen for `roster`. */
  roster(room) {
    const r = this.rooms.get(room);
    if (!r || !r.roster) return null;
    const users = Array.from(r.roster.users, ([id, user]) => ({ id, user })).sort((a, b) => a.id - b.id);
    return { room, users, more: r.roster.after !== null, partial: r.roster.partial };
  }

  /** Reads the next page of `room`'s members into its roster (emits `roster`); resolves with
   * the roster. */
  async moreMembers(room, { limit = 100 } = {}) {
    const r = this.rooms.get(room);
    const roster = r && r.roster;
    if (!roster || roster.after === null) return this.roster(room);
    const info = await this.roomInfo(room, { usersAfter: roster.after, usersLimit: limit });
    if (r.roster !== roster) return this.roster(room);
    applyChanges(roster, (info.users || []).map((u) => [u.id, String(u.user)]));
    roster.after = info.next_users_after ?? null;
    this._emit("roster", this.roster(room));
    return this.roster(room);
  }

  /** A room's info and one page of its members: `{ members, users, next_users_after, ... }`. */
  roomInfo(room, { usersAfter, usersLimit = 100 } = {}) {
    const q = new URLSearchParams({ users_limit: String(usersLimit) });
    if (usersAfter != null) q.set("users_after", String(usersAfter));
    return this._json(`/api/rooms/${encodeURIComponent(room)}?` + q, room);
  }

  /** The rooms this client may see: `{ rooms: [{room, members, password_protected}], total }`. */
  listRooms({ limit = 100 } = {}) { return this._json(`/api/rooms?limit=${limit}`); }

  _get(path, room) {
    const headers = {};
    if (this.token) headers.Authorization = "Bearer " + this.token;
    const r = room && this.rooms.get(room);
    if (r && r.password) headers["X-Room-Password"] = r.password;
    let url = this.base + path;
    // Without tokens, a DM room is read by the user it names (see docs/SECURITY.md).
    if (!this.token && this.user && room && room.startsWith("dm:")) url += "&user=" + encodeURIComponent(this.user);
    return this.fetch(url, { headers, cache: "no-store" });
  }

  async _json(path, room) {
    const res = await this._get(path, room);
    const body = await res.json().catch(() => ({}));
    if (!res.ok) {
      const after = res.headers.get("retry-after");
      throw new RoomcastError(body.error || "http_" + res.status, body.reason, {
        status: res.status, room, retryAfterMs: body.retry_after_ms ?? (after ? Number(after) * 1000 : undefined),
        terminal: res.status === 401 || res.status === 403,
      });
    }
    return body;
  }

  /** Sends one raw frame (debugging). */
  sendRaw(obj) { return this._send(obj); }

  /** Drops the socket as a network failure would: the normal reconnect path follows. */
  drop() { if (this.ws) this.ws.close(4000, "dropped by the client"); }

  /** Stays disconnected until `resume()`. */
  pause() {
    this.held = true;
    this._clearTimers();
    if (this.ws) this.ws.close(4000, "paused");
    else this._state("offline");
  }

  /** Connects again now (after `pause()`, a failure, or to use a new token or name). */
  resume() {
    this.held = false;
    this._clearTimers();
    this.generation++;
    if (this.ws) { const old = this.ws; this.ws = null; try { old.close(1000); } catch { /* gone */ } }
    this.attempt = 0;
    this._open();
  }

  /** Closes for good. */
  close() {
    this._state("closed");
    this.generation++;
    this._clearTimers();
    if (this.ws) this.ws.close(1000);
    this.ws = null;
  }

  /** The REST publish the SSE transport uses: `{ status, body, retryAfterMs }`. */
  async _post(path, room, body) {
    const headers = { "content-type": "application/json" };
    if (this.token) headers.Authorization = "Bearer " + this.token;
    const r = room && this.rooms.get(room);
    if (r && r.password) headers["X-Room-Password"] = r.password;
    const res = await this.fetch(this.base + path, { method: "POST", headers, body: JSON.stringify(body) });
    const json = await res.json().catch(() => ({}));
    const after = res.headers.get("retry-after");
    return { status: res.status, body: json, retryAfterMs: json.retry_after_ms ?? (after ? Number(after) * 1000 : undefined) };
  }
}

/**
 * Receiving over Server-Sent Events and publishing over REST, behind the small part of the
 * WebSocket interface `Client` uses (`readyState`, `send`, `close`, `onopen`, `onmessage`,
 * `onclose`, `onerror`), so that everything above it (joins, recovery, acknowledgements,
 * reconnection) is the same code for both transports. One `EventSource` per room
 * (`GET /sse/{room}`): each resumes by itself with `Last-Event-ID` after a network drop, and a
 * rejoin after a reconnect passes `since` and `epoch` in its URL.
 */
class SseTransport {
  constructor(client) {
    this.client = client;
    this.readyState = 0;
    /** room -> EventSource */
    this.streams = new Map();
    this.onopen = this.onmessage = this.onclose = this.onerror = null;
    setTimeout(() => {
      if (this.readyState !== 0) return;
      this.readyState = 1;
      this.onopen?.({});
    }, 0);
  }

  _deliver(obj) { this.onmessage?.({ data: typeof obj === "string" ? obj : JSON.stringify(obj) }); }

  send(text) {
    if (this.readyState !== 1) return;
    const f = JSON.parse(text);
    switch (f.type) {
      case "join": this._join(f); return;
      case "leave": this._leave(f.room); return;
      case "message": this._publish(f); return;
      case "ping": setTimeout(() => this._deliver({ type: "pong" }), 0); return;
      // A stream cannot take a new token: it ends with `token_expired` and reopens with one.
      default: return;
    }
  }

  _join(f) {
    const c = this.client;
    this._leave(f.room);
    const q = new URLSearchParams();
    if (c.token) q.set("token", c.token);
    else if (c.user) q.set("user", c.user);
    if (f.password) q.set("password", f.password);
    if (f.since != null) q.set("since", String(f.since));
    if (f.epoch) q.set("epoch", f.epoch);
    if (f.history != null) q.set("history", String(f.history));
    const es = new c.EventSource(`${c.base}/sse/${encodeURIComponent(f.room)}?${q}`);
    this.streams.set(f.room, es);
    let opened = false;
    const relay = (e) => this._deliver(e.data);
    for (const name of ["welcome", "message", "history", "recovery", "reset", "presence", "lagged", "notice"]) {
      es.addEventListener(name, relay);
    }
    es.onopen = () => { opened = true; };
    es.addEventListener("close", (e) => {
      let data = {};
      try { data = JSON.parse(e.data); } catch { /* not JSON */ }
      // What the WebSocket would have been closed with.
      if (data.code === "restart") this._end(1012, JSON.stringify({ reason: "server restarting", retry_after_ms: data.retry_after_ms }));
      else if (data.code === "token_expired") this._end(4001, "token expired");
      else this._end(1008, data.code || "closed");
    });
    es.onerror = () => {
      // EventSource retries a dropped stream by itself; it gives up (CLOSED) when the server
      // refuses it outright (401, 403, 404...): the room's join fails as a WebSocket's would.
      if (es.readyState !== 2) return;
      this.streams.delete(f.room);
      if (!opened) this._refused(f.room);
      else this._end(1006, "");
    };
  }

  /** A stream refused before it opened: ask the API why, as an error frame would say. */
  async _refused(room) {
    const c = this.client;
    try {
      await c._json(`/api/rooms/${encodeURIComponent(room)}`, room);
      this._deliver({ type: "error", code: "unavailable", reason: "the event stream was refused", room });
    } catch (e) {
      const code = e.code === "no_such_room" ? "unavailable" : e.code;
      this._deliver({ type: "error", code, reason: e.reason, room, retry_after_ms: e.retryAfterMs });
    }
  }

  _leave(room) {
    const es = this.streams.get(room);
    if (es) { es.close(); this.streams.delete(room); }
  }

  async _publish(f) {
    const c = this.client;
    const body = { text: f.text, id: f.id };
    if (!c.token && c.user) body.user = c.user;
    let res;
    try {
      res = await c._post(`/api/rooms/${encodeURIComponent(f.room)}/messages`, f.room, body);
    } catch {
      this._deliver({ type: "error", code: "disconnected", reason: "the publish did not reach the server", room: f.room, id: f.id });
      return;
    }
    if (res.status === 202 && res.body.duplicate) {
      this._deliver({ type: "ack", room: f.room, id: f.id, seq: res.body.seq, duplicate: true });
    } else if (res.status !== 202) {
      this._deliver({ type: "error", code: res.body.error || `http_${res.status}`, reason: res.body.reason || "", room: f.room, id: f.id, retry_after_ms: res.retryAfterMs });
    }
    // Accepted: the message itself arrives on the room's stream and resolves the publish.
  }

  _end(code, reason) {
    if (this.readyState === 3) return;
    this.readyState = 3;
    for (const es of this.streams.values()) es.close();
    this.streams.clear();
    setTimeout(() => this.onclose?.({ code, reason }), 0);
  }

  close() { this._end(1000, ""); }
}
