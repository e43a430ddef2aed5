// The dashboard: renders the hub's overview (GET /api/overview), then each one the hub
// pushes (server-sent events from /api/stream). Every value from the hub is put in the
// page as text, never as markup.
"use strict";

const WINDOW_MS = 60000;
const BUCKET_MS = 5000;
const samples = new Map(); // tool -> [{t, done, failed, sum, count}]
let updates = 0;
let lastNow = null; // when the previous overview was taken
let shown = null; // the task whose detail is open: {id, terminal}
let asking = 0; // the latest detail request: older answers are dropped
let inFlight = false; // a refresh is under way: the next update does not start another

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else e.setAttribute(k, v);
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : String(c));
  }
  return e;
}

function fill(tableId, rows, empty) {
  const body = document.querySelector(`#${tableId} tbody`);
  const cols = document.querySelectorAll(`#${tableId} thead th`).length;
  body.replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { class: "empty", colspan: cols }, empty))]));
}

function ago(ms, now) {
  const s = Math.max(0, Math.round((now - ms) / 1000));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
  return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
}

function took(ms) {
  return ms < 1000 ? `${ms} ms` : `${(ms / 1000).toFixed(1)} s`;
}

function short(id) {
  return id.length > 13 ? id.slice(0, 8) + "…" + id.slice(-4) : id;
}

function renderCluster(o) {
  document.getElementById("leader").textContent = o.leader_id ? `leader: hub ${o.leader_id}, term ${o.term}` : "no leader";
  fill("members", o.members.map(m => el("tr", { id: `hub-${m.id}` },
    el("td", {}, `hub ${m.id}`), el("td", {}, m.role), el("td", {}, m.api),
    el("td", {}, m.http || "—"), el("td", {}, m.lag))), "no members");
}

function renderNodes(o) {
  fill("nodes", o.nodes.map(n => el("tr", { id: `node-${n.id}` },
    el("td", {}, n.id),
    el("td", { class: `state-${n.status}` }, n.connected ? n.status : `${n.status} (disconnected)`),
    el("td", {}, [n.region, n.zone].filter(Boolean).join(" / ") || "—"),
    el("td", {}, `${Math.round(n.cpu_percent)}%`),
    el("td", {}, n.running),
    el("td", {}, ...n.servers.map(s => el("span", { class: `chip ${s.state}`, title: s.error || "" },
      `${s.name} ${s.state} ${s.running}/${s.max_concurrency}`))))), "no node has joined");
}

function renderQueue(o) {
  fill("queue", o.queue.map(q => el("tr", {}, el("td", {}, q.tenant), el("td", {}, q.queued))), "nothing queued");
}

function renderTasks(o) {
  fill("running", o.running.map(t => el("tr", { id: `task-${t.id}`, class: "task", "data-id": t.id },
    el("td", { class: "id", title: t.id }, short(t.id)), el("td", {}, t.tool), el("td", {}, t.tenant),
    el("td", { class: `state-${t.status}` }, t.status), el("td", {}, t.node || "—"),
    el("td", {}, ago(t.since_ms, o.now_ms)))), "nothing running");
  fill("recent", o.recent.map(t => el("tr", { id: `task-${t.id}`, class: "task", "data-id": t.id, "data-status": t.status },
    el("td", { class: "id", title: t.id }, short(t.id)), el("td", {}, t.tool), el("td", {}, t.tenant),
    el("td", { class: `state-${t.status}` }, t.status), el("td", {}, took(t.took_ms)),
    el("td", {}, `${ago(t.ended_ms, o.now_ms)} ago`))), "nothing finished yet");
}

// Per tool, calls and errors per 5 s over the last minute, from the counters' growth.
function series(points, now) {
  const buckets = [];
  for (let end = now - WINDOW_MS + BUCKET_MS; end <= now; end += BUCKET_MS) {
    const before = [...points].reverse().find(p => p.t <= end - BUCKET_MS) || points[0];
    const at = [...points].reverse().find(p => p.t <= end) || points[0];
    buckets.push({ calls: at.done - before.done, errors: at.failed - before.failed,
      sum: at.sum - before.sum, count: at.count - before.count });
  }
  return buckets;
}

function spark(values, max, cls) {
  const w = 200, h = 34;
  const pts = values.map((v, i) => `${(i * w / Math.max(1, values.length - 1)).toFixed(1)},${(h - 2 - (v / max) * (h - 4)).toFixed(1)}`);
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  line.setAttribute("points", pts.join(" "));
  line.setAttribute("class", cls);
  return line;
}

function renderTools(o) {
  for (const t of o.tools) {
    // A tool seen for the first time after the page opened had no calls at the last update.
    const list = samples.get(t.tool) || (lastNow === null ? [] : [{ t: lastNow, done: 0, failed: 0, sum: 0, count: 0 }]);
    list.push({ t: o.now_ms, done: t.succeeded + t.failed, failed: t.failed, sum: t.seconds_sum, count: t.seconds_count });
    while (list.length > 2 && list[1].t < o.now_ms - WINDOW_MS - BUCKET_MS) list.shift();
    samples.set(t.tool, list);
  }
  const cards = o.tools.map(t => {
    const b = series(samples.get(t.tool), o.now_ms);
    const calls = b.reduce((a, x) => a + x.calls, 0);
    const errors = b.reduce((a, x) => a + x.errors, 0);
    const count = b.reduce((a, x) => a + x.count, 0);
    const mean = count ? b.reduce((a, x) => a + x.sum, 0) / count : 0;
    const max = Math.max(1, ...b.map(x => x.calls));
    const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
    svg.setAttribute("viewBox", "0 0 200 36");
    svg.setAttribute("preserveAspectRatio", "none");
    svg.append(spark(b.map(x => x.calls), max, "calls"), spark(b.map(x => x.errors), max, "errors"));
    return el("div", { class: "card", id: `tool-${t.tool}` },
      el("h3", {}, t.tool),
      svg,
      el("div", { class: "figures" },
        `${(calls / (WINDOW_MS / 1000)).toFixed(2)}/s · ${calls ? Math.round(100 * errors / calls) : 0}% errors · ` +
        `${count ? took(Math.round(mean * 1000)) : "—"} mean · ${t.succeeded + t.failed} in all`));
  });
  lastNow = o.now_ms;
  const box = document.getElementById("tools");
  box.replaceChildren(...(cards.length ? cards : [el("span", { class: "empty" }, "no call has finished since this hub started")]));
}

// A task's detail: what it is and its events, from GET /api/task (again at each update
// while it has not ended).
async function showTask(id) {
  const mine = ++asking;
  let r, body;
  inFlight = true;
  try {
    r = await fetch(`/api/task?id=${encodeURIComponent(id)}`, { credentials: "same-origin" });
    body = await r.json().catch(() => ({ error: `error ${r.status}` }));
  } catch (e) {
    return;
  } finally {
    if (mine === asking) inFlight = false;
  }
  // A click on another task (or a close) since this was asked: its answer is stale.
  if (mine !== asking) return;
  const section = document.getElementById("detail-section");
  section.hidden = false;
  if (!r.ok) {
    shown = null;
    document.getElementById("detail-title").textContent = id;
    document.getElementById("detail-facts").replaceChildren(el("dt", {}, "error"), el("dd", {}, body.error || r.status));
    fill("detail-events", [], "—");
    return;
  }
  const t = body;
  shown = { id: t.id, terminal: t.terminal };
  section.dataset.status = t.status;
  section.dataset.id = t.id;
  document.getElementById("detail-title").textContent = t.id;
  const facts = [["tool", t.tool], ["tenant", t.tenant], ["agent", t.agent], ["state", t.status],
    ["submitted", new Date(t.created_ms).toLocaleString()], ["attempts", t.attempts.length]];
  if (t.dead_lettered) facts.push(["dead letter", "yes"]);
  if (t.error) facts.push(["error", t.error]);
  document.getElementById("detail-facts").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
  fill("detail-events", t.events.map(e => el("tr", { class: `event-${e.what.replace(/ /g, "-")}` },
    el("td", {}, `+${took(Math.max(0, e.at_ms - t.created_ms))}`), el("td", { class: `state-${e.what}` }, e.what),
    el("td", {}, e.node || "—"), el("td", {}, e.detail || ""))), "no event");
}

function render(o) {
  const who = o.hub.admin ? `${o.hub.identity} (admin)` : `${o.hub.identity} (tenant ${o.hub.tenant})`;
  document.getElementById("who").textContent = `hub ${o.hub.id} · signed in as ${who}`;
  // Hubs and nodes are an admin's to see.
  document.getElementById("cluster-section").hidden = !o.hub.admin;
  document.getElementById("nodes-section").hidden = !o.hub.admin;
  document.getElementById("scope").textContent = o.hub.admin ? "showing the whole cluster ·" : `showing tenant ${o.hub.tenant}'s work ·`;
  if (o.hub.admin) {
    renderCluster(o);
    renderNodes(o);
  }
  renderQueue(o);
  renderTasks(o);
  renderTools(o);
  updates += 1;
  const u = document.getElementById("updates");
  u.dataset.count = String(updates);
  u.textContent = `updates received: ${updates}, last at ${new Date(o.now_ms).toLocaleTimeString()}`;
  if (shown && !shown.terminal && !inFlight) showTask(shown.id);
}

function live(on, text) {
  const l = document.getElementById("live");
  l.className = on ? "live" : "live off";
  l.textContent = text;
}

async function start() {
  const r = await fetch("/api/overview", { credentials: "same-origin" });
  if (!r.ok) {
    live(false, r.status === 401 ? "signed out: run `flotilla dashboard` for a new link" : `error ${r.status}`);
    return;
  }
  render(await r.json());
  const stream = new EventSource("/api/stream");
  stream.addEventListener("overview", e => { live(true, "live"); render(JSON.parse(e.data)); });
  stream.onerror = async () => {
    live(false, "reconnecting");
    // A session that ended (expired, or the hub restarted) will not come back by itself.
    const check = await fetch("/api/overview", { credentials: "same-origin" }).catch(() => null);
    if (check && check.status === 401) {
      stream.close();
      live(false, "signed out: run `flotilla dashboard` for a new link");
    }
  };
}

document.addEventListener("click", e => {
  const row = e.target.closest("tr.task");
  if (row) showTask(row.dataset.id);
});
document.getElementById("detail-close").addEventListener("click", () => {
  shown = null;
  asking += 1;
  document.getElementById("detail-section").hidden = true;
});

start();
