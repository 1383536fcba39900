// Types of roomcast.js (see docs/CLIENT.md).

export interface ConnectOptions {
  /** The server's http(s) base URL. Default: the page's origin. */
  url?: string;
  /** The user name, when the server has no --jwt-secret. */
  user?: string;
  /** Returns an access token; called before each connection and before the token's exp. */
  getToken?: () => Promise<string | null> | string | null;
  /** Also join $lobby and emit its frames as `lobby` events. */
  lobby?: boolean;
  /** Past messages asked for on a room's first join. Default 50. */
  history?: number;
  backoff?: { baseMs?: number; maxMs?: number };
  /** How long before the token's exp it is refreshed. Default 60000. */
  refreshBeforeMs?: number;
  WebSocket?: unknown;
  EventSource?: unknown;
  /** Server-Sent Events fallback: "auto" (default), "always" or "never". */
  sse?: "auto" | "always" | "never";
  /** Failed upgrades in a row (with the HTTP API answering) before falling back. Default 2. */
  sseAfter?: number;
  fetch?: typeof fetch;
  random?: () => number;
}

export type State = "idle" | "connecting" | "connected" | "reconnecting" | "offline" | "failed" | "closed";

export interface StateEvent { state: State; delay?: number; at?: number; code?: number; error?: RoomcastError }

export interface Message {
  type: "message"; room: string; user: string; text: string; seq: number; ts: number;
  id?: string;
  /** Replayed (history or recovery), not live. */
  past: boolean;
  /** Sent by this client. */
  mine: boolean;
}

export interface Member { id: number; user: string }
export interface Welcome {
  type: "welcome"; room: string; user: string; members: number; seq: number; epoch: string;
  /** The room's first members by id, the joiner included; absent where presence names nobody. */
  users?: Member[];
  /** There are more members: the next page starts after this id. */
  next_users_after?: number;
  /** Cluster mode: other servers' members could not be read. */
  users_partial?: true;
}
export interface Presence {
  type: "presence"; room: string; joined: string[]; left: string[]; members: number; truncated?: true;
  /** The member ids of `joined` and `left`, in their order. */
  joined_ids?: number[]; left_ids?: number[];
}
/** The members a client knows of a room, kept current from presence. */
export interface Roster { room: string; users: Member[]; more: boolean; partial: boolean }
export interface Replay { type: "history" | "recovery"; room: string; count: number; epoch: string; since?: number; complete?: boolean; from?: number }
export interface Published { room: string; seq: number; duplicate: boolean }

export class RoomcastError extends Error {
  code: string;
  reason: string;
  status?: number;
  room?: string;
  retryAfterMs?: number;
  terminal: boolean;
}

export interface EventMap {
  state: StateEvent;
  welcome: Welcome;
  replay: Replay;
  message: Message;
  presence: Presence;
  roster: Roster;
  lagged: { type: "lagged"; room: string; missed_from: number; missed_to: number };
  left: { type: "left"; room: string; reason?: string };
  refreshed: { type: "refreshed"; exp: number };
  lobby: { type: string; [key: string]: unknown };
  error: RoomcastError;
  frame: { type: string; [key: string]: unknown };
}

export class Client {
  readonly state: State;
  on<K extends keyof EventMap>(type: K, fn: (event: EventMap[K]) => void): () => void;
  join(room: string, options?: { password?: string; history?: number }): Promise<Welcome>;
  leave(room: string): void;
  publish(room: string, text: string, options?: { id?: string }): Promise<Published>;
  isMine(message: { id?: string }): boolean;
  history(room: string, options?: { before?: number; limit?: number }): Promise<{ messages: Omit<Message, "past" | "mine">[]; nextBefore: number | null }>;
  /** The members known of `room` (from its welcome, then presence); null where none are shown. */
  roster(room: string): Roster | null;
  /** Reads the next page of `room`'s members into its roster. */
  moreMembers(room: string, options?: { limit?: number }): Promise<Roster | null>;
  roomInfo(room: string, options?: { usersAfter?: number; usersLimit?: number }): Promise<{
    room: string; members: number; users: Member[]; next_users_after: number | null; users_partial?: true;
    password_protected: boolean; [key: string]: unknown;
  }>;
  listRooms(options?: { limit?: number }): Promise<{ rooms: { room: string; members: number; local_members: number; password_protected: boolean }[]; total: number }>;
  sendRaw(frame: object): boolean;
  drop(): void;
  pause(): void;
  resume(): void;
  close(): void;
  /** What the connection uses now. */
  transport: "websocket" | "sse";
}

export function connect(options?: ConnectOptions): Client;
export function validRoom(name: string): boolean;
export function dmRoom(...users: string[]): string;

/** Options of the account helpers: the server's base URL (default: the page's origin), a fetch. */
export interface CallOptions { url?: string; fetch?: typeof fetch }
export function serverInfo(options?: CallOptions): Promise<{
  accounts: boolean; register: "open" | "closed" | null; tokens_required: boolean; version: string;
}>;
export function register(username: string, password: string, options?: CallOptions): Promise<{ username: string }>;
export function login(username: string, password: string, options?: CallOptions): Promise<{ token: string; expiresIn: number }>;
export function refreshToken(token: string, options?: CallOptions): Promise<{ token: string; expiresIn: number }>;
export function tokenExpiry(token: string): number | null;
