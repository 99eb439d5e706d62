// The rule-sidecar dashboard: the JSON API and the WebSocket, shown. No framework and no
// build step; every value from the server is put into the page as text, never as HTML.
"use strict";

const HOT = "/api/v1/rules/hot-reload";
const BEARER_PROTOCOL = "base64url.bearer.authorization.k8s.io.";
const TOKEN_KEY = "rule-sidecar-token";
const MAX_EVENTS = 200;
const MAX_RULE_ROWS = 500;
const MAX_CHANGES = 100;

const $ = (id) => document.getElementById(id);
const view = { status: null, health: null, rulesets: [], rules: [], history: [], changes: null };
const feed = { socket: null, instance: null, lastSeq: null, serving: null, retryMs: 1000 };

// ------------------------------------------------------------------------- helpers

/** An element with properties and children; strings become text nodes. */
function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "dataset") Object.assign(node.dataset, value);
    else if (value !== undefined && value !== null) node[key] = value;
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined && child !== false) {
      node.append(child instanceof Node ? child : String(child));
    }
  }
  return node;
}

function fill(node, ...children) {
  node.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined));
}

function age(iso) {
  if (!iso) return "";
  const seconds = Math.max(0, Math.round((Date.now() - Date.parse(iso)) / 1000));
  if (seconds < 90) return `${seconds} s ago`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min ago`;
  if (seconds < 172800) return `${Math.round(seconds / 3600)} h ago`;
  return `${Math.round(seconds / 86400)} days ago`;
}

/** A time element that keeps saying how long ago it was (see tick()). */
function since(iso) {
  if (!iso) return "never";
  return el("time", { dateTime: iso, title: new Date(iso).toLocaleString(), dataset: { since: iso } },
    age(iso));
}

function tick() {
  for (const node of document.querySelectorAll("[data-since]")) {
    node.textContent = age(node.dataset.since);
  }
  renderBanner();
}

/** Where a problem is: file:line:column, or the ruleset and rule it belongs to. */
function where(problem) {
  if (problem.location) return problem.location;
  if (problem.file) return `${problem.file}:${problem.line}:${problem.column}`;
  return [problem.ruleset_id, problem.rule_id].filter(Boolean).join(" / ") || "?";
}

function problemItem(problem) {
  const message = problem.message ?? problem.error;
  const path = problem.path && problem.path !== "$" ? ` (at ${problem.path})` : "";
  return el("li", {}, el("span", { className: "location" }, where(problem)), `: ${message}${path}`);
}

function plural(count, noun) {
  return `${count} ${noun}${count === 1 ? "" : "s"}`;
}

function sourceText(source) {
  if (!source) return "";
  return `${source.file.split("/").pop()}:${source.line}`;
}

// ------------------------------------------------------------------------- HTTP

function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

/** Ask for the admin token in a modal dialog; null when the person cancels. */
function askToken() {
  const dialog = $("token-dialog");
  const input = $("token");
  input.value = "";
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      const value = dialog.returnValue === "ok" ? input.value.trim() : "";
      if (value) sessionStorage.setItem(TOKEN_KEY, value);
      resolve(value || null);
    }, { once: true });
    dialog.showModal();
  });
}

/** fetch() with JSON in and out; a 401 asks for the token once and tries again. */
async function api(path, { method = "GET", body } = {}) {
  for (let attempt = 0; ; attempt += 1) {
    const headers = { Accept: "application/json" };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    if (token()) headers.Authorization = `Bearer ${token()}`;
    const response = await fetch(path, {
      method, headers, cache: "no-cache",
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    if (response.status === 401 && attempt === 0) {
      sessionStorage.removeItem(TOKEN_KEY);
      if (await askToken()) continue;
    }
    const data = await response.json().catch(() => ({}));
    return { status: response.status, data, headers: response.headers };
  }
}

function errorText(result) {
  const error = result.data && result.data.error;
  return error ? `${result.status}: ${error.message}` : `HTTP ${result.status}`;
}

// ------------------------------------------------------------------------- refresh

let refreshing = null;
let refreshAgain = false;

/** Read everything again; calls while one runs coalesce into one more run. */
function refresh() {
  if (refreshing) {
    refreshAgain = true;
    return refreshing;
  }
  refreshing = (async () => {
    try {
      let catchUp = 3;  // bounded: a restarted sidecar counts versions from 1 again
      do {
        refreshAgain = false;
        await readAll();
      } while (refreshAgain || (behind() && catchUp-- > 0));
    } catch (error) {
      const pill = $("health");
      pill.dataset.state = "unhealthy";
      pill.textContent = "unreachable";
      pill.title = String(error);
    } finally {
      refreshing = null;
    }
  })();
  return refreshing;
}

async function readAll() {
  const [health, status, rulesets, rules, history, changes] = await Promise.all([
    api("/health/hot-reload"), api(`${HOT}/status`), api("/api/v1/rulesets"),
    api("/api/v1/rules"), api(`${HOT}/history?limit=25`), api(`${HOT}/changes?limit=${MAX_CHANGES}`),
  ]);
  view.health = health.data;
  view.status = status.data;
  view.rulesets = rulesets.data.rulesets || [];
  view.rules = rules.data.rules || [];
  view.history = history.data.history || [];
  view.changes = changes.data;
  renderHeader();
  renderBanner();
  renderRules();
  renderTryRulesets();
  renderChanges();
  renderHistory();
}

// ------------------------------------------------------------------------- rendering

function renderHeader() {
  const { health, status } = view;
  const pill = $("health");
  pill.dataset.state = health.status;
  pill.textContent = health.status;
  const failing = Object.entries(health.checks || {}).filter(([, ok]) => !ok).map(([k]) => k);
  pill.title = failing.length ? `failing checks: ${failing.join(", ")}` : "every check passes";
  $("version").textContent = status.registry.version;
  $("revision").textContent = status.registry.revision;
  fill($("last-reload"),
    status.last_reload_status ? `${status.last_reload_status}, ` : "", since(status.last_reload_time));
  $("monitoring").textContent = status.monitoring_active ? "on" : "off";
}

/** Why the page must shout: a failed reload until a good one, else what degrades health. */
function bannerContent() {
  const { health, status } = view;
  if (!status) return null;
  if (status.last_reload_status === "failed") {
    return {
      level: "error",
      title: `Last reload failed: still serving version ${status.registry.version}`,
      text: ["The failed rules are not live. Fix them and the next good reload clears this. ",
        "Failed ", since(status.last_reload_time), "."],
      problems: status.last_errors || [],
    };
  }
  const reasons = Object.entries(health.checks || {}).filter(([, ok]) => !ok).map(([k]) => k);
  for (const [source, problem] of Object.entries(health.watch_problems || {})) {
    reasons.push(`${source}: ${problem}`);
  }
  if (status.serving_from && status.serving_from !== "sources") {
    reasons.push(`serving the copy from ${status.serving_from}, not the sources`);
  }
  const staleAfterMs = (3 * status.reload_interval_seconds + 10) * 1000;
  if (status.monitoring_active && status.last_check_time &&
      Date.now() - Date.parse(status.last_check_time) > staleAfterMs) {
    reasons.push(`stale: no look at the sources since ${age(status.last_check_time)}`);
  }
  if (!reasons.length) return null;
  return { level: "warning", title: `Health: ${health.status}`, text: [reasons.join("; ")],
    problems: [] };
}

let bannerShown = "null";

/** Called every second (staleness is a matter of time): the banner is rebuilt only when
 *  what it says changes, so that screen readers announce the alert once. */
function renderBanner() {
  const content = bannerContent();
  const key = JSON.stringify(content);  // its time element serializes as {}: it ticks alone
  if (key === bannerShown) return;
  bannerShown = key;
  const banner = $("banner");
  banner.hidden = content === null;
  // The tab says it too, for a page left open behind others.
  document.title = content === null ? "rule-sidecar"
    : `${content.level === "error" ? "Reload failed" : "Degraded"} · rule-sidecar`;
  if (content === null) return;
  banner.dataset.level = content.level;
  $("banner-title").textContent = content.title;
  fill($("banner-text"), content.text);
  fill($("banner-errors"), content.problems.map(problemItem));
}

function ruleMatches(rule, needle) {
  if (!needle) return true;
  const haystack = [rule.id, rule.name, rule.condition, rule.ruleset_id, ...(rule.tags || []),
    rule.source ? rule.source.file : ""].join("\n").toLowerCase();
  return haystack.includes(needle);
}

function ruleRow(rule) {
  return el("tr", { dataset: { rule: rule.id, enabled: String(rule.enabled) } },
    el("td", {}, el("code", {}, rule.id), rule.name !== rule.id ? el("div", {}, rule.name) : null),
    el("td", { className: "number" }, rule.points),
    el("td", {}, rule.enabled ? "yes" : "no"),
    el("td", { className: "condition" }, rule.condition),
    el("td", { title: rule.source ? rule.source.file : "" }, sourceText(rule.source)));
}

function renderRules() {
  const needle = $("filter").value.trim().toLowerCase();
  const byRuleset = new Map(view.rulesets.map((r) => [r.id, []]));
  let shown = 0;
  let matching = 0;
  for (const rule of view.rules) {
    if (!ruleMatches(rule, needle)) continue;
    matching += 1;
    if (shown < MAX_RULE_ROWS && byRuleset.has(rule.ruleset_id)) {
      byRuleset.get(rule.ruleset_id).push(rule);
      shown += 1;
    }
  }
  const blocks = view.rulesets.filter((r) => byRuleset.get(r.id).length || !needle).map((r) => {
    const bands = r.decisions.map((d) => `${d.decision} ≥ ${d.min_points}`).join(", ");
    const fallback = r.default_decision ? `, otherwise ${r.default_decision}` : "";
    return el("details", { className: "ruleset", open: true, dataset: { ruleset: r.id } },
      el("summary", {}, `${r.id}: ${r.name} (${r.enabled_rule_count} of ${r.rule_count} rules enabled)`),
      el("p", { className: "muted" }, `${bands || "no decision bands"}${fallback}. `,
        sourceText(r.source)),
      el("div", { className: "table-scroll" }, el("table", {},
        el("thead", {}, el("tr", {}, ["Rule", "Points", "Enabled", "Condition", "Source"]
          .map((h) => el("th", { scope: "col" }, h)))),
        el("tbody", {}, byRuleset.get(r.id).map(ruleRow)))));
  });
  fill($("rulesets"), blocks);
  const total = view.rules.length;
  let summary = needle ? `${matching} of ${total} rules match.` : `${total} rules in ${view.rulesets.length} rulesets.`;
  if (matching > shown) summary += ` Showing the first ${shown}; filter to narrow.`;
  $("rules-summary").textContent = summary;
}

function renderTryRulesets() {
  const select = $("try-ruleset");
  const chosen = select.value;
  fill(select, view.rulesets.map((r) => el("option", { value: r.id }, r.id)));
  if (view.rulesets.some((r) => r.id === chosen)) select.value = chosen;
}

/** The fields of an updated rule or ruleset that differ, as `field: before → after`. */
function fieldChanges(before, after) {
  const keys = new Set([...Object.keys(before), ...Object.keys(after)]);
  const items = [];
  for (const key of keys) {
    const old = JSON.stringify(before[key]);
    const now = JSON.stringify(after[key]);
    if (old === now) continue;
    const shown = key === "source" ? [sourceText(before[key]), sourceText(after[key])] : [old, now];
    items.push(el("li", {}, `${key}: `, el("del", { className: "before" }, shown[0]), " → ",
      el("ins", { className: "after" }, shown[1])));
  }
  return items.length ? el("ul", {}, items) : null;
}

function changeItem(change) {
  const subject = change.rule_id ? `rule ${change.rule_id} (${change.ruleset_id})`
    : change.ruleset_id ? `ruleset ${change.ruleset_id}` : "every rule";
  const details = change.before && change.after ? fieldChanges(change.before, change.after)
    : change.after && change.after.condition ? el("div", { className: "condition" }, change.after.condition)
      : null;
  return el("li", { dataset: { change: change.type } }, el("strong", {}, change.type.replace("_", " ")),
    ` ${subject}`, details);
}

function renderChanges() {
  const changes = view.changes;
  if (!changes || !changes.changes) return;
  const head = changes.from_version === 0 ? `First load, version ${changes.to_version}`
    : `Version ${changes.from_version} → ${changes.to_version}`;
  $("changes-summary").textContent = `${head}: ${plural(changes.count, "change")}` +
    (changes.count > MAX_CHANGES ? ` (the first ${MAX_CHANGES} shown)` : "") + ".";
  fill($("changes"), changes.changes.map(changeItem));
}

function renderHistory() {
  fill($("history"), view.history.map((record, index) => {
    // The newest record's errors are open: that is the failure being looked at.
    const errors = record.errors.length ? el("details", { open: index === 0 },
      el("summary", {}, plural(record.errors.length, "error")),
      el("ul", { className: "problems" }, record.errors.map(problemItem))) : null;
    return el("tr", { dataset: { record: record.id, status: record.status } },
      el("td", {}, record.id),
      el("td", {}, since(record.timestamp)),
      el("td", {}, record.trigger),
      el("td", {}, el("span", { className: `outcome-${record.status}` }, record.status), errors),
      el("td", {}, record.version_before === record.version_after ? String(record.version_after)
        : `${record.version_before} → ${record.version_after}`),
      el("td", { className: "number" }, record.rules_loaded),
      el("td", { className: "number" }, `${record.reload_time_ms.toFixed(1)} ms`));
  }));
}

// ------------------------------------------------------------------------- live feed

function eventSummary(message) {
  const data = message.data || {};
  switch (message.event_type) {
    case "rules_reloaded":
      return `version ${data.version_before} → ${data.version_after}, ${plural(data.changes, "change")} (${data.trigger})`;
    case "reload_failed":
      return `${plural(data.errors.length, "error")}, first at ${data.errors.length ? where(data.errors[0]) : "?"} (${data.trigger})`;
    case "status":
      return `connected; serving version ${data.registry ? data.registry.version : "?"}`;
    case "resync_required":
      return data.reason === "too_old" ? "missed too much while away; reading everything again"
        : "the sidecar restarted while away; reading everything again";
    case "changes_omitted":
      return `version ${data.registry_version}: more changes than the ${data.sent} shown one by one`;
    default:
      return [data.ruleset_id, data.rule_id].filter(Boolean).join(" / ");
  }
}

function addEvent(message) {
  const list = $("events");
  const item = el("li", { dataset: { event: message.event_type } },
    el("time", { dateTime: message.timestamp }, new Date(message.timestamp).toLocaleTimeString()),
    " ", el("strong", {}, message.event_type), " ", eventSummary(message));
  list.prepend(item);
  while (list.children.length > MAX_EVENTS) list.lastElementChild.remove();
}

function base64url(text) {
  const bytes = new TextEncoder().encode(text);
  return btoa(String.fromCharCode(...bytes)).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

function setFeedState(state, text) {
  const node = $("feed-state");
  node.dataset.state = state;
  node.textContent = text;
}

/** A reload record from the feed, shown at once; the reads that follow fill in the rest
 *  (rule events come with every reload, so they need no reads of their own). */
function showRecord(record) {
  const { status } = view;
  if (!status || !view.health) return;
  status.last_reload_status = record.status;
  status.last_reload_time = record.timestamp;
  status.last_errors = record.errors;
  status.registry.version = record.version_after;
  status.registry.revision = record.revision;
  renderHeader();
  renderBanner();
}

/** Whether the page shows an older version than the feed last said serves. */
function behind() {
  const shown = view.status && view.status.registry;
  return Boolean(shown && feed.serving !== null && shown.version < feed.serving);
}

/** Follow /ws/hot-reload; reconnect with backoff and resume from the last message seen:
 *  its seq counts in its instance, so both go back (a restarted sidecar answers
 *  resync_required, and the page reads everything again). */
function connect() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const resume = feed.lastSeq === null ? ""
    : `?${new URLSearchParams({ instance: feed.instance, last_seq: feed.lastSeq })}`;
  const protocols = token() ? [BEARER_PROTOCOL + base64url(token())] : [];
  const socket = new WebSocket(`${scheme}://${location.host}/ws/hot-reload${resume}`, protocols);
  let opened = false;
  feed.socket = socket;
  socket.onopen = () => {
    opened = true;
    feed.retryMs = 1000;
    setFeedState("open", "connected");
  };
  socket.onmessage = (event) => {
    const message = JSON.parse(event.data);
    if (message.event_type === "pong") return;
    if (typeof message.seq === "number" && typeof message.instance === "string") {
      [feed.instance, feed.lastSeq] = [message.instance, message.seq];
    }
    addEvent(message);
    if (message.event_type === "rules_reloaded" || message.event_type === "reload_failed") {
      showRecord(message.data);
      refresh();
    } else if (message.event_type === "resync_required") {
      refresh();
    } else if (message.event_type === "status" && message.data && message.data.registry) {
      // A reload that finished between the page's reads and this connection was not
      // announced to it: the status sent on connect names the version, and the page
      // reads again if what it shows (or is reading) is older.
      feed.serving = message.data.registry.version;
      if (behind()) refresh();
    }
  };
  socket.onclose = async () => {
    setFeedState("closed", "reconnecting…");
    if (!opened && (await socketNeedsToken())) {
      setFeedState("closed", "needs the admin token");
      if (!(await askToken())) return;
    }
    setTimeout(connect, feed.retryMs);
    feed.retryMs = Math.min(feed.retryMs * 2, 15000);
  };
}

/** A browser does not tell why a WebSocket handshake failed; a plain GET of the same path
 *  answers 401 when the admin token is what is missing. */
async function socketNeedsToken() {
  try {
    const headers = token() ? { Authorization: `Bearer ${token()}` } : {};
    const response = await fetch("/ws/hot-reload", { headers, cache: "no-store" });
    if (response.status === 401) sessionStorage.removeItem(TOKEN_KEY);
    return response.status === 401;
  } catch {
    return false;
  }
}

// ------------------------------------------------------------------------- actions

function showResult(node, outcome, ...children) {
  node.dataset.outcome = outcome;
  fill(node, children);
}

async function runAction(path, label) {
  const out = $("action-result");
  showResult(out, "busy", `${label}…`);
  const result = await api(path, { method: "POST", body: {} });
  const record = result.data;
  if (result.status === 200 && record.status) {
    showResult(out, "ok", `${label}: ${record.status}, version ${record.version_after}.`);
  } else if (result.status === 422 && record.errors) {
    showResult(out, "error", `${label} failed; nothing changed:`,
      el("ul", { className: "problems" }, record.errors.map(problemItem)));
  } else {
    const retry = result.headers.get("Retry-After");
    showResult(out, "error", `${label}: ${errorText(result)}${retry ? ` (retry in ${retry} s)` : ""}`);
  }
  refresh();
}

async function validate() {
  const out = $("action-result");
  showResult(out, "busy", "Validating…");
  const result = await api(`${HOT}/validate`, { method: "POST", body: {} });
  const report = result.data;
  if (result.status !== 200) {
    showResult(out, "error", `Validate: ${errorText(result)}`);
  } else if (report.valid) {
    showResult(out, "ok", `Valid: ${report.total_rules} rules in ${report.total_rulesets} rulesets.`);
  } else {
    showResult(out, "error", `Not valid: ${plural(report.errors.length, "problem")}.`,
      el("ul", { className: "problems" }, report.errors.map(problemItem)));
  }
}

async function tryIt(event) {
  event.preventDefault();
  const out = $("try-result");
  let input;
  try {
    input = JSON.parse($("try-input").value);
  } catch (error) {
    showResult(out, "error", `The input is not JSON: ${error.message}`);
    return;
  }
  const id = $("try-ruleset").value;
  const result = await api(`/api/v1/rulesets/${encodeURIComponent(id)}/evaluate`,
    { method: "POST", body: { input } });
  if (result.status !== 200) {
    showResult(out, "error", errorText(result));
    return;
  }
  const answer = result.data;
  showResult(out, "ok",
    el("p", {}, "Decision ", el("strong", { id: "try-decision" }, answer.decision ?? "none"),
      ", total ", el("strong", { id: "try-total" }, answer.total_points), " points (version ",
      answer.registry_version, ")."),
    el("p", {}, `Matched ${plural(answer.matched.length, "rule")}:`),
    el("ul", { id: "try-matched" }, answer.matched.map((m) =>
      el("li", {}, el("code", {}, m.id), ` ${m.name}: ${m.points} points`))),
    answer.errors.length ? el("details", {}, el("summary", {}, `${plural(answer.errors.length, "rule")} errored`),
      el("ul", {}, answer.errors.map((e) => el("li", {}, el("code", {}, e.rule_id), `: ${e.error}`))))
      : null);
}

// ------------------------------------------------------------------------- start

document.addEventListener("DOMContentLoaded", () => {
  $("reload").addEventListener("click", () => runAction(`${HOT}/reload`, "Reload"));
  $("validate").addEventListener("click", validate);
  $("rollback").addEventListener("click", () => {
    if (confirm("Publish the previous version's rules again, as a new version?")) {
      runAction(`${HOT}/rollback`, "Rollback");
    }
  });
  $("filter").addEventListener("input", renderRules);
  $("try").addEventListener("submit", tryIt);
  refresh();
  connect();
  setInterval(tick, 1000);
});
