// @ts-check
/**
 * The demo page: live tick table with sparklines, counters, a request box and an
 * event log. Messages only update plain state; the DOM is touched at most once
 * per animation frame (and a 4 Hz clock for ages and rates), so the page stays
 * responsive at 10 000+ messages/s.
 */
import { FanoutClient, PROTOCOL_VERSION } from "/fanout.js";

const HISTORY = 120; // sparkline points, one per bucket
const BUCKET_MS = 500; // → the chart shows the last minute
const MAX_ROWS = 50;
const STALE_MS = 5_000;
const LOG_MAX = 40;
const CHART_MS = 250; // redraw a sparkline at most 4 times a second (canvas work dominates otherwise)

const CLOSE_TEXT = /** @type {Record<number, string>} */ ({
  1000: "normal", 1001: "gateway draining", 1002: "protocol error", 1003: "binary frame", 1006: "connection lost",
  1007: "invalid UTF-8", 1008: "policy (rate limit)", 1009: "frame too big", 1011: "internal error",
  1012: "worker restarting", 1013: "overloaded, try later", 4001: "unauthorized", 4003: "slow consumer",
  4004: "NATS unavailable", 4005: "token invalid or expired",
});
const ERROR_TEXT = /** @type {Record<string, string>} */ ({
  XYW002: "subject not allowed for this connection",
  XYW007: "limit exceeded",
  XYW008: "malformed request",
  XYW010: "rate limited",
  XYW011: "circuit open for this subject: the service keeps failing",
  XYW012: "timed out: the service did not answer in time",
  XYW013: "no responders: no service listens on this subject yet",
  DISCONNECTED: "connection lost before the reply",
  CLOSED: "client closed",
  TOO_BIG: "payload too big for one frame",
  JSON: "the payload is not valid JSON",
});

const $ = (/** @type {string} */ id) => /** @type {HTMLElement} */ (document.getElementById(id));
const el = {
  state: $("state"), nats: $("nats"), rate: $("rate"), total: $("total"), drops: $("drops"),
  reconnects: $("reconnects"), lastSeq: $("last-seq"), ticks: $("ticks"), empty: $("empty"), more: $("more"),
  subjects: $("subjects"), conn: $("conn"), expiry: $("expiry"), proto: $("proto"), log: $("log"),
  form: /** @type {HTMLFormElement} */ ($("req-form")), reqSubject: /** @type {HTMLInputElement} */ ($("req-subject")),
  reqBody: /** @type {HTMLTextAreaElement} */ ($("req-body")), reqTimeout: /** @type {HTMLInputElement} */ ($("req-timeout")),
  reqSend: /** @type {HTMLButtonElement} */ ($("req-send")), reqResult: $("req-result"),
};

// ---- configuration from the page URL ----
const params = new URLSearchParams(location.search);
const token = params.get("token");
const subjects = params.getAll("subject").flatMap((s) => s.split(",")).map((s) => s.trim()).filter(Boolean);
if (!subjects.length) subjects.push("xy.md.tick.*");
const wsUrl = params.get("ws") ?? `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`;

const client = new FanoutClient(wsUrl, { token: token ? () => token : undefined });
Object.assign(window, { fanoutDemo: { client } }); // for tests and the console

// ---- state (written per message, read per frame) ----
/**
 * @typedef {{symbol: string, tr: HTMLTableRowElement, cells: HTMLElement[], canvas: HTMLCanvasElement,
 *   price: number, seq: number|null, at: number, dir: number, dirAt: number,
 *   hist: Float64Array, head: number, count: number, bucketAt: number, chartDirty: boolean, drawnAt: number,
 *   shownPrice: number, shownDir: string, shown: string[]}} Row
 */
/** @type {Map<string, Row>} */
const rows = new Map();
/** @type {Set<string>} */
const overflow = new Set();
let lastSeq = /** @type {number|null} */ (null);
let dirty = true;
let rate = 0;
/** @type {{t: number, cls: string, text: string, key?: string, n?: number}[]} */
const log = [];
let logDirty = false;

/** @param {import("/fanout.js").Message} m */
function onTick(m) {
  const d = m.data;
  const obj = d && typeof d === "object" && !(d instanceof Uint8Array) ? /** @type {Record<string, unknown>} */ (d) : null;
  const symbol = String(obj?.symbol ?? m.subject.slice(m.subject.lastIndexOf(".") + 1));
  let r = rows.get(symbol);
  if (!r) {
    if (rows.size >= MAX_ROWS) { overflow.add(symbol); return; }
    r = addRow(symbol);
  }
  const now = performance.now();
  const price = typeof obj?.price === "number" ? obj.price : typeof d === "number" ? d : NaN;
  if (Number.isFinite(price)) {
    if (Number.isFinite(r.price) && price !== r.price) { r.dir = Math.sign(price - r.price); r.dirAt = now; }
    r.price = price;
    if (r.count === 0 || now - r.bucketAt >= BUCKET_MS) {
      r.head = (r.head + 1) % HISTORY;
      r.count = Math.min(r.count + 1, HISTORY);
      r.bucketAt = now;
    }
    r.hist[r.head] = price;
    r.chartDirty = true;
  }
  if (typeof obj?.seq === "number") r.seq = lastSeq = obj.seq;
  r.at = now;
  dirty = true;
  schedule();
}

/** @param {string} symbol @returns {Row} */
function addRow(symbol) {
  const tr = document.createElement("tr");
  tr.dataset.symbol = symbol;
  const cells = ["sym", "num price", "num change", "num seq", "num age", "chart"].map((cls) => {
    const td = document.createElement("td");
    td.className = cls;
    tr.append(td);
    return td;
  });
  cells[0].textContent = symbol;
  const canvas = document.createElement("canvas");
  cells[5].append(canvas);
  const after = [...rows.keys()].sort().find((s) => s > symbol);
  el.ticks.insertBefore(tr, after ? /** @type {Row} */ (rows.get(after)).tr : null);
  el.empty.hidden = true;
  /** @type {Row} */
  const r = { symbol, tr, cells, canvas, price: NaN, seq: null, at: 0, dir: 0, dirAt: 0,
    hist: new Float64Array(HISTORY), head: -1, count: 0, bucketAt: 0, chartDirty: true, drawnAt: -Infinity,
    shownPrice: NaN, shownDir: "", shown: [] };
  rows.set(symbol, r);
  return r;
}

// ---- rendering ----
let rafPending = false;
function schedule() {
  if (rafPending) return;
  rafPending = true;
  requestAnimationFrame(render);
}

/** @param {HTMLElement} node @param {string} text */
function setText(node, text) {
  if (node.textContent !== text) node.textContent = text;
}

/** Fraction digits by magnitude, so a row keeps its width. @param {number} p */
const digitsFor = (p) => (Math.abs(p) >= 1000 ? 2 : Math.abs(p) >= 1 ? 4 : 6);

/** toLocaleString builds a formatter per call: far too slow per frame, so keep one per precision. */
const formatters = new Map([2, 4, 6].map((d) => [d, new Intl.NumberFormat("en-US", { minimumFractionDigits: d, maximumFractionDigits: d })]));

/** @param {number} p @param {number} [digits] */
function fmtPrice(p, digits = digitsFor(p)) {
  return Number.isFinite(p) ? /** @type {Intl.NumberFormat} */ (formatters.get(digits)).format(p) : "–";
}

/** @param {number} ms */
function fmtAge(ms) {
  if (ms < 1000) return `${(ms / 1000).toFixed(1)} s`;
  if (ms < 60_000) return `${Math.floor(ms / 1000)} s`;
  return `${Math.floor(ms / 60_000)} min`;
}

/** @param {Row} r @param {number} i @param {string} text @param {string} [cls] */
function cell(r, i, text, cls) {
  const key = `${text}|${cls ?? ""}`;
  if (r.shown[i] === key) return;
  r.shown[i] = key;
  r.cells[i].textContent = text;
  if (cls !== undefined) r.cells[i].className = cls;
}

/** Price and change: formatted only when the price or its colour changes. @param {Row} r @param {string} dirCls */
function priceCells(r, dirCls) {
  r.shownPrice = r.price;
  r.shownDir = dirCls;
  cell(r, 1, fmtPrice(r.price), `num price${dirCls}`);
  const oldest = r.count ? r.hist[(r.head - r.count + 1 + HISTORY) % HISTORY] : NaN;
  const change = r.price - oldest;
  if (!Number.isFinite(change) || !oldest) return cell(r, 2, "–", "num change");
  const sign = change > 0 ? "+" : change < 0 ? "−" : "±";
  const pct = Math.abs((change / oldest) * 100).toFixed(2);
  const cls = `num change${change > 0 ? " up" : change < 0 ? " down" : ""}`;
  cell(r, 2, `${sign}${fmtPrice(Math.abs(change), digitsFor(r.price))} (${sign}${pct}%)`, cls);
}

function render() {
  rafPending = false;
  if (!dirty && !logDirty) return;
  const now = performance.now();
  if (dirty) {
    dirty = false;
    for (const r of rows.values()) {
      const dirCls = now - r.dirAt < 600 ? (r.dir > 0 ? " up" : r.dir < 0 ? " down" : "") : "";
      if (r.price !== r.shownPrice || dirCls !== r.shownDir) priceCells(r, dirCls);
      cell(r, 3, r.seq === null ? "–" : String(r.seq));
      const age = now - r.at;
      cell(r, 4, fmtAge(age));
      r.tr.classList.toggle("stale", age > STALE_MS);
      if (r.chartDirty && now - r.drawnAt >= CHART_MS) { r.chartDirty = false; r.drawnAt = now; drawSpark(r); }
    }
    const s = client.stats;
    setText(el.rate, String(Math.round(rate)));
    setText(el.total, String(s.messages));
    setText(el.drops, String(s.dropped));
    el.drops.classList.toggle("alert", s.dropped > 0);
    setText(el.reconnects, String(s.reconnects));
    setText(el.lastSeq, lastSeq === null ? "–" : String(lastSeq));
    setState(el.state, client.state);
    setState(el.nats, natsShown());
    el.more.hidden = overflow.size === 0;
    if (overflow.size) setText(el.more, `+${overflow.size} more subjects not shown (the table keeps the first ${MAX_ROWS}).`);
  }
  if (logDirty) renderLog();
}

/** @param {HTMLElement} node @param {string} state */
function setState(node, state) {
  setText(node, state);
  if (node.dataset.state !== state) node.dataset.state = state;
}

/** NATS as reported by `status` frames; ticks flowing on an open connection mean it is up. */
function natsShown() {
  if (client.natsStatus !== "unknown") return client.natsStatus;
  return client.state === "open" && client.stats.messages > 0 ? "up" : "unknown";
}

/** @type {Record<string, string>} */
let palette = {};
function readPalette() {
  const cs = getComputedStyle(document.documentElement);
  palette = { up: cs.getPropertyValue("--up").trim(), down: cs.getPropertyValue("--down").trim(), muted: cs.getPropertyValue("--muted").trim() };
  for (const r of rows.values()) r.chartDirty = true;
  dirty = true;
  schedule();
}

/** @param {Row} r */
function drawSpark(r) {
  const c = r.canvas;
  const dpr = window.devicePixelRatio || 1;
  const w = c.clientWidth || 160, h = c.clientHeight || 30;
  if (c.width !== Math.round(w * dpr)) { c.width = Math.round(w * dpr); c.height = Math.round(h * dpr); }
  const ctx = /** @type {CanvasRenderingContext2D} */ (c.getContext("2d"));
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  if (r.count < 2) return;
  let lo = Infinity, hi = -Infinity;
  for (let i = 0; i < r.count; i++) { const v = r.hist[(r.head - i + HISTORY) % HISTORY]; lo = Math.min(lo, v); hi = Math.max(hi, v); }
  const span = hi - lo || Math.abs(hi) * 1e-6 || 1;
  const stepX = (w - 2) / Math.max(r.count - 1, 20); // stretch a young history, but not two points over the whole width
  const x = (/** @type {number} */ i) => w - 1 - i * stepX;
  const y = (/** @type {number} */ v) => 3 + (h - 6) * (1 - (v - lo) / span);
  const first = r.hist[(r.head - r.count + 1 + HISTORY) % HISTORY];
  const color = r.price > first ? palette.up : r.price < first ? palette.down : palette.muted;
  ctx.beginPath();
  for (let i = 0; i < r.count; i++) {
    const v = r.hist[(r.head - i + HISTORY) % HISTORY];
    if (i === 0) ctx.moveTo(x(i), y(v)); else ctx.lineTo(x(i), y(v));
  }
  ctx.strokeStyle = color;
  ctx.lineWidth = 1.5;
  ctx.lineJoin = "round";
  ctx.stroke();
  ctx.lineTo(x(r.count - 1), h);
  ctx.lineTo(x(0), h);
  ctx.closePath();
  ctx.globalAlpha = 0.12;
  ctx.fillStyle = color;
  ctx.fill();
  ctx.globalAlpha = 1;
  ctx.beginPath();
  ctx.arc(x(0), y(r.price), 2.2, 0, Math.PI * 2);
  ctx.fillStyle = color;
  ctx.fill();
}

// ---- event log (coalesced, rendered per frame) ----
/** @param {string} cls @param {string} text @param {string} [key] entries with the same key within 2 s merge */
function note(cls, text, key) {
  const t = Date.now();
  const top = log[0];
  if (key && top && top.key === key && t - top.t < 2000) { top.n = (top.n ?? 1) + 1; top.t = t; top.text = text; }
  else { log.unshift({ t, cls, text, key }); if (log.length > LOG_MAX) log.pop(); }
  logDirty = true;
  schedule();
}

function renderLog() {
  logDirty = false;
  el.log.replaceChildren(...log.map((e) => {
    const li = document.createElement("li");
    const time = document.createElement("time");
    time.textContent = new Date(e.t).toLocaleTimeString("en-GB");
    const span = document.createElement("span");
    span.className = e.cls;
    span.textContent = e.n ? `${e.text} (×${e.n})` : e.text;
    li.append(time, span);
    return li;
  }));
}

/** @param {string} type @param {(detail: any) => void} fn */
const on = (type, fn) => client.addEventListener(type, (ev) => fn(/** @type {CustomEvent} */ (ev).detail));

let everOpen = false;
on("statechange", ({ state }) => { dirty = true; schedule(); if (state === "connecting") note("", `connecting to ${wsUrl}`); });
on("open", () => { everOpen = true; note("good", "connected"); });
on("welcome", (w) => {
  setText(el.conn, String(w.conn ?? "–"));
  setText(el.proto, String(w.v ?? PROTOCOL_VERSION));
  showExpiry();
});
on("close", ({ code, reason, reconnectInMs }) => {
  const what = CLOSE_TEXT[code] ?? "closed";
  const hint = !everOpen && code === 1006 ? " — the gateway is down or refused the handshake (auth? origin?)" : "";
  const next = reconnectInMs === null ? "" : reconnectInMs === 0 ? "; reconnecting now" : `; retry in ${(reconnectInMs / 1000).toFixed(1)} s`;
  note(code === 1000 ? "" : "warn", `closed ${code} ${what}${reason ? `: ${reason}` : ""}${hint}${next}`, `close${code}`);
});
on("status", ({ nats, code }) => { note(nats === "up" ? "good" : "bad", `NATS ${nats}${code ? ` (${code})` : ""}`); dirty = true; });
on("dropped", ({ subject, count }) => note("warn", `dropped ${count} on ${subject} (XYW003)`, `drop:${subject}`));
on("recovered", ({ subject, recovered, reason }) => note(
  recovered ? "good" : "warn",
  recovered ? `recovered ${subject}: nothing missed` : `${subject} not recovered (${reason}): state reloaded from live`,
  `recovered:${subject}`,
));
on("unsubscribed", ({ subject, code }) => note("bad", `unsubscribed from ${subject} by the gateway (${code})`));
on("error", ({ code, message, op, subject }) => note("bad", `${code}${op ? ` on ${op}` : ""}${subject ? ` ${subject}` : ""}: ${message}`));
// the page's ?token= is its only token, so the client cannot renew it: say what to do instead
on("expiring", ({ expires_at }) => {
  const at = typeof expires_at === "number" ? ` at ${new Date(expires_at * 1000).toLocaleTimeString("en-GB")}` : " soon";
  note("warn", `token expires${at}: reload with a fresh ?token= to stay connected`);
});
on("authrenewed", () => { note("good", "token renewed"); showExpiry(); });
on("authfailed", ({ code }) => note("bad", `authentication failed (${code}); not reconnecting — reload with a fresh ?token=`));

function showExpiry() {
  const exp = client.expiresAt;
  setText(el.expiry, exp ? `expires ${new Date(exp * 1000).toLocaleTimeString("en-GB")}` : "anonymous");
}

// ---- request box ----
el.form.addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const subject = el.reqSubject.value.trim();
  let payload;
  try { payload = el.reqBody.value.trim() ? JSON.parse(el.reqBody.value) : null; } catch {
    return showResult("error", "JSON", ERROR_TEXT.JSON);
  }
  const timeoutMs = Math.max(1, Number(el.reqTimeout.value) || 2000);
  el.reqSend.disabled = true;
  showResult("pending", "", `requesting ${subject}…`);
  const t0 = performance.now();
  try {
    const reply = await client.request(subject, payload, { timeoutMs });
    const ms = Math.round(performance.now() - t0);
    const body = reply.data instanceof Uint8Array ? `${reply.data.length} bytes (binary)` : JSON.stringify(reply.data, null, 2);
    showResult("ok", "", `in ${ms} ms`, body, reply.hdr.traceparent);
  } catch (e) {
    const err = /** @type {import("/fanout.js").FanoutError} */ (e);
    const code = err.code ?? "ERROR";
    const retry = err.retryAfterMs ? ` — retry in ${err.retryAfterMs} ms` : "";
    showResult("error", code, `${ERROR_TEXT[code] ?? "request failed"}${retry}`, undefined, undefined, err.message);
  } finally {
    el.reqSend.disabled = false;
  }
});

/**
 * @param {"ok"|"error"|"pending"} status @param {string} code @param {string} text
 * @param {string} [body] @param {string} [trace] @param {string} [detail]
 */
function showResult(status, code, text, body, trace, detail) {
  const box = el.reqResult;
  box.dataset.status = status;
  box.dataset.code = code;
  const badge = document.createElement("span");
  badge.className = `badge ${status === "ok" ? "ok" : status === "error" ? "err" : ""}`;
  badge.textContent = status === "ok" ? "reply" : status === "error" ? code : "…";
  const line = document.createElement("span");
  line.textContent = text;
  box.replaceChildren(badge, line);
  if (body !== undefined) { const pre = document.createElement("pre"); pre.textContent = body; box.append(pre); }
  const hint = trace ? `traceparent ${trace}` : detail && !detail.endsWith(text) ? detail : "";
  if (hint) { const small = document.createElement("div"); small.className = "hint mono"; small.textContent = hint; box.append(small); }
}

// ---- clocks: rates and ages at 4 Hz, independent of the message rate ----
let rateAt = performance.now(), rateCount = 0;
setInterval(() => {
  const now = performance.now();
  if (now - rateAt >= 1000) {
    rate = ((client.stats.messages - rateCount) * 1000) / (now - rateAt);
    rateAt = now;
    rateCount = client.stats.messages;
  }
  dirty = true;
  schedule();
}, 250);

matchMedia("(prefers-color-scheme: light)").addEventListener("change", readPalette);
readPalette();
setText(el.subjects, subjects.join(", "));
for (const s of subjects) client.subscribe(s, onTick);
