// qdworker dashboard: reads /api/, follows /api/live, renders with plain DOM calls.
// No framework, no build step. Text always goes in as text (never as HTML).
"use strict";

const TOKEN_KEY = "qdworker.token";
const LIVE_RETRY_MS = [1000, 2000, 5000, 10000];
const STATES = ["pending", "running", "unfinished", "succeeded", "failed", "dead", "cancelled"];
const NARROW_HIDDEN = new Set(["Tag", "Error"]);  // columns a phone does without
const FILTERS = ["state", "type", "queue", "user_id", "tag", "concurrency_key", "text", "since", "until"];

let me = null;          // {user_id, admin, viewer, development}
let current = null;     // the mounted view: {refresh()}
let refreshing = null;  // the refresh in flight
let again = false;      // a signal arrived during it

// ---------------------------------------------------------------- small helpers

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

const $ = (id) => document.getElementById(id);
const fmtTime = (v) => (v ? new Date(v).toLocaleString() : "");
const fmtNum = (v) => (v === null || v === undefined ? "" : Number(v).toLocaleString());

function fmtSeconds(s) {
  if (s === null || s === undefined) return "";
  s = Math.round(s);
  if (s < 90) return `${s} s`;
  if (s < 5400) return `${Math.round(s / 60)} min`;
  if (s < 172800) return `${(s / 3600).toFixed(1)} h`;
  return `${(s / 86400).toFixed(1)} d`;
}

function fmtBytes(b) {
  if (b === null || b === undefined) return "";
  const mib = b / (1024 * 1024);
  return mib >= 1024 ? `${(mib / 1024).toFixed(1)} GiB` : `${mib.toFixed(0)} MiB`;
}

function table(caption, headers, rows) {
  const body = rows.length
    ? rows.map((cells) => h("tr", {}, cells.map((c) => (c instanceof Node && c.tagName === "TD" ? c : h("td", {}, c)))))
    : [h("tr", {}, h("td", { colspan: headers.length, class: "muted" }, "Nothing here."))];
  // A column of numbers is right-aligned, its header too.
  const numeric = (i) => rows.length > 0 && body[0].children[i]?.classList.contains("num");
  const headClass = (t, i) => [NARROW_HIDDEN.has(t) ? "hide-narrow" : "", numeric(i) ? "num" : ""].join(" ").trim() || null;
  const head = h("tr", {}, headers.map((t, i) => h("th", { scope: "col", class: headClass(t, i) }, t)));
  return h("div", { class: "scroll" }, h("table", {}, h("caption", {}, caption), h("thead", {}, head), h("tbody", {}, body)));
}

const num = (v) => h("td", { class: "num" }, fmtNum(v));
const stateCell = (s) => h("td", {}, h("span", { class: `state state-${s}` }, s));
const jobLink = (id) => h("a", { href: `#/job/${id}` }, `#${id}`);

function showAlert(text) {
  const el = $("alert");
  el.textContent = text || "";
  el.hidden = !text;
}

function status(text) { $("status").textContent = text; }

// ---------------------------------------------------------------- the API

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path, options = {}) {
  const headers = { accept: "application/json", ...(options.headers || {}) };
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.authorization = `Bearer ${token}`;
  const response = await fetch(path, { ...options, headers });
  const text = await response.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch (e) { body = null; }
  if (!response.ok) {
    const detail = (body && body.detail) || text || response.statusText;
    if (response.status === 401) showLogin(detail);
    throw new ApiError(response.status, `${response.status}: ${detail}`);
  }
  return body;
}

function act(path, payload) {
  return api(path, {
    method: "POST",
    headers: { "content-type": "application/json", "x-qdworker-action": "1" },
    body: JSON.stringify(payload || {}),
  });
}

function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== "" && v !== null && v !== undefined) q.set(k, v);
  const s = q.toString();
  return s ? `?${s}` : "";
}

// A confirmation in the page's <dialog>; resolves true when confirmed.
function confirmAction(text) {
  const dialog = $("confirm");
  $("confirm-text").textContent = text;
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
    dialog.returnValue = "cancel";
    dialog.showModal();
    $("confirm-no").focus();
  });
}

// Run an action on what `filters` matches, after showing how many that is.
async function bulk(action, filters, what) {
  try {
    const c = await api(`/api/jobs/count${query({ ...filters })}`);
    if (c.count === 0) { status(`Nothing to ${action}: no ${what} in a state that allows it.`); return; }
    const n = c.more ? `more than ${fmtNum(c.limit)} (the first ${fmtNum(c.limit)} will be taken)` : fmtNum(c.count);
    if (!(await confirmAction(`${action[0].toUpperCase()}${action.slice(1)} ${n} ${what}?`))) return;
    const done = await act(`/api/actions/${action}`, { filters });
    showAlert("");
    status(`${action}: ${fmtNum(done.touched)} job(s) done.`);
    await refresh();
  } catch (e) {
    showAlert(`Could not ${action}: ${e.message}`);
  }
}

function actionButtons(filters, what) {
  const note = me && !me.admin ? h("span", { class: "muted" }, "(actions need the admin role)") : null;
  return h("div", { class: "actions" },
    h("button", { type: "button", onclick: () => bulk("cancel", { ...filters, state: filters.state || "unfinished" }, what) }, "Cancel…"),
    h("button", { type: "button", onclick: () => bulk("retry", { ...filters, state: "dead" }, `dead ${what}`) }, "Retry dead…"),
    h("button", { type: "button", class: "danger", onclick: () => bulk("delete", filters, what) }, "Delete…"),
    note);
}

// ---------------------------------------------------------------- views

function throughputChart(rows, since) {
  const width = 360, height = 100, slots = 360, start = new Date(since).getTime();
  const peak = Math.max(1, ...rows.map((r) => Number(r.succeeded) + Number(r.failed)));
  const bars = [];
  for (const r of rows) {
    const x = Math.floor((new Date(r.bucket).getTime() - start) / 10000);
    if (x < 0 || x >= slots) continue;
    const ok = (Number(r.succeeded) / peak) * height, bad = (Number(r.failed) / peak) * height;
    bars.push(`<rect class="ok" x="${x}" y="${height - ok}" width="1" height="${ok}"/>`);
    bars.push(`<rect class="bad" x="${x}" y="${height - ok - bad}" width="1" height="${bad}"/>`);
  }
  const svg = h("div", { role: "img", "aria-label": `Completed and failed jobs per 10 seconds over the last hour; peak ${peak}` });
  // Numbers only: safe to build as markup.
  svg.innerHTML = `<svg class="chart" viewBox="0 0 ${width} ${height}" preserveAspectRatio="none">${bars.join("")}</svg>`;
  const total = (k) => rows.reduce((s, r) => s + Number(r[k]), 0);
  return h("div", { class: "card" },
    h("h3", {}, "Throughput, last hour"),
    svg,
    h("p", { class: "legend" }, h("span", { class: "ok" }, `${fmtNum(total("succeeded"))} completed`),
      h("span", { class: "bad" }, `${fmtNum(total("failed"))} failed`), h("span", { class: "muted" }, `peak ${fmtNum(peak)} per 10 s`)),
    h("details", {}, h("summary", {}, "As a table"),
      table("Runs per 10-second bucket", ["Bucket", "Completed", "Failed"],
        rows.slice(-60).map((r) => [fmtTime(r.bucket), num(r.succeeded), num(r.failed)]))));
}

const overview = {
  title: "Overview",
  mount(el) { this.el = el; },
  async refresh() {
    const d = await api("/api/overview");
    const live = d.workers.filter((w) => !w.stopped_at && w.seen_seconds_ago < 30);
    const stale = d.workers.filter((w) => !w.stopped_at && w.seen_seconds_ago >= 30);
    const p = d.pickup, ms = (v) => (v === null ? "—" : `≤ ${fmtNum(v)} ms`);
    const over = (k) => (p.over_last_bound.includes(k) ? `> ${fmtNum(p.bounds_ms[p.bounds_ms.length - 1])} ms` : null);
    const backlog = d.queues.reduce((s, q) => s + Number(q.due), 0);
    this.el.replaceChildren(
      h("h2", {}, "Overview"),
      h("div", { class: "cards" },
        h("div", { class: "card" }, h("h3", {}, "Backlog"), h("p", { class: "figure" }, fmtNum(backlog)), h("p", { class: "muted" }, "due jobs waiting, all queues")),
        h("div", { class: "card" }, h("h3", {}, "Pickup latency, last hour"),
          h("p", { class: "figure" }, `p50 ${over("p50_ms") || ms(p.p50_ms)}`), h("p", {}, `p95 ${over("p95_ms") || ms(p.p95_ms)}`)),
        h("div", { class: "card" }, h("h3", {}, "Workers"), h("p", { class: "figure" }, `${live.length} live`),
          h("p", { class: stale.length ? "error" : "muted" }, `${stale.length} silent for 30 s or more; ${d.supervisors.length} supervisor(s)`))),
      h("div", { class: "cards" }, throughputChart(d.throughput, d.since)),
      h("h3", {}, "Backlog by queue"),
      table("Queues with settings or unfinished jobs", ["Queue", "Due", "Scheduled", "Running", "Oldest due waited", "Paused"],
        d.queues.map((q) => [h("a", { href: `#/jobs?queue=${encodeURIComponent(q.name)}` }, q.name), num(q.due), num(q.scheduled), num(q.running),
          fmtSeconds(q.oldest_due_seconds), q.paused ? "paused" : ""])));
  },
};

function formValues(form) {
  const values = {};
  for (const name of FILTERS) {
    let v = form.elements[name].value.trim();
    if ((name === "since" || name === "until") && v) v = new Date(v).toISOString();
    if (v) values[name] = v;
  }
  return values;
}

function localInput(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  return new Date(d.getTime() - d.getTimezoneOffset() * 60000).toISOString().slice(0, 16);
}

const jobs = {
  title: "Jobs",
  mount(el, params) {
    this.params = params;
    this.filters = Object.fromEntries(FILTERS.filter((k) => params.get(k)).map((k) => [k, params.get(k)]));
    const field = (name, label, input) => h("div", {}, h("label", { for: `f-${name}` }, label), input);
    const text = (name, label, type) => field(name, label, h("input", { id: `f-${name}`, name, type: type || "text", value: name === "since" || name === "until" ? localInput(this.filters[name]) : this.filters[name] || "" }));
    const state = h("select", { id: "f-state", name: "state" }, h("option", { value: "" }, "any"),
      STATES.map((s) => h("option", { value: s, selected: this.filters.state === s }, s)));
    const form = h("form", { class: "filters", role: "search", "aria-label": "Filter jobs", onsubmit: (e) => {
      e.preventDefault();
      location.hash = `#/jobs${query(formValues(form))}`;
    } },
      field("state", "State", state), text("type", "Type"), text("queue", "Queue"), text("user_id", "User id", "number"),
      text("tag", "Tag"), text("concurrency_key", "Concurrency key"), text("text", "Text in data or error"),
      text("since", "Created from", "datetime-local"), text("until", "Created before", "datetime-local"),
      h("div", { class: "buttons" }, h("button", { type: "submit", class: "primary" }, "Filter"),
        h("button", { type: "button", onclick: () => { location.hash = "#/jobs"; } }, "Clear")));
    this.results = h("div", { id: "results" });
    el.replaceChildren(h("h2", {}, "Jobs"), form, actionButtons(this.filters, "matching job(s)"), this.results);
  },
  async refresh() {
    const before = this.params.get("before");
    const d = await api(`/api/jobs${query({ ...this.filters, before })}`);
    const rows = d.jobs.map((j) => [jobLink(j.id), j.type, j.queue, stateCell(j.state), h("td", { class: "hide-narrow" }, j.tag),
      num(j.user_id), num(j.attempt), fmtTime(j.created_at), fmtTime(j.finished), h("td", { class: "hide-narrow" }, j.error || "")]);
    const here = (extra) => `#/jobs${query({ ...this.filters, ...extra })}`;
    this.results.replaceChildren(
      table(`Jobs, newest first${before ? ` (older than #${before})` : ""}`,
        ["#", "Type", "Queue", "State", "Tag", "User", "Attempt", "Created", "Finished", "Error"], rows),
      h("nav", { class: "pager", "aria-label": "Pages" },
        before ? h("a", { href: here({}) }, "Newest") : null,
        d.next ? h("a", { href: here({ before: d.next }), rel: "next" }, "Older →") : h("span", { class: "muted" }, "No older jobs")));
  },
};

const job = {
  title: "Job",
  mount(el, params, id) { this.el = el; this.id = id; },
  async refresh() {
    const { job: j, chain } = await api(`/api/jobs/${this.id}`);
    document.title = `Job #${j.id} · qdworker`;
    const skip = new Set(["data", "result"]);
    const columns = Object.keys(j).filter((k) => !skip.has(k)).map((k) => {
      const v = j[k];
      const shown = v !== null && typeof v === "object" ? JSON.stringify(v) : v === null ? "—" : String(v);
      return [h("dt", {}, k), h("dd", {}, shown)];
    });
    const stateOf = (a) => (a.finished ? (a.success ? "succeeded" : a.dead_at ? "dead" : "failed") : a.started ? "running" : "pending");
    this.el.replaceChildren(
      h("h2", {}, `Job #${j.id}: ${j.type}`),
      actionButtons({ id: String(j.id) }, `job #${j.id}`),
      h("h3", {}, "Attempts"),
      h("ol", { class: "timeline", "aria-label": "Attempts of this job, oldest first" }, chain.map((a) =>
        h("li", { class: a.id === j.id ? "current" : null, "aria-current": a.id === j.id ? "step" : null },
          a.id === j.id ? `#${a.id}` : jobLink(a.id), ` attempt ${a.attempt}: `, h("span", { class: `state state-${stateOf(a)}` }, stateOf(a)),
          ` · due ${fmtTime(a.due)}`, a.finished ? ` · finished ${fmtTime(a.finished)}` : "", a.error ? ` · ${a.error}` : ""))),
      h("h3", {}, "Data"), h("pre", { tabindex: 0, "aria-label": "Data" }, JSON.stringify(j.data, null, 2)),
      h("h3", {}, "Result"), h("pre", { tabindex: 0, "aria-label": "Result", id: "job-result" }, JSON.stringify(j.result, null, 2)),
      h("h3", {}, "Columns"), h("dl", { class: "columns" }, columns));
  },
};

const failures = {
  title: "Failures",
  mount(el) { this.el = el; },
  async refresh() {
    const d = await api("/api/failures");
    const filtersOf = (g) => ({ state: "dead", type: g.type, ...(g.error_type ? { error_type: g.error_type } : {}), ...(g.error ? { error: g.error } : {}) });
    this.el.replaceChildren(h("h2", {}, "Failures"),
      h("p", { class: "muted" }, "Dead jobs (failed for good), grouped by type, error type and message."),
      table("Dead jobs by error", ["Type", "Error type", "Message", "Jobs", "Last", "Actions"], d.rows.map((g) => [
        g.type, g.error_type || "", g.error || "", num(g.jobs), h("td", {}, fmtTime(g.last_dead_at), " ", jobLink(g.last_id)),
        h("td", {}, h("div", { class: "buttons" },
          h("button", { type: "button", onclick: () => bulk("retry", filtersOf(g), `dead ${g.type} job(s)`) }, "Retry all…"),
          h("button", { type: "button", class: "danger", onclick: () => bulk("delete", filtersOf(g), `dead ${g.type} job(s)`) }, "Discard…"))),
      ])));
  },
};

const queues = {
  title: "Queues",
  mount(el) { this.el = el; },
  async refresh() {
    const d = await api("/api/queues");
    const toggle = (q) => async () => {
      try {
        await act(`/api/queues/${encodeURIComponent(q.name)}/pause`, { paused: !q.paused });
        showAlert("");
        await refresh();
      } catch (e) { showAlert(`Could not ${q.paused ? "resume" : "pause"} ${q.name}: ${e.message}`); }
    };
    const limit = (v) => (v === null ? "—" : fmtNum(v));
    this.el.replaceChildren(h("h2", {}, "Queues"), table("Queues", ["Queue", "Due", "Scheduled", "Running", "Oldest due waited", "Concurrency", "Per key", "Rate", "State", "Actions"],
      d.rows.map((q) => [h("a", { href: `#/jobs?queue=${encodeURIComponent(q.name)}` }, q.name), num(q.due), num(q.scheduled), num(q.running),
        fmtSeconds(q.oldest_due_seconds), limit(q.concurrency), limit(q.key_concurrency),
        q.rate_limit === null ? "—" : `${q.rate_limit} / ${q.rate_period_ms} ms`, q.paused ? "paused" : "running",
        h("td", {}, h("button", { type: "button", onclick: toggle(q) }, q.paused ? `Resume ${q.name}` : `Pause ${q.name}`))])));
  },
};

const cron = {
  title: "Cron",
  mount(el) { this.el = el; },
  async refresh() {
    const d = await api("/api/cron");
    const run = (c) => async () => {
      try { await act(`/api/cron/${c.id}/run`); showAlert(""); status(`Cron job #${c.id} is due now.`); await refresh(); } catch (e) { showAlert(`Could not run #${c.id}: ${e.message}`); }
    };
    this.el.replaceChildren(h("h2", {}, "Cron"), table("Cron jobs: the next tick of each", ["Next tick", "Type", "Schedule", "Due", "Lag", "Last tick", "Actions"],
      d.rows.map((c) => [jobLink(c.id), c.type, h("td", {}, h("code", {}, c.cron_schedule)), fmtTime(c.next_due), c.started ? "running" : fmtSeconds(c.lag_seconds),
        c.last_id ? h("td", {}, jobLink(c.last_id), ` ${c.last_success ? "succeeded" : "failed"} ${fmtTime(c.last_finished)}`) : "—",
        h("td", {}, h("button", { type: "button", onclick: run(c), disabled: Boolean(c.started) }, "Run now"))])));
  },
};

const workers = {
  title: "Workers",
  mount(el) { this.el = el; },
  async refresh() {
    const d = await api("/api/workers");
    this.el.replaceChildren(h("h2", {}, "Workers"),
      table("Supervisors", ["Id", "Host", "pid", "Websocket clients", "Last seen"],
        d.supervisors.map((s) => [s.id, s.host, String(s.pid), num(s.ws_clients), `${fmtSeconds(s.seen_seconds_ago)} ago`])),
      h("h3", {}, "Worker processes, last 24 hours"),
      table("Worker processes", ["Supervisor", "Slot", "Host", "pid", "Uptime", "Jobs run", "Failed", "RSS", "Restarts", "Health"],
        d.workers.map((w) => [w.supervisor || "", num(w.slot), w.host, String(w.pid), fmtSeconds(w.uptime_seconds), num(w.jobs_run), num(w.jobs_failed),
          h("td", { class: "num" }, fmtBytes(w.rss_bytes)), num(w.restarts),
          w.stopped_at ? `stopped ${fmtTime(w.stopped_at)}` : w.seen_seconds_ago < 30 ? "live" : `silent ${fmtSeconds(w.seen_seconds_ago)}`])));
  },
};

const VIEWS = { overview, jobs, job, failures, queues, cron, workers };

// ---------------------------------------------------------------- routing, refresh, live

async function refresh() {
  if (!current) return;
  if (refreshing) { again = true; return refreshing; }
  refreshing = (async () => {
    do {
      again = false;
      try {
        await current.refresh();
        status(`Updated ${new Date().toLocaleTimeString()}`);
      } catch (e) {
        if (e.status !== 401) showAlert(e.message);
      }
    } while (again);
  })();
  try { await refreshing; } finally { refreshing = null; }
}

function route() {
  const [path, search] = (location.hash.slice(1) || "/overview").split("?");
  const parts = path.split("/").filter(Boolean);
  const name = VIEWS[parts[0]] ? parts[0] : "overview";
  const view = VIEWS[name];
  for (const a of document.querySelectorAll("nav a")) {
    if (a.getAttribute("href") === `#/${name === "job" ? "jobs" : name}`) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  document.title = `${view.title} · qdworker`;
  showAlert("");
  // Each view renders into a container of its own: a refresh of the view before, still in
  // flight, then writes into a detached node instead of over this one.
  const el = h("div");
  $("view").replaceChildren(el);
  view.mount(el, new URLSearchParams(search || ""), parts[1]);
  current = view;
  refresh();
}

let liveAbort = null;

async function follow() {
  let attempt = 0;
  for (;;) {
    liveAbort = new AbortController();
    const token = sessionStorage.getItem(TOKEN_KEY);
    try {
      const response = await fetch("/api/live", { headers: token ? { authorization: `Bearer ${token}` } : {}, signal: liveAbort.signal });
      if (response.status === 401) { showLogin("Your token was refused."); return; }
      if (!response.ok || !response.body) throw new Error(String(response.status));
      $("live").textContent = "live"; $("live").classList.add("on");
      attempt = 0;
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const message = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          if (message.split("\n").includes("event: change")) refresh();
        }
        if (buffer.length > 65536) buffer = "";  // bounded: never a real message
      }
    } catch (e) {
      if (liveAbort.signal.aborted) return;
    }
    $("live").textContent = "reconnecting"; $("live").classList.remove("on");
    await new Promise((r) => setTimeout(r, LIVE_RETRY_MS[Math.min(attempt++, LIVE_RETRY_MS.length - 1)]));
    refresh();  // changes while we were away
  }
}

// ---------------------------------------------------------------- sign-in

function showLogin(message) {
  if (liveAbort) liveAbort.abort();
  $("login").hidden = false;
  $("view").hidden = true;
  $("login-error").textContent = message && sessionStorage.getItem(TOKEN_KEY) ? message : "";
  current = null;
  $("token").focus();
}

async function start() {
  try {
    me = await api("/api/me");
  } catch (e) {
    if (e.status !== 401) showAlert(e.message);
    return;
  }
  $("login").hidden = true;
  $("view").hidden = false;
  $("identity").textContent = me.development ? "development mode (admin)" : `user ${me.user_id} · ${me.admin ? "admin" : "viewer"}`;
  $("signout").hidden = me.development;
  route();
  follow();
}

document.addEventListener("DOMContentLoaded", () => {
  window.addEventListener("hashchange", () => { if (me) { route(); $("view").focus(); } });
  $("login").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
    $("token").value = "";
    start();
  });
  $("signout").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    me = null;
    showLogin("");
  });
  start();
});
