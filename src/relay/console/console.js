// The operator console (served by src/relay/console.rs): one ES module, no dependencies.
// The admin key is typed once and kept in sessionStorage (this tab only, gone when it
// closes); every call sends it as a bearer header, never in a URL. Live views poll the
// admin routes or read an SSE stream through fetch (EventSource cannot send a header).

const KEY = "syncrelay.adminKey";
const SAMPLE_MS = 2000;
const HISTORY = 60;

const $ = (selector, root = document) => root.querySelector(selector);

/** An element with attributes and children (strings become text, never HTML). */
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === false || value === null || value === undefined) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svgEl(tag, attrs = {}) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  return node;
}

// --- The key and the API -------------------------------------------------------------------

const key = () => sessionStorage.getItem(KEY);

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

/** Calls the relay with the admin key; the design's error JSON becomes an ApiError. */
async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  headers.set("authorization", `Bearer ${options.key || key()}`);
  if (options.json !== undefined) {
    headers.set("content-type", "application/json");
    options = { ...options, body: JSON.stringify(options.json) };
  }
  let response;
  try {
    response = await fetch(path, { ...options, headers, cache: "no-store" });
  } catch (err) {
    throw new ApiError(0, "unreachable", `the relay did not answer (${err.message})`);
  }
  if (response.ok) return response;
  let code = "error";
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    code = body.error?.code || code;
    message = body.error?.message || message;
  } catch (_) {
    // Not the design's error shape (a proxy's page): keep the status line.
  }
  const error = new ApiError(response.status, code, message);
  if (!options.key && (response.status === 401 || response.status === 403)) signOut(explain(error));
  throw error;
}

const getJson = async (path) => (await api(path)).json();

/** What a refused key means, in words. */
function explain(error) {
  if (error.status === 401) return `The relay refused this key: ${error.message}.`;
  if (error.status === 403) return `This key is not an admin key: ${error.message}.`;
  if (error.status === 0) return `Cannot reach the relay: ${error.message}.`;
  return `The relay answered ${error.status}: ${error.message}.`;
}

/** Reads an SSE response body, calling `onEvent({id, event, data})` per event. */
async function readSse(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const message = { id: null, event: "message", data: [] };
      for (const line of block.split("\n")) {
        if (line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "id") message.id = text;
        else if (field === "event") message.event = text;
        else if (field === "data") message.data.push(text);
      }
      if (message.data.length) onEvent({ ...message, data: message.data.join("\n") });
    }
  }
}

// --- Formatting ----------------------------------------------------------------------------

const number = (n) => (n === null || n === undefined ? "–" : Number(n).toLocaleString("en"));

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i += 1;
  }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function ago(iso) {
  if (!iso) return "never";
  const seconds = Math.max(0, Math.round((Date.now() - Date.parse(iso)) / 1000));
  if (seconds < 60) return `${seconds} s ago`;
  if (seconds < 3600) return `${Math.round(seconds / 60)} min ago`;
  if (seconds < 86400) return `${Math.round(seconds / 3600)} h ago`;
  return `${Math.round(seconds / 86400)} d ago`;
}

const ms = (seconds) => (seconds === null ? "–" : `${(seconds * 1000).toFixed(seconds < 0.01 ? 2 : 1)} ms`);

/** The `q` quantile of a histogram's observations between two samples (bucket bounds). */
function quantile(before, after, q) {
  if (!before || !after) return null;
  const counts = after.cumulative.map((c, i) => c - (before.cumulative[i] || 0));
  const total = counts[counts.length - 1];
  if (!total) return null;
  const rank = q * total;
  const index = counts.findIndex((c) => c >= rank);
  return index < after.bounds.length ? after.bounds[index] : after.bounds[after.bounds.length - 1];
}

// --- Views ---------------------------------------------------------------------------------

/** Each view renders into `root` and returns a function that stops its timers and reads. */
const views = {
  overview: viewOverview,
  daemons: viewDaemons,
  daemon: viewDaemon,
  keys: viewKeys,
  backup: viewBackup,
};

let stopView = () => {};

function route() {
  stopView();
  stopView = () => {};
  const signedIn = Boolean(key());
  $("#sign-in").hidden = signedIn;
  $("#nav").hidden = !signedIn;
  const root = $("#view");
  root.replaceChildren();
  if (!signedIn) {
    document.title = "Sign in · syncrelay console";
    $("#key").focus();
    return;
  }
  const parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  let name = parts[0] || "overview";
  if (name === "daemons" && parts[1]) name = "daemon";
  if (!views[name]) name = "overview";
  for (const link of document.querySelectorAll("#nav a")) {
    const current = link.getAttribute("href") === `#/${name === "daemon" ? "daemons" : name}`;
    if (current) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  const stop = views[name](root, parts[1]);
  stopView = typeof stop === "function" ? stop : () => {};
  $("#main").focus({ preventScroll: true });
}

function status(text, kind = "") {
  const node = $("#status");
  node.textContent = text;
  node.className = kind;
}

/** Runs `tick` now and every `period` ms until stopped; failures show in the status line. */
function every(period, tick) {
  let timer = null;
  let stopped = false;
  const run = async () => {
    try {
      await tick();
      if (!stopped) status(`Updated ${new Date().toLocaleTimeString("en-GB")}`);
    } catch (err) {
      if (!stopped) status(err instanceof ApiError ? explain(err) : String(err), "error");
    }
    if (!stopped) timer = setTimeout(run, period);
  };
  run();
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}

function sparkline(values) {
  const svg = svgEl("svg", { viewBox: "0 0 100 30", preserveAspectRatio: "none", "aria-hidden": "true" });
  const finite = values.filter((v) => v !== null && Number.isFinite(v));
  if (finite.length > 1) {
    const max = Math.max(...finite) || 1;
    const step = 100 / (HISTORY - 1);
    const offset = HISTORY - values.length;
    const points = values
      .map((v, i) => (v === null ? null : `${((offset + i) * step).toFixed(2)},${(29 - (v / max) * 28).toFixed(2)}`))
      .filter(Boolean)
      .join(" ");
    svg.append(svgEl("polyline", { points }));
  }
  return svg;
}

function card(label, value, history, id) {
  return el("div", { class: "card", id },
    el("div", { class: "label" }, label),
    el("div", { class: "value" }, value),
    history ? sparkline(history) : null);
}

function viewOverview(root) {
  document.title = "Overview · syncrelay console";
  const cards = el("div", { class: "cards" });
  const states = el("div", { class: "table-wrap" });
  root.append(el("h2", {}, "Overview"), cards, el("h3", {}, "Commands by state"), states);
  const samples = [];
  return every(SAMPLE_MS, async () => {
    const [stats, list] = await Promise.all([getJson("/admin/stats"), getJson("/admin/daemons")]);
    const at = performance.now();
    samples.push({ at, stats });
    if (samples.length > HISTORY + 1) samples.shift();
    // Rates and percentiles over each interval between two samples.
    const series = samples.slice(1).map((s, i) => {
      const prev = samples[i];
      const seconds = (s.at - prev.at) / 1000;
      const reqs = s.stats.requests.total - prev.stats.requests.total;
      // What clients feel: the client API (the sync family holds long polls).
      const latencyBefore = prev.stats.requests.latency.client;
      const latencyAfter = s.stats.requests.latency.client;
      const flushes = s.stats.store.flushes - prev.stats.store.flushes;
      const writes = s.stats.store.commits - prev.stats.store.commits;
      const flushMicros = s.stats.store.flush_micros - prev.stats.store.flush_micros;
      return {
        rps: reqs / seconds,
        p50: quantile(latencyBefore, latencyAfter, 0.5),
        p99: quantile(latencyBefore, latencyAfter, 0.99),
        flushMs: flushes ? flushMicros / flushes / 1000 : null,
        perFlush: flushes ? writes / flushes : null,
      };
    });
    const last = series[series.length - 1] || {};
    const online = list.daemons.filter((d) => d.online).length;
    cards.replaceChildren(
      card("Daemons online", `${online} of ${list.daemons.length}`, null, "card-daemons"),
      card("Requests / s", last.rps === undefined ? "–" : last.rps.toFixed(1), series.map((s) => s.rps), "card-rps"),
      card("Client API p50 / p99", `${ms(last.p50 ?? null)} / ${ms(last.p99 ?? null)}`, series.map((s) => s.p99), "card-latency"),
      card("Flush (durable write)", last.flushMs == null ? "idle" : `${last.flushMs.toFixed(2)} ms`, series.map((s) => s.flushMs), "card-flush"),
      card("Writes per flush", last.perFlush == null ? "idle" : last.perFlush.toFixed(1), series.map((s) => s.perFlush), "card-per-flush"),
      card("Disk", bytes(stats.store.disk_bytes), samples.map((s) => s.stats.store.disk_bytes), "card-disk"),
      ...clusterCards(samples),
    );
    const byState = stats.commands.by_state;
    states.replaceChildren(
      byState
        ? el("table", {},
            el("thead", {}, el("tr", {}, el("th", {}, "State"), el("th", { class: "num" }, "Commands"))),
            el("tbody", {}, Object.entries(byState).map(([state, count]) =>
              el("tr", {}, el("td", {}, state), el("td", { class: "num" }, number(count))))))
        : el("p", { class: "muted" }, `${number(stats.commands.unfinished)} unfinished; counts by state come with the next retention census.`),
    );
  });
}

/**
 * In a cluster: this node, its NATS link and the daemons it holds; and the latency of the
 * hints it gets from other nodes (since it started; the line is each interval's p50).
 */
function clusterCards(samples) {
  const cluster = samples[samples.length - 1].stats.cluster;
  if (!cluster) return [];
  const latency = cluster.hint_latency;
  const p50 = quantile({ cumulative: [] }, latency, 0.5);
  const p99 = quantile({ cumulative: [] }, latency, 0.99);
  const history = samples.slice(1).map((s, i) =>
    quantile(samples[i].stats.cluster?.hint_latency, s.stats.cluster?.hint_latency, 0.5));
  return [
    el("div", { class: "card", id: "card-cluster" },
      el("div", { class: "label" }, `Node ${cluster.node}`),
      el("div", { class: "value" }, cluster.nats_connected ? "NATS connected" : "NATS unreachable"),
      el("div", { class: "label held" }, `holds ${number(cluster.daemons_held)} daemon connection(s)`)),
    card("Hint latency p50 / p99 (bounds)",
      p50 === null ? "no hints yet" : `≤ ${ms(p50).replace(" ms", "")} / ${ms(p99)}`,
      history, "card-hints"),
  ];
}

function viewDaemons(root) {
  document.title = "Daemons · syncrelay console";
  const wrap = el("div", { class: "table-wrap" });
  root.append(el("h2", {}, "Daemons"), wrap);
  return every(SAMPLE_MS, async () => {
    const { daemons } = await getJson("/admin/daemons");
    if (!daemons.length) {
      wrap.replaceChildren(el("p", { class: "muted" }, "No daemons yet: create a daemon key and start its agent."));
      return;
    }
    // In a cluster, the node holding each online daemon.
    const nodes = daemons.some((d) => d.node);
    wrap.replaceChildren(el("table", { id: "daemons" },
      el("thead", {}, el("tr", {},
        el("th", {}, "Daemon"), el("th", {}, "State"), nodes ? el("th", {}, "Node") : null, el("th", {}, "Last seen"),
        el("th", { class: "wide" }, "Version"), el("th", { class: "wide" }, "Capabilities"),
        el("th", { class: "num" }, "Queued"), el("th", { class: "num" }, "Last seq"))),
      el("tbody", {}, daemons.map((d) => el("tr", { "data-daemon": d.daemon_id },
        el("td", {}, el("a", { href: `#/daemons/${encodeURIComponent(d.daemon_id)}` }, d.daemon_id)),
        el("td", {}, el("span", { class: `badge ${d.online ? "online" : "offline"}` }, d.online ? "online" : "offline")),
        nodes ? el("td", { class: "node" }, d.node || "–") : null,
        el("td", { title: d.last_seen || "" }, ago(d.last_seen)),
        el("td", { class: "wide" }, d.version || "–"),
        el("td", { class: "wide" }, d.capabilities.join(", ") || "–"),
        el("td", { class: "num" }, number(d.queued)),
        el("td", { class: "num" }, number(d.last_seq)))))));
  });
}

function viewDaemon(root, daemonId) {
  document.title = `${daemonId} · syncrelay console`;
  const path = `/admin/daemons/${encodeURIComponent(daemonId)}`;
  const summary = el("p", { class: "muted" }, "…");
  const log = el("ol", { class: "log", id: "changes", "aria-label": "Change log, newest last" });
  const commands = el("div", { class: "table-wrap", id: "commands" });
  const contexts = el("div", { class: "table-wrap", id: "contexts" });
  root.append(
    el("h2", {}, `Daemon ${daemonId}`), summary,
    el("h3", {}, "Change log (live)"), log,
    el("h3", {}, "Recent commands"), commands,
    el("h3", {}, "Cached contexts"), contexts);
  const addChange = (change) => {
    const data = typeof change.data === "string" ? change.data : JSON.stringify(change.data);
    log.append(el("li", { "data-seq": change.seq }, `#${change.seq} ${change.timestamp || ""} ${change.type || ""} ${data}`));
    while (log.children.length > 500) log.firstChild.remove();
    log.scrollTop = log.scrollHeight;
  };
  // The live tail: the last page, then the SSE stream from after it.
  const reading = new AbortController();
  (async () => {
    try {
      const { last_seq: last } = await getJson(path);
      const page = await getJson(`${path}/changes?since=${Math.max(0, last - 50)}&limit=50`);
      page.changes.forEach(addChange);
      const response = await api(`${path}/events`, {
        signal: reading.signal,
        headers: { "last-event-id": String(page.last_seq), accept: "text/event-stream" },
      });
      await readSse(response, (message) => {
        addChange({ seq: Number(message.id), ...JSON.parse(message.data) });
      });
      if (!reading.signal.aborted) status("The live change log ended; reload to follow it again.", "warn");
    } catch (err) {
      if (!reading.signal.aborted) status(err instanceof ApiError ? explain(err) : `The live change log stopped: ${err.message}`, "error");
    }
  })();
  const stop = every(SAMPLE_MS, async () => {
    const [daemon, recent, cached] = await Promise.all([
      getJson(path), getJson(`${path}/commands?limit=20`), getJson(`${path}/contexts`)]);
    summary.replaceChildren(
      el("span", { class: `badge ${daemon.online ? "online" : "offline"}` }, daemon.online ? "online" : "offline"),
      `${daemon.node ? ` on node ${daemon.node} ·` : ""} last seen ${ago(daemon.last_seen)} · version ${daemon.version || "–"} · ${number(daemon.queued)} queued · last seq ${number(daemon.last_seq)}`);
    commands.replaceChildren(recent.commands.length
      ? el("table", {},
          el("thead", {}, el("tr", {}, el("th", {}, "Command"), el("th", {}, "Method"), el("th", {}, "State"),
            el("th", { class: "wide" }, "Created"), el("th", {}, "Result"))),
          el("tbody", {}, recent.commands.map((c) => el("tr", {},
            el("td", {}, el("code", {}, c.id)), el("td", {}, c.method), el("td", {}, c.state),
            el("td", { class: "wide" }, ago(c.created_at)),
            el("td", {}, c.error ? `${c.error.code}: ${c.error.message}` : c.result ? `${c.result.status ?? ""} ${JSON.stringify(c.result.body ?? "").slice(0, 80)}` : "–")))))
      : el("p", { class: "muted" }, "No commands."));
    contexts.replaceChildren(cached.contexts.length
      ? el("table", {},
          el("thead", {}, el("tr", {}, el("th", {}, "Path"), el("th", {}, "State"), el("th", { class: "num" }, "Size"),
            el("th", { class: "wide" }, "Fetched"))),
          el("tbody", {}, cached.contexts.map((c) => el("tr", {},
            el("td", {}, el("code", {}, c.key)), el("td", {}, c.state), el("td", { class: "num" }, bytes(c.bytes)),
            el("td", { class: "wide" }, ago(c.created_at))))))
      : el("p", { class: "muted" }, "No cached contexts."));
  });
  return () => {
    reading.abort();
    stop();
  };
}

function viewKeys(root) {
  document.title = "Keys · syncrelay console";
  const wrap = el("div", { class: "table-wrap" });
  const created = el("div", { id: "created" });
  const error = el("p", { class: "error", role: "alert", id: "key-error", hidden: true });
  const role = el("select", { id: "new-role", name: "role" },
    el("option", { value: "client" }, "client"), el("option", { value: "daemon" }, "daemon"),
    el("option", { value: "admin" }, "admin"));
  const target = el("input", { id: "new-target", name: "target", autocomplete: "off", spellcheck: "false" });
  const targetLabel = el("label", { for: "new-target" }, "Scope (daemon ids, comma-separated, or *)");
  const label = el("input", { id: "new-label", name: "label", autocomplete: "off" });
  role.addEventListener("change", () => {
    targetLabel.textContent = role.value === "daemon" ? "Daemon id" : "Scope (daemon ids, comma-separated, or *)";
    target.disabled = role.value === "admin";
  });
  const form = el("form", { id: "create-key", "aria-label": "Create a key" },
    el("label", { for: "new-role" }, "Role"), role, targetLabel, target,
    el("label", { for: "new-label" }, "Label (optional)"), label,
    el("button", { type: "submit" }, "Create key"));
  const refresh = async () => {
    const { keys } = await getJson("/admin/keys");
    wrap.replaceChildren(el("table", { id: "keys" },
      el("thead", {}, el("tr", {}, el("th", {}, "Key"), el("th", {}, "Role"), el("th", {}, "Daemon / scope"),
        el("th", { class: "wide" }, "Label"), el("th", { class: "wide" }, "Created"), el("th", {}, el("span", { class: "muted" }, "Revoke")))),
      el("tbody", {}, keys.map((k) => el("tr", { "data-key": k.key_id },
        el("td", {}, el("code", {}, k.key_id)), el("td", {}, k.role),
        el("td", {}, k.daemon || k.scope.join(", ") || "–"),
        el("td", { class: "wide" }, k.label || "–"), el("td", { class: "wide" }, ago(k.created_at)),
        el("td", {}, el("button", {
          type: "button", class: "danger", "aria-label": `Revoke key ${k.key_id}`,
          onclick: () => revoke(k.key_id),
        }, "Revoke")))))));
  };
  const revoke = async (keyId) => {
    if (!confirm(`Revoke key ${keyId}? Its requests and streams end at once; this cannot be undone.`)) return;
    try {
      await api(`/admin/keys/${encodeURIComponent(keyId)}`, { method: "DELETE" });
      status(`Key ${keyId} revoked.`);
      await refresh();
    } catch (err) {
      error.textContent = err instanceof ApiError ? explain(err) : String(err);
      error.hidden = false;
    }
  };
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    error.hidden = true;
    const request = { role: role.value };
    if (label.value.trim()) request.label = label.value.trim();
    if (role.value === "daemon") request.daemon = target.value.trim();
    if (role.value === "client") request.scope = target.value.split(",").map((s) => s.trim()).filter(Boolean);
    try {
      const key = await (await api("/admin/keys", { method: "POST", json: request })).json();
      const token = el("code", { id: "new-token" }, key.token);
      const copy = el("button", { type: "button", class: "secondary", id: "copy-token" }, "Copy");
      copy.addEventListener("click", async () => {
        try {
          await navigator.clipboard.writeText(key.token);
          copy.textContent = "Copied";
        } catch (_) {
          getSelection().selectAllChildren(token);
          copy.textContent = "Selected: press Ctrl+C";
        }
      });
      created.replaceChildren(el("div", { class: "token", role: "status" },
        el("strong", {}, `New ${key.role} key ${key.key_id}. The token is shown this once:`), token, copy));
      form.reset();
      target.disabled = false;
      await refresh();
    } catch (err) {
      error.textContent = err instanceof ApiError ? explain(err) : String(err);
      error.hidden = false;
    }
  });
  root.append(el("h2", {}, "Keys"), wrap, el("h3", {}, "Create a key"), form, error, created);
  return every(10 * SAMPLE_MS, refresh);
}

function viewBackup(root) {
  document.title = "Backup · syncrelay console";
  root.append(el("h2", {}, "Backup"));
  const body = el("div");
  root.append(body);
  getJson("/admin/stats").then((stats) => {
    if (stats.store.backend === "postgres") {
      body.append(el("p", {}, "This relay keeps its data in PostgreSQL, which backs it up with its own tools: ",
        el("code", {}, "pg_dump"), " for a copy, or ", el("code", {}, "pg_basebackup"),
        " with WAL archiving for point-in-time recovery. The relay's data directory holds only its admin key and TLS files."));
      return;
    }
    const to = el("input", { id: "backup-to", name: "to", required: true, autocomplete: "off", spellcheck: "false",
      placeholder: "/var/backups/syncrelay-2026-12-07" });
    const progress = el("progress", { id: "backup-progress", max: 1, value: 0, hidden: true });
    const line = el("p", { id: "backup-status", role: "status" });
    const start = el("button", { type: "submit" }, "Start backup");
    const form = el("form", { id: "backup-form", "aria-label": "Start a backup" },
      el("label", { for: "backup-to" }, "Directory on the relay's host (absolute, must not exist yet)"), to, start);
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      start.disabled = true;
      progress.hidden = false;
      progress.removeAttribute("value");
      line.className = "";
      line.textContent = "Starting…";
      let reports = 0;
      try {
        const response = await api("/admin/backup", { method: "POST", json: { to: to.value.trim() } });
        await readLines(response, (entry) => {
          if (entry.error) {
            line.className = "error";
            line.textContent = `Backup failed: ${entry.error.message || entry.error.code}`;
          } else if (entry.done) {
            progress.max = 1;
            progress.value = 1;
            line.className = "ok";
            line.textContent = `Backup done: ${bytes(entry.bytes)}, ${number(entry.entries)} entries in ${entry.to} (${(entry.elapsed_ms / 1000).toFixed(1)} s).`;
          } else {
            progress.max = Math.max(entry.estimated_bytes, entry.copied_bytes, 1);
            progress.value = entry.copied_bytes;
            reports += 1;
            line.dataset.reports = String(reports);
            line.textContent = `Copied ${bytes(entry.copied_bytes)} of about ${bytes(entry.estimated_bytes)} (${number(entry.entries)} entries)…`;
          }
        });
      } catch (err) {
        line.className = "error";
        line.textContent = err instanceof ApiError ? explain(err) : String(err);
      }
      start.disabled = false;
    });
    body.append(el("p", {}, "An online backup: the relay keeps serving while its store is copied, and the copy is consistent and durable when this says done."), form, progress, line);
  }).catch((err) => status(err instanceof ApiError ? explain(err) : String(err), "error"));
}

/** Reads an NDJSON response, calling `onLine` with each parsed line. */
async function readLines(response, onLine) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (value) buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n")) >= 0) {
      const text = buffer.slice(0, end).trim();
      buffer = buffer.slice(end + 1);
      if (text) onLine(JSON.parse(text));
    }
    if (done) {
      if (buffer.trim()) onLine(JSON.parse(buffer));
      return;
    }
  }
}

// --- Sign-in -------------------------------------------------------------------------------

function signOut(message) {
  sessionStorage.removeItem(KEY);
  const error = $("#sign-in-error");
  error.textContent = message || "";
  error.hidden = !message;
  route();
}

async function signIn(event) {
  event.preventDefault();
  const input = $("#key");
  const candidate = input.value.trim();
  const error = $("#sign-in-error");
  error.hidden = true;
  try {
    await api("/admin/stats", { key: candidate });
  } catch (err) {
    error.textContent = err instanceof ApiError ? explain(err) : String(err);
    error.hidden = false;
    input.select();
    return;
  }
  sessionStorage.setItem(KEY, candidate);
  input.value = "";
  if (!location.hash || location.hash === "#/") location.hash = "#/overview";
  route();
}

$("#sign-in-form").addEventListener("submit", signIn);
$("#sign-out").addEventListener("click", () => signOut("Signed out."));
window.addEventListener("hashchange", route);
route();
