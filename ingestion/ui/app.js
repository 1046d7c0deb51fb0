// dsched dashboard: plain JavaScript, no build step. Talks only to the public API with the user's credentials.
// Everything shown is put into the page with textContent / DOM nodes (never innerHTML), so data cannot inject markup.
"use strict";

(() => {
  const state = {
    auth: "dev",
    cred: "",
    route: "",
    stream: null,       // AbortController of the live events stream
    streamKey: "",
    listeners: [],      // callbacks for live events of the current page
    cleanups: [],       // stops the current page's timers when another page is shown
  };

  // ---------- small DOM helpers ----------
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") el.className = v;
      else if (k === "text") el.textContent = v;
      else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else if (k === "value") el.value = v;
      else if (k === "checked") el.checked = !!v;
      else el.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined || c === false) continue;
      el.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return el;
  }
  const svgNS = "http://www.w3.org/2000/svg";
  function s(tag, attrs, ...children) {
    const el = document.createElementNS(svgNS, tag);
    for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
    for (const c of children) el.append(c instanceof Node ? c : document.createTextNode(String(c)));
    return el;
  }
  const main = () => document.getElementById("main");
  function toast(message, error) {
    const t = h("div", { class: "toast" + (error ? " error" : ""), text: message });
    document.getElementById("toasts").append(t);
    setTimeout(() => t.remove(), error ? 7000 : 3500);
  }
  const badge = (status) => h("span", { class: "badge " + status, "data-status": status, text: status });
  function fmtTime(iso, zone) {
    if (!iso) return "—";
    const d = new Date(iso);
    try {
      return new Intl.DateTimeFormat("sv-SE", {
        timeZone: zone || "UTC", year: "numeric", month: "2-digit", day: "2-digit",
        hour: "2-digit", minute: "2-digit", second: "2-digit",
      }).format(d) + (zone ? "" : " UTC");  // with a zone, the caller names it
    } catch (_) {
      return iso;
    }
  }
  function zoned(iso, zone) {
    return zone === "UTC" ? fmtTime(iso) : `${fmtTime(iso, zone)} ${zone}  (${fmtTime(iso)})`;
  }
  function ago(iso) {
    if (!iso) return "";
    const secs = (Date.now() - new Date(iso).getTime()) / 1000;
    const abs = Math.abs(secs);
    const text = abs < 60 ? `${Math.round(abs)}s` : abs < 3600 ? `${Math.round(abs / 60)}m` : abs < 86400 ? `${Math.round(abs / 3600)}h` : `${Math.round(abs / 86400)}d`;
    return secs >= 0 ? `${text} ago` : `in ${text}`;
  }
  function payloadText(job) {
    const p = job.payload || {};
    if (p.kind === "http" && p.http) return `${p.http.method || "GET"} ${p.http.url}`;
    if (p.offloaded) return "(large payload in the blob store)";
    return (p.kind === "cmd" ? "cmd:" : "") + (p.text || "");
  }

  // ---------- credentials and API ----------
  function loadCredentials() {
    const params = new URLSearchParams(location.search);
    if (state.auth === "dev") {
      const fromUrl = params.get("user");
      if (fromUrl) localStorage.setItem("dsched.user", fromUrl);
      state.cred = localStorage.getItem("dsched.user") || "";
    } else {
      state.cred = sessionStorage.getItem("dsched.token") || "";
    }
  }
  function saveCredentials(value) {
    state.cred = value.trim();
    if (state.auth === "dev") localStorage.setItem("dsched.user", state.cred);
    else sessionStorage.setItem("dsched.token", state.cred);
  }
  function authHeaders() {
    if (!state.cred) return {};
    return state.auth === "dev" ? { "X-User-ID": state.cred } : { Authorization: "Bearer " + state.cred };
  }
  class ApiError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }
  async function api(method, path, body) {
    const headers = { Accept: "application/json", ...authHeaders() };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let resp;
    try {
      resp = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    } catch (e) {
      throw new ApiError(0, "cannot reach the server");
    }
    const text = await resp.text();
    let data = {};
    try { data = text ? JSON.parse(text) : {}; } catch (_) { data = { detail: text }; }
    if (!resp.ok) throw new ApiError(resp.status, `${resp.status}: ${data.detail || data.error || resp.statusText}`);
    return data;
  }
  async function act(label, fn) {
    try {
      const result = await fn();
      toast(label);
      return result;
    } catch (e) {
      toast(e.message, true);
      return null;
    }
  }

  // ---------- live updates: server-sent events over fetch (so the auth headers go along) ----------
  function live(on) {
    const el = document.getElementById("live");
    el.textContent = on ? "● live" : "○ reconnecting";
    el.classList.toggle("on", on);
  }
  function startStream(jobId) {
    const key = `${state.cred}|${jobId || ""}`;
    if (state.stream && state.streamKey === key) return;
    stopStream();
    const controller = new AbortController();
    state.stream = controller;
    state.streamKey = key;
    let backoff = 1000;
    const run = async () => {
      while (!controller.signal.aborted && state.cred) {
        try {
          const url = "/events" + (jobId ? "?job_id=" + encodeURIComponent(jobId) : "");
          const resp = await fetch(url, { headers: { Accept: "text/event-stream", ...authHeaders() }, signal: controller.signal });
          if (!resp.ok || !resp.body) throw new Error("events: " + resp.status);
          live(true);
          backoff = 1000;
          const reader = resp.body.getReader();
          const decoder = new TextDecoder();
          let buffer = "";
          for (;;) {
            const { value, done } = await reader.read();
            if (done) break;
            buffer += decoder.decode(value, { stream: true });
            let cut;
            while ((cut = buffer.indexOf("\n\n")) >= 0) {
              const block = buffer.slice(0, cut);
              buffer = buffer.slice(cut + 2);
              let event = "message", data = "";
              for (const line of block.split("\n")) {
                if (line.startsWith("event: ")) event = line.slice(7);
                else if (line.startsWith("data: ")) data += line.slice(6);
              }
              if (data) {
                let parsed = null;
                try { parsed = JSON.parse(data); } catch (_) { /* ignore */ }
                for (const fn of state.listeners) fn(event, parsed);
              }
            }
          }
        } catch (e) {
          if (controller.signal.aborted) return;
        }
        live(false);
        await new Promise((r) => setTimeout(r, backoff));
        backoff = Math.min(backoff * 2, 30000);  // back off while the server is away
      }
    };
    run();
  }
  function stopStream() {
    const el = document.getElementById("live");
    el.textContent = "";
    el.classList.remove("on");
    if (state.stream) state.stream.abort();
    state.stream = null;
    state.streamKey = "";
  }
  function onLive(fn) { state.listeners.push(fn); }
  function every(ms, fn) {
    const id = setInterval(fn, ms);
    state.cleanups.push(() => clearInterval(id));
  }
  function debounce(fn, ms) {
    let t = null;
    return (...args) => { clearTimeout(t); t = setTimeout(() => fn(...args), ms); };
  }

  // ---------- router ----------
  const routes = [
    [/^#\/jobs\/([^/]+)$/, (m) => jobPage(decodeURIComponent(m[1]))],
    [/^#\/submit$/, () => submitPage()],
    [/^#\/dead-letters$/, () => deadLettersPage()],
    [/^#\/cluster$/, () => clusterPage()],
    [/^#?\/?(jobs)?(\?.*)?$/, () => jobsPage()],
  ];
  function render() {
    state.listeners = [];
    state.cleanups.forEach((fn) => fn());
    state.cleanups = [];
    const hash = location.hash || "#/jobs";
    state.route = hash;
    for (const a of document.querySelectorAll("[data-nav]")) {
      a.classList.toggle("active", hash.startsWith("#/" + a.dataset.nav));
    }
    main().replaceChildren();
    if (!state.cred) return signIn();
    for (const [re, page] of routes) {
      const m = hash.match(re);
      if (m) return page(m);
    }
    main().append(h("div", { class: "empty", text: "No such page." }));
  }
  function signIn() {
    stopStream();
    const dev = state.auth === "dev";
    const input = h("input", { id: "signin-input", placeholder: dev ? "user id, e.g. demo" : "API key or bearer token", type: dev ? "text" : "password" });
    main().append(h("div", { class: "panel signin" },
      h("h1", { text: "Sign in" }),
      h("p", { class: "muted", text: dev
        ? "Development mode: the API trusts the user id you give (X-User-ID). It is remembered in this browser."
        : "Enter an API key (dsched keys create) or a bearer token. It is kept only for this browser session." }),
      h("form", { class: "bar", onsubmit: (e) => { e.preventDefault(); if (input.value.trim()) { saveCredentials(input.value); syncWho(); render(); } } },
        input, h("button", { class: "primary", type: "submit", text: "Continue" }))));
    input.focus();
  }
  function syncWho() {
    const input = document.getElementById("who-input");
    document.getElementById("who-label").textContent = state.auth === "dev" ? "User" : "Key";
    input.type = state.auth === "dev" ? "text" : "password";
    input.value = state.cred;
  }

  // ---------- Jobs ----------
  function jobsPage() {
    startStream(null);
    const q = { status: "", project_id: "", q: "", limit: 25 };
    const cursors = [null];      // cursors of the pages visited, for Previous
    let page = 0, nextCursor = null, rows = [];
    const selected = new Set();
    const status = h("select", { id: "filter-status", "aria-label": "status" },
      h("option", { value: "", text: "any status" }),
      ...["scheduled", "queued", "running", "succeeded", "failed", "paused", "deleted"].map((x) => h("option", { value: x, text: x })));
    const project = h("input", { id: "filter-project", placeholder: "project", size: 12 });
    const search = h("input", { id: "filter-search", placeholder: "search name, id, payload…", size: 28, type: "search" });
    const count = h("span", { class: "muted small" });
    const tbody = h("tbody");
    const prev = h("button", { id: "page-prev", text: "← Newer", onclick: () => { if (page > 0) { page -= 1; load(); } } });
    const next = h("button", { id: "page-next", text: "Older →", onclick: () => { if (nextCursor) { cursors[page + 1] = nextCursor; page += 1; load(); } } });
    const bulkButtons = ["pause", "resume", "trigger", "delete"].map((action) =>
      h("button", { "data-bulk": action, class: action === "delete" ? "danger" : "", text: action[0].toUpperCase() + action.slice(1), onclick: () => bulk(action) }));
    const allBox = h("input", { type: "checkbox", "aria-label": "select all", onchange: (e) => { rows.forEach((j) => (e.target.checked ? selected.add(j.job_id) : selected.delete(j.job_id))); draw(); } });
    const refilter = () => { page = 0; cursors.length = 1; load(); };
    status.addEventListener("change", refilter);
    project.addEventListener("input", debounce(refilter, 300));
    search.addEventListener("input", debounce(refilter, 300));

    async function load() {
      const params = new URLSearchParams({ limit: String(q.limit) });
      if (status.value) params.set("status", status.value);
      if (project.value.trim()) params.set("project_id", project.value.trim());
      if (search.value.trim()) params.set("q", search.value.trim());
      if (cursors[page]) params.set("cursor", cursors[page]);
      try {
        const data = await api("GET", "/jobs?" + params);
        rows = data.jobs;
        nextCursor = data.next_cursor;
        draw();
      } catch (e) {
        tbody.replaceChildren(h("tr", {}, h("td", { colspan: 8, class: "error-text", text: e.message })));
      }
    }
    function draw() {
      for (const id of [...selected]) if (!rows.some((j) => j.job_id === id)) selected.delete(id);
      bulkButtons.forEach((b) => (b.disabled = selected.size === 0));
      const partial = search.value.trim() && rows.length < q.limit && nextCursor;
      count.textContent = selected.size ? `${selected.size} selected`
        : partial ? "searched a window of jobs; “Older →” searches further" : `page ${page + 1}`;
      prev.disabled = page === 0;
      next.disabled = !nextCursor;
      allBox.checked = rows.length > 0 && rows.every((j) => selected.has(j.job_id));
      if (!rows.length) {
        tbody.replaceChildren(h("tr", {}, h("td", { colspan: 8, class: "empty", text: "No jobs here yet — submit one." })));
        return;
      }
      tbody.replaceChildren(...rows.map((j) => {
        const box = h("input", { type: "checkbox", "aria-label": "select " + j.job_id, checked: selected.has(j.job_id),
          onchange: (e) => { e.target.checked ? selected.add(j.job_id) : selected.delete(j.job_id); draw(); } });
        return h("tr", { class: selected.has(j.job_id) ? "selected" : "", "data-job": j.job_id },
          h("td", {}, box),
          h("td", {}, h("a", { href: "#/jobs/" + encodeURIComponent(j.job_id), text: j.name || j.job_id.slice(0, 8) }),
            h("div", { class: "muted small mono", text: j.job_id })),
          h("td", { text: j.project_id }),
          h("td", {}, badge(j.status)),
          h("td", { class: "mono small", text: payloadText(j).slice(0, 60) }),
          h("td", { class: "small" }, j.cron_schedule ? h("code", { text: j.cron_schedule }) : h("span", { class: "muted", text: "once" }),
            j.cron_schedule && j.timezone !== "UTC" ? h("div", { class: "muted", text: j.timezone }) : null),
          h("td", { class: "small", title: j.next_fire_at || "" }, j.next_fire_at ? `${fmtTime(j.next_fire_at)} (${ago(j.next_fire_at)})` : "—"),
          h("td", {}, j.last_run ? badge(j.last_run.status) : h("span", { class: "muted", text: "—" })));
      }));
    }
    async function bulk(action) {
      const ids = [...selected];
      if (!ids.length) return;
      if (action === "delete" && !confirm(`Delete ${ids.length} job(s)? Future runs stop; history is kept.`)) return;
      const res = await act(`${action}: ${ids.length} job(s)`, () => api("POST", "/jobs/bulk", { action, job_ids: ids }));
      if (res && res.failed) toast(`${res.failed} could not be changed`, true);
      selected.clear();
      setTimeout(load, 300);
    }
    onLive((event) => { if (event === "jobs" && page === 0) reload(); });
    const reload = debounce(load, 400);
    every(15000, () => { if (page === 0) load(); });  // fallback if the stream is down

    main().append(
      h("div", { class: "bar" }, h("h1", { text: "Jobs" }), h("span", { class: "grow" }),
        h("a", { href: "#/submit" }, h("button", { class: "primary", text: "+ Submit a job" }))),
      h("div", { class: "bar" }, search, status, project, h("span", { class: "grow" }), count, ...bulkButtons),
      h("table", { id: "jobs-table" },
        h("thead", {}, h("tr", {}, h("th", {}, allBox), h("th", { text: "Name / id" }), h("th", { text: "Project" }), h("th", { text: "Status" }),
          h("th", { text: "Payload" }), h("th", { text: "Schedule" }), h("th", { text: "Next fire" }), h("th", { text: "Last run" }))),
        tbody),
      h("div", { class: "bar" }, h("span", { class: "grow" }), prev, next));
    load();
  }

  // ---------- Job ----------
  function jobPage(jobId) {
    startStream(jobId);
    let job = null, runs = [], chosen = null, runsCursor = null;
    const head = h("div", { class: "bar" });
    const defPanel = h("div", { class: "panel", id: "job-definition" });
    const schedPanel = h("div", { class: "panel", id: "job-schedule" });
    const timeline = h("div", { class: "timeline", id: "run-timeline" });
    const runsBody = h("tbody");
    const outputPanel = h("div", { id: "run-output" });
    const more = h("button", { text: "Older runs", onclick: () => loadRuns(true) });

    async function loadJob() {
      try {
        job = await api("GET", "/jobs/" + encodeURIComponent(jobId));
      } catch (e) {
        main().replaceChildren(h("div", { class: "panel error-text", text: e.message }));
        return false;
      }
      drawJob();
      loadSchedule();
      return true;
    }
    function drawJob() {
      const paused = job.status === "paused", deleted = job.status === "deleted";
      head.replaceChildren(
        h("h1", {}, job.name || "Job", " ", badge(job.status)), h("span", { class: "grow" }),
        h("button", { id: "job-trigger", text: "Run now", disabled: deleted, onclick: () => control("trigger") }),
        paused ? h("button", { id: "job-resume", text: "Resume", onclick: () => control("resume") })
          : h("button", { id: "job-pause", text: "Pause", disabled: deleted, onclick: () => control("pause") }),
        h("button", { id: "job-delete", class: "danger", text: "Delete", disabled: deleted,
          onclick: () => confirm("Delete this job? Future runs stop; history is kept.") && control("delete") }));
      const rows = [
        ["Job id", h("code", { text: job.job_id })], ["Project", job.project_id], ["Payload", h("code", { text: payloadText(job) })],
        ["Created", fmtTime(job.created_at)], ["Max retries", String(job.max_retries)],
        ["Retry", `${job.retry.backoff}, ${job.retry.initial_s}s → ${job.retry.max_s}s`], ["Timeout", `${job.timeout_s}s`],
        ["Execution", job.execution], ["Priority", String(job.priority)], ["Overlap", job.overlap], ["Misfire", job.misfire],
      ];
      defPanel.replaceChildren(h("h2", { text: "Definition" }), h("dl", { class: "def" }, ...rows.flatMap(([k, v]) => [h("dt", { text: k }), h("dd", {}, v)])));
    }
    async function loadSchedule() {
      const zone = job.timezone || "UTC";
      const cron = h("input", { id: "edit-cron", value: job.cron_schedule || "", placeholder: "e.g. */5 * * * * or @every 1h", size: 26 });
      const tz = h("input", { id: "edit-tz", value: zone, list: "zones", size: 20 });
      const list = h("ul", { class: "preview", id: "next-fires" });
      schedPanel.replaceChildren(
        h("h2", { text: "Schedule" }),
        h("dl", { class: "def" },
          h("dt", { text: "Cron" }), h("dd", {}, job.cron_schedule ? h("code", { text: job.cron_schedule }) : "once"),
          h("dt", { text: "Time zone" }), h("dd", { text: zone })),
        h("h2", { text: zone === "UTC" ? "Next fire times (UTC)" : `Next fire times (${zone}; UTC in brackets)` }), list,
        h("h2", { text: "Edit schedule" }),
        h("form", { class: "bar", id: "edit-schedule", onsubmit: async (e) => {
          e.preventDefault();
          const body = { cron_schedule: cron.value.trim() || null, timezone: tz.value.trim() || "UTC" };
          if (await act("schedule changed", () => api("PATCH", "/jobs/" + encodeURIComponent(jobId), body))) setTimeout(loadJob, 400);
        } }, cron, tz, zonesList(), h("button", { type: "submit", text: "Save schedule", disabled: job.status === "deleted" })));
      try {
        const data = await api("GET", `/jobs/${encodeURIComponent(jobId)}/schedule?next=5`);
        list.replaceChildren(...(data.next.length ? data.next.map((t) => h("li", { text: zoned(t, zone) }))
          : [h("li", { class: "muted", text: "none: paused, deleted or already done" })]));
      } catch (e) {
        list.replaceChildren(h("li", { class: "error-text", text: e.message }));
      }
    }
    async function control(action) {
      const method = action === "delete" ? "DELETE" : "POST";
      const path = "/jobs/" + encodeURIComponent(jobId) + (action === "delete" ? "" : "/" + action);
      if (await act(`${action}: done`, () => api(method, path))) setTimeout(() => { loadJob(); loadRuns(false); }, 400);
    }
    async function loadRuns(older) {
      const params = new URLSearchParams({ limit: "50" });
      if (older && runsCursor) params.set("cursor", runsCursor);
      try {
        const data = await api("GET", `/jobs/${encodeURIComponent(jobId)}/runs?${params}`);
        runs = older ? runs.concat(data.runs) : data.runs;
        runsCursor = data.next_cursor;
        drawRuns();
      } catch (e) {
        runsBody.replaceChildren(h("tr", {}, h("td", { colspan: 8, class: "error-text", text: e.message })));
      }
    }
    function drawRuns() {
      more.disabled = !runsCursor;
      timeline.replaceChildren(...runs.slice().reverse().map((r) => h("button", {
        class: `tick ${r.status}${chosen === r.run_id ? " selected" : ""}`, "data-run": r.run_id, "data-status": r.status,
        title: `${r.status} · ${fmtTime(r.scheduled_for)}${r.error ? " · " + r.error : ""}`, "aria-label": `run ${r.status}`,
        onclick: () => showOutput(r) })));
      if (!runs.length) {
        runsBody.replaceChildren(h("tr", {}, h("td", { colspan: 8, class: "empty", text: "No runs yet." })));
        return;
      }
      runsBody.replaceChildren(...runs.map((r) => {
        const result = r.exit_code !== null ? `exit ${r.exit_code}` : r.http_status !== null ? `HTTP ${r.http_status}` : "";
        const secs = r.started_at && r.finished_at ? ((new Date(r.finished_at) - new Date(r.started_at)) / 1000).toFixed(2) + "s" : "";
        return h("tr", { class: "clickable" + (chosen === r.run_id ? " selected" : ""), "data-run": r.run_id, onclick: () => showOutput(r) },
          h("td", {}, badge(r.status)),
          h("td", { text: String(r.attempt) }),
          h("td", { class: "small", text: fmtTime(r.scheduled_for) }),
          h("td", { class: "small", text: r.started_at ? fmtTime(r.started_at) : "—" }),
          h("td", { class: "small", text: secs }),
          h("td", { class: "small mono", text: r.worker_id || "" }),
          h("td", { class: "small" }, result, r.error ? h("div", { class: r.status === "skipped" ? "muted" : "error-text", text: r.error }) : null),
          h("td", {}, r.status === "running" ? h("button", { class: "danger", "data-cancel": r.run_id, text: "Cancel",
            onclick: (e) => { e.stopPropagation(); act("cancelling the run", () => api("POST", `/runs/${encodeURIComponent(r.run_id)}/cancel`)); } }) : null));
      }));
    }
    async function showOutput(run) {
      chosen = run.run_id;
      drawRuns();
      const pre = h("pre", { class: "output", id: "output-text" });
      outputPanel.replaceChildren(h("h2", {}, "Output of run ", h("code", { text: run.run_id.slice(0, 8) }), " ", badge(run.status)), pre);
      if (run.status === "skipped") { pre.textContent = run.error || "skipped"; return; }
      try {  // streamed: big outputs appear as they arrive
        const resp = await fetch(`/runs/${encodeURIComponent(run.run_id)}/output`, { headers: authHeaders() });
        if (!resp.ok) throw new Error(`${resp.status}`);
        const reader = resp.body.getReader();
        const decoder = new TextDecoder();
        let shown = 0;
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          shown += value.length;
          pre.append(decoder.decode(value, { stream: true }));
          if (shown > 2000000) { pre.append("\n… (truncated in the browser; use `dsched runs output`)"); await reader.cancel(); break; }
        }
        if (!pre.textContent) pre.textContent = "(no output)";
      } catch (e) {
        pre.textContent = "cannot load the output: " + e.message;
      }
    }
    onLive((event, data) => {
      if (event === "runs" && data) {
        for (const r of data.runs) {
          const i = runs.findIndex((x) => x.run_id === r.run_id);
          if (i >= 0) runs[i] = r; else runs.unshift(r);
        }
        runs.sort((a, b) => (b.scheduled_for || "").localeCompare(a.scheduled_for || "") || b.attempt - a.attempt);
        drawRuns();
        if (data.job && (!job || data.job.status !== job.status)) { job = data.job; drawJob(); loadSchedule(); }
      }
      if (event === "jobs" && data && data.jobs.some((j) => j.job_id === jobId)) {
        const j = data.jobs.find((x) => x.job_id === jobId);
        if (job && (j.status !== job.status)) { job = j; drawJob(); loadSchedule(); }
      }
    });
    every(10000, () => loadRuns(false));  // fallback when the stream is down

    main().append(
      h("div", { class: "small" }, h("a", { href: "#/jobs", text: "← Jobs" })), head,
      h("div", { class: "grid" }, defPanel, schedPanel),
      h("div", { class: "panel" },
        h("div", { class: "bar" }, h("h2", { text: "Runs" }), h("span", { class: "grow" }),
          h("div", { class: "legend" }, ...["succeeded", "failed", "running", "skipped", "cancelled"].map((x) => h("span", { class: "l-" + x, text: x })))),
        timeline,
        h("table", { id: "runs-table" }, h("thead", {}, h("tr", {}, ...["Status", "Attempt", "Scheduled", "Started", "Took", "Worker", "Result", ""].map((t) => h("th", { text: t })))), runsBody),
        h("div", { class: "bar" }, h("span", { class: "grow" }), more),
        outputPanel));
    loadJob().then((found) => found && loadRuns(false));
  }

  let zonesCache = null;
  function zonesList() {
    if (!zonesCache) {
      const zones = (Intl.supportedValuesOf ? Intl.supportedValuesOf("timeZone") : ["UTC"]);
      zonesCache = ["UTC", ...zones.filter((z) => z !== "UTC")];
    }
    return h("datalist", { id: "zones" }, ...zonesCache.map((z) => h("option", { value: z })));
  }

  // ---------- Submit ----------
  function submitPage() {
    stopStream();
    const kind = h("select", { id: "submit-kind" }, h("option", { value: "cmd", text: "shell command (cmd:)" }),
      h("option", { value: "http", text: "HTTP call" }), h("option", { value: "plain", text: "plain payload (echo)" }));
    const command = h("textarea", { id: "submit-payload", placeholder: "echo hello", spellcheck: "false" });
    const url = h("input", { id: "submit-url", placeholder: "https://example.com/hook", size: 50 });
    const method = h("select", { id: "submit-method" }, ...["POST", "GET", "PUT", "PATCH", "DELETE"].map((m) => h("option", { value: m, text: m })));
    const body = h("textarea", { id: "submit-body", placeholder: '{"hello": "world"} (optional)', spellcheck: "false" });
    const project = h("input", { id: "submit-project", value: localStorage.getItem("dsched.project") || "default" });
    const name = h("input", { id: "submit-name", placeholder: "optional" });
    const when = h("select", { id: "submit-when" }, h("option", { value: "now", text: "now" }),
      h("option", { value: "at", text: "at a time" }), h("option", { value: "cron", text: "recurring (cron)" }));
    const at = h("input", { id: "submit-at", type: "datetime-local", step: "1" });
    const cron = h("input", { id: "submit-cron", placeholder: "*/5 * * * *", size: 30, spellcheck: "false" });
    const tz = h("input", { id: "submit-tz", list: "zones", value: Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC", size: 24 });
    const retries = h("input", { id: "submit-retries", type: "number", min: "0", max: "100", value: "3", size: 4 });
    const preview = h("ul", { class: "preview", id: "submit-preview" });
    const payloadRows = h("div", { class: "form" });
    const whenRows = h("div", { class: "form" });
    const error = h("p", { class: "error-text", id: "submit-error" });

    function drawKind() {
      const k = kind.value;
      payloadRows.replaceChildren(...(k === "http" ? [
        h("label", { for: "submit-url", text: "URL" }), url, h("label", { for: "submit-method", text: "Method" }), method,
        h("label", { for: "submit-body", text: "Body" }), body,
      ] : [h("label", { for: "submit-payload", text: k === "cmd" ? "Command" : "Payload" }), command,
        h("div", { class: "help muted small", text: k === "cmd" ? "Runs under /bin/sh -c where DSCHED_ALLOW_CMD=true." : "Any text; the run echoes it." })]));
    }
    function drawWhen() {
      const w = when.value;
      whenRows.replaceChildren(...(w === "at" ? [h("label", { for: "submit-at", text: "At (your local time)" }), at]
        : w === "cron" ? [
          h("label", { for: "submit-cron", text: "Cron" }), cron,
          h("div", { class: "help muted small" }, "5 fields (min hour day month weekday), 6 with leading seconds, ",
            h("code", { text: "@every 30s" }), ", ", h("code", { text: "@hourly" }), ", ", h("code", { text: "@daily" }),
            ". Examples: ", h("code", { text: "*/15 * * * *" }), " every 15 min; ", h("code", { text: "0 30 9 * * MON-FRI" }), " 09:30:00 on weekdays."),
          h("label", { for: "submit-tz", text: "Time zone" }), tz, zonesList()] : []),
        h("label", { text: "First fire times" }), preview);
      refreshPreview();
    }
    const refreshPreview = debounce(async () => {
      const params = new URLSearchParams({ next: "5" });
      let zone = "UTC";
      if (when.value === "cron") {
        if (!cron.value.trim()) { preview.replaceChildren(h("li", { class: "muted", text: "enter a cron expression" })); return; }
        params.set("cron", cron.value.trim());
        zone = tz.value.trim() || "UTC";
        params.set("timezone", zone);
      } else if (when.value === "at" && at.value) {
        params.set("at", new Date(at.value).toISOString());
      }
      try {
        const data = await api("GET", "/schedule/preview?" + params);
        preview.replaceChildren(...data.next.map((t) => h("li", { text: zoned(t, zone) })));
      } catch (e) {
        preview.replaceChildren(h("li", { class: "error-text", text: e.message }));
      }
    }, 250);
    kind.addEventListener("change", drawKind);
    when.addEventListener("change", drawWhen);
    for (const el of [cron, tz, at]) el.addEventListener("input", refreshPreview);

    async function submit(e) {
      e.preventDefault();
      error.textContent = "";
      const req = { project_id: project.value.trim() || "default", max_retries: Number(retries.value || 0) };
      if (name.value.trim()) req.name = name.value.trim();
      if (kind.value === "http") {
        const spec = { url: url.value.trim(), method: method.value };
        if (body.value.trim()) {
          try { spec.body = JSON.parse(body.value); spec.headers = { "Content-Type": "application/json" }; } catch (_) { spec.body = body.value; }
        }
        req.payload = { http: spec };
      } else {
        req.payload = (kind.value === "cmd" ? "cmd:" : "") + command.value;
      }
      if (when.value === "at") {
        if (!at.value) { error.textContent = "choose a time"; return; }
        req.next_fire_at = new Date(at.value).toISOString();
      }
      if (when.value === "cron") { req.cron_schedule = cron.value.trim(); req.timezone = tz.value.trim() || "UTC"; }
      try {
        const res = await api("POST", "/submit", req);
        localStorage.setItem("dsched.project", req.project_id);
        toast("submitted " + res.job_id.slice(0, 8));
        location.hash = "#/jobs/" + encodeURIComponent(res.job_id);
      } catch (err) {
        error.textContent = err.message;
      }
    }
    drawKind();
    drawWhen();
    main().append(h("h1", { text: "Submit a job" }),
      h("form", { class: "panel", id: "submit-form", onsubmit: submit },
        h("div", { class: "form" }, h("label", { for: "submit-kind", text: "Kind" }), kind), payloadRows,
        h("div", { class: "form" }, h("label", { for: "submit-project", text: "Project" }), project, h("label", { for: "submit-name", text: "Name" }), name,
          h("label", { for: "submit-when", text: "When" }), when), whenRows,
        h("div", { class: "form" }, h("label", { for: "submit-retries", text: "Max retries" }), retries),
        error, h("button", { class: "primary", type: "submit", id: "submit-button", text: "Submit" })));
  }

  // ---------- Dead letters ----------
  function deadLettersPage() {
    startStream(null);
    let letters = [], cursor = null;
    const selected = new Set();
    const tbody = h("tbody");
    const replaySelected = h("button", { id: "replay-selected", class: "primary", text: "Replay selected", onclick: () => replay([...selected]) });
    const older = h("button", { text: "Older", onclick: () => load(true) });
    async function load(more) {
      try {
        const data = await api("GET", "/dead-letters?limit=50" + (more && cursor ? "&cursor=" + encodeURIComponent(cursor) : ""));
        letters = more ? letters.concat(data.dead_letters) : data.dead_letters;
        cursor = data.next_cursor;
        draw();
      } catch (e) {
        tbody.replaceChildren(h("tr", {}, h("td", { colspan: 7, class: "error-text", text: e.message })));
      }
    }
    function draw() {
      replaySelected.disabled = selected.size === 0;
      older.disabled = !cursor;
      if (!letters.length) {
        tbody.replaceChildren(h("tr", {}, h("td", { colspan: 7, class: "empty", text: "No dead letters. Jobs land here when their retries are used up." })));
        return;
      }
      tbody.replaceChildren(...letters.map((d) => h("tr", { "data-letter": d.id, class: selected.has(d.id) ? "selected" : "" },
        h("td", {}, h("input", { type: "checkbox", "aria-label": "select " + d.id, checked: selected.has(d.id),
          onchange: (e) => { e.target.checked ? selected.add(d.id) : selected.delete(d.id); draw(); } })),
        h("td", {}, h("a", { href: "#/jobs/" + encodeURIComponent(d.job_id), class: "mono small", text: d.job_id })),
        h("td", { text: d.project_id }),
        h("td", { class: "small", text: fmtTime(d.dead_at) }),
        h("td", { text: String(d.attempts) }),
        h("td", { class: "error-text small", text: d.error || "" }),
        h("td", {}, h("button", { "data-replay": d.id, text: "Replay", onclick: () => replay([d.id]) })))));
    }
    async function replay(ids) {
      if (!ids.length) return;
      const res = ids.length === 1
        ? await act("replayed: a new run starts now", () => api("POST", `/dead-letters/${encodeURIComponent(ids[0])}/replay`))
        : await act(`replayed ${ids.length}`, () => api("POST", "/dead-letters/replay", { ids }));
      if (res) ids.forEach((i) => selected.delete(i));
      draw();
    }
    onLive((event) => { if (event === "dead_letters") load(false); });
    main().append(h("div", { class: "bar" }, h("h1", { text: "Dead letters" }), h("span", { class: "grow" }), replaySelected),
      h("table", { id: "dead-letters-table" }, h("thead", {}, h("tr", {}, ...["", "Job", "Project", "Dead at", "Attempts", "Error", ""].map((t) => h("th", { text: t })))), tbody),
      h("div", { class: "bar" }, h("span", { class: "grow" }), older));
    load(false);
  }

  // ---------- Cluster ----------
  function clusterPage() {
    stopStream();
    document.getElementById("live").textContent = "↻ every 5 s";
    const body = h("div", { id: "cluster" });
    let delay = 5000, timer = null, alive = true;
    async function load() {
      if (!alive) return;
      try {
        const [cluster, stats] = await Promise.all([api("GET", "/cluster"), api("GET", "/stats?window_s=900")]);
        draw(cluster, stats);
        delay = 5000;
      } catch (e) {
        body.replaceChildren(h("div", { class: "panel error-text", text: e.status === 403 ? "The cluster view is for admins." : e.message }));
        delay = Math.min(delay * 2, 60000);  // polling with backoff
      }
      timer = setTimeout(load, delay);
    }
    state.cleanups.push(() => { alive = false; clearTimeout(timer); });
    function stat(label, value) { return h("div", {}, h("div", { class: "stat", text: value }), h("div", { class: "stat-label", text: label })); }
    function draw(cluster, stats) {
      const q = cluster.queue || {};
      const total = Object.values(stats.runs).reduce((a, b) => a + b, 0);
      const lag = (v) => (v === null || v === undefined ? "—" : `${v} ms`);
      body.replaceChildren(
        h("div", { class: "panel stats" }, stat("leader", cluster.leader || "none"), stat("queue waiting", String(q.visible ?? "—")),
          stat("in flight", String(q.in_flight ?? "—")), stat("runs, last 15 min", String(total)),
          stat("failed, last 15 min", String((stats.runs.failed || 0) + (stats.runs.timed_out || 0))),
          stat("fire lag p50", lag(stats.fire_lag_p50_ms)), stat("fire lag p99", lag(stats.fire_lag_p99_ms))),
        h("div", { class: "grid" },
          h("div", { class: "panel" }, h("h2", { text: "Throughput (runs/s), last 15 minutes" }),
            chart(stats.points, [["throughput_per_s", "s1", "runs/s"]])),
          h("div", { class: "panel" }, h("h2", { text: "Fire lag p50 / p99 (ms), last 15 minutes" }),
            chart(stats.points, [["fire_lag_p50_ms", "s1", "p50"], ["fire_lag_p99_ms", "s2", "p99"]]))),
        h("div", { class: "grid" },
          h("div", { class: "panel" }, h("h2", { text: `Pickers (${cluster.shard_count} shards)` }),
            h("table", { id: "pickers-table" }, h("thead", {}, h("tr", {}, h("th", { text: "Picker" }), h("th", { text: "Shards" }))),
              h("tbody", {}, ...cluster.pickers.map((p) => h("tr", {}, h("td", { class: "mono", text: p.node_id + (p.node_id === cluster.leader ? " (leader's node)" : "") }),
                h("td", {}, h("div", { class: "shards" }, ...p.shards.map((x) => h("span", { text: String(x) }))))))))),
          h("div", { class: "panel" }, h("h2", { text: "Workers" }),
            h("table", { id: "workers-table" }, h("thead", {}, h("tr", {}, ...["Worker", "Busy / slots", "Current runs", "Heartbeat"].map((t) => h("th", { text: t })))),
              h("tbody", {}, ...(cluster.workers.length ? cluster.workers.map((w) => h("tr", {}, h("td", { class: "mono", text: w.node_id }),
                h("td", { text: `${w.busy} / ${w.slots}` }), h("td", { class: "mono small", text: (w.running || []).map((r) => r.slice(0, 8)).join(" ") || "—" }),
                h("td", { class: "small", text: ago(w.heartbeat_at) })))
                : [h("tr", {}, h("td", { colspan: 4, class: "empty", text: "no live workers" }))]))))));
    }
    main().append(h("h1", { text: "Cluster" }), body);
    load();
  }
  function chart(points, series) {
    const W = 600, H = 150, P = 28;
    const svg = s("svg", { class: "chart", viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none", role: "img" });
    const values = series.flatMap(([k]) => points.map((p) => p[k]).filter((v) => v !== null && v !== undefined));
    const max = Math.max(1e-9, ...values);
    svg.append(s("line", { class: "axis", x1: P, y1: H - P, x2: W - 4, y2: H - P }), s("line", { class: "axis", x1: P, y1: 6, x2: P, y2: H - P }),
      s("text", { x: 2, y: 14 }, max >= 10 ? max.toFixed(0) : max.toPrecision(2)), s("text", { x: 2, y: H - P }, "0"),
      s("text", { x: P, y: H - 8 }, "−15 min"), s("text", { x: W - 30, y: H - 8 }, "now"));
    if (!points.length) { svg.append(s("text", { x: W / 2 - 40, y: H / 2 }, "collecting samples…")); return svg; }
    const t0 = Date.now() - 15 * 60 * 1000;
    const x = (p) => P + ((new Date(p.at).getTime() - t0) / (15 * 60 * 1000)) * (W - P - 6);
    const y = (v) => H - P - (v / max) * (H - P - 10);
    let legendX = P + 8;
    for (const [key, cls, label] of series) {
      const pts = points.filter((p) => p[key] !== null && p[key] !== undefined).map((p) => `${x(p).toFixed(1)},${y(p[key]).toFixed(1)}`);
      if (pts.length === 1) pts.push(pts[0].replace(/^[^,]+/, (v) => String(Number(v) + 2)));
      svg.append(s("polyline", { class: cls, points: pts.join(" ") }));
      svg.append(s("text", { x: legendX, y: 14, class: cls + "-label" }, label));
      legendX += 40;
    }
    return svg;
  }

  // ---------- start ----------
  async function start() {
    try {
      const resp = await fetch("/ui/config.json");
      state.auth = (await resp.json()).auth || "dev";
    } catch (_) { state.auth = "dev"; }
    if (state.auth !== "dev" && state.auth.includes("dev")) state.auth = "dev";
    loadCredentials();
    syncWho();
    document.getElementById("who").addEventListener("submit", (e) => {
      e.preventDefault();
      saveCredentials(document.getElementById("who-input").value);
      stopStream();
      render();
    });
    window.addEventListener("hashchange", render);
    render();
  }
  start();
})();
