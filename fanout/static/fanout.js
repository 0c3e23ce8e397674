// @ts-check
/**
 * fanout browser client: one WebSocket to the gateway, subscriptions with
 * local fan-out to callbacks, v1.1 requests, reconnect with backoff and
 * resubscribe, idle ping, token renewal, v1.2 recovery (every subscription
 * remembers the stream position and epoch it has seen and resumes from them after
 * any reconnect). Plain ES module, no dependencies.
 * The wire contract is the gateway's protocol.md (v1 + v1.1 `request` + v1.2 recovery).
 */

export const PROTOCOL_VERSION = 1;

/** A connection that stayed open this long resets the backoff. */
const STABLE_MS = 10_000;
/** The client-side request timer runs this much longer than the server's, so XYW012 comes from the server. */
const REQUEST_GRACE_MS = 1_000;
/** Upper bound for one outgoing batch frame (the server's max_frame_bytes caps it further). */
const MAX_BATCH_CHARS = 256 * 1024;

/** @typedef {"idle"|"connecting"|"open"|"reconnecting"|"closed"} State */
/** @typedef {{subject: string, data: unknown, hdr: Record<string, string>|undefined, seq: number|undefined, raw: Record<string, any>}} Message */
/** @typedef {(msg: Message) => void} MessageHandler */
/** @typedef {() => (string|null|Promise<string|null>)} TokenFn */
/**
 * @typedef {object} ClientOptions
 * @property {TokenFn} [token] called before every connection attempt and on `expiring`
 * @property {{initialMs?: number, maxMs?: number}} [backoff] full-jitter exponential backoff (defaults 500 / 30000)
 * @property {number} [pingIntervalMs] send a ping after this long without any frame (default 25000; 0 = off)
 * @property {number} [pongTimeoutMs] reconnect when nothing arrives this long after a ping (default 10000)
 * @property {typeof WebSocket} [WebSocket] WebSocket implementation (default: globalThis.WebSocket)
 */
/** @typedef {{messages: number, dropped: number, reconnects: number, lastCloseCode: number|null}} Stats */
/**
 * A subscription; `seq`/`epoch`: the last stream position seen on it (recoverable subjects only).
 * @typedef {{callbacks: Set<MessageHandler>, tokens: string[]|null, seq: number|null, epoch: string|null}} Sub
 */
/** @typedef {{data: unknown, hdr: Record<string, string>}} Reply */
/**
 * A frame waiting for its answer; requests carry their encoded `text` and whether it was `sent`;
 * a resuming `sub` whether it asked to resume.
 * @typedef {{op: "sub"|"unsub"|"auth"|"request", subject?: string, token?: string, text?: string, sent?: boolean, resume?: boolean,
 *   resolve?: (v: Reply) => void, reject?: (e: FanoutError) => void, timer?: ReturnType<typeof setTimeout>}} Pending
 */

/** An error with the protocol's code (XYW010…XYW013, …) or a client code: CLOSED, DISCONNECTED, TOO_BIG, ENCODE. */
export class FanoutError extends Error {
  /** @param {string} code @param {string} message @param {number} [retryAfterMs] */
  constructor(code, message, retryAfterMs) {
    super(`${code}: ${message}`);
    this.name = "FanoutError";
    this.code = code;
    /** @type {number|undefined} */ this.retryAfterMs = retryAfterMs;
  }
}

/** @param {string} b64 @returns {Uint8Array} */
export function base64ToBytes(b64) {
  const bin = atob(b64);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

/**
 * The payload of a `msg` or `reply` frame: the JSON value from `data`, bytes from `b64`, else undefined.
 * @param {Record<string, any>} frame
 * @returns {unknown}
 */
export function decodePayload(frame) {
  if ("data" in frame) return frame.data;
  if (typeof frame.b64 === "string") return base64ToBytes(frame.b64);
  return undefined;
}

/** @param {string[]} pat @param {string[]} sub */
function matchTokens(pat, sub) {
  for (let i = 0; i < pat.length; i++) {
    if (pat[i] === ">") return sub.length > i;
    if (i >= sub.length || (pat[i] !== "*" && pat[i] !== sub[i])) return false;
  }
  return pat.length === sub.length;
}

/** NATS wildcard match: `*` is exactly one token, `>` one or more trailing tokens. @param {string} pattern @param {string} subject */
export function subjectMatches(pattern, subject) {
  return matchTokens(pattern.split("."), subject.split("."));
}

/** @param {unknown} err */
function reportAsync(err) {
  if (typeof globalThis.reportError === "function") globalThis.reportError(err);
  else setTimeout(() => { throw err; });
}

/**
 * Events (CustomEvent, payload in `detail`): open, close {code, reason, reconnectInMs}, welcome (frame),
 * status (frame), dropped {subject, count, code}, unsubscribed {subject, code}, error {id, code, message, op, subject},
 * expiring {expires_at}, authrenewed {expiresAt}, authfailed {code, reason}, statechange {state, previous},
 * recovered {subject, recovered, reason, epoch} — after a reconnect, each recoverable subscription says
 * whether it got everything it missed (`recovered: true`) or must reload its state (`false`, with the
 * server's `reason`: gap, epoch, limit, no_history, unavailable); live delivery goes on either way.
 */
export class FanoutClient extends EventTarget {
  /** @param {string} url ws(s)://host/ws @param {ClientOptions} [opts] */
  constructor(url, opts = {}) {
    super();
    this.url = url;
    this._opts = opts;
    /** @type {typeof WebSocket} */ this._WS = opts.WebSocket ?? globalThis.WebSocket;
    this._pingMs = opts.pingIntervalMs ?? 25_000;
    this._pongMs = opts.pongTimeoutMs ?? 10_000;
    /** @type {State} */ this._state = "idle";
    /** @type {WebSocket|null} */ this._ws = null;
    /** @type {Map<string, Sub>} */ this._subs = new Map();
    /** @type {Set<Sub>} wildcard subscriptions, matched per message */ this._wild = new Set();
    /** @type {Map<number, Pending>} */ this._pending = new Map();
    /** @type {string[]} */ this._out = [];
    this._flushQueued = false;
    this._nextId = 1;
    this._gen = 0; // bumped whenever a pending async step (token, timer) must be ignored
    this._attempt = 0;
    this._everOpened = false;
    this._openedAt = this._lastRecv = this._pingSentAt = 0;
    this._maxFrame = 1 << 20;
    /** @type {ReturnType<typeof setTimeout>|null} */ this._timer = this._pingTimer = null;
    /** @type {string|null} the token of the current connection */ this._token = null;
    /** @type {Stats} */ this.stats = { messages: 0, dropped: 0, reconnects: 0, lastCloseCode: null };
    /** @type {Record<string, any>|null} the last `welcome` frame */ this.welcome = null;
    /** @type {number|null} token expiry (unix s), null when anonymous */ this.expiresAt = null;
    /** @type {"up"|"down"|"unknown"} */ this.natsStatus = "unknown";
  }

  /** @returns {State} */
  get state() { return this._state; }

  /** Start connecting; a no-op unless idle or closed. */
  connect() {
    if (this._state !== "idle" && this._state !== "closed") return;
    this._attempt = 0;
    this._setState("connecting");
    this._dial();
  }

  /**
   * Subscribe to a subject or pattern; the server `sub` goes out once per subject.
   * @param {string} subject @param {MessageHandler} onMessage @returns {() => void} unsubscribe
   */
  subscribe(subject, onMessage) {
    let sub = this._subs.get(subject);
    if (!sub) {
      const wild = subject.split(".").some((t) => t === "*" || t === ">");
      sub = { callbacks: new Set(), tokens: wild ? subject.split(".") : null, seq: null, epoch: null };
      this._subs.set(subject, sub);
      if (wild) this._wild.add(sub);
      if (this._state === "open") this._track({ op: "sub", subject });
    }
    const entry = sub;
    const cb = (/** @type {Message} */ m) => onMessage(m);
    entry.callbacks.add(cb);
    if (this._state === "idle") this.connect();
    return () => {
      if (!entry.callbacks.delete(cb) || entry.callbacks.size > 0 || this._subs.get(subject) !== entry) return;
      this._subs.delete(subject);
      this._wild.delete(entry);
      if (this._state === "open") this._track({ op: "unsub", subject });
    };
  }

  /**
   * A v1.1 request; rejects with a FanoutError (.code, .retryAfterMs): a gateway code
   * (XYW010…XYW013, …), or the service's own code ("401", "503", …) when the service
   * answered with a NATS micro error (the `Nats-Service-Error-Code` reply header).
   * @param {string} subject @param {unknown} data JSON-serialisable
   * @param {{timeoutMs?: number, headers?: Record<string, string>}} [opts]
   * @returns {Promise<Reply>}
   */
  request(subject, data, { timeoutMs = 5_000, headers } = {}) {
    return new Promise((resolveReply, reject) => {
      /** @param {Reply} v */
      const resolve = (v) => {
        const code = v.hdr["Nats-Service-Error-Code"];
        if (code === undefined) resolveReply(v);
        else reject(new FanoutError(code, v.hdr["Nats-Service-Error"] ?? ""));
      };
      if (this._state === "closed") return reject(new FanoutError("CLOSED", "client is closed"));
      const id = this._nextId++;
      /** @type {Record<string, unknown>} */
      const frame = { op: "request", id, subject, data: data ?? null, timeout_ms: timeoutMs };
      if (headers && Object.keys(headers).length) frame.headers = headers;
      let text;
      try { text = JSON.stringify(frame); } catch (e) { return reject(new FanoutError("ENCODE", String(e))); }
      if (text.length * 3 > this._maxFrame && new TextEncoder().encode(text).length > this._maxFrame) {
        return reject(new FanoutError("TOO_BIG", `request frame exceeds ${this._maxFrame} bytes`));
      }
      const timer = setTimeout(
        () => this._settle(id, new FanoutError("XYW012", "request timed out (client)")),
        timeoutMs + REQUEST_GRACE_MS,
      );
      /** @type {Pending} */ const p = { op: "request", subject, text, sent: false, resolve, reject, timer };
      this._pending.set(id, p);
      if (this._state === "open") this._sendRequest(p);
      else this.connect();
    });
  }

  /** Close for good (until connect() is called again); pending requests reject with CLOSED. */
  close() {
    if (this._state === "closed") return;
    this._gen++;
    this._clearTimers();
    const ws = this._detach();
    this._failPending("CLOSED", true);
    this._setState("closed");
    if (ws) {
      try { ws.close(1000, "client closed"); } catch { /* already closing */ }
      this.stats.lastCloseCode = 1000;
      this._emit("close", { code: 1000, reason: "client closed", reconnectInMs: null });
    }
  }

  // ---- connection lifecycle ----

  async _dial() {
    const gen = ++this._gen;
    /** @type {string|null} */ let token = null;
    try {
      token = this._opts.token ? await this._opts.token() : null;
    } catch (e) {
      if (gen !== this._gen) return;
      this._emit("error", { id: null, code: "TOKEN", message: String(e), op: null, subject: null });
      return this._retry(this._backoff());
    }
    if (gen !== this._gen) return;
    let ws;
    try {
      ws = token ? new this._WS(this.url, ["bearer", token]) : new this._WS(this.url);
    } catch (e) {
      this._emit("error", { id: null, code: "CONNECT", message: String(e), op: null, subject: null });
      return this._retry(this._backoff());
    }
    this._ws = ws;
    this._token = token;
    ws.onopen = () => this._onOpen();
    ws.onmessage = (ev) => this._onData(ev.data);
    ws.onclose = (ev) => this._onClose(ev.code, ev.reason);
    ws.onerror = () => {}; // the close event that follows carries what we can know
  }

  _onOpen() {
    this._openedAt = this._lastRecv = Date.now();
    if (this._everOpened) this.stats.reconnects++;
    this._everOpened = true;
    this._setState("open");
    this._emit("open", { url: this.url });
    for (const [subject, sub] of this._subs) this._resubscribe(subject, sub);
    for (const p of this._pending.values()) if (p.op === "request" && !p.sent) this._sendRequest(p);
    this._pingSentAt = 0;
    if (this._pingMs > 0) this._armPing(this._pingMs);
  }

  /** @param {number} code @param {string} reason */
  _onClose(code, reason) {
    this._detach();
    if (this._pingTimer) clearTimeout(this._pingTimer);
    this.stats.lastCloseCode = code;
    this._failPending("DISCONNECTED", false);
    if (this._openedAt && Date.now() - this._openedAt >= STABLE_MS) this._attempt = 0;
    this._openedAt = 0;
    if (code === 4001 || code === 4005) {
      this._setState("reconnecting");
      this._emit("close", { code, reason, reconnectInMs: null });
      this._reauth(code, reason);
      return;
    }
    const delay = code === 1012 ? 0 : this._backoff();
    this._emit("close", { code, reason, reconnectInMs: delay });
    this._retry(delay);
  }

  /** After 4001/4005: reconnect only with a fresh token, else give up. @param {number} code @param {string} reason */
  async _reauth(code, reason) {
    const gen = ++this._gen;
    /** @type {string|null} */ let fresh = null;
    try { fresh = this._opts.token ? await this._opts.token() : null; } catch { fresh = null; }
    if (gen !== this._gen) return;
    if (fresh && fresh !== this._token) return this._retry(this._backoff());
    this._failPending("CLOSED", true);
    this._setState("closed");
    this._emit("authfailed", { code, reason });
  }

  /** @param {number} delay */
  _retry(delay) {
    this._setState("reconnecting");
    const gen = ++this._gen;
    this._timer = setTimeout(() => {
      this._timer = null;
      if (gen === this._gen) this._dial();
    }, delay);
  }

  _backoff() {
    const b = this._opts.backoff ?? {};
    const cap = Math.min(b.maxMs ?? 30_000, (b.initialMs ?? 500) * 2 ** Math.min(this._attempt, 30));
    this._attempt++;
    return Math.floor(Math.random() * cap);
  }

  /** Drop the current socket's handlers; returns the socket. */
  _detach() {
    const ws = this._ws;
    if (ws) ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    this._ws = null;
    return ws;
  }

  _clearTimers() {
    if (this._timer) clearTimeout(this._timer);
    if (this._pingTimer) clearTimeout(this._pingTimer);
    this._timer = this._pingTimer = null;
  }

  /** @param {number} ms */
  _armPing(ms) {
    this._pingTimer = setTimeout(() => this._checkIdle(), ms);
  }

  _checkIdle() {
    const now = Date.now();
    if (this._pingSentAt) {
      if (this._lastRecv < this._pingSentAt) {
        if (now - this._pingSentAt < this._pongMs) return this._armPing(this._pingSentAt + this._pongMs - now);
        const ws = this._ws;
        if (ws) { ws.onclose = null; try { ws.close(); } catch { /* already closing */ } }
        return this._onClose(1006, "pong timeout");
      }
      this._pingSentAt = 0;
    }
    const idle = now - this._lastRecv;
    if (idle < this._pingMs) return this._armPing(this._pingMs - idle);
    this._pingSentAt = now;
    this._send(JSON.stringify({ op: "ping", id: this._nextId++ }));
    this._armPing(this._pongMs);
  }

  // ---- outgoing ----

  /** Send a frame whose ack/error we correlate by id. @param {{op: "sub"|"unsub"|"auth", subject?: string, token?: string}} f */
  _track(f) {
    const id = this._nextId++;
    this._pending.set(id, { op: f.op, subject: f.subject, token: f.token });
    this._send(JSON.stringify({ ...f, id }));
  }

  /** After a reconnect: resume from the last position seen, when there is one. @param {string} subject @param {Sub} sub */
  _resubscribe(subject, sub) {
    if (sub.seq === null || sub.epoch === null) return this._track({ op: "sub", subject });
    const id = this._nextId++;
    this._pending.set(id, { op: "sub", subject, resume: true });
    this._send(JSON.stringify({ op: "sub", id, subject, since: { seq: sub.seq, epoch: sub.epoch } }));
  }

  /** @param {Pending} p */
  _sendRequest(p) {
    p.sent = true;
    this._send(/** @type {string} */ (p.text));
  }

  /** Queue an encoded frame; frames queued in one task go out as one batch. @param {string} text */
  _send(text) {
    this._out.push(text);
    if (this._flushQueued) return;
    this._flushQueued = true;
    queueMicrotask(() => this._flush());
  }

  _flush() {
    this._flushQueued = false;
    const out = this._out;
    this._out = [];
    const ws = this._ws;
    if (!ws || this._state !== "open") return;
    const limit = Math.min(MAX_BATCH_CHARS, Math.floor(this._maxFrame / 3));
    /** @type {string[]} */ let batch = [];
    let size = 2;
    const push = () => ws.send(batch.length === 1 ? batch[0] : `[${batch.join(",")}]`);
    for (const s of out) {
      if (batch.length && size + s.length + 1 > limit) { push(); batch = []; size = 2; }
      batch.push(s);
      size += s.length + 1;
    }
    if (batch.length) push();
  }

  // ---- incoming ----

  /** @param {unknown} data */
  _onData(data) {
    this._lastRecv = Date.now();
    if (typeof data !== "string") return;
    let v;
    try { v = JSON.parse(data); } catch {
      this._emit("error", { id: null, code: "BAD_FRAME", message: "server frame is not JSON", op: null, subject: null });
      return;
    }
    if (Array.isArray(v)) for (const f of v) this._frame(f);
    else this._frame(v);
  }

  /** @param {any} f */
  _frame(f) {
    if (!f || typeof f !== "object") return;
    switch (f.op) {
      case "msg": return this._dispatch(f);
      case "ack": {
        const p = this._pending.get(f.id);
        if (!p || p.op === "request") return;
        this._pending.delete(f.id);
        if (p.op === "sub") return this._subAck(p, f);
        if (p.op === "auth") {
          this._token = p.token ?? this._token;
          if ("expires_at" in f) this.expiresAt = f.expires_at;
          this._emit("authrenewed", { expiresAt: this.expiresAt });
        }
        return;
      }
      case "reply": return this._settle(f.id, null, { data: decodePayload(f), hdr: f.hdr ?? {} });
      case "error": {
        const p = this._pending.get(f.id);
        if (p && p.op === "request") {
          const retry = typeof f.retry_after_ms === "number" ? f.retry_after_ms : undefined;
          return this._settle(f.id, new FanoutError(String(f.code), String(f.message ?? ""), retry));
        }
        if (p) this._pending.delete(f.id);
        return this._emit("error", { id: f.id ?? null, code: f.code, message: f.message, op: p?.op ?? null, subject: p?.subject ?? null });
      }
      case "welcome":
        this.welcome = f;
        this.expiresAt = f.expires_at ?? null;
        if (f.limits && f.limits.max_frame_bytes > 0) this._maxFrame = f.limits.max_frame_bytes;
        return this._emit("welcome", f);
      case "status":
        if (f.nats === "up" || f.nats === "down") this.natsStatus = f.nats;
        return this._emit("status", f);
      case "dropped":
        this.stats.dropped += Number(f.count) || 0;
        return this._emit("dropped", { subject: f.subject, count: f.count, code: f.code });
      case "unsubscribed": {
        const sub = this._subs.get(f.subject);
        if (sub) { this._subs.delete(f.subject); this._wild.delete(sub); }
        return this._emit("unsubscribed", { subject: f.subject, code: f.code });
      }
      case "expiring":
        if ("expires_at" in f) this.expiresAt = f.expires_at;
        this._emit("expiring", f);
        return void this._renew();
      default: return; // pong and ops from newer servers
    }
  }

  /** A `sub` ack: remember the stream's epoch and position; a resume reports how it went. @param {Pending} p @param {Record<string, any>} f */
  _subAck(p, f) {
    const sub = this._subs.get(/** @type {string} */ (p.subject));
    if (!sub) return;
    if (typeof f.epoch === "string") {
      if (sub.epoch !== null && f.epoch !== sub.epoch) sub.seq = null;
      sub.epoch = f.epoch;
    }
    if (typeof f.seq === "number" && (sub.seq === null || f.seq > sub.seq)) sub.seq = f.seq;
    if (p.resume || "recovered" in f) {
      this._emit("recovered", { subject: p.subject, recovered: f.recovered === true, reason: f.reason ?? null, epoch: sub.epoch });
    }
  }

  /** @param {Record<string, any>} f */
  _dispatch(f) {
    this.stats.messages++;
    const subject = f.subject;
    /** @type {Message|null} */ let m = null;
    const exact = this._subs.get(subject);
    if (exact && !exact.tokens) m = this._deliver(exact, m, f);
    if (this._wild.size) {
      const toks = String(subject).split(".");
      for (const sub of this._wild) if (matchTokens(/** @type {string[]} */ (sub.tokens), toks)) m = this._deliver(sub, m, f);
    }
  }

  /** @param {Sub} sub @param {Message|null} m @param {Record<string, any>} f @returns {Message} */
  _deliver(sub, m, f) {
    const seq = typeof f.seq === "number" ? f.seq : undefined;
    if (seq !== undefined && (sub.seq === null || seq > sub.seq)) sub.seq = seq;
    const msg = m ?? { subject: f.subject, data: decodePayload(f), hdr: f.hdr, seq, raw: f };
    for (const cb of sub.callbacks) {
      try { cb(msg); } catch (e) { reportAsync(e); }
    }
    return msg;
  }

  async _renew() {
    if (!this._opts.token) return;
    const gen = this._gen;
    let t;
    try { t = await this._opts.token(); } catch (e) {
      return this._emit("error", { id: null, code: "TOKEN", message: String(e), op: "auth", subject: null });
    }
    if (gen !== this._gen || this._state !== "open" || !t || t === this._token) return;
    this._track({ op: "auth", token: t });
  }

  // ---- helpers ----

  /** @param {number} id @param {FanoutError|null} err @param {Reply} [value] */
  _settle(id, err, value) {
    const p = this._pending.get(id);
    if (!p || p.op !== "request") return;
    this._pending.delete(id);
    clearTimeout(p.timer);
    if (err) p.reject?.(err);
    else if (value) p.resolve?.(value);
  }

  /** Forget acks we wait for; reject requests already sent (all of them when `all`). @param {string} code @param {boolean} all */
  _failPending(code, all) {
    for (const [id, p] of this._pending) {
      if (p.op !== "request") this._pending.delete(id);
      else if (p.sent || all) this._settle(id, new FanoutError(code, code === "CLOSED" ? "client closed" : "connection lost before the reply"));
    }
  }

  /** @param {State} s */
  _setState(s) {
    const previous = this._state;
    if (previous === s) return;
    this._state = s;
    this._emit("statechange", { state: s, previous });
  }

  /** @param {string} type @param {unknown} detail */
  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}
