/* nomyo-router live usage page.
 *
 * Snapshots arrive over a websocket (/ws/usage/ on this host); charts are read from
 * /dashboard/series.json. Every piece of text from the server goes into the page through
 * textContent or setAttribute, never as markup. Charts are SVG drawn here.
 */
(() => {
  "use strict";

  const cfg = document.body.dataset;
  const SVG_NS = "http://www.w3.org/2000/svg";
  const STALE_AFTER = 6; // s without a message on an open socket: the server sends at least every 2 s
  const BACKOFF_BASE = 500; // ms
  const BACKOFF_CAP = 30000; // ms
  const SERIES_EVERY = 30000; // ms
  const FLUSH_DELAY = (parseFloat(cfg.flushInterval) || 5) * 1000 + 700; // tokens reach the charts' table
  const RANGE_STEPS = { hour: 60e3, day: 3600e3, week: 3600e3, month: 86400e3 };
  const RANGE_SPANS = { hour: 3600e3, day: 86400e3, week: 7 * 86400e3, month: 30 * 86400e3 };
  const MODEL_COLORS = [
    "#4f6bed", "#e8710a", "#12a39a", "#c2389b", "#7b61ff", "#d1a200",
    "#2b9ed8", "#d8473f", "#5a9e3a", "#8c6d5a",
  ];
  const ENDPOINT_COLORS = ["#3566d6", "#0f9d8a", "#e0891b", "#b44bb0", "#6e7f94", "#d04a4a", "#7a9b2d"];

  // -- tiny DOM helpers ----------------------------------------------------------------
  const $ = (id) => document.getElementById(id);

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    setAttrs(node, attrs);
    append(node, children);
    return node;
  }

  function svg(tag, attrs, ...children) {
    const node = document.createElementNS(SVG_NS, tag);
    setAttrs(node, attrs);
    append(node, children);
    return node;
  }

  function setAttrs(node, attrs) {
    if (!attrs) return;
    for (const [key, value] of Object.entries(attrs)) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.setAttribute("class", value);
      else if (key === "text") node.textContent = String(value);
      else if (key === "style") for (const [p, v] of Object.entries(value)) node.style.setProperty(p, v);
      else node.setAttribute(key, String(value));
    }
  }

  function append(node, children) {
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
  }

  const numberFmt = new Intl.NumberFormat("en-US");
  const compactFmt = new Intl.NumberFormat("en-US", { notation: "compact", maximumFractionDigits: 1 });
  const num = (n) => numberFmt.format(n || 0);
  const compact = (n) => compactFmt.format(n || 0);

  function hashColor(name, palette) {
    let h = 2166136261;
    for (let i = 0; i < name.length; i++) {
      h ^= name.charCodeAt(i);
      h = Math.imul(h, 16777619);
    }
    return palette[(h >>> 0) % palette.length];
  }

  const modelColors = new Map();
  function modelColor(model) {
    // Stable per name, and distinct among the models on screen as long as the palette lasts.
    if (!modelColors.has(model)) {
      const used = new Set(modelColors.values());
      let color = hashColor(model, MODEL_COLORS);
      if (used.has(color)) color = MODEL_COLORS.find((c) => !used.has(c)) || color;
      modelColors.set(model, color);
    }
    return modelColors.get(model);
  }

  // A duration in seconds as people read it: "45s", "1m 30s", "12m", "2h 5m", "3d 4h".
  // Whole units only (floored), so "for 1m 30s" never reads "for 2m" after 90 s.
  function ago(seconds) {
    const s = Math.max(0, Math.floor(seconds || 0));
    const two = (big, bigName, small, smallName) => (small ? `${big}${bigName} ${small}${smallName}` : `${big}${bigName}`);
    if (s < 60) return `${s}s`;
    if (s < 600) return two(Math.floor(s / 60), "m", s % 60, "s");
    if (s < 3600) return `${Math.floor(s / 60)}m`;
    if (s < 86400) return two(Math.floor(s / 3600), "h", Math.floor((s % 3600) / 60), "m");
    return two(Math.floor(s / 86400), "d", Math.floor((s % 86400) / 3600), "h");
  }

  // The server's clock now, in seconds: the snapshot's taken_at plus the time since it
  // arrived. Durations computed against it do not depend on the browser's clock being right.
  function serverNow() {
    const taken = state.snap && Number(state.snap.taken_at);
    if (!taken) return Date.now() / 1000;
    return taken + (Date.now() - state.lastMessageAt) / 1000;
  }

  // -- connection state and the badge ----------------------------------------------------
  const state = {
    snap: null,
    socket: null,
    everOpen: false,
    attempt: 0,
    retryAt: 0,
    lastMessageAt: 0,
    signedOut: false,
  };

  function wsUrl() {
    const scheme = location.protocol === "https:" ? "wss://" : "ws://";
    return scheme + location.host + (cfg.wsPath || "/ws/usage/");
  }

  function connect() {
    state.retryAt = 0;
    let socket;
    try {
      socket = new WebSocket(wsUrl());
    } catch (err) {
      scheduleReconnect();
      return;
    }
    state.socket = socket;
    socket.addEventListener("open", () => {
      state.everOpen = true;
      updateBadge();
    });
    socket.addEventListener("message", (event) => {
      let snap;
      try {
        snap = JSON.parse(event.data);
      } catch (err) {
        return;
      }
      state.attempt = 0; // a real message, not just an open socket, resets the backoff
      state.lastMessageAt = Date.now();
      state.snap = snap;
      render(snap);
      updateBadge();
    });
    socket.addEventListener("close", () => {
      if (state.socket !== socket) return;
      state.socket = null;
      scheduleReconnect();
      updateBadge();
    });
  }

  function scheduleReconnect() {
    // Exponential backoff, capped, with "equal jitter": half fixed, half random.
    const ceiling = Math.min(BACKOFF_CAP, BACKOFF_BASE * 2 ** state.attempt);
    const delay = ceiling / 2 + Math.random() * (ceiling / 2);
    state.attempt = Math.min(state.attempt + 1, 16);
    state.retryAt = Date.now() + delay;
    window.setTimeout(connect, delay);
    if (state.attempt >= 3) checkSession();
  }

  async function checkSession() {
    // A closed socket that keeps failing may mean the session ended: the series view tells.
    try {
      const reply = await fetch(cfg.seriesUrl + "?range=hour", { credentials: "same-origin" });
      state.signedOut = reply.redirected && reply.url.includes("/login");
    } catch (err) {
      state.signedOut = false; // the server is down: keep retrying
    }
    updateBadge();
  }

  function updateBadge() {
    const badge = $("conn");
    const now = Date.now();
    const age = state.lastMessageAt ? (now - state.lastMessageAt) / 1000 : null;
    const open = state.socket && state.socket.readyState === WebSocket.OPEN;
    let kind;
    let text;
    if (state.signedOut && !open) {
      kind = "signed-out";
      text = "signed out";
    } else if (open && age !== null && age <= STALE_AFTER) {
      kind = "live";
      text = "live";
    } else if (open) {
      kind = "stale";
      text = age === null ? "waiting for data…" : `stale: last update ${ago(age)} ago`;
    } else if (!state.everOpen && !state.retryAt) {
      kind = "connecting";
      text = "connecting…";
    } else {
      kind = "reconnecting";
      const wait = state.retryAt ? Math.max(0, Math.ceil((state.retryAt - now) / 1000)) : 0;
      text = wait > 0 ? `reconnecting… (retry in ${wait}s)` : "reconnecting…";
    }
    badge.dataset.state = kind;
    badge.textContent = text;
    badge.title = age === null ? "no update received yet" : `last update ${ago(age)} ago`;
    $("main").classList.toggle("is-stale", kind !== "live" && state.snap !== null);
    $("main").classList.toggle("waiting", state.snap === null);
    if (kind === "signed-out") {
      badge.replaceChildren(el("a", { href: cfg.loginUrl, text: "signed out: log in again" }));
    }
  }

  // -- rendering a snapshot --------------------------------------------------------------
  let lastTokenSum = null;

  function render(snap) {
    const endpoints = snap.endpoints || [];
    const active = snap.active || [];
    const tokens = snap.tokens || [];
    const queued = snap.queued || {};
    renderCards(endpoints, active, tokens, queued, snap);
    renderEndpoints(endpoints, active);
    renderUsage(endpoints, active);
    renderQueue(queued);
    renderTokens(tokens, endpoints);
    renderClients(snap.clients || []);
    renderModels(endpoints);
    if (lastDistribution) drawDistribution(lastDistribution);

    const sum = tokens.reduce((acc, row) => acc + (row.total || 0), 0);
    if (lastTokenSum !== null && sum !== lastTokenSum) seriesAfterFlush();
    lastTokenSum = sum;
  }

  function renderCards(endpoints, active, tokens, queued, snap) {
    const enabled = endpoints.filter((e) => e.enabled);
    const healthy = enabled.filter((e) => e.healthy && !e.failing_since);
    const failing = enabled.filter((e) => e.failing_since);
    $("card-endpoints").textContent = `${healthy.length} / ${enabled.length}`;
    const notes = [];
    if (failing.length) notes.push(`${failing.length} failing`);
    const disabled = endpoints.length - enabled.length;
    if (disabled) notes.push(`${disabled} disabled`);
    $("card-endpoints-note").textContent = notes.join(" · ") || "all enabled endpoints answer";
    $("card-endpoints").classList.toggle("warn", failing.length > 0);

    const activeSum = active.reduce((acc, r) => acc + r.count, 0);
    $("card-active").textContent = num(activeSum);
    const models = new Set(active.filter((r) => r.count > 0).map((r) => r.model));
    $("card-active-note").textContent = activeSum
      ? `${models.size} model${models.size === 1 ? "" : "s"} busy`
      : "idle";

    const waiting = Object.values(queued).reduce((acc, n) => acc + n, 0);
    $("card-queued").textContent = num(waiting);
    $("card-queued").classList.toggle("warn", waiting > 0);
    $("card-queued-note").textContent = waiting ? "all slots taken for these models" : "no one waiting";

    const tin = tokens.reduce((acc, r) => acc + (r.input || 0), 0);
    const tout = tokens.reduce((acc, r) => acc + (r.output || 0), 0);
    $("card-tokens").textContent = compact(tin + tout);
    $("card-tokens").title = num(tin + tout);
    $("card-tokens-note").textContent = `${compact(tin)} in · ${compact(tout)} out`;

    const procs = snap.processes || 0;
    $("processes").textContent = `${procs} router process${procs === 1 ? "" : "es"}`;
  }

  // The endpoint's circuit breaker: open = out of rotation, half_open = back on trial after
  // a probe answered. failing_since is when it left closed (it does not restart per probe).
  function statePill(ep) {
    if (!ep.enabled) return el("span", { class: "pill pill-off", text: "disabled" });
    const breaker = ep.breaker || (ep.failing_since ? "open" : "closed");
    if (breaker !== "closed" && ep.failing_since) {
      const since = serverNow() - Number(ep.failing_since);
      const trial = breaker === "half_open";
      return el(
        "div",
        null,
        el("span", {
          class: trial ? "pill pill-warn" : "pill pill-bad",
          text: trial ? "on trial" : "failing",
          title: trial ? "circuit breaker half-open: a probe answered, requests go there again"
            : "circuit breaker open: out of rotation, probed until it answers",
        }),
        el("div", { class: "reason", text: `${ep.failing_reason || "no answer"} · for ${ago(since)}` }),
      );
    }
    if (ep.healthy) return el("span", { class: "pill pill-ok", text: "healthy" });
    return el("span", { class: "pill pill-unknown", text: "unknown", title: "not probed yet" });
  }

  function renderEndpoints(endpoints, active) {
    const body = $("endpoints").tBodies[0];
    if (!endpoints.length) {
      body.replaceChildren(el("tr", { class: "empty" }, el("td", { colspan: 6 }, "No endpoints configured. ",
        el("a", { href: "/admin/routing/endpoint/add/", text: "Add one in the admin" }), ".")));
      return;
    }
    const rows = endpoints.map((ep) => {
      const mine = active.filter((r) => r.endpoint_id === ep.id && r.count > 0);
      const meters = mine.map((r) => {
        const full = r.count >= ep.limit;
        return el("div", { class: "meter-row" + (full ? " full" : "") },
          el("span", { class: "dot", style: { "--c": modelColor(r.model) } }),
          el("span", { class: "meter-model", text: r.model }),
          el("span", { class: "meter" }, el("span", {
            class: "meter-fill",
            style: { width: `${Math.min(100, (100 * r.count) / Math.max(1, ep.limit))}%`, "--c": modelColor(r.model) },
          })),
          el("span", { class: "meter-num", text: `${r.count} / ${ep.limit}` }));
      });
      return el("tr", { "data-endpoint": ep.name, class: ep.enabled ? "" : "disabled" },
        el("td", null,
          el("div", { class: "ep-name", text: ep.name }),
          el("div", { class: "ep-url muted small", text: [
            ep.kind === "openai" ? "OpenAI-compatible" : "Ollama",
            ep.url,
            // tier and weight (README "How a server is chosen"), when not the defaults
            ...(ep.tier ? [`tier ${ep.tier}`] : []),
            ...(ep.weight > 1 ? [`weight ${ep.weight}`] : []),
          ].join(" · ") })),
        el("td", null, statePill(ep)),
        el("td", { class: "mono", text: ep.version || "—" }),
        el("td", { class: "num" },
          el("span", { class: "active-count", text: String(ep.active || 0) }),
          el("div", { class: "muted small", text: `limit ${ep.limit} per model` })),
        el("td", null, meters.length ? meters : el("span", { class: "muted small", text: "idle" })),
        el("td", null, (ep.loaded || []).length
          ? el("div", { class: "chips" }, ep.loaded.map((m) => el("span", { class: "chip", text: m })))
          : el("span", { class: "muted small", text: "—" })));
    });
    body.replaceChildren(...rows);
    $("endpoints-note").textContent = `${endpoints.length} configured`;
  }

  function renderUsage(endpoints, active) {
    const box = $("usage-bars");
    const shown = endpoints.filter((ep) => ep.enabled);
    if (!shown.length) {
      box.replaceChildren(el("p", { class: "empty", text: "No enabled endpoints." }));
      $("usage-legend").replaceChildren();
      return;
    }
    const totals = shown.map((ep) => ep.active || 0);
    // One scale for every bar, so they compare; at least the largest per-model limit.
    const scale = Math.max(1, ...totals, ...shown.map((ep) => ep.limit));
    const seen = new Set();
    const rows = shown.map((ep) => {
      const mine = active.filter((r) => r.endpoint_id === ep.id && r.count > 0);
      const track = el("div", { class: "bar-track", role: "img" });
      const parts = [];
      for (const r of mine) {
        seen.add(r.model);
        parts.push(`${r.model}: ${r.count}`);
        track.append(el("span", {
          class: "bar-seg",
          title: `${r.model}: ${r.count} active (limit ${ep.limit})`,
          style: { width: `${(100 * r.count) / scale}%`, "--c": modelColor(r.model) },
        }));
      }
      for (let i = 1; i < scale && scale <= 40; i++) {
        track.append(el("span", { class: "bar-tick", style: { left: `${(100 * i) / scale}%` } }));
      }
      track.setAttribute("aria-label", `${ep.name}: ${parts.join(", ") || "idle"}`);
      return el("div", { class: "bar-row", "data-endpoint": ep.name },
        el("div", { class: "bar-label" }, el("span", { class: "bar-name", text: ep.name }),
          el("span", { class: "bar-count", text: `${ep.active || 0} active` })),
        track);
    });
    box.replaceChildren(...rows);
    const legend = [...seen].sort().map((m) =>
      el("span", { class: "legend-item" }, el("span", { class: "dot", style: { "--c": modelColor(m) } }), m));
    $("usage-legend").replaceChildren(...(legend.length ? legend : [el("span", { class: "muted small", text: "All endpoints idle." })]));
  }

  function renderQueue(queued) {
    const body = $("queue").tBodies[0];
    const rows = Object.entries(queued).filter(([, n]) => n > 0).sort((a, b) => b[1] - a[1]);
    if (!rows.length) {
      body.replaceChildren(el("tr", { class: "empty" }, el("td", { colspan: 2, text: "Nobody is waiting." })));
      return;
    }
    body.replaceChildren(...rows.map(([model, n]) =>
      el("tr", { "data-model": model },
        el("td", null, el("span", { class: "dot", style: { "--c": modelColor(model) } }), model),
        el("td", { class: "num queue-count", text: num(n) }))));
  }

  function renderTokens(tokens, endpoints) {
    const names = new Map(endpoints.map((ep) => [ep.url, ep.name]));
    const byModel = new Map();
    for (const row of tokens) {
      const cur = byModel.get(row.model) || { input: 0, output: 0, total: 0, parts: [] };
      cur.input += row.input || 0;
      cur.output += row.output || 0;
      cur.total += row.total || 0;
      cur.parts.push(`${names.get(row.endpoint) || row.endpoint}: ${num(row.total)}`);
      byModel.set(row.model, cur);
    }
    const body = $("tokens").tBodies[0];
    const foot = $("tokens").tFoot;
    if (!byModel.size) {
      body.replaceChildren(el("tr", { class: "empty" }, el("td", { colspan: 5, text: "No tokens counted yet." })));
      foot.replaceChildren();
      return;
    }
    const rows = [...byModel.entries()].sort((a, b) => b[1].total - a[1].total);
    const grand = rows.reduce((acc, [, v]) => acc + v.total, 0);
    body.replaceChildren(...rows.map(([model, v]) =>
      el("tr", { "data-model": model, title: v.parts.join("\n") },
        el("td", null, el("span", { class: "dot", style: { "--c": modelColor(model) } }), model),
        el("td", { class: "num tok-in", text: num(v.input) }),
        el("td", { class: "num tok-out", text: num(v.output) }),
        el("td", { class: "num tok-total", text: num(v.total) }),
        el("td", { class: "share-col" }, el("span", { class: "share" }, el("span", {
          class: "share-fill",
          style: { width: `${grand ? (100 * v.total) / grand : 0}%`, "--c": modelColor(model) },
        }))))));
    const tin = rows.reduce((acc, [, v]) => acc + v.input, 0);
    const tout = rows.reduce((acc, [, v]) => acc + v.output, 0);
    foot.replaceChildren(el("tr", null,
      el("th", { text: "All models" }), el("th", { class: "num", text: num(tin) }),
      el("th", { class: "num", text: num(tout) }), el("th", { class: "num", text: num(grand) }), el("th")));
  }

  function renderClients(clients) {
    const body = $("clients").tBodies[0];
    const rows = clients.filter((c) => c.total || c.active).sort((a, b) => b.total - a.total || b.active - a.active);
    if (!rows.length) {
      body.replaceChildren(el("tr", { class: "empty" }, el("td", { colspan: 5, text: "No client counted yet." })));
      return;
    }
    body.replaceChildren(...rows.map((c) =>
      el("tr", { "data-client": c.client },
        el("td", { text: c.client }),
        el("td", { class: "num client-active", text: num(c.active) }),
        el("td", { class: "num", text: num(c.input) }),
        el("td", { class: "num", text: num(c.output) }),
        el("td", { class: "num client-total", text: num(c.total) }))));
  }

  function renderModels(endpoints) {
    const available = new Map();
    const running = new Map();
    for (const ep of endpoints) {
      if (!ep.enabled) continue;
      for (const m of ep.models || []) available.set(m, [...(available.get(m) || []), ep.name]);
      for (const m of ep.loaded || []) running.set(m, [...(running.get(m) || []), ep.name]);
    }
    const item = (model, where, badge) =>
      el("li", { "data-model": model },
        el("span", { class: "dot", style: { "--c": modelColor(model) } }),
        el("span", { class: "model-name", text: model }),
        badge ? el("span", { class: "pill pill-ok tiny", text: "running" }) : null,
        el("span", { class: "chips right" }, where.map((n) => el("span", { class: "chip subtle", text: n }))));
    const list = (node, map, badgeFor) => {
      const entries = [...map.entries()].sort((a, b) => a[0].localeCompare(b[0]));
      node.replaceChildren(...(entries.length
        ? entries.map(([m, where]) => item(m, where, badgeFor(m)))
        : [el("li", { class: "empty", text: "None reported." })]));
    };
    list($("running"), running, () => false);
    list($("available"), available, (m) => running.has(m));
    $("models-note").textContent = `${available.size} available · ${running.size} running`;
  }

  // -- charts ------------------------------------------------------------------------------
  let range = "hour";
  let lastSeries = null;
  let lastDistribution = null;
  let seriesTimer = null;
  let flushTimer = null;
  let seriesSeq = 0;

  async function loadSeries() {
    const seq = ++seriesSeq;
    window.clearTimeout(seriesTimer);
    seriesTimer = window.setTimeout(loadSeries, SERIES_EVERY);
    let data;
    try {
      const reply = await fetch(`${cfg.seriesUrl}?range=${encodeURIComponent(range)}`, {
        credentials: "same-origin",
        headers: { Accept: "application/json" },
      });
      if (reply.redirected && reply.url.includes("/login")) {
        state.signedOut = true;
        updateBadge();
        return;
      }
      if (!reply.ok) throw new Error(`HTTP ${reply.status}`);
      data = await reply.json();
    } catch (err) {
      if (seq === seriesSeq) $("series-note").textContent = `could not load the chart (${err.message}); retrying`;
      return;
    }
    if (seq !== seriesSeq) return; // a newer request (another range) wins
    lastSeries = data;
    lastDistribution = data;
    drawTimeChart(data);
    drawDistribution(data);
    $("series-note").textContent = `updated ${new Date().toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" })}`;
  }

  function seriesAfterFlush() {
    // Live totals changed: the database has the new minute rows after the next flush.
    if (flushTimer !== null) return;
    flushTimer = window.setTimeout(() => {
      flushTimer = null;
      loadSeries();
    }, FLUSH_DELAY);
  }

  function buckets(data) {
    const step = RANGE_STEPS[data.range] || RANGE_STEPS.hour;
    const to = data.to ? Date.parse(data.to) : Date.now();
    const from = data.from ? Date.parse(data.from) : to - RANGE_SPANS[data.range];
    const last = Math.floor(to / step) * step;
    const values = new Map();
    for (const p of data.points || []) {
      const key = Math.floor(Date.parse(p.t) / step) * step;
      const cur = values.get(key) || { input: 0, output: 0 };
      cur.input += p.input || 0;
      cur.output += p.output || 0;
      values.set(key, cur);
    }
    // The window starts inside a bucket; that first, partial bucket is shown only if it has data.
    let first = Math.ceil(from / step) * step;
    if (values.has(first - step)) first -= step;
    const out = [];
    for (let t = first; t <= last; t += step) {
      const v = values.get(t) || { input: 0, output: 0 };
      out.push({ t, input: v.input, output: v.output });
    }
    return { step, list: out };
  }

  function niceCeil(value) {
    if (value <= 0) return 1;
    const exp = 10 ** Math.floor(Math.log10(value));
    for (const m of [1, 2, 2.5, 5, 10]) if (value <= m * exp) return m * exp;
    return 10 * exp;
  }

  function timeLabel(t, rangeName) {
    const d = new Date(t);
    if (rangeName === "hour" || rangeName === "day") {
      return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    }
    if (rangeName === "week") {
      return `${d.toLocaleDateString([], { weekday: "short" })} ${d.getDate()}`;
    }
    return d.toLocaleDateString([], { month: "short", day: "numeric" });
  }

  function bucketLabel(t, rangeName) {
    const d = new Date(t);
    if (rangeName === "month") return d.toLocaleDateString([], { weekday: "short", month: "short", day: "numeric" });
    if (rangeName === "hour") return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    return d.toLocaleString([], { weekday: "short", hour: "2-digit", minute: "2-digit" });
  }

  function drawTimeChart(data) {
    const box = $("time-chart");
    const { list } = buckets(data);
    const width = Math.max(320, box.clientWidth || 720);
    const height = 240;
    const m = { top: 14, right: 14, bottom: 28, left: 52 };
    const iw = width - m.left - m.right;
    const ih = height - m.top - m.bottom;
    const peak = Math.max(0, ...list.map((b) => Math.max(b.input, b.output)));
    const top = niceCeil(peak);
    const n = list.length;
    const x = (i) => m.left + (n <= 1 ? iw / 2 : (i * iw) / (n - 1));
    const y = (v) => m.top + ih - (v / top) * ih;

    const root = svg("svg", { width, height, viewBox: `0 0 ${width} ${height}`, class: "time-svg", role: "img" });
    const grid = svg("g", { class: "grid" });
    for (let i = 0; i <= 4; i++) {
      const v = (top * i) / 4;
      const yy = y(v);
      grid.append(svg("line", { x1: m.left, x2: width - m.right, y1: yy, y2: yy }));
      grid.append(svg("text", { x: m.left - 8, y: yy + 4, "text-anchor": "end", text: compact(v) }));
    }
    root.append(grid);

    const axis = svg("g", { class: "axis" });
    const ticks = Math.min(6, n);
    for (let k = 0; k < ticks; k++) {
      const i = Math.round((k * (n - 1)) / Math.max(1, ticks - 1));
      axis.append(svg("text", {
        x: x(i), y: height - 8, "text-anchor": k === 0 ? "start" : k === ticks - 1 ? "end" : "middle",
        text: timeLabel(list[i].t, data.range),
      }));
    }
    root.append(axis);

    // The last bucket is still filling up: its segment is dashed, so a dip there does not
    // read as traffic stopping.
    const pt = (i, key) => `${x(i).toFixed(1)},${y(list[i][key]).toFixed(1)}`;
    for (const key of ["input", "output"]) {
      if (!n) break;
      const done = n > 1 ? n - 1 : n;
      let line = "";
      for (let i = 0; i < done; i++) line += `${i ? "L" : "M"}${pt(i, key)}`;
      let area = `${line}`;
      if (n > 1) area += `L${pt(n - 1, key)}`;
      area += `L${x(n - 1).toFixed(1)},${y(0)}L${x(0).toFixed(1)},${y(0)}Z`;
      root.append(svg("path", { d: area, class: `area area-${key}` }));
      root.append(svg("path", { d: line, class: `line line-${key}` }));
      if (n > 1) {
        root.append(svg("path", { d: `M${pt(n - 2, key)}L${pt(n - 1, key)}`, class: `line line-${key} line-partial` }));
      }
    }

    // Hover targets: one column per bucket, with the numbers as a native tooltip.
    const hover = svg("g", { class: "hover" });
    const colWidth = n > 1 ? iw / (n - 1) : iw;
    list.forEach((b, i) => {
      hover.append(svg("rect", { x: x(i) - colWidth / 2, y: m.top, width: colWidth, height: ih },
        svg("title", { text: `${bucketLabel(b.t, data.range)}\ninput ${num(b.input)} · output ${num(b.output)}` })));
    });
    root.append(hover);

    if (peak === 0) {
      root.append(svg("text", { x: m.left + iw / 2, y: m.top + ih / 2, "text-anchor": "middle", class: "empty-text",
        text: "No tokens in this range yet" }));
    }
    box.replaceChildren(root);
    const sumIn = list.reduce((a, b) => a + b.input, 0);
    const sumOut = list.reduce((a, b) => a + b.output, 0);
    $("sum-input").textContent = num(sumIn);
    $("sum-output").textContent = num(sumOut);
  }

  function arc(cx, cy, r, r0, a0, a1) {
    const p = (rad, a) => [cx + rad * Math.sin(a), cy - rad * Math.cos(a)];
    const large = a1 - a0 > Math.PI ? 1 : 0;
    const [x0, y0] = p(r, a0);
    const [x1, y1] = p(r, a1);
    const [x2, y2] = p(r0, a1);
    const [x3, y3] = p(r0, a0);
    return `M${x0},${y0}A${r},${r} 0 ${large} 1 ${x1},${y1}L${x2},${y2}A${r0},${r0} 0 ${large} 0 ${x3},${y3}Z`;
  }

  // An endpoint's label in the charts: its name (sent with the series, or from the live
  // snapshot); for an url no endpoint has any more, the url without its scheme, which tells
  // servers on one host apart where "http://127…" did not. The full url goes in the tooltip.
  function endpointLabel(row, names) {
    if (row.name) return row.name;
    if (names.has(row.endpoint)) return names.get(row.endpoint);
    return String(row.endpoint).replace(/^[a-z][a-z0-9+.-]*:\/\//i, "");
  }

  function drawDistribution(data) {
    const box = $("dist-chart");
    const names = new Map(((state.snap && state.snap.endpoints) || []).map((ep) => [ep.url, ep.name]));
    const rows = (data.by_endpoint || []).filter((r) => r.total > 0).sort((a, b) => b.total - a.total);
    const total = rows.reduce((acc, r) => acc + r.total, 0);
    $("dist-note").textContent = `last ${data.range || range}`;
    if (!total) {
      box.replaceChildren(el("p", { class: "empty", text: "No tokens in this range yet." }));
      return;
    }
    const size = 180;
    const c = size / 2;
    const root = svg("svg", { width: size, height: size, viewBox: `0 0 ${size} ${size}`, class: "donut", role: "img" });
    let a = 0;
    const legend = el("ul", { class: "dist-legend" });
    rows.forEach((r, i) => {
      const color = ENDPOINT_COLORS[i % ENDPOINT_COLORS.length];
      const share = r.total / total;
      const label = endpointLabel(r, names);
      const a1 = a + share * 2 * Math.PI;
      const shape = share >= 0.9999
        ? svg("circle", { cx: c, cy: c, r: (c - 4 + c * 0.58) / 2, fill: "none", stroke: color, "stroke-width": c - 4 - c * 0.58 })
        : svg("path", { d: arc(c, c, c - 4, c * 0.58, a, a1), fill: color });
      shape.append(svg("title", { text: `${label} (${r.endpoint}): ${num(r.total)} tokens (${(share * 100).toFixed(1)}%)` }));
      root.append(shape);
      a = a1;
      legend.append(el("li", { "data-endpoint": label, title: `${label}\n${r.endpoint}` },
        el("span", { class: "dot", style: { "--c": color } }),
        el("span", { class: "dist-name", text: label, title: r.endpoint }),
        el("span", { class: "dist-num", text: compact(r.total) }),
        el("span", { class: "dist-pct muted", text: `${(share * 100).toFixed(share < 0.1 ? 1 : 0)}%` })));
    });
    root.append(svg("text", { x: c, y: c - 2, "text-anchor": "middle", class: "donut-total", text: compact(total) }));
    root.append(svg("text", { x: c, y: c + 16, "text-anchor": "middle", class: "donut-label", text: "tokens" }));
    box.replaceChildren(root, legend);
  }

  function selectRange(name) {
    range = name;
    for (const tab of document.querySelectorAll(".tab")) {
      tab.setAttribute("aria-selected", tab.dataset.range === name ? "true" : "false");
    }
    loadSeries();
  }

  // -- start ---------------------------------------------------------------------------------
  for (const tab of document.querySelectorAll(".tab")) {
    tab.addEventListener("click", () => selectRange(tab.dataset.range));
  }
  if (window.ResizeObserver) {
    let lastWidth = 0;
    new ResizeObserver(() => {
      const w = $("time-chart").clientWidth;
      if (lastSeries && Math.abs(w - lastWidth) > 8) drawTimeChart(lastSeries);
      lastWidth = w;
    }).observe($("time-chart"));
  }
  window.setInterval(updateBadge, 1000);
  connect();
  loadSeries();
  updateBadge();
})();
