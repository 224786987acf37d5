// Kairos status page: polls GET /status every second and renders it. Vanilla JS, no dependencies.
// Every value from the server goes into the page through textContent (tenant and app names are client input).
"use strict";

const POLL_MS = 1000;
const $ = (id) => document.getElementById(id);

// With --protect-observability, /status needs the API key: open the page as /?key=<key>. The key is kept in
// sessionStorage (this tab only) and taken out of the address bar, so it does not stay in the history.
const API_KEY = (() => {
  const params = new URLSearchParams(location.search);
  const key = params.get("key");
  if (key === null) return sessionStorage.getItem("kairos-key");
  sessionStorage.setItem("kairos-key", key);
  params.delete("key");
  history.replaceState(null, "", location.pathname + (params.size ? `?${params}` : ""));
  return key;
})();

// ---- formatting ---------------------------------------------------------------------------------------------

function fmtInt(n) {
  return n == null ? "–" : Math.round(n).toLocaleString("en-US");
}

function fmtRate(n) {
  if (n == null) return "–";
  return n >= 100 ? fmtInt(n) : n.toFixed(1);
}

function fmtSeconds(s) {
  if (s == null) return "–";
  if (s < 1) return `${(s * 1000).toFixed(s < 0.01 ? 2 : 0)} ms`;
  return `${s.toFixed(2)} s`;
}

function fmtDuration(s) {
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = Math.floor(s % 60);
  return h ? `${h}h ${m}m` : m ? `${m}m ${sec}s` : `${sec}s`;
}

function fmtPercent(x) {
  return x == null || Number.isNaN(x) ? "–" : `${(100 * x).toFixed(1)} %`;
}

function setText(id, text) {
  const el = $(id);
  if (el.textContent !== text) el.textContent = text;
}

// ---- building blocks ----------------------------------------------------------------------------------------

function fillTable(tbodyId, rows, emptyText) {
  const tbody = $(tbodyId);
  const width = tbody.closest("table").querySelectorAll("thead tr:last-child th").length;
  const fresh = document.createElement("tbody");
  fresh.id = tbodyId;
  if (!rows.length) {
    const tr = fresh.insertRow();
    const td = tr.insertCell();
    td.colSpan = width;
    td.className = "empty";
    td.textContent = emptyText;
  }
  for (const row of rows) {
    const tr = fresh.insertRow();
    for (const cell of row) tr.insertCell().textContent = cell;
  }
  tbody.replaceWith(fresh);
}

function setStack(barId, parts) {
  // parts: {className: value}; widths are shares of the sum
  const total = Object.values(parts).reduce((a, b) => a + b, 0);
  for (const [name, value] of Object.entries(parts)) {
    const span = $(barId).querySelector(`.${name}`);
    span.style.width = total ? `${(100 * value) / total}%` : "0";
    span.title = `${name}: ${fmtInt(value)}`;
  }
}

const SVG_NS = "http://www.w3.org/2000/svg";

function sparkline(svgId, values, format, style = "line") {
  // style "line": one polyline per run of non-null values (rates, dense); "bars": one bar per value
  // (latency percentiles, present only in seconds with requests). The caption shows the latest value and the max.
  const svg = $(svgId);
  const w = 300, h = 48, pad = 3;
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  svg.setAttribute("preserveAspectRatio", "none");
  svg.replaceChildren();
  const present = values.filter((v) => v != null);
  const max = Math.max(...present, 0);
  const x = (i) => (values.length > 1 ? (i * w) / (values.length - 1) : 0);
  const y = (v) => h - pad - (max > 0 ? (v / max) * (h - 2 * pad) : 0);
  const draw = (points, className) => {
    const line = document.createElementNS(SVG_NS, "polyline");
    line.setAttribute("points", points.map(([a, b]) => `${a.toFixed(1)},${b.toFixed(1)}`).join(" "));
    line.setAttribute("class", className);
    svg.appendChild(line);
  };
  let run = [];
  const flush = () => {
    if (run.length === 1) run.push([run[0][0] + 1, run[0][1]]);
    if (run.length) draw(run, "line");
    run = [];
  };
  values.forEach((v, i) => {
    if (style === "bars") {
      if (v != null) draw([[x(i), h], [x(i), Math.min(y(v), h - 2)]], "bar");
    } else if (v == null) {
      flush();
    } else {
      run.push([x(i), y(v)]);
    }
  });
  flush();
  const last = [...values].reverse().find((v) => v != null);
  const caption = svg.closest("figure").querySelector("figcaption");
  caption.dataset.value = present.length ? `latest ${format(last)} · max ${format(max)}` : "no data yet";
}

function sinceStart(values, s) {
  // A young server has fewer seconds than the window: chart only the seconds it has lived.
  return values.slice(-Math.max(2, Math.min(values.length, Math.ceil(s.uptime_s) + 1)));
}

// ---- sections -----------------------------------------------------------------------------------------------

function fmtReplicas(r) {
  // KunServe: "2 · data-parallel", or "2 · pipeline 0+1" after a parameter drop merged replicas 0 and 1.
  if (!r) return "–";
  if (r.mode === "single") return "1";
  const n = r.groups.reduce((a, g) => a + g.length, 0);
  if (r.mode === "data_parallel") return `${n} · data-parallel`;
  return `${n} · pipeline ${r.groups.map((g) => g.join("+")).join(", ")}`;
}

function renderHeader(s) {
  const info = s.engine_info;
  setText("model", s.model);
  setText("device", info ? info.device : "–");
  setText("policy", info ? info.policy : "–");
  setText("replicas", fmtReplicas(s.replicas));
  setText("kv-geometry", info ? `${fmtInt(info.num_kv_blocks)} × ${info.block_size} tokens` : "–");
  setText("max-model-len", info ? fmtInt(info.max_model_len) : "–");
  setText("uptime", fmtDuration(s.uptime_s));
  setText("stats-age", s.engine ? fmtSeconds(s.engine.age_s) : "–");
  const state = $("state");
  state.textContent = s.state === "ok" ? "serving" : s.state;
  state.className = `badge ${s.state === "ok" ? "ok" : "warn"}`;
}

function meanOfLast(values, n) {
  const tail = values.slice(-n);
  return tail.length ? tail.reduce((a, b) => a + b, 0) / tail.length : null;
}

function renderCards(s) {
  const e = s.engine, series = s.series, recent = s.summary["300s"];
  setText("num-running", e ? fmtInt(e.num_running) : "–");
  setText("num-waiting", e ? fmtInt(e.num_waiting) : "–");
  setText("num-preempted", e ? `${fmtInt(e.num_preempted)} preempted` : "–");
  setText("kv-usage", e ? fmtPercent(e.kv_usage) : "–");
  setText("kv-usage-sub", s.kv ? `${fmtInt(s.kv.used)} of ${fmtInt(s.kv.total)} blocks` : "–");
  // The last second is still filling: rates average the 10 complete seconds before it.
  const complete = (name) => series[name].slice(0, -1);
  setText("gen-rate", fmtRate(meanOfLast(complete("generation_tokens"), 10)));
  setText("prompt-rate", fmtRate(meanOfLast(complete("prompt_tokens"), 10)));
  setText("gen-tokens-total", e ? fmtInt(e.num_generation_tokens_total) : "–");
  setText("prompt-tokens-total", e ? fmtInt(e.num_prompt_tokens_total) : "–");
  setText("preemptions-total", e ? fmtInt(e.num_preemptions_total) : "–");
  setText("preemptions-recent", `${fmtInt(recent.preemptions_total)} in the last 5 min`);
  const queries = e ? e.prefix_cache_queries_total : 0;
  setText("prefix-hit-rate", queries ? fmtPercent(e.prefix_cache_hits_total / queries) : "–");
  setText("prefix-hit-sub", e ? `${fmtInt(e.prefix_cache_hits_total)} of ${fmtInt(queries)} tokens` : "–");
}

function renderKv(s) {
  const kv = s.kv || { total: 0, used: 0, cached: 0, free: 0 };
  setStack("kv-bar", { used: kv.used, cached: kv.cached, free: kv.free });
  const device = s.engine_info ? s.engine_info.device : "–";
  fillTable("kv-table", s.kv ? [[`0 (${device})`, fmtInt(kv.total), fmtInt(kv.used), fmtInt(kv.cached), fmtInt(kv.free)]] : [],
    "no engine stats yet");
}

function renderBatch(s) {
  const b = s.batch || { num_prefill_requests: 0, num_prefill_tokens: 0, num_decode_requests: 0, num_decode_tokens: 0 };
  setStack("batch-bar", { prefill: b.num_prefill_tokens, decode: b.num_decode_tokens });
  setText("batch-prefill-requests", fmtInt(b.num_prefill_requests));
  setText("batch-prefill-tokens", fmtInt(b.num_prefill_tokens));
  setText("batch-decode-requests", fmtInt(b.num_decode_requests));
  setText("batch-decode-tokens", fmtInt(b.num_decode_tokens));
  setText("last-step", s.engine ? fmtSeconds(s.engine.last_step_seconds) : "–");
  setText("num-steps", s.engine ? fmtInt(s.engine.num_steps_total) : "–");
}

function renderLatency(s) {
  const names = { ttft: "TTFT", tpot: "TPOT", e2e: "end to end", queue: "engine queue" };
  const m1 = s.summary["60s"], m5 = s.summary["300s"];
  const rows = Object.entries(names).map(([key, label]) => [
    label,
    ...["p50", "p90", "p99"].map((p) => fmtSeconds(m1[key][p])),
    ...["p50", "p90", "p99"].map((p) => fmtSeconds(m5[key][p])),
    fmtInt(m5[key].count),
  ]);
  fillTable("latency-table", rows, "");
  sparkline("spark-ttft", sinceStart(s.series.ttft_p90, s), fmtSeconds, "bars");
  sparkline("spark-tpot", sinceStart(s.series.tpot_p90, s), fmtSeconds, "bars");
}

function renderThroughput(s) {
  // The last second is still filling: charts stop at the last complete one.
  const rate = (name) => sinceStart(s.series[name].slice(0, -1), s);
  sparkline("spark-gen", rate("generation_tokens"), fmtRate);
  sparkline("spark-prompt", rate("prompt_tokens"), fmtRate);
  sparkline("spark-finished", rate("finished"), fmtRate);
  sparkline("spark-preemptions", rate("preemptions"), fmtRate);
  const reasons = Object.entries(s.finished_by_reason).map(([r, n]) => `${r} ${fmtInt(n)}`);
  setText("finished-by-reason", reasons.length ? reasons.join(" · ") : "none yet");
}

function renderQueues(s) {
  const q = s.queues;
  const counts = (r) => [fmtInt(r.num_waiting), fmtInt(r.num_running), fmtInt(r.num_kv_blocks)];
  fillTable("queues-tenant", q.by_tenant.map((r) => [r.tenant, ...counts(r)]), "no requests");
  fillTable("queues-class", q.by_class.map((r) => [r.slo_class, ...counts(r)]), "no requests");
  fillTable("queues-app", q.by_group.map((r) => [r.tenant, r.app_id || "(none)", r.slo_class, ...counts(r)]),
    "no requests");
}

// ---- polling ------------------------------------------------------------------------------------------------

function render(s) {
  renderHeader(s);
  renderCards(s);
  renderKv(s);
  renderBatch(s);
  renderLatency(s);
  renderThroughput(s);
  renderQueues(s);
  document.body.dataset.updated = String(s.time);
}

async function poll() {
  const started = performance.now();
  try {
    const headers = API_KEY ? { Authorization: `Bearer ${API_KEY}` } : {};
    const response = await fetch("/status", { cache: "no-store", headers });
    if (response.status === 401) throw new Error("HTTP 401: open this page as /?key=<API key>");
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    render(await response.json());
  } catch (err) {
    const state = $("state");
    state.textContent = `unreachable (${err.message})`;
    state.className = "badge bad";
  }
  setTimeout(poll, Math.max(0, POLL_MS - (performance.now() - started)));
}

poll();
