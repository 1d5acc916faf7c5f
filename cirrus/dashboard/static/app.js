// The Cirrus dashboard: an overview of every API and a page per API, polled every 2 s from the daemon's
// admin API (/v1/dashboard/...), drawn with uPlot (vendored by scripts/vendor-uplot). No framework, no
// build step, nothing fetched from elsewhere.
"use strict";

(function () {
  const POLL_MS = 2000;
  const WINDOWS = [300, 900, 3600];
  const COLORS = {
    green: "#2f9e44", orange: "#e8590c", red: "#e03131", blue: "#1c7ed6", violet: "#7048e8",
    teal: "#0c8599", grey: "#868e96", yellow: "#f08c00",
  };

  const state = {
    windowS: loadWindow(),
    generation: 0, // bumped on every route change: a stale poll's answer is dropped
    timer: null,
    charts: [], // {plot, el, def} of the page shown
    expired: false,
    restart: null, // polls the page shown again from now (after a change of window)
  };

  // --- small helpers -------------------------------------------------------------------

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key.startsWith("data-")) node.setAttribute(key, value);
      else if (key === "onclick" || key === "onchange") node[key] = value;
      else node.setAttribute(key, value);
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function isNum(value) {
    return typeof value === "number" && Number.isFinite(value);
  }

  function fmt(value, unit) {
    if (!isNum(value)) return "–";
    const abs = Math.abs(value);
    let text;
    if (abs === 0) text = "0";
    else if (abs >= 100) text = Math.round(value).toLocaleString("en");
    else if (abs >= 10) text = value.toFixed(1);
    else if (abs >= 0.01) text = String(Number(value.toFixed(2)));
    else text = value.toPrecision(1);
    return unit ? `${text} ${unit}` : text;
  }

  function tick(value) {
    return isNum(value) ? String(Number(value.toPrecision(3))) : "";
  }

  function fmtInt(value) {
    return isNum(value) ? Math.round(value).toLocaleString("en") : "–";
  }

  function fmtPercent(ratio) {
    if (!isNum(ratio)) return "–";
    const pct = ratio * 100;
    return `${pct === 0 ? "0" : pct < 0.1 ? "<0.1" : pct < 10 ? pct.toFixed(1) : Math.round(pct)} %`;
  }

  function fmtTime(unixS) {
    if (!isNum(unixS)) return "–";
    return new Date(unixS * 1000).toLocaleTimeString("en-GB", { hour12: false });
  }

  // The time axis's labels: 24-hour clock, seconds only where the ticks are closer than a minute.
  function clockTicks(u, splits, axisIdx, space, increment) {
    return splits.map((v) => {
      const text = fmtTime(v);
      return increment < 60 ? text : text.slice(0, 5);
    });
  }

  function fmtDateTime(unixS) {
    if (!isNum(unixS)) return "–";
    const d = new Date(unixS * 1000);
    return `${d.toLocaleDateString("en-CA")} ${d.toLocaleTimeString("en-GB", { hour12: false })}`;
  }

  function fmtDuration(seconds) {
    if (!isNum(seconds)) return "–";
    if (seconds < 60) return `${Math.round(seconds)} s`;
    if (seconds < 3600) return `${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s`;
    return `${Math.floor(seconds / 3600)} h ${Math.round((seconds % 3600) / 60)} min`;
  }

  function badge(status) {
    return el("span", { class: `badge badge-${status || "unknown"}`, text: status || "?" });
  }

  function loadWindow() {
    const saved = Number(window.localStorage.getItem("cirrus.window_s"));
    return WINDOWS.includes(saved) ? saved : 900;
  }

  // --- fetching --------------------------------------------------------------------------

  class SessionExpired extends Error {}

  class NotFound extends Error {}

  class Unreachable extends Error {} // the daemon did not answer, or answered an error

  async function getJSON(path) {
    let response;
    try {
      response = await fetch(path, { credentials: "same-origin", headers: { Accept: "application/json" } });
    } catch (error) {
      throw new Unreachable("cannot reach the Cirrus daemon (stopped?)");
    }
    if (response.status === 401 || response.status === 403) throw new SessionExpired();
    if (response.status === 404) throw new NotFound();
    if (!response.ok) {
      let detail = "";
      try {
        const body = await response.text();
        try {
          detail = JSON.parse(body).error || body;
        } catch (_) {
          detail = body;
        }
      } catch (_) {
        /* the status says enough */
      }
      throw new Unreachable(`the daemon answered HTTP ${response.status} ${String(detail).slice(0, 200)}`.trim());
    }
    return response.json();
  }

  function showBanner(kind, message) {
    const banner = document.getElementById("banner");
    banner.className = `banner banner-${kind}`;
    banner.replaceChildren(...(Array.isArray(message) ? message : [message]));
    banner.hidden = false;
  }

  function hideBanner() {
    document.getElementById("banner").hidden = true;
  }

  function expired() {
    state.expired = true;
    clearTimeout(state.timer);
    showBanner("error", [
      "This dashboard session has ended (it lasts 12 hours; a daemon restart ends it too). Run ",
      el("code", { text: "cirrus dashboard" }),
      " again for a new login link.",
    ]);
    document.getElementById("updated").textContent = "session expired";
  }

  // One polling loop: `tick` fetches and renders; the next tick is scheduled after it ends, so two never
  // overlap and a slow daemon is not flooded.
  function poll(tick) {
    state.restart = () => poll(tick);
    const generation = ++state.generation;
    clearTimeout(state.timer);
    const run = async () => {
      if (generation !== state.generation || state.expired) return;
      try {
        await tick(() => generation === state.generation);
        if (generation !== state.generation) return;
        hideBanner();
        document.getElementById("updated").textContent = `updated ${fmtTime(Date.now() / 1000)}`;
      } catch (error) {
        if (generation !== state.generation) return;
        if (error instanceof SessionExpired) return expired();
        if (error instanceof NotFound) return; // the view says so
        if (!(error instanceof Unreachable)) console.error(error); // a bug of this page: say it where it shows
        showBanner("warn", `Cannot refresh: ${error.message || error}. Retrying every ${POLL_MS / 1000} s.`);
        document.getElementById("updated").textContent = "refresh failed";
      }
      if (generation === state.generation) state.timer = setTimeout(run, POLL_MS);
    };
    run();
  }

  // --- routing ---------------------------------------------------------------------------

  function route() {
    destroyCharts();
    const match = window.location.hash.match(/^#\/api\/([^?]+)/);
    const view = document.getElementById("view");
    const crumbs = document.getElementById("crumbs");
    if (match) {
      const name = decodeURIComponent(match[1]);
      document.title = `${name} · Cirrus`;
      crumbs.replaceChildren(el("a", { href: "#/", text: "APIs" }), " / ", el("span", { text: name }));
      showApi(view, name);
    } else {
      document.title = "Cirrus dashboard";
      crumbs.replaceChildren(el("span", { text: "APIs" }));
      showOverview(view);
    }
  }

  // --- the overview ----------------------------------------------------------------------

  const OVERVIEW_COLUMNS = [
    ["API", "name"], ["Kind", "kind"], ["Status", "status"], ["Rev", "revision"], ["Replicas", "replicas"],
    ["Req/s", "rps"], ["p50", "p50_ms"], ["p99", "p99_ms"], ["Errors", "error_rate"], ["In flight", "in_flight"],
    ["Queued", "queued"], ["Backlog", "backlog"],
  ];

  function showOverview(view) {
    const tbody = el("tbody");
    const table = el(
      "table",
      { class: "grid overview", id: "overview" },
      el("thead", {}, el("tr", {}, OVERVIEW_COLUMNS.map(([label, key]) => el("th", { class: `col-${key}`, text: label })))),
      tbody,
    );
    const empty = el("p", { class: "muted", hidden: "", text: "No APIs deployed. Deploy one with `cirrus deploy`." });
    view.replaceChildren(el("section", { class: "card" }, el("h2", { text: "APIs" }), table, empty));
    poll(async (current) => {
      const data = await getJSON("/v1/dashboard/overview");
      if (!current()) return;
      const apis = data.apis || [];
      empty.hidden = apis.length > 0;
      table.hidden = apis.length === 0;
      tbody.replaceChildren(...apis.map(overviewRow));
    });
  }

  function overviewRow(api) {
    const open = () => {
      window.location.hash = `#/api/${encodeURIComponent(api.name)}`;
    };
    const pending = api.replicas_pending ? el("span", { class: "muted", text: ` +${api.replicas_pending} pending` }) : null;
    let backlog = "–";
    if (isNum(api.backlog_in_queue) || isNum(api.backlog_in_progress)) {
      backlog = `${fmtInt(api.backlog_in_queue)} / ${fmtInt(api.backlog_in_progress)}`;
    }
    const errorClass = isNum(api.error_rate) && api.error_rate > 0 ? "num bad" : "num";
    return el(
      "tr",
      { class: "clickable", "data-api": api.name, onclick: open },
      el("td", { class: "col-name" }, el("a", { href: `#/api/${encodeURIComponent(api.name)}`, text: api.name })),
      el("td", { text: api.kind || "" }),
      el("td", {}, badge(api.status)),
      el("td", { class: "num", text: api.revision ?? "–" }),
      el("td", { class: "num" }, `${fmtInt(api.replicas_ready)} / ${fmtInt(api.replicas_desired)}`, pending),
      el("td", { class: "num", "data-field": "rps", "data-value": api.rps ?? "", text: fmt(api.rps) }),
      el("td", { class: "num", text: fmt(api.p50_ms, "ms") }),
      el("td", { class: "num", text: fmt(api.p99_ms, "ms") }),
      el("td", { class: errorClass, text: fmtPercent(api.error_rate) }),
      el("td", { class: "num", text: fmtInt(api.in_flight) }),
      el("td", { class: "num", text: fmtInt(api.queued) }),
      el("td", { class: "num", title: "in queue / in progress", text: backlog }),
    );
  }

  // --- one API ---------------------------------------------------------------------------

  // Each chart: its title, unit, the series it draws (key in `series`, label, colour) and when it shows.
  const CHARTS = [
    {
      id: "requests", title: "Requests by status", unit: "req/s",
      series: [["rps_2xx", "2xx", COLORS.green], ["rps_4xx", "4xx", COLORS.orange], ["rps_5xx", "5xx", COLORS.red]],
    },
    {
      id: "latency", title: "Latency", unit: "ms",
      series: [["p50_ms", "p50", COLORS.blue], ["p90_ms", "p90", COLORS.violet], ["p99_ms", "p99", COLORS.red]],
    },
    {
      id: "load", title: "In flight and queued", unit: "requests",
      series: [["in_flight", "in flight", COLORS.blue], ["queued", "queued", COLORS.orange]],
    },
    {
      id: "replicas", title: "Replicas", unit: "replicas", steps: true, markEvents: ["scale", "deploy"],
      series: [["replicas_ready", "ready", COLORS.green], ["replicas_desired", "desired", COLORS.grey]],
    },
    {
      id: "batch", title: "Batch size", unit: "requests per predict",
      series: [["batch_size_mean", "mean", COLORS.teal]],
    },
    {
      id: "stages", title: "Slot wait vs predict", unit: "ms",
      series: [["slot_wait_ms", "slot wait", COLORS.orange], ["predict_ms", "predict", COLORS.blue]],
    },
    {
      id: "cold_starts", title: "Cold starts", unit: "count", markEvents: ["cold_start"],
      series: [["cold_starts", "cold starts", COLORS.violet]],
    },
    {
      id: "backlog", title: "Async backlog", unit: "requests", onlyKind: "async",
      series: [["backlog_in_queue", "in queue", COLORS.orange], ["backlog_in_progress", "in progress", COLORS.blue]],
    },
  ];

  function section(title, id, ...body) {
    return el("section", { class: "card", id }, el("h2", { text: title }), ...body);
  }

  function showApi(view, name) {
    const parts = {
      summary: el("div", { class: "summary", id: "summary" }),
      charts: el("div", { class: "charts", id: "charts" }),
      scaleEvents: el("ul", { class: "events", id: "scale-events" }),
      replicas: el("div", { id: "replicas" }),
      revisions: el("div", { id: "revisions" }),
      deadLetters: el("div", { id: "dead-letters" }),
      jobs: el("div", { id: "jobs" }),
      logs: el("pre", { class: "logs", id: "logs" }),
      events: el("ul", { class: "events", id: "events" }),
    };
    const asyncSection = section("Dead letters", "dead-letters-card", parts.deadLetters);
    const jobsSection = section("Jobs", "jobs-card", parts.jobs);
    asyncSection.hidden = true;
    jobsSection.hidden = true;
    view.replaceChildren(
      parts.summary,
      parts.charts,
      section("Scale events", "scale-events-card", parts.scaleEvents),
      section("Replicas", "replicas-card", parts.replicas),
      asyncSection,
      jobsSection,
      el("div", { class: "two" }, section("Revisions", "revisions-card", parts.revisions), section("Events", "events-card", parts.events)),
      section("Recent logs", "logs-card", parts.logs),
    );
    let kind = null;
    poll(async (current) => {
      const windowS = state.windowS;
      let data;
      try {
        data = await getJSON(`/v1/dashboard/apis/${encodeURIComponent(name)}?window_s=${windowS}`);
      } catch (error) {
        if (error instanceof NotFound && current()) {
          destroyCharts();
          view.replaceChildren(
            el("section", { class: "card" }, el("p", {}, `There is no API named “${name}”. `, el("a", { href: "#/", text: "Back to all APIs" }))),
          );
        }
        throw error;
      }
      if (!current()) return;
      const status = data.status || {};
      if (kind !== status.kind) {
        kind = status.kind;
        buildCharts(parts.charts, kind);
      }
      renderSummary(parts.summary, status);
      updateCharts(data, windowS);
      refresh(parts.scaleEvents, (data.events || []).filter((e) => e.kind === "scale"), renderScaleEvents);
      refresh(parts.replicas, status.replicas || [], renderReplicas);
      refresh(parts.revisions, data.revisions || [], renderRevisions);
      asyncSection.hidden = kind !== "async";
      if (!asyncSection.hidden) refresh(parts.deadLetters, data.dead_letters || [], renderDeadLetters);
      jobsSection.hidden = kind !== "batch" && !(data.jobs || []).length;
      if (!jobsSection.hidden) refresh(parts.jobs, data.jobs || [], renderJobs);
      refresh(parts.logs, data.logs || [], renderLogs);
      refresh(parts.events, data.events || [], renderEvents);
    });
  }

  function stat(label, value, key, extra) {
    return el(
      "div",
      { class: "stat" },
      el("div", { class: "stat-label", text: label }),
      el("div", { class: "stat-value", "data-stat": key, text: value }),
      extra ? el("div", { class: "stat-extra muted", text: extra }) : null,
    );
  }

  function renderSummary(container, s) {
    const pending = s.replicas_pending ? `${s.replicas_pending} pending` : null;
    const stats = [
      stat("Status", "", "status"),
      stat("Revision", String(s.revision ?? "–"), "revision", s.kind),
      stat("Replicas ready / desired", `${fmtInt(s.replicas_ready)} / ${fmtInt(s.replicas_desired)}`, "replicas", pending),
      stat("Requests, last minute", fmtInt(s.requests_last_minute), "requests_last_minute"),
      stat("In flight", fmtInt(s.in_flight), "in_flight"),
      stat("Queued", fmtInt(s.queued), "queued"),
      stat("Cold starts", fmtInt(s.cold_starts), "cold_starts", isNum(s.last_cold_start_s) ? `last ${fmt(s.last_cold_start_s, "s")}` : null),
    ];
    if (s.kind === "async") {
      stats.push(
        stat("Backlog queued / running", `${fmtInt(s.backlog_in_queue)} / ${fmtInt(s.backlog_in_progress)}`, "backlog",
          isNum(s.backlog_oldest_age_s) ? `oldest ${fmtDuration(s.backlog_oldest_age_s)}` : null),
      );
    }
    if (isNum(s.batch_size_mean)) stats.push(stat("Batch size", fmt(s.batch_size_mean), "batch_size_mean"));
    stats[0].querySelector(".stat-value").replaceChildren(badge(s.status));
    const notes = [];
    if (s.message) notes.push(el("div", { class: "note note-warn", "data-field": "message", text: s.message }));
    if (s.autoscaler) notes.push(el("div", { class: "note" }, el("strong", { text: "Autoscaler: " }), s.autoscaler));
    if (s.endpoint) notes.push(el("div", { class: "note muted" }, "Endpoint: ", el("code", { text: s.endpoint })));
    container.replaceChildren(el("div", { class: "stats" }, stats), ...notes);
  }

  // --- charts ----------------------------------------------------------------------------

  function destroyCharts() {
    for (const chart of state.charts) chart.plot.destroy();
    state.charts = [];
  }

  function chartWidth(box) {
    return Math.max(240, Math.floor(box.clientWidth - 2));
  }

  // Vertical dashed lines at the times of the events of `kinds` (scale events on the replicas chart).
  function eventMarkers(chart) {
    return {
      hooks: {
        draw: [
          (u) => {
            const events = chart.events || [];
            const [min, max] = [u.scales.x.min, u.scales.x.max];
            const ctx = u.ctx;
            ctx.save();
            ctx.setLineDash([4, 4]);
            ctx.lineWidth = 1;
            for (const event of events) {
              if (!isNum(event.t) || event.t < min || event.t > max) continue;
              const x = Math.round(u.valToPos(event.t, "x", true));
              ctx.strokeStyle = event.kind === "deploy" ? COLORS.grey : event.kind === "cold_start" ? COLORS.violet : COLORS.blue;
              ctx.beginPath();
              ctx.moveTo(x, u.bbox.top);
              ctx.lineTo(x, u.bbox.top + u.bbox.height);
              ctx.stroke();
            }
            ctx.restore();
          },
        ],
      },
    };
  }

  function buildCharts(container, kind) {
    destroyCharts();
    container.replaceChildren();
    for (const def of CHARTS) {
      if (def.onlyKind && def.onlyKind !== kind) continue;
      const box = el("div", { class: "chart", id: `chart-${def.id}`, "data-points": "0" });
      const card = el("section", { class: "card chart-card" }, el("h3", {}, def.title, el("span", { class: "muted unit", text: ` ${def.unit}` })), box);
      container.append(card);
      const now = Date.now() / 1000;
      const chart = { def, el: box, events: [], now, since: now - state.windowS, lastIdx: null };
      const opts = {
        width: chartWidth(box),
        height: 170,
        legend: { live: true },
        cursor: { drag: { x: false, y: false } },
        scales: {
          x: { time: true, range: () => [chart.since, chart.now] },
          y: { range: (u, min, max) => [0, isNum(max) && max > 0 ? max * 1.1 : 1] },
        },
        axes: [
          { stroke: "#555", grid: { stroke: "#eee" }, ticks: { stroke: "#ddd" }, values: clockTicks, size: 30 },
          { stroke: "#555", grid: { stroke: "#eee" }, ticks: { stroke: "#ddd" }, size: 50, values: (u, splits) => splits.map(tick) },
        ],
        series: [
          { value: (u, v) => fmtTime(v) },
          ...def.series.map(([, label, color]) => ({
            label,
            stroke: color,
            width: 1.5,
            spanGaps: false,
            paths: def.steps ? uPlot.paths.stepped({ align: 1 }) : undefined,
            value: (u, v) => fmt(v),
          })),
        ],
        plugins: def.markEvents ? [eventMarkers(chart)] : [],
        hooks: {
          // Away from the cursor, the legend shows the latest values.
          setCursor: [(u) => {
            if (u.cursor.idx == null && chart.lastIdx != null) u.setLegend({ idx: chart.lastIdx });
          }],
        },
      };
      chart.plot = new uPlot(opts, [[], ...def.series.map(() => [])], box);
      state.charts.push(chart);
    }
  }

  function updateCharts(data, windowS) {
    const series = data.series || {};
    const times = series.t || [];
    for (const chart of state.charts) {
      chart.now = isNum(data.time) ? data.time : Date.now() / 1000;
      // The window, or less while the history is younger than it (a minute before its first sample).
      chart.since = Math.max(chart.now - windowS, isNum(times[0]) ? Math.min(times[0] - 60, chart.now - 60) : 0);
      chart.events = (data.events || []).filter((e) => (chart.def.markEvents || []).includes(e.kind));
      const columns = chart.def.series.map(([key]) => {
        const values = series[key] || [];
        return times.map((_, i) => (isNum(values[i]) ? values[i] : null));
      });
      chart.plot.setData([times, ...columns]);
      const filled = times.map((_, i) => columns.some((column) => column[i] !== null));
      const points = filled.filter(Boolean).length;
      const lastIdx = filled.lastIndexOf(true);
      chart.lastIdx = lastIdx >= 0 ? lastIdx : null;
      if (chart.lastIdx != null && chart.plot.cursor.idx == null) chart.plot.setLegend({ idx: chart.lastIdx });
      chart.el.setAttribute("data-points", String(points));
      chart.el.setAttribute("data-window", String(windowS));
      const latest = columns.map((column) => [...column].reverse().find((v) => v !== null));
      chart.el.setAttribute("data-latest", latest.map((v) => (v === undefined ? "" : String(v))).join(","));
    }
  }

  window.addEventListener("resize", () => {
    for (const chart of state.charts) chart.plot.setSize({ width: chartWidth(chart.el), height: 170 });
  });

  // --- tables ----------------------------------------------------------------------------

  function table(columns, rows, emptyText) {
    if (!rows.length) return el("p", { class: "muted", text: emptyText });
    return el(
      "table",
      { class: "grid" },
      el("thead", {}, el("tr", {}, columns.map((c) => el("th", { class: c.num ? "num" : null, text: c.label })))),
      el("tbody", {}, rows.map((row) => el("tr", row.attrs || {}, columns.map((c) => {
        const value = c.value(row.item);
        return el("td", { class: [c.num ? "num" : "", c.cls ? c.cls(row.item) : ""].join(" ").trim() || null },
          value instanceof Node ? value : String(value ?? "–"));
      })))),
    );
  }

  function renderScaleEvents(container, events) {
    const scale = events.filter((e) => e.kind === "scale").slice(-20).reverse();
    if (!scale.length) {
      container.replaceChildren(el("li", { class: "muted", text: "No scaling in this window." }));
      return;
    }
    container.replaceChildren(...scale.map(eventItem));
  }

  function eventItem(event) {
    return el(
      "li",
      { class: `event event-${event.kind}` },
      el("span", { class: "event-time", text: fmtTime(event.t) }),
      el("span", { class: `tag tag-${event.kind}`, text: (event.kind || "").replace("_", " ") }),
      el("span", { class: "event-message", text: event.message || "" }),
    );
  }

  function renderEvents(container, events) {
    const recent = events.slice(-50).reverse();
    if (!recent.length) {
      container.replaceChildren(el("li", { class: "muted", text: "No events in this window." }));
      return;
    }
    container.replaceChildren(...recent.map(eventItem));
  }

  function devices(d) {
    const entries = Object.entries(d || {});
    return entries.length ? entries.map(([k, v]) => `${k}: ${v}`).join(", ") : "–";
  }

  function renderReplicas(container, replicas) {
    container.replaceChildren(
      table(
        [
          { label: "Replica", value: (r) => el("code", { text: r.id }) },
          { label: "Rev", num: true, value: (r) => r.revision },
          { label: "State", value: (r) => badge(r.state) },
          { label: "Node", value: (r) => r.node || "local" },
          { label: "Devices", value: (r) => devices(r.devices) },
          { label: "PID", num: true, value: (r) => r.pid ?? "–" },
          { label: "In flight", num: true, value: (r) => fmtInt(r.in_flight) },
          { label: "Restarts", num: true, value: (r) => fmtInt(r.restarts), cls: (r) => (r.restarts ? "bad" : "") },
          { label: "Started", num: true, value: started },
          { label: "Last error / reason", value: (r) => errorCell(r.last_error || r.reason, r.id), cls: (r) => (r.last_error ? "error-cell" : "") },
        ],
        replicas.map((r) => ({ item: r, attrs: { "data-replica": r.id, "data-state": r.state } })),
        "No replicas.",
      ),
    );
  }

  function started(replica) {
    const running = ["starting", "ready", "draining"].includes(replica.state);
    return running && isNum(replica.started_at) ? fmtTime(replica.started_at) : "–";
  }

  // A one-line error as is; a traceback folded under its last line (`key`: which row, to keep it open).
  function errorCell(text, key) {
    if (!text) return "–";
    const lines = String(text).trim().split("\n");
    const last = lines[lines.length - 1];
    if (lines.length === 1) return el("span", { class: "last-error", text: last });
    return el("details", { class: "last-error", "data-key": key }, el("summary", { text: last }), el("pre", { text }));
  }

  // Renders `rows` into `container` with `render` when they changed since the last time, keeping the
  // tracebacks the user unfolded unfolded (the page refreshes every 2 s).
  function refresh(container, rows, render) {
    const fingerprint = JSON.stringify(rows);
    if (container.dataset.fingerprint === fingerprint) return;
    const open = new Set([...container.querySelectorAll("details[open]")].map((d) => d.dataset.key));
    render(container, rows);
    for (const details of container.querySelectorAll("details")) if (open.has(details.dataset.key)) details.open = true;
    container.dataset.fingerprint = fingerprint;
  }

  function renderRevisions(container, revisions) {
    const rows = [...revisions].sort((a, b) => (b.revision ?? 0) - (a.revision ?? 0)).slice(0, 20);
    container.replaceChildren(
      table(
        [
          { label: "Rev", num: true, value: (r) => r.revision },
          { label: "Created", value: (r) => fmtDateTime(r.created_at) },
          { label: "Role", value: (r) => r.role || "" },
          { label: "Note", value: (r) => r.note || "" },
          { label: "Snapshot", value: (r) => (r.snapshot ? el("code", { text: String(r.snapshot).slice(0, 12) }) : "–") },
        ],
        rows.map((r) => ({ item: r })),
        "No revisions.",
      ),
    );
  }

  function renderDeadLetters(container, letters) {
    container.replaceChildren(
      table(
        [
          { label: "Request", value: (d) => el("code", { text: d.id }) },
          { label: "Created", value: (d) => (d.timestamps && d.timestamps.created ? d.timestamps.created.replace("T", " ").slice(0, 19) : "–") },
          { label: "Attempts", num: true, value: (d) => d.attempts },
          { label: "Error", value: (d) => errorCell(d.error, d.id), cls: () => "error-cell" },
          { label: "Payload", value: (d) => el("code", { class: "payload", text: payloadPreview(d) }) },
        ],
        letters.map((d) => ({ item: d })),
        "No dead letters.",
      ),
    );
  }

  function payloadPreview(d) {
    if (d.payload === undefined || d.payload === null) return "–";
    const text = d.payload_encoding === "base64" ? `(base64) ${d.payload}` : String(d.payload);
    const cut = text.length > 120 ? `${text.slice(0, 120)}…` : text;
    return d.truncated || text.length > 120 ? `${cut} (${fmtInt(d.payload_bytes)} bytes)` : cut;
  }

  function renderJobs(container, jobs) {
    container.replaceChildren(
      table(
        [
          { label: "Job", value: (j) => el("code", { text: j.id }) },
          { label: "Status", value: (j) => badge(j.status) },
          { label: "Progress", value: progress },
          { label: "Failed batches", num: true, value: (j) => fmtInt(j.batches_failed), cls: (j) => (j.batches_failed ? "bad" : "") },
          { label: "Items/s", num: true, value: (j) => fmt(j.items_per_s) },
          { label: "ETA", num: true, value: (j) => fmtDuration(j.eta_s) },
          { label: "Created", value: (j) => fmtDateTime(j.created_at) },
          { label: "Error", value: (j) => errorCell(j.error || j.hook_error, j.id), cls: () => "error-cell" },
        ],
        jobs.map((j) => ({ item: j, attrs: { "data-job": j.id } })),
        "No recent jobs.",
      ),
    );
  }

  function progress(job) {
    const total = job.total_items || 0;
    const done = job.items_done || 0;
    const ratio = total ? Math.min(1, done / total) : 0;
    const bar = el("div", { class: "bar" }, el("div", { class: "bar-fill", style: `width: ${(ratio * 100).toFixed(1)}%` }));
    return el("div", { class: "progress" }, bar, el("span", { class: "muted", text: `${fmtInt(done)} / ${fmtInt(total)} items` }));
  }

  function renderLogs(container, lines) {
    const atBottom = container.scrollHeight - container.scrollTop - container.clientHeight < 8;
    container.textContent = lines.length ? lines.join("\n") : "No log lines yet.";
    if (atBottom) container.scrollTop = container.scrollHeight;
  }

  // --- start -----------------------------------------------------------------------------

  const select = document.getElementById("window");
  select.value = String(state.windowS);
  select.onchange = () => {
    state.windowS = Number(select.value);
    window.localStorage.setItem("cirrus.window_s", String(state.windowS));
    if (!state.expired && state.restart) state.restart(); // the same page, refreshed now for the new window
  };
  window.addEventListener("hashchange", route);
  route();
})();
