// Haddock locator dashboard. Plain browser JavaScript, no build step, no external assets.
//
// Data flow: GET /v1/snapshot, then GET /v1/watch?since=REV (newline-delimited JSON events,
// each `{revision, kind, ...entity}`), applied exactly as `locator::api::Snapshot::apply` does.
// The stream is read with fetch + a streaming body reader (EventSource cannot send the
// Authorization header) and resumed from the last revision whenever it ends.
"use strict";

(() => {
  const TOKEN_KEY = "haddock.locator.token";
  const TERMINAL = new Set(["done", "rolled_back", "failed"]);
  const HISTORY_ROWS = 20;

  const state = {
    token: "",
    snap: null, // {revision, services, instances, releases, traffic}
    canDeploy: false,
    history: new Map(), // service -> [Release] (newest first)
    historyError: new Map(), // service -> message
    controlError: new Map(), // release id -> message
    busy: new Set(), // release ids with a control request in flight
    rendered: new Map(), // service -> signature of what its section shows
    gen: 0, // bumped on every (re)connect so that an old watch loop stops
    watch: null, // AbortController of the current watch request
    renderQueued: false,
  };

  const $ = (id) => document.getElementById(id);

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
    toString() {
      return `${this.status} ${this.code}: ${this.message}`;
    }
  }

  // ---------- small DOM helper ----------

  function h(tag, props, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === "class") el.className = v;
      else if (k === "text") el.textContent = v;
      else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else el.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children.flat(Infinity)) {
      if (c === undefined || c === null || c === false) continue;
      el.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return el;
  }

  // ---------- formatting ----------

  function fmtDuration(ms) {
    if (ms === undefined || ms === null || !isFinite(ms)) return "?";
    const neg = ms < 0;
    let s = Math.round(Math.abs(ms) / 1000);
    const parts = [];
    const d = Math.floor(s / 86400);
    s -= d * 86400;
    const hr = Math.floor(s / 3600);
    s -= hr * 3600;
    const m = Math.floor(s / 60);
    s -= m * 60;
    if (d) parts.push(`${d} d`);
    if (hr) parts.push(`${hr} h`);
    if (m && !d) parts.push(`${m} min`);
    if (!d && !hr) parts.push(`${s} s`);
    return (neg ? "-" : "") + parts.join(" ");
  }

  function fmtAgo(atMs) {
    if (!atMs) return "never";
    return `${fmtDuration(Date.now() - atMs)} ago`;
  }

  function fmtTime(atMs) {
    if (!atMs) return "";
    return new Date(atMs).toLocaleString();
  }

  function fmtPercent(ratio) {
    if (ratio === undefined || ratio === null) return "–";
    return `${(ratio * 100).toFixed(2)} %`;
  }

  function fmtMs(ms) {
    if (ms === undefined || ms === null) return "–";
    return `${Number(ms).toFixed(1)} ms`;
  }

  // Live text: refreshed every second by `tick` without rebuilding the page.
  function ago(atMs) {
    return h("time", { class: "ago", "data-at": atMs || 0, datetime: atMs ? new Date(atMs).toISOString() : undefined, title: fmtTime(atMs) }, fmtAgo(atMs));
  }

  function countdown(untilMs) {
    return h("span", { class: "countdown", "data-until": untilMs }, remaining(untilMs));
  }

  function remaining(untilMs) {
    const left = untilMs - Date.now();
    return left > 0 ? `${fmtDuration(left)} left` : "bake time over";
  }

  function tick() {
    for (const el of document.querySelectorAll(".ago[data-at]")) {
      el.textContent = fmtAgo(Number(el.dataset.at));
    }
    for (const el of document.querySelectorAll(".countdown[data-until]")) {
      el.textContent = remaining(Number(el.dataset.until));
    }
  }

  // ---------- API ----------

  function authHeaders(json) {
    const headers = { Authorization: `Bearer ${state.token}` };
    if (json) headers["Content-Type"] = "application/json";
    return headers;
  }

  async function apiError(resp) {
    const text = await resp.text().catch(() => "");
    try {
      const body = JSON.parse(text);
      if (body && body.error) return new ApiError(resp.status, body.error.code, body.error.message);
    } catch (_) {
      // not JSON: fall through
    }
    return new ApiError(resp.status, "http_error", text || resp.statusText);
  }

  async function api(method, path, body) {
    const resp = await fetch(path, {
      method,
      headers: authHeaders(body !== undefined),
      body: body === undefined ? undefined : typeof body === "string" ? body : JSON.stringify(body),
      cache: "no-store",
    });
    if (!resp.ok) throw await apiError(resp);
    return resp.json();
  }

  // Whether the token may press the buttons. There is no "who am I" route, so ask the control
  // route itself with an empty body: auth is checked before the body is read, so 401/403 means
  // no, and anything else (400 for the body) means yes, without changing anything.
  async function probeDeploy() {
    try {
      const resp = await fetch("/v1/releases/-/control", {
        method: "POST",
        headers: authHeaders(true),
        body: "{}",
        cache: "no-store",
      });
      return resp.status !== 401 && resp.status !== 403;
    } catch (_) {
      return false;
    }
  }

  // ---------- the local view, kept exactly like Snapshot::apply ----------

  function normalise(snap) {
    return {
      revision: snap.revision || 0,
      services: snap.services || [],
      instances: snap.instances || [],
      releases: snap.releases || [],
      traffic: snap.traffic || {},
    };
  }

  function upsert(list, item, same) {
    const i = list.findIndex(same);
    if (i >= 0) list[i] = item;
    else list.push(item);
  }

  function applyEvent(ev) {
    const snap = state.snap;
    const revision = ev.revision;
    const body = Object.assign({}, ev);
    delete body.kind;
    snap.revision = Math.max(snap.revision, revision);
    switch (ev.kind) {
      case "snapshot":
        state.snap = normalise(body);
        state.snap.revision = revision;
        refreshAllHistory();
        break;
      case "service":
        // A service's own `revision` is the event's: the key appears once on the wire.
        upsert(snap.services, body, (x) => x.name === body.name);
        break;
      case "instance":
        delete body.revision;
        if (body.state === "gone") snap.instances = snap.instances.filter((x) => x.id !== body.id);
        else upsert(snap.instances, body, (x) => x.id === body.id);
        break;
      case "release":
        delete body.revision;
        if (TERMINAL.has(body.state)) snap.releases = snap.releases.filter((x) => x.id !== body.id);
        else upsert(snap.releases, body, (x) => x.id === body.id);
        refreshHistory(body.service);
        break;
      case "traffic":
        snap.traffic[body.service] = body.traffic;
        break;
      default:
        // A newer locator may send kinds this page does not know: ignore them.
        break;
    }
  }

  // ---------- history ----------

  async function refreshHistory(service) {
    try {
      const list = await api("GET", `/v1/releases?service=${encodeURIComponent(service)}`);
      state.history.set(service, list);
      state.historyError.delete(service);
    } catch (e) {
      state.historyError.set(service, String(e));
    }
    scheduleRender();
  }

  function refreshAllHistory() {
    for (const s of state.snap.services) refreshHistory(s.name);
  }

  // ---------- connection ----------

  function setStatus(text, live) {
    const el = $("status");
    el.textContent = text;
    el.classList.toggle("live", !!live);
  }

  function showError(message) {
    const el = $("error");
    el.textContent = message;
    el.hidden = !message;
  }

  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

  async function connect() {
    const gen = ++state.gen;
    if (state.watch) state.watch.abort();
    showError("");
    state.rendered.clear();
    if (!state.token) {
      state.snap = null;
      state.canDeploy = false;
      setStatus("Paste a token to connect.");
      $("role").textContent = "";
      render();
      return;
    }
    setStatus("Connecting…");
    let snap;
    try {
      snap = await api("GET", "/v1/snapshot");
    } catch (e) {
      if (gen !== state.gen) return;
      showError(`Cannot read the snapshot: ${e}`);
      setStatus("Not connected.");
      return;
    }
    if (gen !== state.gen) return;
    state.snap = normalise(snap);
    state.canDeploy = await probeDeploy();
    if (gen !== state.gen) return;
    $("role").textContent = state.canDeploy ? "deploy: controls enabled" : "read-only";
    render();
    refreshAllHistory();
    watchLoop(gen);
  }

  async function watchLoop(gen) {
    let delay = 500;
    while (gen === state.gen) {
      const ctrl = new AbortController();
      state.watch = ctrl;
      try {
        const resp = await fetch(`/v1/watch?since=${state.snap.revision}`, {
          headers: authHeaders(false),
          signal: ctrl.signal,
          cache: "no-store",
        });
        if (!resp.ok) {
          const err = await apiError(resp);
          if (resp.status === 401 || resp.status === 403) {
            showError(`The watch stream was refused: ${err}`);
            setStatus("Not connected.");
            return;
          }
          throw err;
        }
        setStatus(`Live at revision ${state.snap.revision}`, true);
        delay = 500;
        const reader = resp.body.getReader();
        const decoder = new TextDecoder();
        let buf = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done || gen !== state.gen) break;
          buf += decoder.decode(value, { stream: true });
          let nl;
          let changed = false;
          while ((nl = buf.indexOf("\n")) >= 0) {
            const line = buf.slice(0, nl).trim();
            buf = buf.slice(nl + 1);
            if (!line) continue; // keep-alive
            applyEvent(JSON.parse(line));
            changed = true;
          }
          if (changed) {
            setStatus(`Live at revision ${state.snap.revision}`, true);
            scheduleRender();
          }
        }
      } catch (e) {
        if (gen !== state.gen) return;
        if (e.name !== "AbortError") showError(`Watch stream: ${e}`);
      }
      if (gen !== state.gen) return;
      setStatus(`Reconnecting from revision ${state.snap.revision}…`);
      await sleep(delay);
      delay = Math.min(delay * 2, 10000);
      if (gen === state.gen) showError("");
    }
  }

  // ---------- controls ----------

  async function control(release, what) {
    if (what === "abort" && !window.confirm(`Abort release ${release.id} of ${release.service} and roll back?`)) return;
    state.busy.add(release.id);
    state.controlError.delete(release.id);
    scheduleRender();
    try {
      const updated = await api("POST", `/v1/releases/${encodeURIComponent(release.id)}/control`, { control: what });
      // The watch stream brings the same record; applying it now makes the press feel instant.
      if (!TERMINAL.has(updated.state)) upsert(state.snap.releases, updated, (x) => x.id === updated.id);
    } catch (e) {
      state.controlError.set(release.id, `${what} refused: ${e.message} (${e.status || ""} ${e.code || ""})`.trim());
      if (e.status === 401 || e.status === 403) {
        state.canDeploy = false;
        $("role").textContent = "read-only";
      }
    } finally {
      state.busy.delete(release.id);
      scheduleRender();
    }
  }

  // ---------- rendering ----------

  function scheduleRender() {
    if (state.renderQueued) return;
    state.renderQueued = true;
    setTimeout(() => {
      state.renderQueued = false;
      render();
    }, 0);
  }

  function render() {
    const main = $("services");
    if (!state.snap) {
      main.replaceChildren();
      return;
    }
    const names = new Set(state.snap.services.map((s) => s.name));
    for (const r of state.snap.releases) names.add(r.service);
    for (const i of state.snap.instances) names.add(i.service);
    const sorted = [...names].sort();
    if (sorted.length === 0) {
      main.replaceChildren(h("p", { class: "empty" }, "No services registered yet."));
      state.rendered.clear();
      return;
    }
    const existing = new Map();
    for (const el of main.querySelectorAll(":scope > section[data-service]")) existing.set(el.dataset.service, el);
    main.querySelector(":scope > p.empty")?.remove();
    // Remember focus by key: rebuilding a section must not throw keyboard users out of it.
    const focusKey = document.activeElement?.dataset?.key;
    let prev = null;
    for (const name of sorted) {
      const sig = signature(name);
      let el = existing.get(name);
      if (!el || state.rendered.get(name) !== sig) {
        const fresh = renderService(name);
        if (el) el.replaceWith(fresh);
        el = fresh;
        state.rendered.set(name, sig);
      }
      existing.delete(name);
      const want = prev ? prev.nextSibling : main.firstChild;
      if (want !== el) main.insertBefore(el, want);
      prev = el;
    }
    for (const [name, el] of existing) {
      el.remove();
      state.rendered.delete(name);
    }
    if (focusKey) main.querySelector(`[data-key="${CSS.escape(focusKey)}"]`)?.focus();
  }

  function signature(name) {
    const s = state.snap;
    const release = s.releases.find((r) => r.service === name);
    return JSON.stringify([
      s.services.find((x) => x.name === name),
      s.instances.filter((i) => i.service === name),
      release,
      s.traffic[name],
      state.history.get(name),
      state.historyError.get(name),
      release && [state.busy.has(release.id), state.controlError.get(release.id)],
      state.canDeploy,
    ]);
  }

  function slug(name) {
    return name.replace(/[^A-Za-z0-9_-]/g, "_");
  }

  function renderService(name) {
    const s = state.snap;
    const service = s.services.find((x) => x.name === name);
    const weights = (service && service.weights) || {};
    const instances = s.instances.filter((i) => i.service === name).sort((a, b) => a.version.localeCompare(b.version) || a.id.localeCompare(b.id));
    const release = s.releases.find((r) => r.service === name);
    const id = `svc-${slug(name)}`;
    const weightText = Object.keys(weights).length
      ? Object.entries(weights).map(([v, w]) => `${v}: ${w} %`).join(" · ")
      : "no weights yet";
    return h(
      "section",
      { class: "service", "data-service": name, "aria-labelledby": id },
      h(
        "div",
        { class: "service-head" },
        h("h2", { id }, name),
        h("p", { class: "weights", "data-field": "weights" }, `Weights ${weightText}`),
        service && service.primary_version ? h("p", { class: "primary" }, `primary ${service.primary_version}`) : null,
        renderLimits(service),
        renderLock(service)
      ),
      renderRelease(release, s.traffic[name]),
      renderInstances(name, instances, weights),
      renderHistory(name)
    );
  }

  // The newest in-place limits change (`haddock update`): when, who, each instance from → to.
  function renderLimits(service) {
    const changes = (service && service.limit_changes) || [];
    const c = changes[changes.length - 1];
    if (!c) return null;
    const bytes = (b) => (b ? `${(b / 1048576).toFixed(0)} MiB` : "none");
    const cpus = (n) => (n ? `${n / 1e9}` : "none");
    const moves = c.instances.map((i) => {
      const parts = [];
      if (i.memory_to !== undefined) parts.push(`memory ${bytes(i.memory_from)} → ${bytes(i.memory_to)}`);
      if (i.nano_cpus_to !== undefined) parts.push(`cpus ${cpus(i.nano_cpus_from)} → ${cpus(i.nano_cpus_to)}`);
      return `${i.id}: ${parts.join(", ")}`;
    });
    return h(
      "p",
      { class: "limits", "data-field": "limits" },
      `Limits changed ${fmtTime(c.at)} by ${c.who}: ${moves.join("; ")}`
    );
  }

  // The deploy lock (`haddock lock acquire`): while it is held no release of the service starts.
  function renderLock(service) {
    const l = service && service.lock;
    if (!l) return null;
    return h(
      "p",
      { class: "lock", "data-field": "lock" },
      `Locked ${fmtTime(l.at)} by ${l.who}: ${l.message}`
    );
  }

  function renderInstances(name, instances, weights) {
    const caption = `Instances of ${name}`;
    if (instances.length === 0) return h("div", { class: "block" }, h("h3", {}, "Instances"), h("p", { class: "empty" }, "No instances."));
    const rows = instances.map((i) => {
      const weight = weights[i.version];
      const load = i.load || {};
      return h(
        "tr",
        { "data-instance": i.id, class: `state-${i.state}` },
        h("th", { scope: "row" }, h("span", { class: "mono" }, i.id)),
        h("td", { "data-field": "version" }, i.version),
        h("td", { class: "mono" }, i.address),
        h("td", { "data-field": "state" }, badge(i.state)),
        h("td", { "data-field": "weight", class: "num" }, weight === undefined ? "0 %" : `${weight} %`),
        h("td", { "data-field": "live_sessions", class: "num" }, String(load.live_sessions ?? 0)),
        h("td", { "data-field": "in_flight", class: "num" }, String(load.in_flight ?? 0)),
        h("td", { "data-field": "health" }, health(i))
      );
    });
    return h(
      "div",
      { class: "block" },
      h("h3", {}, "Instances"),
      h(
        "div",
        { class: "scroll" },
        h(
          "table",
          {},
          h("caption", { class: "sr-only" }, caption),
          h("thead", {}, h("tr", {}, ["Instance", "Version", "Address", "State", "Weight", "Live sessions", "In flight", "Health"].map((t) => h("th", { scope: "col" }, t)))),
          h("tbody", {}, rows)
        )
      )
    );
  }

  function health(i) {
    switch (i.state) {
      case "ready":
        return "healthy";
      case "unhealthy":
        return "unhealthy";
      case "starting":
        return "not ready yet";
      case "draining":
        return "draining";
      default:
        return i.state;
    }
  }

  function badge(text) {
    return h("span", { class: `badge b-${text}` }, text.replace(/_/g, " "));
  }

  function renderRelease(release, traffic) {
    if (!release) return h("div", { class: "block release none" }, h("h3", {}, "Active release"), h("p", { class: "empty" }, "No release in progress."));
    const st = release.status && typeof release.status === "object" ? release.status : {};
    const facts = [
      ["Versions", `${release.from_version || "(none)"} → ${release.to_version}`],
      ["State", badge(release.state)],
      ["Step", String(release.step)],
      ["Paused", release.paused ? "yes" : "no"],
      release.control ? ["Pending control", release.control] : null,
      st.waiting_for ? ["Waiting for", st.waiting_for] : null,
      ["Started", ago(release.created_at)],
      ["By", release.who],
      ["Image", h("span", { class: "mono" }, release.image)],
      release.reason ? ["Reason", release.reason] : null,
      st.driver ? ["Driven by", [st.driver.who || "?", " · seen ", ago(st.driver.at_ms)]] : null,
      // The operators' controls, under their tokens' names.
      (release.actions || []).length
        ? ["Operators", release.actions.map((a) => `${a.control} by ${a.who} ${fmtTime(a.at)}`).join("; ")]
        : null,
    ].filter(Boolean);
    const dataKey = (what) => `${release.id}/${what}`;
    const busy = state.busy.has(release.id);
    const needs = state.canDeploy ? undefined : "Needs a token with the deploy role";
    const button = (what, label, enabled, cls) =>
      h("button", {
        type: "button",
        class: cls,
        "data-control": what,
        "data-key": dataKey(what),
        disabled: !state.canDeploy || busy || !enabled,
        title: needs,
        onclick: () => control(release, what),
      }, label);
    const err = state.controlError.get(release.id);
    // What the locator accepts in each state (state.rs `control_refusal`): pause and promote
    // act on canary steps; abort works until the old version's containers are being removed.
    const canary = ["validating", "starting", "waiting_healthy", "registered", "shifting"].includes(release.state);
    const abortable = canary || ["promoted", "draining"].includes(release.state);
    return h(
      "div",
      { class: "block release", "data-release": release.id, "data-state": release.state, "data-paused": String(release.paused) },
      h("h3", {}, "Active release ", h("span", { class: "mono" }, release.id)),
      h("dl", { class: "facts" }, facts.map(([k, v]) => [h("dt", {}, k), h("dd", { "data-field": k.toLowerCase().replace(/ /g, "_") }, v)])),
      renderBake(release, st),
      renderAnalysis(st.analysis),
      renderTraffic(traffic),
      renderOtherStatus(st),
      h(
        "div",
        { class: "controls", role: "group", "aria-label": `Controls of release ${release.id}` },
        button("promote", "Promote", canary, "primary"),
        button("pause", "Pause", canary && !release.paused),
        button("resume", "Resume", release.paused),
        button("abort", "Abort", abortable, "danger")
      ),
      state.canDeploy ? null : h("p", { class: "hint" }, "Controls need a token with the deploy role."),
      err ? h("p", { class: "error", role: "alert", "data-field": "control_error" }, err) : null
    );
  }

  // Haddock records each bake as `status.bake = {weight, pause_ms, started_at_ms, until_ms,
  // remaining_ms}` (locator api `BakeStatus`): `until_ms` while the timer runs, none while it
  // is paused (then `remaining_ms` is what is left). Every screen counts down from the same
  // recorded times, also after a reload.
  function renderBake(release, st) {
    const bake = st.bake;
    if (!bake || typeof bake !== "object") return null;
    const head = `Baking at ${bake.weight ?? "?"} % for ${fmtDuration(bake.pause_ms)}: `;
    const left = bake.until_ms
      ? countdown(bake.until_ms)
      : `paused with ${fmtDuration(bake.remaining_ms ?? bake.pause_ms)} left`;
    return h("p", { class: "bake", "data-field": "bake" }, head, left);
  }

  function renderAnalysis(a) {
    if (!a || typeof a !== "object") return null;
    const figures = a.figures || a;
    const rows = [];
    if (a.verdict === "waiting" || a.verdict === "inconclusive") {
      rows.push(["Requests on the new version", `${a.requests} of ${a.min_requests} needed`]);
    } else {
      rows.push(["Requests", String(figures.requests ?? "–")]);
      rows.push(["5xx ratio", `${fmtPercent(figures.ratio_5xx)} (old ${fmtPercent(figures.old_ratio_5xx)})`]);
      rows.push(["p99 latency", `${fmtMs(figures.p99_ms)} (old ${fmtMs(figures.old_p99_ms)})`]);
    }
    if (a.reason) rows.push(["Breach", a.reason]);
    return h(
      "div",
      { class: `analysis v-${a.verdict || "unknown"}`, "data-field": "analysis" },
      h("h4", {}, "Analysis: ", badge(a.verdict || "unknown")),
      h("dl", { class: "facts" }, rows.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]))
    );
  }

  function renderTraffic(traffic) {
    if (!traffic || Object.keys(traffic).length === 0) return null;
    return h(
      "div",
      { class: "scroll" },
      h(
        "table",
        { class: "traffic" },
        h("caption", {}, "Traffic by version (cumulative, all proxies)"),
        h("thead", {}, h("tr", {}, ["Version", "Requests", "5xx", "p99"].map((t) => h("th", { scope: "col" }, t)))),
        h(
          "tbody",
          {},
          Object.entries(traffic).map(([v, t]) =>
            h("tr", {}, h("th", { scope: "row" }, v), h("td", { class: "num" }, String(t.requests)), h("td", { class: "num" }, String(t.responses_5xx)), h("td", { class: "num" }, fmtMs(t.p99_ms)))
          )
        )
      )
    );
  }

  function renderOtherStatus(st) {
    const known = new Set(["bake", "analysis", "driver", "waiting_for"]);
    const other = Object.fromEntries(Object.entries(st).filter(([k]) => !known.has(k)));
    if (Object.keys(other).length === 0) return null;
    return h("details", { class: "raw" }, h("summary", {}, "More status"), h("pre", {}, JSON.stringify(other, null, 2)));
  }

  function renderHistory(name) {
    const list = state.history.get(name);
    const err = state.historyError.get(name);
    const head = h("h3", {}, "History");
    if (err) return h("div", { class: "block" }, head, h("p", { class: "error" }, `Cannot read the history: ${err}`));
    if (!list) return h("div", { class: "block" }, head, h("p", { class: "empty" }, "Loading…"));
    if (list.length === 0) return h("div", { class: "block" }, head, h("p", { class: "empty" }, "No releases yet."));
    const rows = list.slice(0, HISTORY_ROWS).map((r) => {
      const end = r.finished_at || null;
      return h(
        "tr",
        { "data-history": r.id },
        h("th", { scope: "row" }, h("span", { class: "mono" }, r.id)),
        h("td", {}, `${r.from_version || "(none)"} → ${r.to_version}`),
        h("td", {}, badge(r.state)),
        h("td", {}, h("time", { datetime: new Date(r.created_at).toISOString() }, fmtTime(r.created_at))),
        h("td", { class: "num" }, end ? fmtDuration(end - r.created_at) : "running"),
        h("td", {}, r.who),
        h("td", { class: "reason" }, r.reason || "")
      );
    });
    return h(
      "div",
      { class: "block" },
      head,
      h(
        "div",
        { class: "scroll" },
        h(
          "table",
          {},
          h("caption", { class: "sr-only" }, `Release history of ${name}, newest first`),
          h("thead", {}, h("tr", {}, ["Release", "Versions", "Outcome", "Started", "Took", "By", "Reason"].map((t) => h("th", { scope: "col" }, t)))),
          h("tbody", {}, rows)
        )
      ),
      list.length > HISTORY_ROWS ? h("p", { class: "hint" }, `Showing the newest ${HISTORY_ROWS} of ${list.length}.`) : null
    );
  }

  // ---------- start ----------

  function start() {
    const input = $("token");
    try {
      state.token = window.localStorage.getItem(TOKEN_KEY) || "";
    } catch (_) {
      state.token = "";
    }
    input.value = state.token;
    $("token-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      state.token = input.value.trim();
      try {
        if (state.token) window.localStorage.setItem(TOKEN_KEY, state.token);
        else window.localStorage.removeItem(TOKEN_KEY);
      } catch (_) {
        // Storage may be disabled: the token then lasts as long as the page.
      }
      connect();
    });
    $("forget").addEventListener("click", () => {
      try {
        window.localStorage.removeItem(TOKEN_KEY);
      } catch (_) {
        // nothing stored
      }
      input.value = "";
      state.token = "";
      connect();
    });
    setInterval(tick, 1000);
    connect();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
