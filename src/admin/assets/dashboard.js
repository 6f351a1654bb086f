// The weir dashboard: polls the admin JSON API every second and redraws. No framework, no build.
"use strict";

const POLL_MS = 1000;
let previous = null; // { at: ms, queues: Map(name -> counts) }

function fmt(n) {
  if (n === null || n === undefined) return "–";
  if (typeof n !== "number") return String(n);
  if (Math.abs(n) >= 1e6) return (n / 1e6).toFixed(2) + "M";
  if (Math.abs(n) >= 1e4) return (n / 1e3).toFixed(1) + "k";
  return Number.isInteger(n) ? String(n) : n.toFixed(1);
}

function age(ms) {
  if (ms === null || ms === undefined) return "–";
  if (ms < 1000) return ms + " ms";
  const s = ms / 1000;
  if (s < 120) return s.toFixed(1) + " s";
  if (s < 7200) return (s / 60).toFixed(1) + " min";
  return (s / 3600).toFixed(1) + " h";
}

function micros(us) {
  if (us === null || us === undefined) return "–";
  return us >= 1000 ? (us / 1000).toFixed(2) + " ms" : us + " µs";
}

function cell(row, text, numeric) {
  const td = document.createElement("td");
  td.textContent = text;
  if (numeric) td.className = "n";
  row.appendChild(td);
  return td;
}

async function getJson(path) {
  const r = await fetch(path, { cache: "no-store" });
  const body = await r.json().catch(() => null);
  if (!r.ok) {
    const why = body && body.message ? body.error + ": " + body.message : r.status + " " + r.statusText;
    throw new Error(path + ": " + why);
  }
  return body;
}

function rate(now, prev, key, seconds) {
  if (!prev || seconds <= 0) return null;
  const d = now[key] - prev[key];
  return d >= 0 ? d / seconds : null;
}

function drawQueues(queues, at) {
  const body = document.querySelector("#queues tbody");
  body.textContent = "";
  const seconds = previous ? (at - previous.at) / 1000 : 0;
  if (queues.length === 0) {
    const row = document.createElement("tr");
    row.className = "empty";
    const td = cell(row, "no queues yet");
    td.colSpan = 10;
    body.appendChild(row);
  }
  for (const q of queues) {
    const row = document.createElement("tr");
    row.dataset.queue = q.name;
    const prev = previous ? previous.queues.get(q.name) : null;
    cell(row, q.name).className = "name";
    cell(row, q.shard, true);
    cell(row, fmt(q.messages_ready), true).className = "n ready";
    cell(row, fmt(q.messages_unacked), true).className = "n unacked";
    cell(row, fmt(q.messages_delayed), true).className = "n delayed";
    cell(row, fmt(q.consumers), true);
    cell(row, fmt(rate(q, prev, "messages_published", seconds)), true).className = "n publish-rate";
    cell(row, fmt(rate(q, prev, "messages_delivered", seconds)), true).className = "n deliver-rate";
    cell(row, fmt(rate(q, prev, "messages_acked", seconds)), true).className = "n ack-rate";
    cell(row, age(q.oldest_ready_age_ms), true).className = "n oldest";
    body.appendChild(row);
  }
  previous = { at, queues: new Map(queues.map((q) => [q.name, q])) };
}

function drawShards(overview) {
  const body = document.querySelector("#shards-table tbody");
  body.textContent = "";
  const byShard = new Map();
  for (const h of overview.histograms || []) {
    const s = byShard.get(h.shard) || {};
    if (h.name.startsWith("journal.commit_latency")) s.commit = h;
    if (h.name.startsWith("journal.fdatasync_latency")) s.fsync = h;
    byShard.set(h.shard, s);
  }
  for (let shard = 0; shard < overview.shard_count; shard++) {
    const s = byShard.get(shard) || {};
    const row = document.createElement("tr");
    cell(row, shard);
    const commits = overview.counters["shard." + shard + ".journal.commits"];
    cell(row, fmt(commits), true);
    cell(row, s.commit ? micros(s.commit.p50) : "–", true);
    cell(row, s.commit ? micros(s.commit.p99) : "–", true).className = "n commit-p99";
    cell(row, s.commit ? micros(s.commit.p999) : "–", true);
    cell(row, s.commit ? micros(s.commit.max) : "–", true);
    cell(row, s.fsync ? micros(s.fsync.p99) : "–", true);
    body.appendChild(row);
  }
}

async function poll() {
  const error = document.getElementById("error");
  try {
    const [overview, queues] = await Promise.all([getJson("/api/overview"), getJson("/api/queues")]);
    const at = Date.now();
    document.getElementById("broker").textContent =
      "broker " + overview.broker_version + ", " + overview.shard_count + " shards";
    document.getElementById("shards").textContent = overview.shards_ready + " / " + overview.shard_count;
    document.getElementById("connections").textContent = fmt(overview.connections);
    document.getElementById("queue-count").textContent = fmt(overview.queues);
    document.getElementById("ready-total").textContent = fmt(overview.messages_ready);
    document.getElementById("unacked-total").textContent = fmt(overview.messages_unacked);
    document.getElementById("uptime").textContent = age(overview.uptime_ms);
    drawQueues(queues, at);
    drawShards(overview);
    document.getElementById("updated").textContent = "updated " + new Date(at).toLocaleTimeString();
    error.hidden = true;
  } catch (e) {
    error.textContent = String(e.message || e);
    error.hidden = false;
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

poll();
