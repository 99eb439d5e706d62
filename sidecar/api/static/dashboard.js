// The rule-sidecar dashboard: the JSON API and the WebSocket, shown. No framework and no
// build step; every value from the server is put into the page as text, never as HTML.
"use strict";

const HOT = "/api/v1/rules/hot-reload";
const BEARER_PROTOCOL = "base64url.bearer.authorization.k8s.io.";
const TOKEN_KEY = "rule-sidecar-token";
const MAX_EVENTS = 200;
const MAX_CHANGES = 100;
const PAGE_SIZE = 50;           // rulesets (or matching rules) on one page of the list
const READ_TIMEOUT_MS = 8000;   // a read that takes longer counts as the sidecar unreachable
const ACTION_TIMEOUT_MS = 60000;  // reloads and validations read every source
const PROBE_MS = 5000;          // how often health is read while the sidecar answers
const PROBE_DOWN_MS = 2000;     // and while it does not
const STATS_MS = 10000;         // how often an opened ruleset's counts are read again
const FEW_CHANGES = 10;         // more changes than this are summarised, each one behind a click

const $ = (id) => document.getElementById(id);
const view = { status: null, health: null, history: [], changes: null, list: null };
const feed = { socket: null, instance: null, lastSeq: null, serving: null, retryMs: 1000, timer: null };
/** What the page knows about reaching the sidecar: when it last read health from it, and
 *  since when nothing it asks is answered. */
const link = { knownAt: null, answeredAt: 0, downSince: null, why: "", readError: null };
/** The list of rulesets: the page shown, the filter, the rulesets opened and their rules
 *  and counts as last read, and which of those the feed said changed since. */
const list = { offset: 0, needle: "", opened: new Set(), rules: new Map(), changed: new Set(),
  allChanged: false, pageChanged: true, stats: new Map(), statsError: new Map(), statsAsked: new Map() };

// ------------------------------------------------------------------------- helpers

/** An element with properties and children; strings become text nodes. */
function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "dataset") Object.assign(node.dataset, value);
    else if (value !== undefined && value !== null) node[key] = value;
  }
  node.append(...parts(children));
  return node;
}

function fill(node, ...children) {
  node.replaceChildren(...parts(children));
}

/** Children nested to any depth, as nodes and text. An array or object left in them would
 *  be shown as its String() (`,[object HTMLTimeElement],`): it is a bug, so it throws. */
function parts(children) {
  return children.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false)
    .map((c) => {
      if (c instanceof Node) return c;
      if (typeof c === "object") throw new TypeError(`not text nor an element: ${String(c)}`);
      return String(c);
    });
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
  renderAge();
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

/** Thrown when the sidecar does not answer at all (refused, reset, or not in time). */
class Unreachable extends Error {}

/** fetch() with JSON in and out, within `timeoutMs`; a 401 asks for the token once and
 *  tries again. No answer marks the sidecar unreachable; any answer marks it reachable.
 *  `text` is sent as it is, as `type` (a document being edited); with `accept` other
 *  than JSON, an answer that is not JSON is given as text. */
async function api(path, { method = "GET", body, text, type, accept = "application/json",
  headers: extra = {}, cache = "no-cache", timeoutMs = READ_TIMEOUT_MS, signal } = {}) {
  for (let attempt = 0; ; attempt += 1) {
    const headers = { Accept: accept, ...extra };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    if (text !== undefined) headers["Content-Type"] = type;
    if (token()) headers.Authorization = `Bearer ${token()}`;
    const sent = Date.now();
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(new Unreachable(`no answer within ${timeoutMs / 1000} s`)), timeoutMs);
    const abandon = () => controller.abort(signal.reason);
    if (signal) signal.addEventListener("abort", abandon, { once: true });
    let response;
    let data;
    try {
      response = await fetch(path, {
        method, headers, cache, signal: controller.signal,
        body: text !== undefined ? text : body === undefined ? undefined : JSON.stringify(body),
      });
      const json = accept === "application/json" || (response.headers.get("Content-Type") || "").includes("json");
      data = await (json ? response.json() : response.text()).catch((error) => {
        if (controller.signal.aborted) throw error;
        return {};
      });
    } catch (error) {
      if (signal && signal.aborted) throw error;  // superseded by a newer request: not a failure
      const why = controller.signal.aborted ? controller.signal.reason.message : "the connection failed";
      linkDown(why, sent);
      throw new Unreachable(`could not reach the sidecar (${why})`);
    } finally {
      clearTimeout(timer);
      if (signal) signal.removeEventListener("abort", abandon);
    }
    linkUp();
    if (response.status === 401 && attempt === 0) {
      sessionStorage.removeItem(TOKEN_KEY);
      if (await askToken()) continue;
    }
    return { status: response.status, data, headers: response.headers };
  }
}

/** The data of a read that must succeed, else an error naming what failed. */
function answered(result, path) {
  if (result.status >= 200 && result.status < 300) return result.data;
  if (path === "/health/hot-reload" && result.status === 503 && result.data.status) return result.data;
  throw new Error(`${path}: ${errorText(result)}`);
}

function errorText(result) {
  const error = result.data && result.data.error;
  return error ? `${result.status}: ${error.message}` : `HTTP ${result.status}`;
}

/** Nothing answers a request sent at `sent`: from then on, the page says, nothing is
 *  known, and what it shows is what it last knew. */
function linkDown(why, sent) {
  if (link.downSince === null) link.downSince = Math.max(sent, link.answeredAt);
  link.why = why;
  renderHeader();
  renderBanner();
}

/** An answer after a time without: every part of the page is read again (what it knew
 *  may be wrong now), and the feed reconnects without waiting for its backoff. */
function linkUp() {
  link.answeredAt = Date.now();
  if (link.downSince === null) return;
  link.downSince = null;
  list.allChanged = true;
  renderHeader();
  renderBanner();
  refresh();
  if (!feed.socket) reconnectNow();
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
      link.readError = null;
    } catch (error) {
      // Unreachable is shown by linkDown(); anything else is an answer the page cannot use.
      if (!(error instanceof Unreachable)) link.readError = error.message;
    } finally {
      refreshing = null;
      renderBanner();
    }
  })();
  return refreshing;
}

async function readHealth() {
  const [health, status] = await Promise.all([api("/health/hot-reload"), api(`${HOT}/status`)]);
  view.health = answered(health, "/health/hot-reload");
  view.status = answered(status, `${HOT}/status`);
  link.knownAt = Date.now();
}

async function readAll() {
  const [, history, changes] = await Promise.all([
    readHealth(), api(`${HOT}/history?limit=25`), api(`${HOT}/changes?limit=${MAX_CHANGES}`),
    readList(),
  ]);
  view.history = answered(history, "history").history || [];
  view.changes = answered(changes, "changes");
  renderHeader();
  renderBanner();
  renderWrites();
  renderList();
  renderTryRulesets();
  renderChanges();
  renderHistory();
}

/** Between reloads the page reads health alone, so that what it shows has an age, and
 *  a sidecar that stops answering is seen within seconds, with or without the feed. */
async function probe() {
  clearTimeout(probe.timer);
  try {
    await readHealth();
    renderHeader();
    renderBanner();
  } catch {
    // linkDown() has said it; a bad answer waits for the next full read.
  } finally {
    probe.timer = setTimeout(probe, link.downSince === null ? PROBE_MS : PROBE_DOWN_MS);
  }
}

// ------------------------------------------------------------------------- the list

/** The page of the list shown: rulesets, or with a filter the rules that match. Only
 *  what changed is read again: the page when the feed named one of its rulesets (or
 *  rulesets came or went), and the rules of an opened ruleset when it changed. */
async function readList({ force = false, signal } = {}) {
  const needle = list.needle;
  const everything = list.allChanged;
  const changed = new Set(list.changed);
  list.allChanged = false;
  list.changed.clear();
  try {
    const shown = view.list && view.list.needle === needle && view.list.offset === list.offset;
    const onPage = shown && (view.list.items || []).some((item) => changed.has(item.ruleset_id ?? item.id));
    if (force || needle || everything || !shown || list.pageChanged || onPage) {
      list.pageChanged = false;
      const query = new URLSearchParams({ offset: list.offset, limit: PAGE_SIZE });
      if (needle) query.set("q", needle);
      const path = needle ? "/api/v1/rules" : "/api/v1/rulesets";
      const data = answered(await api(`${path}?${query}`, { signal }), path);
      view.list = { needle, offset: list.offset, total: data.total, version: data.registry_version,
        items: needle ? data.rules : data.rulesets };
      if (list.offset > 0 && list.offset >= data.total) {  // the list got shorter
        list.offset = Math.max(0, Math.floor((data.total - 1) / PAGE_SIZE) * PAGE_SIZE);
        return readList({ force: true, signal });
      }
    }
    for (const id of list.rules.keys()) {
      if (everything || changed.has(id) || !list.opened.has(id)) list.rules.delete(id);
    }
    renderList();
    await Promise.all([...list.opened].filter((id) => shownIds().includes(id) && !list.rules.has(id))
      .map((id) => Promise.all([readRuleset(id), readStats(id)])));
  } catch (error) {
    // Not read: read it again next time.
    if (everything) list.allChanged = true;
    for (const id of changed) list.changed.add(id);
    throw error;
  }
}

function shownIds() {
  if (!view.list || view.list.needle) return [];
  return view.list.items.map((r) => r.id);
}

/** The rules of one opened ruleset, read when it is opened or when it changed. */
async function readRuleset(id) {
  const result = await api(`/api/v1/rulesets/${encodeURIComponent(id)}`);
  if (result.status === 404) {
    list.rules.delete(id);
    list.pageChanged = true;
    return;
  }
  list.rules.set(id, answered(result, `ruleset ${id}`));
  const block = openedBlock(id);
  if (block) fill(block.querySelector(".ruleset-body"), rulesetBody(list.rules.get(id)));
}

function openedBlock(id) {
  const block = document.querySelector(`#rulesets details[data-ruleset="${CSS.escape(id)}"]`);
  return block && block.open ? block : null;
}

/** What the page knows of a ruleset: its read, else its line in the page of the list. */
function rulesetInfo(id) {
  if (list.rules.has(id)) return list.rules.get(id);
  if (!view.list || view.list.needle) return null;
  return view.list.items.find((r) => r.id === id) || null;
}

/** The counts of an opened ruleset (GET .../stats), read when it is opened, when the feed
 *  says it changed, after "Try it" evaluated it, and every STATS_MS while it is open and
 *  shown: never for a collapsed one (a registry can hold thousands). A challenger reads
 *  its champion's counts too: the two rulesets' decisions are counted there. Answers
 *  that arrive after a newer question are dropped. */
async function readStats(id) {
  const info = rulesetInfo(id);
  const ids = [id, info && info.challenger_of].filter(Boolean);
  await Promise.all(ids.map(async (one) => {
    const ticket = (list.statsAsked.get(one) || 0) + 1;
    list.statsAsked.set(one, ticket);
    const path = `/api/v1/rulesets/${encodeURIComponent(one)}/stats`;
    let result;
    try {
      result = await api(path);
    } catch (error) {
      if (error instanceof Unreachable) return;  // linkDown() says it; the last counts stay
      throw error;
    }
    if (list.statsAsked.get(one) !== ticket) return;
    if (result.status === 200) {
      list.stats.set(one, result.data);
      list.statsError.delete(one);
    } else if (result.status === 404) {
      list.stats.delete(one);
    } else {
      list.statsError.set(one, `counts not read: ${errorText(result)}`);
    }
  }));
  renderStats(id);
}

/** Counts of every opened ruleset on the page shown, unless nobody can see them. */
function readOpenedStats() {
  if (document.hidden || link.downSince !== null || !view.list || view.list.needle) return;
  for (const id of list.opened) {
    if (shownIds().includes(id)) readStats(id).catch(() => {});
  }
}

/** What happened to the registry, from the feed: which rulesets to read again. */
function noteChange(message) {
  const data = message.data || {};
  switch (message.event_type) {
    case "rule_added": case "rule_updated": case "rule_removed": case "ruleset_updated":
      if (data.ruleset_id) list.changed.add(data.ruleset_id);
      return;
    case "ruleset_added": case "ruleset_removed":
      if (data.ruleset_id) list.changed.add(data.ruleset_id);
      list.pageChanged = true;  // the pages after it move
      return;
    case "registry_cleared": case "changes_omitted": case "resync_required":
      list.allChanged = true;
      list.pageChanged = true;
      return;
    default:
  }
}

let filterRead = null;
let filterTimer = null;

/** The filter asks the sidecar (`q`): the page never holds every rule. Keystrokes within
 *  200 ms make one read, and a newer read abandons the one before it. */
function filterChanged() {
  clearTimeout(filterTimer);
  filterTimer = setTimeout(() => {
    list.needle = $("filter").value.trim();
    list.offset = 0;
    readListNow();
  }, 200);
}

async function readListNow() {
  if (filterRead) filterRead.abort();
  const controller = new AbortController();
  filterRead = controller;
  try {
    await readList({ force: true, signal: controller.signal });
  } catch (error) {
    if (!controller.signal.aborted && !(error instanceof Unreachable)) {
      link.readError = error.message;
      renderBanner();
    }
  } finally {
    if (filterRead === controller) filterRead = null;
  }
}

/** Previous and next page; the focus stays on a pagination button for keyboard users
 *  (on the other one when the pressed one is disabled at the first or last page). */
function turnPage(step) {
  if (!view.list) return;
  const offset = list.offset + step * PAGE_SIZE;
  if (offset < 0 || offset >= view.list.total) return;
  list.offset = offset;
  readListNow();
}

// ------------------------------------------------------------------------- rendering

function clock(ms) {
  return new Date(ms).toLocaleTimeString([], { hour12: false });
}

/** The pill says what the page last knew and how old that is; when nothing answers, it
 *  says since when, and the last thing known stays beside it as what it is: old news. */
function renderHeader() {
  const { health, status } = view;
  const pill = $("health-pill");
  if (link.downSince !== null) {
    pill.dataset.state = "unreachable";
    $("health").textContent = `unreachable since ${clock(link.downSince)}`;
    pill.title = link.why;
  } else if (health) {
    pill.dataset.state = health.status;
    $("health").textContent = health.status;
    const failing = Object.entries(health.checks || {}).filter(([, ok]) => !ok).map(([k]) => k);
    pill.title = failing.length ? `failing checks: ${failing.join(", ")}` : "every check passes";
  }
  renderAge();
  const socketOpen = feed.socket !== null && feed.socket.readyState === WebSocket.OPEN;
  if (socketOpen) {  // an open socket to a sidecar that answers nothing is no live feed
    setFeedState(link.downSince === null ? "open" : "closed",
      link.downSince === null ? "connected" : "silent");
  }
  if (!status) return;
  $("version").textContent = status.registry.version;
  $("revision").textContent = status.registry.revision;
  fill($("last-reload"),
    status.last_reload_status ? `${status.last_reload_status}, ` : "", since(status.last_reload_time));
  $("monitoring").textContent = status.monitoring_active ? "on" : "off";
}

function renderAge() {
  if (link.knownAt === null) return;
  const known = age(new Date(link.knownAt).toISOString());
  $("health-age").textContent = link.downSince === null ? known
    : `last known ${view.health ? view.health.status : "nothing"}, ${known}`;
}

/** Why the page must shout: a failed reload until a good one, else what degrades health;
 *  `tab` is the same in a word, for the tab title. */
function bannerContent() {
  const { health, status } = view;
  if (link.downSince !== null) {
    return {
      level: "error",
      tab: "Unreachable",
      title: `Cannot reach the sidecar since ${clock(link.downSince)}`,
      text: [`${link.why[0].toUpperCase()}${link.why.slice(1)}. Everything below is what the page last knew`,
        link.knownAt === null ? "" : [" (", since(new Date(link.knownAt).toISOString()), ")"],
        ": it may serve other rules now, or none. Trying again every few seconds."],
      problems: [],
    };
  }
  if (link.readError) {
    return { level: "error", tab: "Not shown", title: "The sidecar's answer could not be shown",
      text: [link.readError, ". What is shown may be out of date."], problems: [] };
  }
  if (!status) return null;
  if (status.last_reload_status === "failed") {
    return {
      level: "error",
      tab: "Reload failed",
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
  return { level: "warning", tab: "Degraded", title: `Health: ${health.status}`, text: [reasons.join("; ")],
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
  document.title = content === null ? "rule-sidecar" : `${content.tab} · rule-sidecar`;
  if (content === null) return;
  banner.dataset.level = content.level;
  $("banner-title").textContent = content.title;
  fill($("banner-text"), content.text);
  fill($("banner-errors"), content.problems.map(problemItem));
}

function ruleRow(rule, counted, writable) {
  const shadow = rule.mode === "shadow"
    ? el("span", { className: "shadow", title: "evaluated and reported, never adds points" }, "shadow")
    : null;
  return el("tr", { dataset: { rule: rule.id, enabled: String(rule.enabled), mode: rule.mode } },
    el("td", {}, el("code", {}, rule.id), shadow, rule.name !== rule.id ? el("div", {}, rule.name) : null),
    el("td", { className: "number" }, rule.points),
    el("td", {}, rule.enabled ? "yes" : "no", writable ? [" ", toggleButton(rule)] : null),
    el("td", { className: "condition" }, rule.condition),
    el("td", { title: rule.source ? rule.source.file : "" }, sourceText(rule.source)),
    counted ? ruleCounts(counted.span, counted.span && counted.span.rules.find((r) => r.id === rule.id))
      : null);
}

/** A rule's hit rate and errors in the current span: "—" before any evaluation, and for
 *  a disabled rule (never evaluated). */
function ruleCounts(span, counts) {
  const evaluated = Boolean(span && counts && counts.enabled && span.evaluations > 0);
  const hit = evaluated && counts.hit_rate !== null
    ? [percent(counts.hit_rate), el("div", { className: "muted" }, `${counts.matches} of ${span.evaluations}`)]
    : "—";
  return [el("td", { className: "number", dataset: { stat: "hit-rate" } }, hit),
    el("td", { className: evaluated && counts.errors ? "number has-errors" : "number", dataset: { stat: "errors" } },
      evaluated ? counts.errors : "—")];
}

function percent(fraction) {
  const value = fraction * 100;
  if (value > 0 && value < 0.1) return "<0.1%";
  if (value < 100 && value > 99.9) return ">99.9%";
  return `${Number(value.toFixed(1))}%`;
}

/** A table of rules; never an empty one. With `counted` (an opened ruleset's), each
 *  rule's hit rate and errors since its content went live. */
function rulesTable(rules, counted = null, writable = false) {
  if (!rules.length) return el("p", { className: "muted" }, "No rules.");
  const heads = ["Rule", "Points", "Enabled", "Condition", "Source", ...counted ? ["Hit rate", "Errors"] : []];
  return el("div", { className: "table-scroll" }, el("table", {},
    el("thead", {}, el("tr", {}, heads.map((h) => el("th", { scope: "col" }, h)))),
    el("tbody", {}, rules.map((rule) => ruleRow(rule, counted, writable)))));
}

function rulesetBody(ruleset) {
  const bands = ruleset.decisions.map((d) => `${d.decision} ≥ ${d.min_points}`).join(", ");
  const fallback = ruleset.default_decision ? `, otherwise ${ruleset.default_decision}` : "";
  const stats = list.stats.get(ruleset.id);
  return [el("p", { className: "muted" }, `${bands || "no decision bands"}${fallback}. `,
    sourceText(ruleset.source)),
  ruleset.rules ? writeBar(ruleset) : null,
  el("div", { className: "insight" }, insight(ruleset.id)),
  ruleset.rules ? rulesTable(ruleset.rules, { span: stats ? stats.current : null }, editable(ruleset))
    : el("p", {}, "Reading…")];
}

/** New counts of an opened ruleset, put in place: its insight and its rules' cells (the
 *  table is not rebuilt, so a selection or a focus in it stays). */
function renderStats(id) {
  const block = openedBlock(id);
  if (!block) return;
  const insightNode = block.querySelector(".insight");
  if (insightNode) fill(insightNode, insight(id));
  const stats = list.stats.get(id);
  const span = stats ? stats.current : null;
  for (const row of block.querySelectorAll("tr[data-rule]")) {
    const counts = span ? span.rules.find((r) => r.id === row.dataset.rule) : null;
    const [hit, errors] = ruleCounts(span, counts);
    row.querySelector('[data-stat="hit-rate"]')?.replaceWith(hit);
    row.querySelector('[data-stat="errors"]')?.replaceWith(errors);
  }
}

function decisionName(decision) {
  return decision === null ? "no decision" : decision;
}

/** The counts of an opened ruleset: its decision mix, and its challenger's decisions
 *  against its own (or, for a challenger, against its champion's). */
function insight(id) {
  const stats = list.stats.get(id);
  const problem = list.statsError.get(id);
  if (!stats) return el("p", { className: "muted" }, problem || "Reading counts…");
  return [decisionMix(stats.current, stats.since_start), challengerPart(id, stats),
    problem ? el("p", { className: "muted" }, problem) : null];
}

/** Inputs by decision as one bar of proportional parts, and the same as text (the bar is
 *  decoration: a screen reader reads the list, and no decision is told by color alone). */
function decisionMix(span, whole) {
  const started = span.since_version ? [`version ${span.since_version} went live `, since(span.since)]
    : ["this content went live ", since(span.since)];
  const head = el("h3", {}, "Decisions");
  const total = whole.evaluations !== span.evaluations
    ? ` (${plural(whole.evaluations, "input")} since the sidecar started)` : "";
  if (!span.evaluations) {
    return [head, el("p", { className: "muted mix-empty" }, "No input evaluated since ", started, `${total}.`)];
  }
  const all = span.decisions.map((d, i) => ({
    ...d, share: d.count / span.evaluations, tone: d.decision === null ? "none" : String(i % 6),
  }));
  const parts = all.filter((d) => d.count > 0);
  const label = (d) => `${decisionName(d.decision)}: ${d.count} (${percent(d.share)})`;
  const bar = el("div", { className: "mix-bar", ariaHidden: "true" }, parts.map((d) => {
    const part = el("span", { className: "mix-part", title: label(d), dataset: { tone: d.tone } },
      el("span", {}, `${decisionName(d.decision)} ${percent(d.share)}`));
    part.style.width = `${d.share * 100}%`;  // CSSOM: the page's style-src allows no style attribute
    return part;
  }));
  return [head,
    el("p", { className: "muted" }, `${plural(span.evaluations, "input")} since `, started, `${total}.`),
    bar,
    el("ul", { className: "mix-legend" }, all.map((d) =>
      el("li", { dataset: { decision: decisionName(d.decision) } },
        el("span", { className: "swatch", ariaHidden: "true", dataset: { tone: d.tone } }), label(d))))];
}

/** A ruleset's challenger: named by a ruleset of the page shown, or by the counts (the
 *  ruleset views do not name it: one on another page is known once it was counted). */
function challengersOf(id, stats) {
  const named = view.list && !view.list.needle
    ? view.list.items.filter((r) => r.challenger_of === id).map((r) => r.id) : [];
  return [...new Set([...named, ...stats.current.challenger.map((e) => e.challenger)])];
}

function challengerPart(id, stats) {
  const info = rulesetInfo(id);
  const champion = info && info.challenger_of;
  if (champion) {
    const theirs = list.stats.get(champion);
    return [el("h3", {}, "Challenger"),
      el("p", {}, "Challenger of ", el("code", {}, champion),
        ": evaluated beside it on every input it evaluates; its decision is reported, never answered."),
      theirs ? versusTable(champion, id, theirs.current) : el("p", { className: "muted" }, "Reading counts…")];
  }
  const challengers = challengersOf(id, stats);
  if (!challengers.length) return null;
  return [el("h3", {}, "Challenger"), challengers.map((challenger) => [
    el("p", {}, "Challenged by ", el("code", {}, challenger),
      ": evaluated beside this ruleset on every input; this ruleset's decision is the answer."),
    versusTable(id, challenger, stats.current)])];
}

/** This ruleset's decisions (rows) against its challenger's (columns), agreements on the
 *  diagonal; the caption says how many differ. */
function versusTable(champion, challenger, span) {
  const entries = span.challenger.filter((e) => e.challenger === challenger);
  const total = entries.reduce((sum, e) => sum + e.count, 0);
  if (!total) return el("p", { className: "muted" }, "No input evaluated by both since ", since(span.since), ".");
  const ours = [...new Set([...span.decisions.map((d) => d.decision), ...entries.map((e) => e.decision)])]
    .filter((d) => entries.some((e) => e.decision === d));
  const theirs = [...new Set([...ours, ...entries.map((e) => e.challenger_decision)])]
    .filter((d) => entries.some((e) => e.challenger_decision === d));
  const count = (d, c) => entries.filter((e) => e.decision === d && e.challenger_decision === c)
    .reduce((sum, e) => sum + e.count, 0);
  const agree = entries.filter((e) => e.decision === e.challenger_decision).reduce((sum, e) => sum + e.count, 0);
  const counted = span.since_version ? `since ${champion}'s version ${span.since_version} went live`
    : `since ${champion}'s content went live`;
  return [el("p", { className: "versus-summary", dataset: { challenger } },
    `${agree} of ${plural(total, "input")} got the same decision from both (${percent(agree / total)}),`
    + ` ${total - agree} a different one (counted ${counted}, `, since(span.since), ")."),
  el("div", { className: "table-scroll" }, el("table", { className: "versus", dataset: { challenger } },
    el("caption", {}, `Decisions of ${champion} (rows) and ${challenger} (columns)`),
    el("thead", {}, el("tr", {}, el("th", { scope: "col" }, `${champion} ↓ · ${challenger} →`),
      theirs.map((c) => el("th", { scope: "col" }, decisionName(c))))),
    el("tbody", {}, ours.map((d) => el("tr", { dataset: { decision: decisionName(d) } },
      el("th", { scope: "row" }, decisionName(d)),
      theirs.map((c) => {
        const n = count(d, c);
        const kind = d === c ? "agree" : n ? "differ" : "";
        return el("td", { className: `number ${kind}`.trim(),
          dataset: { challengerDecision: decisionName(c) } }, n);
      }))))))];
}

/** A ruleset, collapsed unless opened: its rules are read when it is opened. */
function rulesetBlock(ruleset) {
  const opened = list.opened.has(ruleset.id);
  const known = list.rules.get(ruleset.id);
  const block = el("details", { className: "ruleset", open: opened, dataset: { ruleset: ruleset.id } },
    el("summary", {}, `${ruleset.id}: ${ruleset.name} (${ruleset.enabled_rule_count} of ${ruleset.rule_count} rules enabled)`),
    el("div", { className: "ruleset-body" }, opened ? rulesetBody(known || ruleset) : null));
  block.addEventListener("toggle", () => {
    if (block.open && list.opened.has(ruleset.id)) return;  // rendered open: readList reads it
    if (block.open) {
      list.opened.add(ruleset.id);
      const body = block.querySelector(".ruleset-body");
      fill(body, rulesetBody(list.rules.get(ruleset.id) || ruleset));
      if (!list.rules.has(ruleset.id)) readRuleset(ruleset.id).catch(() => {});
      readStats(ruleset.id).catch(() => {});
    } else {
      list.opened.delete(ruleset.id);
      list.rules.delete(ruleset.id);
      for (const id of [ruleset.id, ruleset.challenger_of]) {
        if (id && !list.opened.has(id)) list.stats.delete(id);
      }
      fill(block.querySelector(".ruleset-body"));
    }
  });
  return block;
}

/** Matching rules, grouped by ruleset and shown open: they are what was asked for. */
function matchBlocks(rules) {
  const groups = new Map();
  for (const rule of rules) {
    if (!groups.has(rule.ruleset_id)) groups.set(rule.ruleset_id, []);
    groups.get(rule.ruleset_id).push(rule);
  }
  return [...groups].map(([id, matched]) => el("details", { className: "ruleset", open: true, dataset: { ruleset: id } },
    el("summary", {}, `${id}: ${plural(matched.length, "matching rule")}`), rulesTable(matched)));
}

function renderList() {
  const shown = view.list;
  if (!shown) return;
  const { total, items, offset } = shown;
  // Rebuilt after a reload: a keyboard user's focus on a ruleset stays on it.
  const focused = document.activeElement.closest("#rulesets [data-ruleset]");
  fill($("rulesets"), shown.needle ? matchBlocks(items) : items.map(rulesetBlock));
  if (focused) {
    const again = $("rulesets").querySelector(`[data-ruleset="${CSS.escape(focused.dataset.ruleset)}"] > summary`);
    if (again) again.focus();
  }
  $("rulesets").dataset.filter = shown.needle;  // what the list shows, for its tests
  const rules = view.status ? view.status.registry.rule_count : null;
  $("rules-summary").textContent = shown.needle
    ? `${total} of ${rules ?? "?"} rules match.`
    : `${rules ?? "?"} rules in ${plural(total, "ruleset")}.`;
  renderPages(total, offset, items.length, shown.needle ? "rules" : "rulesets");
}

function renderPages(total, offset, count, noun) {
  const nav = $("pages");
  nav.hidden = total <= PAGE_SIZE;
  if (nav.hidden) return;
  const previous = $("page-previous");
  const next = $("page-next");
  const focused = document.activeElement;
  previous.disabled = offset === 0;
  next.disabled = offset + count >= total;
  const pages = Math.ceil(total / PAGE_SIZE);
  $("page-position").textContent =
    `Page ${Math.floor(offset / PAGE_SIZE) + 1} of ${pages}: ${noun} ${offset + 1} to ${offset + count} of ${total}`;
  if (focused === previous && previous.disabled) next.focus();
  if (focused === next && next.disabled) previous.focus();
}

/** The rulesets of the page shown (a select of 5,000 options is no use to anyone). */
function renderTryRulesets() {
  const select = $("try-ruleset");
  const chosen = select.value;
  const ids = new Set(chosen ? [chosen] : []);
  if (view.list) for (const item of view.list.items) ids.add(item.ruleset_id ?? item.id);
  fill(select, [...ids].sort().map((id) => el("option", { value: id }, id)));
  if (chosen) select.value = chosen;
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

const CHANGE_WORDS = {
  rule_added: ["rule", "added"], rule_updated: ["rule", "updated"], rule_removed: ["rule", "removed"],
  ruleset_added: ["ruleset", "added"], ruleset_updated: ["ruleset", "updated"],
  ruleset_removed: ["ruleset", "removed"], registry_cleared: ["registry", "cleared"],
};

/** Many changes in a few words: a first load is "47 rules added in 3 rulesets" (counted
 *  by the status when the list is cut short), else the count of each kind of change. */
function changesInWords(changes) {
  const whole = changes.count <= changes.changes.length;
  const registry = view.status && view.status.registry;
  if (changes.from_version === 0) {
    if (!whole && !(registry && registry.version === changes.to_version)) return "";
    const rules = whole ? changes.changes.filter((c) => c.type === "rule_added").length : registry.rule_count;
    const rulesets = whole ? changes.changes.filter((c) => c.type === "ruleset_added").length
      : registry.ruleset_count;
    return `${plural(rules, "rule")} added in ${plural(rulesets, "ruleset")}`;
  }
  const kinds = new Map();
  for (const change of changes.changes) kinds.set(change.type, (kinds.get(change.type) || 0) + 1);
  return [...kinds].map(([type, count]) => {
    const [noun, verb] = CHANGE_WORDS[type] || [type, ""];
    return `${plural(count, noun)} ${verb}`.trim();
  }).join(", ") + (whole ? "" : ` among the first ${changes.changes.length}`);
}

/** The changes of the last reload: a few are listed; many (a first load lists every rule)
 *  are summed up, each one a click away, so they do not push the rules off the screen. */
function renderChanges() {
  const changes = view.changes;
  if (!changes || !changes.changes) return;
  const head = changes.from_version === 0 ? `First load, version ${changes.to_version}`
    : `Version ${changes.from_version} → ${changes.to_version}`;
  const many = changes.from_version === 0 || changes.count > FEW_CHANGES;
  const words = many ? changesInWords(changes) : "";
  $("changes-summary").textContent = `${head}: ${plural(changes.count, "change")}` +
    (words ? `: ${words}` : "") + ".";
  const items = el("ul", { id: "changes", className: "changes" }, changes.changes.map(changeItem));
  const body = $("changes-body");
  const wasOpen = body.dataset.version === String(changes.to_version) && Boolean(body.querySelector("details[open]"));
  body.dataset.version = changes.to_version;
  fill(body, many ? el("details", { open: wasOpen },
    el("summary", {}, changes.count > changes.changes.length
      ? `The first ${changes.changes.length} of the ${changes.count} changes` : `Each of the ${changes.count} changes`),
    items) : items);
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

/** Whether the page shows (in its header or its list) an older version than the feed
 *  last said serves. */
function behind() {
  const shown = view.status && view.status.registry;
  if (!shown || feed.serving === null) return false;
  return shown.version < feed.serving || listBehind();
}

/** The list was read before a version the feed never announced to the page. */
function listBehind() {
  return Boolean(view.list && feed.serving !== null && view.list.version < feed.serving);
}

/** Follow /ws/hot-reload; reconnect with backoff and resume from the last message seen:
 *  its seq counts in its instance, so both go back (a restarted sidecar answers
 *  resync_required, and the page reads everything again). */
function connect() {
  clearTimeout(feed.timer);
  feed.timer = null;
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
    linkUp();
  };
  socket.onmessage = (event) => {
    let message;
    try {
      message = JSON.parse(event.data);
    } catch {
      return;
    }
    if (message.event_type === "pong") return;
    if (typeof message.seq === "number" && typeof message.instance === "string") {
      [feed.instance, feed.lastSeq] = [message.instance, message.seq];
    }
    addEvent(message);
    noteChange(message);
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
      // Its changes are unknown: the list and every opened ruleset are read again.
      if (listBehind()) list.allChanged = true;
      if (behind()) refresh();
    }
  };
  socket.onclose = async () => {
    if (feed.socket !== socket) return;
    feed.socket = null;
    setFeedState("closed", "reconnecting…");
    probe();  // a closed feed is often a stopped sidecar: find out now, not at the next probe
    if (!opened && (await socketNeedsToken())) {
      setFeedState("closed", "needs the admin token");
      if (!(await askToken())) return;
    }
    if (feed.socket || feed.timer) return;  // reconnected meanwhile (linkUp)
    feed.timer = setTimeout(connect, feed.retryMs);
    feed.retryMs = Math.min(feed.retryMs * 2, 15000);
  };
}

/** The sidecar answers again: connect at once instead of at the end of the backoff. */
function reconnectNow() {
  if (feed.socket || feed.timer === null) return;
  feed.retryMs = 1000;
  connect();
}

/** A browser does not tell why a WebSocket handshake failed; a plain GET of the same path
 *  answers 401 when the admin token is what is missing. */
async function socketNeedsToken() {
  try {
    const headers = token() ? { Authorization: `Bearer ${token()}` } : {};
    const response = await fetch("/ws/hot-reload",
      { headers, cache: "no-store", signal: AbortSignal.timeout(READ_TIMEOUT_MS) });
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

/** Run `work` with `button` busy; whatever happens, the button is free again after, and
 *  a failure to reach the sidecar is said, not left as "Validating…" forever. */
async function busy(button, label, work, out = button.form ? $("try-result") : $("action-result")) {
  if (button.getAttribute("aria-disabled") === "true") return;
  button.setAttribute("aria-disabled", "true");
  showResult(out, "busy", `${label}…`);
  try {
    await work(out);
  } catch (error) {
    showResult(out, "error", `${label}: ${error.message}`);
  } finally {
    button.removeAttribute("aria-disabled");
  }
}

async function runAction(button, path, label) {
  await busy(button, label, async (out) => {
    try {
      const result = await api(path, { method: "POST", body: {}, timeoutMs: ACTION_TIMEOUT_MS });
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
    } finally {
      refresh();
    }
  });
}

async function validate() {
  await busy($("validate"), "Validate", async (out) => {
    showResult(out, "busy", "Validating…");
    const result = await api(`${HOT}/validate`, { method: "POST", body: {}, timeoutMs: ACTION_TIMEOUT_MS });
    const report = result.data;
    if (result.status !== 200) {
      showResult(out, "error", `Validate: ${errorText(result)}`);
    } else if (report.valid) {
      showResult(out, "ok", `Valid: ${report.total_rules} rules in ${report.total_rulesets} rulesets.`);
    } else {
      showResult(out, "error", `Not valid: ${plural(report.errors.length, "problem")}.`,
        el("ul", { className: "problems" }, report.errors.map(problemItem)));
    }
  });
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
  await busy(event.submitter || $("try").querySelector("button"), "Evaluate", async () => {
    const result = await api(`/api/v1/rulesets/${encodeURIComponent(id)}/evaluate?explain=true`,
      { method: "POST", body: { input }, timeoutMs: ACTION_TIMEOUT_MS });
    if (result.status !== 200) {
      const error = result.data && result.data.error;
      showResult(out, "error", errorText(result), error && error.path ? ` (at ${error.path})` : "");
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
      answer.shadow_matched.length ? el("p", { id: "try-shadow" }, "Shadow rules matched (no points): ",
        answer.shadow_matched.map((rule, i) => [i ? ", " : "", el("code", {}, rule)]), ".") : null,
      answer.challenger ? challengerAnswer(answer) : null,
      answer.errors.length ? el("details", {}, el("summary", {}, `${plural(answer.errors.length, "rule")} errored`),
        el("ul", {}, answer.errors.map((e) => el("li", {}, el("code", {}, e.rule_id), `: ${e.error}`))))
        : null,
      answer.rules ? explanation(answer.rules) : null);
    // The counts just changed: an opened ruleset shows them now, not at its next read.
    for (const counted of [id, answer.challenger && answer.challenger.ruleset_id]) {
      if (counted && list.opened.has(counted) && shownIds().includes(counted)) readStats(counted).catch(() => {});
    }
  });
}

function challengerAnswer(answer) {
  const theirs = answer.challenger;
  const same = theirs.decision === answer.decision;
  return el("p", { id: "try-challenger" }, "Challenger ", el("code", {}, theirs.ruleset_id), ": decision ",
    el("strong", {}, theirs.decision ?? "none"), `, total ${theirs.total_points} points`,
    same ? " (the same decision)" : " (a different decision)",
    theirs.matched.length ? ["; matched ", theirs.matched.map((rule, i) => [i ? ", " : "", el("code", {}, rule)])] : "",
    ".");
}

const OUTCOMES = { matched: "matched", not_matched: "not matched", error: "error", disabled: "disabled" };

/** Every rule's part in the answer, in document order: what it did, its points and mode,
 *  and the input values its condition read (`input.amount = 5000`; null: not in the input). */
function explanation(rules) {
  const matched = rules.filter((r) => r.outcome === "matched").length;
  const errored = rules.filter((r) => r.outcome === "error").length;
  return el("details", { open: true, className: "explanation" },
    el("summary", {}, `Why: ${plural(rules.length, "rule")}, ${matched} matched`,
      errored ? `, ${errored} errored` : ""),
    el("div", { className: "table-scroll" }, el("table", { id: "try-explain" },
      el("thead", {}, el("tr", {}, ["Rule", "Outcome", "Points", "Mode", "Read"]
        .map((h) => el("th", { scope: "col" }, h)))),
      el("tbody", {}, rules.map((rule) => el("tr", { dataset: { rule: rule.id, outcome: rule.outcome } },
        el("td", {}, el("code", {}, rule.id)),
        el("td", { className: `outcome-${rule.outcome}` }, OUTCOMES[rule.outcome] ?? rule.outcome,
          rule.error ? el("div", { className: "rule-error" }, rule.error) : null),
        el("td", { className: "number" }, rule.points),
        el("td", {}, rule.mode),
        el("td", {}, rule.reads ? el("ul", { className: "reads" }, Object.entries(rule.reads).map(([path, value]) =>
          el("li", {}, el("code", {}, path), " = ", el("code", {}, JSON.stringify(value)))))
          : el("span", { className: "muted" }, "—"))))))));
}

// ------------------------------------------------------------------------- writes

const ACTOR_KEY = "rule-sidecar-actor";
const NEW_RULESET = `apiVersion: rule-sidecar/v1
kind: RuleSet
metadata:
  id: new-ruleset
  name: New ruleset
spec:
  decisions:
    - {decision: review, min_points: 40}
  default_decision: allow
  rules: []
`;
/** The document being edited: the ruleset's id and the row version it was read at (what
 *  Save sends as If-Match), or `creating` (If-None-Match: *); the text as read. */
const editor = { id: null, rowVersion: null, creating: false, original: "", opener: null };
/** What the last write from a ruleset's view said, kept across the view's re-renders. */
const notes = new Map();

/** `writes` of the status: whether this sidecar takes writes, where, and why not. */
function writes() {
  return view.status ? view.status.writes : null;
}

/** A ruleset read from the database (it has a row version), while writes are taken. */
function editable(ruleset) {
  const taken = writes();
  return Boolean(taken && taken.available && Number.isInteger(ruleset.row_version));
}

/** The X-Actor of a write: the name typed, marked as the dashboard's. */
function actor() {
  const name = $("actor").value.trim();
  return name ? `${name} (dashboard)` : "dashboard";
}

function renderWrites() {
  const taken = writes();
  if (!taken) return;
  $("write-controls").hidden = !taken.available;
  $("writes-note").textContent = taken.available
    ? `Rulesets stored in the database (${taken.source}) can be changed here: every change is checked`
      + " against the whole registry before it is saved. Rulesets from files or ConfigMaps are"
      + " read-only here: they come from GitOps."
    : `Changing rules here is off: ${taken.reason}. Rulesets from files or ConfigMaps come from`
      + " GitOps: change them in their repository.";
}

/** Above an opened ruleset's rules: Edit and Delete for one of the database, else why not. */
function writeBar(ruleset) {
  const taken = writes();
  const stored = Number.isInteger(ruleset.row_version);
  const note = notes.get(ruleset.id);
  const said = note ? el("div", { className: "result write-note", dataset: { outcome: note.outcome } },
    note.text, note.problems.length ? el("ul", { className: "problems" }, note.problems.map(problemItem)) : null)
    : null;
  if (!stored) {
    return el("p", { className: "muted read-only" }, "Read-only here: from ",
      el("code", {}, ruleset.source ? ruleset.source.file : "its source"),
      " (files or ConfigMaps), changed through GitOps.");
  }
  if (!taken || !taken.available) {
    return el("p", { className: "muted read-only" },
      `Stored in the database (row version ${ruleset.row_version}); changing it here is off: ${taken ? taken.reason : "?"}.`);
  }
  const edit = el("button", { type: "button", className: "edit", ariaLabel: `Edit ${ruleset.id}` }, "Edit");
  const remove = el("button", { type: "button", className: "delete", ariaLabel: `Delete ${ruleset.id}` }, "Delete");
  edit.addEventListener("click", () => openEditor(ruleset.id, edit));
  remove.addEventListener("click", () => deleteRuleset(ruleset, remove));
  return el("div", { className: "write-bar" },
    el("div", { className: "buttons" }, el("span", { className: "muted" },
      `Stored in the database, row version ${ruleset.row_version}.`), edit, remove),
    el("div", { className: "write-result", ariaLive: "polite" }, said));
}

function toggleButton(rule) {
  const verb = rule.enabled ? "Disable" : "Enable";
  const button = el("button", { type: "button", className: "toggle", ariaLabel: `${verb} ${rule.id}` }, verb);
  button.addEventListener("click", () => setEnabled(rule, !rule.enabled, button));
  return button;
}

/** A write's answer in words: 200 served, 202 committed but not served yet, 412 stale,
 *  422 refused with its problems, anything else as the sidecar said it. */
function writeOutcome(result, label) {
  const data = result.data || {};
  const error = data.error || {};
  if (result.status === 200) {
    const row = data.row_version === null ? "" : `row version ${data.row_version}, `;
    return { outcome: "ok", text: `${label}: done (${row}serving registry version ${data.registry_version}).`, problems: [] };
  }
  if (result.status === 202) {
    return { outcome: "warning", text: `${label}: committed (row version ${data.row_version}), not served yet: ${data.message}`, problems: [] };
  }
  if (result.status === 412) {
    const now = error.row_version === null || error.row_version === undefined
      ? "it no longer exists" : `it is now at row version ${error.row_version}`;
    return { outcome: "error", stale: true,
      text: `${label}: not saved. Someone else changed it since it was read: ${now}.`, problems: [] };
  }
  if (result.status === 422) {
    const problems = error.errors || [];
    return { outcome: "error", text: `${label}: refused, nothing was written (${plural(problems.length, "problem")}):`, problems };
  }
  return { outcome: "error", text: `${label}: ${errorText(result)}`, problems: [] };
}

/** After a write (or a stale one) the ruleset is read again now, not only when the
 *  feed says so. */
function readAgain(id) {
  list.changed.add(id);
  list.pageChanged = true;
  refresh();
}

/** Run a write from a ruleset's view with `button` busy; its outcome stays under the
 *  ruleset's buttons. */
async function viewWrite(button, id, label, request) {
  if (button.getAttribute("aria-disabled") === "true") return;
  button.setAttribute("aria-disabled", "true");
  try {
    const result = await request();
    const said = writeOutcome(result, label);
    notes.set(id, said);
    if (result.status < 300 && result.data.row_version === null) {  // deleted: its view goes
      notes.delete(id);
      showResult($("write-result"), said.outcome, said.text);
    }
  } catch (error) {
    notes.set(id, { outcome: "error", text: `${label}: ${error.message}`, problems: [] });
  } finally {
    button.removeAttribute("aria-disabled");
  }
  const block = openedBlock(id);
  if (block && list.rules.has(id)) fill(block.querySelector(".ruleset-body"), rulesetBody(list.rules.get(id)));
  readAgain(id);
}

/** Enable or disable one rule; no If-Match: the flag is all it sets, so it cannot undo
 *  another change (the sidecar's own answer to a stale one would be the same write). */
function setEnabled(rule, enabled, button) {
  const path = `/api/v1/rules/${encodeURIComponent(rule.id)}/${enabled ? "enable" : "disable"}`;
  return viewWrite(button, rule.ruleset_id, `${enabled ? "Enable" : "Disable"} ${rule.id}`,
    () => api(path, { method: "POST", headers: { "X-Actor": actor() }, timeoutMs: ACTION_TIMEOUT_MS }));
}

function deleteRuleset(ruleset, button) {
  const rules = plural(ruleset.rules.length, "rule");
  if (!confirm(`Delete the ruleset ${ruleset.id} and its ${rules} from the database? Applications stop getting its decisions.`)) return;
  viewWrite(button, ruleset.id, `Delete ${ruleset.id}`, () => api(`/api/v1/rulesets/${encodeURIComponent(ruleset.id)}`,
    { method: "DELETE", headers: { "X-Actor": actor(), "If-Match": `"${ruleset.row_version}"` },
      timeoutMs: ACTION_TIMEOUT_MS }));
}

// The editor

function etagVersion(etag) {
  const match = /^"(\d+)"$/.exec(etag || "");
  return match ? Number(match[1]) : null;
}

function showEditor(title, about, text, opener) {
  editor.original = text;
  editor.opener = opener;
  $("editor-title").textContent = title;
  $("editor-about").textContent = about;
  $("editor-id-field").hidden = !editor.creating;
  $("editor-text").value = text;
  showResult($("editor-result"), "", "");
  $("editor").hidden = false;
  (editor.creating ? $("editor-id") : $("editor-text")).focus();
}

/** Open a stored ruleset's document (GET as YAML: the text a PUT takes back, and its row
 *  version as ETag). */
async function openEditor(id, opener) {
  const out = $("editor-result");
  try {
    const result = await api(`/api/v1/rulesets/${encodeURIComponent(id)}`,
      { accept: "application/yaml", cache: "no-store" });
    const version = etagVersion(result.headers.get("ETag"));
    if (result.status !== 200 || version === null || typeof result.data !== "string") {
      notes.set(id, { outcome: "error", problems: [], text: result.status === 200
        ? `Edit ${id}: not stored in the database any more.` : `Edit ${id}: ${errorText(result)}` });
      readAgain(id);
      return;
    }
    Object.assign(editor, { id, rowVersion: version, creating: false });
    showEditor(`Edit ruleset ${id}`, `Row version ${version}, read at ${clock(Date.now())}. Save replaces it`
      + " only if nobody changed it since; Check changes nothing.", result.data, opener);
  } catch (error) {
    showResult(out, "error", `Edit ${id}: ${error.message}`);
  }
}

function newRuleset() {
  Object.assign(editor, { id: null, rowVersion: null, creating: true });
  $("editor-id").value = "new-ruleset";
  showEditor("New ruleset", "Saved only if no ruleset has its id yet; Check changes nothing.", NEW_RULESET,
    $("new-ruleset"));
}

function closeEditor() {
  if ($("editor-text").value !== editor.original && !confirm("Close the editor and discard your changes?")) return;
  $("editor").hidden = true;
  const back = editor.opener && editor.opener.isConnected ? editor.opener : $("new-ruleset");
  if (!back.closest("[hidden]")) back.focus();
}

/** Where a problem is in the text being edited (line and column), or null when it is
 *  elsewhere: validate names the text `request#1.yaml` (or .json), a write
 *  `request.yaml` (or .json) in its `location`. */
function inText(problem) {
  let { file, line, column } = problem;
  const match = problem.location ? /^(.*):(\d+):(\d+)$/.exec(problem.location) : null;
  if (match) [file, line, column] = [match[1], Number(match[2]), Number(match[3])];
  return /^request(#1)?\.(yaml|json)$/.test(file || "") && line > 0 ? { line, column } : null;
}

/** A problem of the edited text: its line:column a button that puts the cursor there. */
function editorProblem(problem) {
  const at = inText(problem);
  if (!at) return problemItem(problem);
  const message = problem.message ?? problem.error;
  const path = problem.path && problem.path !== "$" ? ` (at ${problem.path})` : "";
  const go = el("button", { type: "button", className: "location link", ariaLabel: `Go to line ${at.line}, column ${at.column}` },
    `line ${at.line}:${at.column}`);
  go.addEventListener("click", () => goTo(at.line, at.column));
  return el("li", {}, go, `: ${message}${path}`);
}

function goTo(line, column) {
  const area = $("editor-text");
  const lines = area.value.split("\n");
  let offset = 0;
  for (let i = 0; i < Math.min(line - 1, lines.length); i += 1) offset += lines[i].length + 1;
  offset = Math.min(offset + Math.max(column - 1, 0), area.value.length);
  area.focus();
  area.setSelectionRange(offset, offset);
}

function names(ids) {
  return ids.length ? ids.map((id, i) => [i ? ", " : "", el("code", {}, id)]) : "none";
}

/** Check: the text validated as part of the registry (nothing written): its problems at
 *  line:column, its embedded tests, and what it would change. */
async function checkDocument() {
  await busy($("editor-check"), "Check", async (out) => {
    const result = await api(`${HOT}/validate`, { method: "POST", body: { documents: [$("editor-text").value] },
      timeoutMs: ACTION_TIMEOUT_MS });
    const report = result.data;
    if (result.status !== 200) {
      showResult(out, "error", `Check: ${errorText(result)}`);
      return;
    }
    const { tests, changes } = report;
    const testsLine = el("p", { className: "tests" }, `Embedded tests: ${tests.passed} of ${tests.run} passed`,
      tests.failed ? `, ${tests.failed} failed.` : ".");
    if (!report.valid) {
      showResult(out, "error", el("p", {}, `Not valid: ${plural(report.errors.length, "problem")}; saving it would be refused.`),
        el("ul", { className: "problems" }, report.errors.map(editorProblem)), testsLine);
      return;
    }
    const what = changes.added.length ? "adds the ruleset" : changes.changed.length ? "changes the ruleset"
      : "changes nothing that serves";
    showResult(out, "ok", el("p", {}, `Valid: it ${what}.`), testsLine,
      el("ul", { className: "check-changes" },
        el("li", {}, "Rules added: ", names(changes.rules.added)),
        el("li", {}, "Rules changed: ", names(changes.rules.changed)),
        el("li", {}, "Rules removed: ", names(changes.rules.removed))));
  }, $("editor-result"));
}

/** Save: PUT the text as it is (JSON when it opens like JSON, else YAML: problems are
 *  located in it), If-Match the row version read, or If-None-Match: * for a new one. */
async function saveDocument(event) {
  event.preventDefault();
  const text = $("editor-text").value;
  const id = editor.creating ? $("editor-id").value.trim() : editor.id;
  const out = $("editor-result");
  if (!id) {
    showResult(out, "error", "Save: give the ruleset's id.");
    $("editor-id").focus();
    return;
  }
  await busy($("editor-save"), "Save", async () => {
    const condition = editor.creating ? { "If-None-Match": "*" } : { "If-Match": `"${editor.rowVersion}"` };
    const result = await api(`/api/v1/rulesets/${encodeURIComponent(id)}`, {
      method: "PUT", text, type: /^[\s\ufeff]*[{[]/.test(text) ? "application/json" : "application/yaml",
      headers: { ...condition, "X-Actor": actor() }, timeoutMs: ACTION_TIMEOUT_MS });
    const said = writeOutcome(result, `Save ${id}`);
    if (result.status === 200 || result.status === 202) {
      Object.assign(editor, { id, rowVersion: result.data.row_version, creating: false, original: text });
      $("editor-id-field").hidden = true;
      $("editor-title").textContent = `Edit ruleset ${id}`;
      $("editor-about").textContent = `Row version ${editor.rowVersion}, saved at ${clock(Date.now())}.`;
      showResult(out, said.outcome, said.text);
      readAgain(id);
    } else if (said.stale && editor.creating) {
      showResult(out, "error", `Save ${id}: not saved: a ruleset ${id} exists already. Choose another id, or edit that one.`);
    } else if (said.stale) {
      const exists = Number.isInteger((result.data.error || {}).row_version);
      const reload = el("button", { type: "button", id: "editor-reload" }, "Load the current version (discards your text)");
      reload.addEventListener("click", () => openEditor(id, editor.opener));
      showResult(out, "error", el("p", {}, said.text, " Your text is still here."), exists ? reload : null);
      readAgain(id);
    } else {
      showResult(out, said.outcome, el("p", {}, said.text),
        said.problems.length ? el("ul", { className: "problems" }, said.problems.map(editorProblem)) : null);
    }
  }, out);
}

// ------------------------------------------------------------------------- start

document.addEventListener("DOMContentLoaded", () => {
  $("reload").addEventListener("click", () => runAction($("reload"), `${HOT}/reload`, "Reload"));
  $("validate").addEventListener("click", validate);
  $("rollback").addEventListener("click", () => {
    if (confirm("Publish the previous version's rules again, as a new version?")) {
      runAction($("rollback"), `${HOT}/rollback`, "Rollback");
    }
  });
  $("filter").addEventListener("input", filterChanged);
  $("page-previous").addEventListener("click", () => turnPage(-1));
  $("page-next").addEventListener("click", () => turnPage(1));
  $("try").addEventListener("submit", tryIt);
  $("new-ruleset").addEventListener("click", newRuleset);
  $("editor-check").addEventListener("click", checkDocument);
  $("editor").addEventListener("submit", saveDocument);
  $("editor-close").addEventListener("click", closeEditor);
  $("actor").value = sessionStorage.getItem(ACTOR_KEY) || "";
  $("actor").addEventListener("change", () => sessionStorage.setItem(ACTOR_KEY, $("actor").value.trim()));
  refresh();
  connect();
  probe.timer = setTimeout(probe, PROBE_MS);
  setInterval(tick, 1000);
  setInterval(readOpenedStats, STATS_MS);
});
