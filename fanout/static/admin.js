// fanout admin page: polls /admin/state.json (the JSON `fanout top --json` prints) every second.
"use strict";

const STATE_URL = "/admin/state.json";
const PERIOD_MS = 1000;

const $ = (id) => document.getElementById(id);

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return i === 0 ? `${n} B` : `${n.toFixed(1)} ${units[i]}`;
}

function duration(s) {
  if (s < 120) return `${Math.round(s)} s`;
  if (s < 7200) return `${Math.round(s / 60)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

function cells(tr, values) {
  for (const v of values) {
    const td = document.createElement("td");
    if (v instanceof Node) td.append(v); else td.textContent = String(v);
    tr.append(td);
  }
}

function natsCell(row) {
  const b = document.createElement("b");
  b.dataset.state = row.nats;
  const flags = [row.nats];
  if (row.draining) flags.push("draining");
  if (row.shedding) flags.push("shedding");
  if (row.lastErrorCode) flags.push(row.lastErrorCode);
  b.textContent = flags.join(" · ");
  return b;
}

function render(view) {
  const t = view.totals;
  $("status").textContent = view.status;
  $("status").dataset.state = view.status;
  $("workers").textContent = `${t.workers}/${view.workersWanted ?? "?"}`;
  // fewer live workers than the supervisor wants: one died or is being replaced
  $("workers").dataset.state = t.workers < (view.workersWanted ?? 0) ? "degraded" : "ok";
  const restarts = Object.entries(view.restarts);
  $("restart-count").textContent = String(restarts.reduce((sum, [, n]) => sum + n, 0));
  $("restarts").textContent = restarts.length
    ? "worker restarts since start: " + restarts.map(([why, n]) => `${why} ${n}`).join(", ")
    : "no worker restarts since start";
  $("t-clients").textContent = t.clients;
  $("t-subscriptions").textContent = t.subscriptions;
  $("t-deliveries").textContent = t.deliveriesPerSecond.toFixed(1);
  $("t-drops").textContent = t.dropsPerSecond.toFixed(1);
  $("t-outbox").textContent = t.outboxMax;
  $("t-lag").textContent = `${(t.loopLagSeconds * 1000).toFixed(1)} ms`;

  const body = document.createElement("tbody");
  body.id = "rows";
  for (const w of view.workers) {
    const tr = document.createElement("tr");
    tr.dataset.pid = w.pid;
    if (w.draining) tr.className = "leaving";
    cells(tr, [w.index, w.pid, w.generation, w.clients, w.subscriptions,
      w.deliveriesPerSecond.toFixed(1), w.dropsPerSecond.toFixed(1), w.outboxMax,
      `${(w.loopLagSeconds * 1000).toFixed(1)} ms`, bytes(w.rssBytes), w.openFds,
      duration(w.uptimeSeconds), natsCell(w)]);
    body.append(tr);
  }
  $("rows").replaceWith(body);
  const foot = document.createElement("tr");
  cells(foot, ["all", "", "", t.clients, t.subscriptions, t.deliveriesPerSecond.toFixed(1),
    t.dropsPerSecond.toFixed(1), t.outboxMax, `${(t.loopLagSeconds * 1000).toFixed(1)} ms`,
    bytes(t.rssBytes), t.openFds, "", `${t.natsConnected}/${t.workers} connected`]);
  $("totals").replaceChildren(foot);
  $("updated").textContent = `updated ${new Date(view.at * 1000).toLocaleTimeString()}`;
  document.body.dataset.polls = String(Number(document.body.dataset.polls || 0) + 1);
}

async function poll() {
  try {
    const resp = await fetch(STATE_URL, { cache: "no-store" });
    if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
    render(await resp.json());
  } catch (err) {
    $("status").textContent = "unreachable";
    $("status").dataset.state = "unreachable";
    $("updated").textContent = `cannot read ${STATE_URL}: ${err.message}`;
  } finally {
    setTimeout(poll, PERIOD_MS);
  }
}

poll();
