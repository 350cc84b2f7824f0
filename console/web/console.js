// The console page: fetches from sync-server, hands each change-feed answer
// to the wasm module (which validates and holds the tables, and makes the
// pick preview with the plugin's routing core), and draws what it returns.
// No framework, and no inline script or style: the page's CSP forbids them.
import init, { Console } from "./pkg/etcd_mesh_console.js";

const WAIT_SECONDS = 30;
const READY_EVERY_MS = 2000;
// The token lives in memory and this tab's sessionStorage only: never in
// localStorage (it would outlive the session) nor in a URL (logs, history).
const TOKEN_KEY = "etcd-mesh-console-token";

const $ = (id) => document.getElementById(id);
let held;
let filter = "";
let chosen = null;
let token = readToken();

function readToken() {
  try { return sessionStorage.getItem(TOKEN_KEY); } catch { return null; }
}

function keepToken(value) {
  token = value;
  try { sessionStorage.setItem(TOKEN_KEY, value); } catch { /* memory only */ }
}

function sleep(ms) { return new Promise((resolve) => setTimeout(resolve, ms)); }

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function setState(id, text, ok) {
  const node = $(id);
  node.textContent = text;
  node.className = ok === undefined ? "" : ok ? "ok" : "bad";
}

function showError(message) {
  const node = $("error");
  node.textContent = message || "";
  node.hidden = !message;
}

// Resolves once the user gave a token; `refused` says the last one got 401.
function askToken(refused) {
  $("main").hidden = true;
  $("token-form").hidden = false;
  $("token-error").hidden = !refused;
  setState("feed", "needs a token", false);
  $("token").focus();
  return new Promise((resolve) => {
    $("token-form").addEventListener("submit", (event) => {
      event.preventDefault();
      keepToken($("token").value.trim());
      $("token").value = "";
      $("token-form").hidden = true;
      resolve();
    }, { once: true });
  });
}

async function follow() {
  let pause = 250;
  for (;;) {
    const query = held.query();
    const url = "/v1/changes" + (query ? `?${query}&wait=${WAIT_SECONDS}` : "");
    const headers = token ? { Authorization: `Bearer ${token}` } : {};
    let response;
    try {
      response = await fetch(url, { headers, cache: "no-store" });
    } catch (e) {
      setState("feed", `sync-server unreachable (${e.message}); retrying`, false);
      await sleep(pause);
      pause = Math.min(pause * 2, 5000);
      continue;
    }
    if (response.status === 401) {
      held.reset();
      await askToken(token !== null);
      continue;
    }
    if (response.status === 304) continue; // nothing changed during `wait`
    if (!response.ok) {
      const retry = Number(response.headers.get("Retry-After")) * 1000;
      setState("feed", `answered ${response.status}; retrying`, false);
      await sleep(retry > 0 ? retry : pause);
      pause = Math.min(pause * 2, 5000);
      continue;
    }
    const body = new Uint8Array(await response.arrayBuffer());
    try {
      held.apply(body);
      showError(null);
    } catch (e) {
      // The module dropped its tables: the next poll asks for everything.
      showError(`answer refused: ${e.message}`);
      await sleep(pause);
      continue;
    }
    pause = 250;
    setState("feed", "live (long-poll)", true);
    $("main").hidden = false;
    render();
  }
}

async function watchReadiness() {
  for (;;) {
    try {
      const response = await fetch("/readyz", { cache: "no-store" });
      setState("ready", response.ok ? "ready" : `not ready (${response.status})`, response.ok);
    } catch {
      setState("ready", "unreachable", false);
    }
    await showFreshness();
    await sleep(READY_EVERY_MS);
  }
}

// How recently sync-server proved contact with the etcd majority
// (/v1/status): a long-poll is not answered when that goes stale, so it is
// asked here, on the readiness beat.
async function showFreshness() {
  const headers = token ? { Authorization: `Bearer ${token}` } : {};
  try {
    const response = await fetch("/v1/status", { headers, cache: "no-store" });
    if (!response.ok) return;
    const status = await response.json();
    const age = status.proof_age_ms;
    const proven = age === undefined ? "never proven" : `proven ${(age / 1000).toFixed(1)} s ago`;
    setState("freshness", `${status.stale ? "stale" : "fresh"}, ${proven}`, !status.stale);
    setState("stale", status.stale ? "stale (last known)" : "fresh", !status.stale);
  } catch {
    setState("freshness", "unknown", false);
  }
}

function render() {
  const all = JSON.parse(held.view(""));
  const view = filter ? JSON.parse(held.view(filter)) : all;
  setState("revision", view.health_seq ? `${view.revision} (health changes ${view.health_seq})` : view.revision);
  setState("etcd", view.stale ? "unreachable" : "connected", !view.stale);
  setState("stale", view.stale ? "stale (last known)" : "fresh", !view.stale);
  $("service-count").textContent = filter
    ? `(${view.services.length} of ${view.total_services})`
    : `(${view.total_services})`;
  renderServices(view.services);
  renderPicks(all.services);
  renderRejected(view.rejected);
  renderLog(view.log);
}

function renderServices(services) {
  const box = $("services");
  box.replaceChildren();
  if (services.length === 0) box.append(el("p", "No service matches.", "muted"));
  for (const service of services) {
    const div = el("div", null, "service");
    div.dataset.service = service.name;
    const title = el("h3", service.name);
    title.title = "show its next picks";
    title.addEventListener("click", () => { chosen = service.name; render(); });
    div.append(title);
    const table = el("table");
    const head = el("tr");
    for (const h of ["", "address", "weight", "share", "health", "zone", "state", "metadata"]) head.append(el("th", h));
    const thead = el("thead");
    thead.append(head);
    table.append(thead);
    const body = el("tbody");
    for (const e of service.endpoints) {
      const row = el("tr", null, e.draining ? "draining" : "");
      row.dataset.addr = e.addr;
      row.append(el("td", e.letter, "letter"));
      row.append(el("td", e.addr, "addr"));
      const weight = el("td", null, "num");
      const bar = el("meter");
      bar.min = 0;
      bar.max = Math.max(1, ...service.endpoints.map((x) => x.weight));
      bar.value = e.weight;
      weight.append(bar, el("span", ` ${e.weight}`));
      row.append(weight);
      row.append(el("td", `${e.share.toFixed(1)}%`, "num"));
      const health = el("td");
      health.append(el("span", e.health, `tag ${e.health}`));
      row.append(health);
      row.append(el("td", e.zone ?? "–"));
      const state = el("td");
      state.append(e.draining ? el("span", "draining", "tag draining") : el("span", "serving", "tag"));
      row.append(state);
      row.append(el("td", e.metadata.join(", ") || "–", "key"));
      body.append(row);
    }
    table.append(body);
    div.append(table);
    box.append(div);
  }
}

function renderPicks(services) {
  const select = $("pick-service");
  const names = services.map((s) => s.name);
  if (!names.includes(chosen)) chosen = names[0] ?? null;
  select.replaceChildren(...names.map((name) => {
    const option = el("option", name);
    option.value = name;
    option.selected = name === chosen;
    return option;
  }));
  const strip = $("picks");
  const legend = $("picks-legend");
  strip.replaceChildren();
  legend.replaceChildren();
  if (chosen === null) {
    $("picks-caption").textContent = "No service.";
    return;
  }
  const picks = JSON.parse(held.picks(chosen, Date.now()));
  const service = services.find((s) => s.name === chosen);
  if (!picks || !service) return;
  $("picks-caption").textContent = picks.letters.length === 0
    ? "No picks: every endpoint is draining."
    : picks.letters.length < picks.wanted
      ? `The first ${picks.letters.length} of the next ${picks.wanted} picks (2 × the sum of weights).`
      : `The next ${picks.wanted} picks (2 × the sum of weights).`;
  strip.replaceChildren(...picks.letters.map((letter) => el("li", letter)));
  for (const e of service.endpoints) {
    const item = el("li");
    item.append(el("span", e.letter, "letter"), el("span", ` ${e.addr} (weight ${e.weight})`, "addr"));
    legend.append(item);
  }
}

function renderRejected(rejected) {
  $("rejected-none").hidden = rejected.length > 0;
  $("rejected").hidden = rejected.length === 0;
  $("rejected").tBodies[0].replaceChildren(...rejected.map((r) => {
    const row = el("tr");
    row.append(el("td", r.key, "key"), el("td", r.reason));
    return row;
  }));
}

function renderLog(log) {
  $("log").replaceChildren(...log.map((entry) => {
    const item = el("li");
    const health = entry.health_seq ? `, health change ${entry.health_seq}` : "";
    item.append(el("span", `revision ${entry.revision}${health}${entry.full ? " (everything)" : ""}: `, "rev"));
    item.append(el("span", entry.what.length ? entry.what.join("; ") : "no services"));
    return item;
  }));
}

async function main() {
  await init();
  held = new Console();
  $("filter").addEventListener("input", (event) => { filter = event.target.value; render(); });
  $("pick-service").addEventListener("change", (event) => { chosen = event.target.value; render(); });
  watchReadiness();
  await follow();
}

// A CSP violation is a bug of this page: show it rather than fail quietly.
document.addEventListener("securitypolicyviolation", (e) => {
  showError(`blocked by the Content-Security-Policy: ${e.violatedDirective} ${e.blockedURI}`);
});
main().catch((e) => showError(`the console failed: ${e.message}`));
