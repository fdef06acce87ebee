// igdtrigger dashboard: plain JS, no build step. Reads /api/v1/status, follows
// /api/v1/events (server-sent events, read with fetch so the optional admin token can be sent
// as a header) and acts through /api/v1/activations. All text goes in via textContent.
//
// The page only says what the service vouches for: when the event stream drops (the service
// stopped, crashed or is unreachable) or stays silent past its heartbeat, the page says the
// service is away, greys out the router, activations and mappings, shows their states as
// unknown (with the last one reported) and stops the countdowns; it reconnects by itself and
// shows the service's fresh state when it is back.
"use strict";

const TOKEN_KEY = "igdtrigger-token";
const state = {
  token: sessionStorage.getItem(TOKEN_KEY) || localStorage.getItem(TOKEN_KEY) || "",
  status: null,      // last /api/v1/status (or the reduced view without read access)
  fetchedAt: 0,      // performance.now() when it arrived: countdowns tick from there
  readable: true,    // false after a 401 on /status: own activations only
  events: [],
  refreshTimer: null,
  away: false,       // the event stream dropped: nothing shown is vouched for any more
  awaySince: null,
  streamUp: false,   // the event stream is connected
};

const $ = (sel) => document.querySelector(sel);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else if (k === "onclick") node.addEventListener("click", v);
    else node[k] = v;
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function headers(extra) {
  const h = Object.assign({ "Accept": "application/json" }, extra || {});
  if (state.token) h["Authorization"] = "Bearer " + state.token;
  return h;
}

async function api(method, path, body) {
  const init = { method, headers: headers(body ? { "Content-Type": "application/json" } : {}),
                 cache: "no-store" };
  if (body !== undefined) init.body = JSON.stringify(body);
  let resp;
  try {
    resp = await fetch(path, init);
  } catch (e) {
    const err = new Error("no answer (" + e.message + ")");
    err.network = true;   // the service did not answer at all
    throw err;
  }
  let data = null;
  try { data = await resp.json(); } catch (e) { data = null; }
  if (!resp.ok) {
    const err = new Error(data && data.error ? data.error.message : "HTTP " + resp.status);
    err.status = resp.status;
    throw err;
  }
  return data;
}

function say(text, isError) {
  const m = $("#message");
  m.textContent = text;
  m.className = isError ? "error" : "";
  m.hidden = !text;
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  seconds = Math.max(0, Math.round(seconds));
  if (seconds < 120) return seconds + "s";
  if (seconds < 3600) return Math.floor(seconds / 60) + "m " + (seconds % 60) + "s";
  return Math.floor(seconds / 3600) + "h " + Math.floor((seconds % 3600) / 60) + "m";
}

function elapsed() { return (performance.now() - state.fetchedAt) / 1000; }

// --- loading ------------------------------------------------------------------------------

async function refresh() {
  try {
    let status;
    try {
      status = await api("GET", "/api/v1/status");
      state.readable = true;
      $("#auth").hidden = true;
    } catch (err) {
      if (err.status !== 401) throw err;
      if (state.token) {
        // the stored token is not this service's: say so (every call would fail the same way)
        state.readable = false;
        showAuth(err.message);
        say("the admin token kept in this browser is wrong: paste the right one or forget it", true);
        return;
      }
      // No read access from this host: show what the own-address rule allows.
      state.readable = false;
      showAuth(err.message);
      const [rules, acts] = await Promise.all([api("GET", "/api/v1/rules"),
                                               api("GET", "/api/v1/activations")]);
      status = { rules: rules.rules, activations: acts.activations, mappings: [],
                 warnings: [], gateway: null, events: [] };
    }
    if (state.away && !state.streamUp) return;   // an answer from before the drop is no news
    state.status = status;
    state.fetchedAt = performance.now();
    if (status.events && !state.events.length) state.events = status.events.slice(-50);
    if (state.away) setAway(false);   // back: this is the service's fresh word
    else render();
  } catch (err) {
    if (err.network) { setAway(true); return; }   // no answer: the banner says so
    say("cannot read the service: " + err.message, true);
  }
}

function scheduleRefresh() {
  if (state.refreshTimer !== null) return;
  state.refreshTimer = setTimeout(() => { state.refreshTimer = null; refresh(); }, 150);
}

// --- rendering ----------------------------------------------------------------------------

function render() {
  const s = state.status;
  if (!s) return;
  if (s.version) $("#version").textContent = "v" + s.version + " · instance " + s.instance;
  renderGateway(s.gateway, s.warnings || []);
  renderActivations(s.activations || []);
  renderMappings(s.mappings || [], s.pinholes || {});
  renderRules(s.rules || []);
  renderEvents();
}

function renderGateway(gw, warnings) {
  const set = (id, text, cls) => { const n = $(id); n.textContent = text; n.className = cls || ""; };
  if (state.away) {
    const last = !gw ? "" : " (last reported " + (gw.up ? "up" : "down") + ")";
    set("#gateway-state", "unknown: the service is away" + last, "muted");
  } else if (!gw) {
    for (const id of ["#gateway-state", "#gateway-protocol", "#gateway-external",
                      "#gateway-local", "#gateway-location", "#gateway-lease"]) set(id, "(needs read access)", "muted");
  } else {
    set("#gateway-state", gw.up ? "up" : "down" + (gw.error ? ": " + gw.error : ""), gw.up ? "ok" : "bad");
  }
  if (gw) {
    set("#gateway-protocol", gw.protocol || "–");
    const ext = gw.external_address || "unknown";
    set("#gateway-external", gw.external_reachable === false ? ext + " (not public: double NAT or CGNAT)" : ext,
        gw.external_reachable === false ? "warnish" : "");
    set("#gateway-local", gw.local_address || "–");
    set("#gateway-location", gw.location || "–", "wrap");
    set("#gateway-lease", gw.permanent_leases ? "permanent (" + (gw.permanent_why || "router refuses timed leases") + ")" : duration(gw.lease));
  }
  const ul = $("#warnings");
  ul.replaceChildren(...warnings.map((w) => el("li", {}, w)));
}

function portSummary(act) {
  const ports = act.ports || [];
  const open = ports.filter((p) => p.state === "active").length;
  const other = ports.filter((p) => p.state !== "active")
    .map((p) => p.port + " " + p.state + (p.held_by ? " by " + p.held_by : ""));
  return open + "/" + ports.length + " open" + (other.length ? " · " + other.join(", ") : "");
}

function activationLine(a) {  // the message after Activate: the reason and fix when it failed
  return a.rule + " for " + a.host + ": " + a.state + ", " + portSummary(a)
    + (a.message ? " · " + a.message : "");
}

function unknown(last) { return "unknown (last reported " + last + ")"; }

function renderActivations(acts) {
  const body = $("#activations tbody");
  const away = state.away;
  body.replaceChildren(...acts.map((a) => el("tr", { "data-activation": a.id, "data-rule": a.rule,
                                                     "data-state": away ? "unknown" : a.state },
    el("td", {}, a.rule),
    el("td", {}, a.host),
    el("td", {}, a.source || ""),
    away ? el("td", { class: "muted" }, unknown(a.state)) :
    el("td", { class: a.state === "open" || a.state === "self" ? "ok" : (a.state === "failed" ? "bad" : "warnish"),
               title: a.message || "" },
       (a.state === "self" ? "mapped by the PC itself" : a.state)
       + (a.held_by && a.held_by.length ? " (held by " + a.held_by.join(", ") + ")" : "")),
    away ? el("td", { class: "muted" }, "–") :
    a.expires_in === null || a.expires_in === undefined
      ? el("td", { class: "held", title: "closes " + duration(a.ttl) + " after the trigger traffic and the inbound traffic stop" },
           "held: " + (a.hold || "live"))
      : el("td", { class: "countdown", "data-expires": String(a.expires_in), title: a.hold || "" },
           duration(a.expires_in)),
    el("td", { class: away ? "muted" : "wrap" },
       away ? "last reported " + portSummary(a)
       : a.state === "self" ? (a.ports || []).length + " port(s), by the PC"
       : portSummary(a) + (a.message ? " · " + a.message : "")),
    el("td", {}, el("button", { type: "button", "data-deactivate": a.id, disabled: away,
                               onclick: () => deactivate(a) }, "Deactivate")),
  )));
  $("#activations-empty").hidden = acts.length > 0;
}

function renderMappings(maps, pinholes) {
  const body = $("#mappings tbody");
  const holes = pinholes.entries || [];
  const away = state.away;
  const stateCell = (st, error) => away
    ? el("td", { class: "muted" }, unknown(st))
    : el("td", { class: st === "active" ? "ok" : "bad", title: error || "" },
         st + (error ? " – " + error : ""));
  const renewCell = (renewIn) => {
    const none = away || renewIn === undefined || renewIn === null;
    return el("td", { class: "countdown", "data-expires": none ? "" : String(renewIn) },
              none ? "–" : duration(renewIn));
  };
  const rows = maps.map((m) => {
    const key = m.protocol.toLowerCase() + "/" + m.external_port;
    return el("tr", { "data-mapping": key, "data-state": away ? "unknown" : m.state },
      el("td", {}, key),
      el("td", {}, m.internal_client + ":" + m.internal_port),
      stateCell(m.state, m.error),
      el("td", { title: m.verified === false ? "the router does not show this mapping: not verifiable" : "" },
         (m.lease ? duration(m.lease) : "permanent")
         + (m.lease_asked !== undefined && m.lease_asked !== m.lease ? " (asked " + (m.lease_asked ? duration(m.lease_asked) : "permanent") + ")" : "")),
      renewCell(m.renew_in));
  });
  // IPv6: no NAT, the router's firewall lets the port through to this machine's own address
  rows.push(...holes.map((h) => {
    const key = "ipv6 " + h.proto.toLowerCase() + "/" + h.port;
    return el("tr", { "data-pinhole": key + " " + h.address,
                      "data-state": away ? "unknown" : h.state },
      el("td", {}, key),
      el("td", {}, "[" + h.address + "]:" + h.port),
      stateCell(h.state, h.error),
      el("td", {}, duration(pinholes.lease)),
      renewCell(h.renew_in));
  }));
  body.replaceChildren(...rows);
  $("#mappings-empty").hidden = rows.length > 0;
  if (!state.readable) $("#mappings-empty").textContent = "Needs read access.";
}

function renderRules(rules) {
  const body = $("#rules tbody");
  body.replaceChildren(...rules.map((r) => {
    const input = el("input", { class: "for", placeholder: duration(r.idle_timeout),
                                title: "how long, e.g. 30m or 2h (default: idle timeout)" });
    return el("tr", { "data-rule": r.name },
      el("td", {}, r.name),
      el("td", {}, (r.trigger || []).join(", ") || "–"),
      el("td", {}, (r.open || []).join(", ")),
      el("td", {}, duration(r.idle_timeout)),
      el("td", {}, input),
      el("td", {}, el("button", { type: "button", "data-activate": r.name, disabled: state.away,
                                 onclick: () => activate(r.name, input.value.trim()) }, "Activate")));
  }));
}

function renderEvents() {
  const ol = $("#events");
  const items = state.events.slice(-50).reverse().map((e) => {
    const when = e.at ? new Date(e.at * 1000).toLocaleTimeString() : "";
    const what = [e.event, e.rule, e.mapping, e.host ? "→ " + e.host : "", e.error || ""]
      .filter(Boolean).join(" ");
    return el("li", { "data-event": e.event }, when + "  " + what);
  });
  ol.replaceChildren(...items);
}

function tick() {
  if (!state.status || state.away) return;
  const gone = elapsed();
  for (const cell of document.querySelectorAll("td.countdown")) {
    const base = cell.getAttribute("data-expires");
    if (base === "" || base === null || base === "undefined") continue;
    cell.textContent = duration(parseFloat(base) - gone);
  }
}

// --- actions ------------------------------------------------------------------------------

async function activate(rule, ttl) {
  const body = { rule };
  if (ttl) body.ttl = /^\d+(\.\d+)?$/.test(ttl) ? parseFloat(ttl) : ttl;
  try {
    const a = await api("POST", "/api/v1/activations", body);
    say(activationLine(a), a.state === "failed");
  } catch (err) {
    say("activate " + rule + ": " + err.message, true);
  }
  refresh();
}

async function deactivate(act) {
  try {
    await api("DELETE", "/api/v1/activations/" + encodeURIComponent(act.id));
    say(act.rule + " for " + act.host + ": ended");
  } catch (err) {
    say("deactivate " + act.rule + ": " + err.message, true);
  }
  refresh();
}

// --- live events (server-sent events over fetch) -------------------------------------------

function setLive(on) {
  const p = $("#live");
  p.textContent = on ? "live" : "service away";
  p.className = "pill " + (on ? "on" : "off");
  state.streamUp = on;
}

function setAway(on) {
  if (on === state.away) return;
  state.away = on;
  state.awaySince = on ? new Date() : null;
  document.body.classList.toggle("away", on);
  $("#away").hidden = !on;
  if (on) {
    $("#away-since").textContent = state.awaySince.toLocaleTimeString();
    say("", false);
  }
  render();
}

function handleBlock(block, cursor) {
  let name = "message", data = "", id = null;
  for (const line of block.split("\n")) {
    if (line.startsWith(":")) continue;
    const i = line.indexOf(":");
    const field = i < 0 ? line : line.slice(0, i);
    const value = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
    if (field === "event") name = value;
    else if (field === "data") data += (data ? "\n" : "") + value;
    else if (field === "id") id = value;
  }
  if (name === "hello" && data) {
    try {
      const hello = JSON.parse(data);
      // a restarted service numbers its events afresh: forget what the old one said
      if (cursor.last !== null && Number(hello.seq) < Number(cursor.last)) {
        cursor.last = null;
        state.events = [];
      }
      if (hello.heartbeat > 0) cursor.heartbeat = hello.heartbeat;
    } catch (e) { /* keep the defaults */ }
    return;
  }
  if (id !== null) cursor.last = id;
  if (!data) return;
  if (name === "lost") { scheduleRefresh(); return; }
  try { state.events.push(JSON.parse(data)); } catch (e) { return; }
  if (state.events.length > 200) state.events.splice(0, state.events.length - 200);
  renderEvents();
  scheduleRefresh();
}

async function follow() {
  const cursor = { last: null, heartbeat: 15 };
  for (;;) {
    const abort = new AbortController();
    let quiet = null;
    // the service writes at least a keep-alive every heartbeat: silence well past it means
    // it is frozen or the network between us is gone, even without a closed connection
    const watch = () => {
      clearTimeout(quiet);
      quiet = setTimeout(() => abort.abort(), (cursor.heartbeat * 2 + 5) * 1000);
    };
    try {
      const h = headers({ "Accept": "text/event-stream" });
      if (cursor.last !== null) h["Last-Event-ID"] = cursor.last;
      watch();
      const resp = await fetch("/api/v1/events", { headers: h, cache: "no-store",
                                                   signal: abort.signal });
      if (resp.status === 401) {
        // the service answered: it is not away, this page may just not read its events
        // (a wrong stored token, or another host without read access)
        clearTimeout(quiet);
        let data = null;
        try { data = await resp.json(); } catch (e) { data = null; }
        const p = $("#live");
        p.textContent = "no live updates";
        p.className = "pill off";
        state.streamUp = false;
        if (state.token) showAuth(data && data.error ? data.error.message : "HTTP 401");
        await new Promise((r) => setTimeout(r, 15000));
        continue;
      }
      if (!resp.ok || !resp.body) throw new Error("HTTP " + resp.status);
      setLive(true);
      // catch up after a reconnect; the page stays "away" until the fresh status is in
      if (cursor.last !== null || state.away) refresh();
      const reader = resp.body.getReader();
      const dec = new TextDecoder();
      let buf = "";
      for (;;) {
        watch();
        const { value, done } = await reader.read();
        if (done) break;
        buf += dec.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
        let i;
        while ((i = buf.indexOf("\n\n")) >= 0) {
          handleBlock(buf.slice(0, i), cursor);
          buf = buf.slice(i + 2);
        }
      }
    } catch (err) {
      // fall through: retry below
    }
    clearTimeout(quiet);
    setLive(false);
    setAway(true);
    await new Promise((r) => setTimeout(r, 3000));
  }
}

// --- token ----------------------------------------------------------------------------------

function showAuth(message) {
  $("#auth").hidden = false;
  $("#auth-message").textContent = message;
}

function setup() {
  $("#token-button").addEventListener("click", () => {
    $("#auth").hidden = !$("#auth").hidden;
    $("#auth-message").textContent = "The admin token may do anything, including acting for other hosts. It is kept in this browser's storage.";
  });
  $("#token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    state.token = $("#token-input").value.trim();
    if (state.token) localStorage.setItem(TOKEN_KEY, state.token);
    $("#token-input").value = "";
    refresh();
  });
  $("#token-clear").addEventListener("click", () => {
    state.token = "";
    localStorage.removeItem(TOKEN_KEY);
    sessionStorage.removeItem(TOKEN_KEY);
    refresh();
  });
  refresh();
  follow();
  setInterval(tick, 1000);
  setInterval(refresh, 15000);   // leases, renewals and countdown drift
}

document.addEventListener("DOMContentLoaded", setup);
