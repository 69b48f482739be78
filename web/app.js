// nanopipe chat page: plain JavaScript, no build step, no network but the nanopipe web API.
//
// Where the API is: the server that served this page, when that is `nanopipe web` (it answers
// "health" with JSON); else http://localhost:8000/ (the page opened as a file, or served by
// `python -m http.server 8080`). "Server" changes it, and the browser remembers it (localStorage).
// The API admits such pages by default (localhost origins and "null", docs/WEB.md).
//
// The page holds a conversation: each turn sends the earlier turns as `history` (the server puts
// them in the chat template, leaving out the oldest if they do not fit the model's context, and
// every node still holds the KV cache of the turns before, so only the new ones are prefilled).
// "New chat" starts over.
//
// One reply, as it happens:
//   POST chat {"text", "history": [{role, content}, ...], "conversation_id", ..., "stream": true}
//   <- data: {"token": 995, "text": " world"}       appended to the reply as it arrives
//   <- event: status / data: {"status": "..."}      e.g. "waiting for rank 2 to join"
//   <- event: done / data: {"response", "config", "stats", "trimmed_turns"}   parameters, timings,
//      prompt tokens and how many were reused from the cache, per-node bar
//   <- event: error / data: {"error", "status"}
"use strict";

(() => {
  const TOKEN_KEY = "nanopipe.apiToken";
  const API_KEY = "nanopipe.apiBase";
  const DEFAULT_API = "http://localhost:8000/";
  const HEALTH_EVERY_MS = 5000;          // while everything is up
  const RETRY_MIN_MS = 1000;             // while something is down: 1 s, 2 s, 4 s ... up to RETRY_MAX_MS
  const RETRY_MAX_MS = 15000;
  const FIELDS = ["max_tokens", "temperature", "top_p", "top_k", "seed"];
  const CLUSTER_EVERY_MS = 2000;         // the Cluster view polls GET cluster this often while it is shown

  const $ = (id) => document.getElementById(id);
  const state = {
    config: null,          // GET config
    nodes: [],             // the last nodes /health or /config listed
    controller: null,      // AbortController of the reply streaming now
    retryMs: RETRY_MIN_MS,
    healthTimer: null,
    history: [],           // this conversation's turns so far: [{role: "user" | "assistant", content}]
    conversationId: newConversationId(),
    api: null,             // the API's base URL ending in "/", or "" for the server that served this page
    clusterTimer: null,    // the Cluster view's next poll
    leaving: new Set(),    // ranks whose leave (drain) the page asked for and the leader has not answered
    leaveSaid: {},         // rank -> {kind: busy | ok | error, text}: the answer, kept across refreshes
  };

  function newConversationId() {
    return "c" + Date.now().toString(36) + Math.random().toString(36).slice(2, 8);
  }

  // ---------------------------------------------------------------------------------------
  // Server-Sent Events, parsed from a fetch() body

  /** One SSE block ("event: done\ndata: {...}") -> {event, data}; null for a comment-only block. */
  function parseEvent(block) {
    let event = "message";
    const data = [];
    for (const line of block.split("\n")) {
      if (line === "" || line.startsWith(":")) continue;     // ":" starts a comment
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "event") event = value;
      else if (field === "data") data.push(value);
    }
    return data.length ? { event, data: data.join("\n") } : null;
  }

  /**
   * Network chunks do not respect event boundaries: one read() may hold half an event, or three.
   * push() keeps the unfinished tail in a buffer and returns only complete events, so
   *   push('data: {"tok') -> []      push('en": 1}\n\nda') -> [{event: "message", data: '{"token": 1}'}]
   */
  class SSEParser {
    constructor() { this.buffer = ""; }
    push(text) {
      this.buffer = (this.buffer + text).replace(/\r\n/g, "\n");
      const events = [];
      let end;
      while ((end = this.buffer.indexOf("\n\n")) >= 0) {
        const ev = parseEvent(this.buffer.slice(0, end));
        this.buffer = this.buffer.slice(end + 2);
        if (ev) events.push(ev);
      }
      return events;
    }
  }

  // ---------------------------------------------------------------------------------------
  // Talking to the web app

  function headers(json) {
    const h = {};
    if (json) h["Content-Type"] = "application/json";
    const token = localStorage.getItem(TOKEN_KEY);
    if (token) h.Authorization = "Bearer " + token;
    return h;
  }

  /** "localhost:8000" -> "http://localhost:8000/"; "" stays "" (this page's server). */
  function normalizeApi(text) {
    let base = (text || "").trim();
    if (!base) return "";
    if (!/^[a-z][a-z0-9+.-]*:\/\//i.test(base)) base = "http://" + base;
    return base.endsWith("/") ? base : base + "/";
  }

  /** The API's base: the one saved in this browser; else this page's server if it is nanopipe web;
   *  else http://localhost:8000/. */
  async function findApi() {
    const saved = localStorage.getItem(API_KEY);
    if (saved !== null) return saved;
    if (location.protocol === "http:" || location.protocol === "https:") {
      try {
        const resp = await fetch("health", { headers: headers(false) });
        if ((resp.headers.get("Content-Type") || "").includes("application/json")) return "";
      } catch (_) { /* nothing answers here: try the default */ }
    }
    return DEFAULT_API;
  }

  function apiLabel() {
    return state.api === "" ? location.origin + "/" : state.api;
  }

  /** fetch + JSON; never throws: {ok, status, body}, status 0 when the web server is unreachable. */
  async function call(path, options = {}) {
    try {
      const resp = await fetch(state.api + path, { ...options, headers: headers(options.body !== undefined) });
      let body = null;
      try { body = await resp.json(); } catch (_) { body = null; }
      if (resp.status === 401) askForToken(body && body.error);
      return { ok: resp.ok, status: resp.status, body };
    } catch (e) {
      return { ok: false, status: 0, body: { error: "the web server is unreachable (" + e.message + ")" } };
    }
  }

  // ---------------------------------------------------------------------------------------
  // Connection indicator: poll /health; while down, re-dial with POST /reconnect and back off

  function setConn(kind, text) {
    $("conn").dataset.state = kind;          // up | degraded | down | auth | unknown
    $("conn-text").textContent = text;
  }

  function scheduleHealth(ms) {
    clearTimeout(state.healthTimer);
    state.healthTimer = setTimeout(checkHealth, ms);
  }

  async function checkHealth(redial) {
    const r = redial ? await call("reconnect", { method: "POST", body: "{}" }) : await call("health");
    if (redial && r.ok) return checkHealth(false);
    if (r.status === 401) { setConn("auth", "needs an API token"); return; }
    const body = r.body || {};
    if (body.nodes && body.nodes.length) renderNodes(body.nodes);
    if (r.status !== 0) $("api-panel").dataset.reason = "";     // the API answered: next time it is gone, say so again
    if (r.ok) {
      const n = body.nodes.length;
      setConn("up", `connected · ${n}/${n} node${n === 1 ? "" : "s"} up`);
      state.retryMs = RETRY_MIN_MS;
      if (!state.config) loadConfig();
      scheduleHealth(HEALTH_EVERY_MS);
      return;
    }
    const secs = Math.round(state.retryMs / 1000);
    if (body.leader && body.leader.reachable) {
      const up = body.nodes.filter((n) => n.status === "up").length;
      setConn("degraded", `${up}/${body.nodes.length} nodes up · ${body.error || "not ready"} · checking again in ${secs}s`);
    } else {
      setConn("down", r.status === 0 ? `no API at ${apiLabel()} · retrying in ${secs}s`
                                      : `leader unreachable · retrying in ${secs}s`);
      if (r.status === 0) showApiHelp();
      markNodesDown();
    }
    const wait = state.retryMs;
    state.retryMs = Math.min(RETRY_MAX_MS, state.retryMs * 2);
    clearTimeout(state.healthTimer);
    state.healthTimer = setTimeout(() => checkHealth(r.status !== 0 && !(body.leader && body.leader.reachable)), wait);
  }

  function layersText(layers) {
    if (!layers || layers.length !== 2) return "";
    const [first, last] = layers;            // [first, last], inclusive, as the leader reports them
    return first === last ? `layer ${first}` : `layers ${first}–${last}`;
  }

  function renderNodes(nodes) {
    state.nodes = nodes;
    const box = $("nodes");
    box.replaceChildren(...nodes.map((n) => {
      const chip = el("div", "node");
      chip.dataset.status = n.status || "unknown";
      chip.title = `rank ${n.rank} on ${n.host}: ${n.status}` +
        (n.last_seen_s != null ? `, last heard ${n.last_seen_s.toFixed(1)} s ago` : "");
      chip.append(el("span", "dot"), el("b", "", `${n.rank}`), el("span", "host", n.host || "?"),
                  el("span", "layers", layersText(n.layers)));
      return chip;
    }));
  }

  function markNodesDown() {
    for (const chip of $("nodes").children) chip.dataset.status = "unknown";
  }

  // ---------------------------------------------------------------------------------------
  // Parameters

  async function loadConfig() {
    const r = await call("config");
    if (!r.ok) return;
    state.config = r.body;
    $("model").textContent = r.body.model || "";
    showSynthetic(r.body);
    if (r.body.n_ctx) $("max_tokens").max = r.body.n_ctx;
    const select = $("strategy");
    select.replaceChildren(...Object.keys(r.body.strategies).map((name) => {
      const opt = el("option", "", name);
      opt.value = name;
      return opt;
    }));
    if (r.body.nodes && r.body.nodes.length) renderNodes(r.body.nodes);
    resetControls();
  }

  // Random weights from `nanopipe init-weights` answer gibberish: say so where the model is named.
  function showSynthetic(c) {
    const badge = $("synthetic");
    badge.hidden = !c.synthetic;
    badge.textContent = c.weights_mixed ? "MIXED WEIGHTS" : "SYNTHETIC";
    badge.title = c.weights_note || "";
  }

  function resetControls() {
    const c = state.config;
    if (!c) return;
    $("strategy").value = c.active_strategy;
    setStrategyDefaults(c.active_strategy);
    $("max_tokens").value = c.max_tokens;
    $("seed").value = "";
  }

  function setStrategyDefaults(name) {
    const s = (state.config && state.config.strategies[name]) || {};
    for (const f of ["temperature", "top_p", "top_k"]) if (s[f] != null) setValue(f, s[f]);
    markUsedControls();
  }

  function setValue(field, value) {
    $(field).value = value;
    const range = $(field + "-range");
    if (range) range.value = value;
  }

  /** Dim the controls the chosen strategy ignores (greedy ignores all three). */
  function markUsedControls() {
    const name = $("strategy").value;
    const uses = (state.config && state.config.strategy_uses[name]) || [];
    for (const box of document.querySelectorAll("[data-uses]")) {
      box.classList.toggle("unused", !uses.includes(box.dataset.uses));
    }
    const ignored = ["temperature", "top_p", "top_k"].filter((f) => !uses.includes(f));
    $("uses-note").textContent = ignored.length
      ? `${name} ignores ${ignored.map(label).join(", ")}.` : "";
  }

  function label(field) {
    return { temperature: "temperature", top_p: "top-p", top_k: "top-k" }[field] || field;
  }

  /** The request's fields: the strategy, and only the knobs it uses (the server refuses a knob
   *  the strategy would ignore, e.g. greedy with top_k), plus max_tokens and seed. */
  function currentParams() {
    const name = $("strategy").value;
    const body = { decoding_strategy: name || undefined };
    const uses = (state.config && state.config.strategy_uses[name]) || [];
    for (const f of FIELDS) {
      const raw = $(f).value.trim();
      if (raw === "") continue;
      if (["temperature", "top_p", "top_k"].includes(f) && name && !uses.includes(f)) continue;
      body[f] = Number(raw);
    }
    return body;
  }

  // ---------------------------------------------------------------------------------------
  // The conversation

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function scrollToEnd(force) {
    const log = $("log");
    if (force || log.scrollHeight - log.scrollTop - log.clientHeight < 120) log.scrollTop = log.scrollHeight;
  }

  function addUserMessage(text) {
    $("empty").hidden = true;
    const msg = el("article", "msg user");
    msg.append(el("div", "bubble", text));
    $("log").append(msg);
    scrollToEnd(true);
  }

  function addReply() {
    const node = $("reply-template").content.firstElementChild.cloneNode(true);
    node.dataset.tokens = "0";
    $("log").append(node);
    scrollToEnd(true);
    return {
      node,
      textEl: node.querySelector(".text"),
      text: "",
      tokens: 0,
      append(piece) {
        this.text += piece;
        // GPT-2 usually continues with a space (" world"); a reply bubble need not start with one
        this.textEl.textContent = this.text.replace(/^\s+/, "");
      },
    };
  }

  function setBusy(busy) {
    $("send").disabled = busy;
    $("stop").hidden = !busy;
  }

  async function send(text) {
    if (!text || state.controller || state.api === null) return;
    addUserMessage(text);
    const reply = addReply();
    const history = state.history.slice();     // the turns before this one
    const conversation = state.conversationId;
    state.controller = new AbortController();
    setBusy(true);
    try {
      await streamReply(text, reply, state.controller.signal, history);
    } catch (e) {
      if (e.name === "AbortError") finishReply(reply, "stopped");
      else showError(reply, "the web server is unreachable (" + e.message + ")", text, true);
    } finally {
      state.controller = null;
      setBusy(false);
    }
    // a finished or stopped reply joins the conversation (unless "New chat" started another meanwhile)
    const how = reply.node.dataset.state;
    if ((how === "done" || how === "stopped") && conversation === state.conversationId) {
      // the reply as the model wrote it, leading space and all: the next turn's prompt then
      // starts with exactly the tokens this one computed, and every node reuses them
      state.history.push({ role: "user", content: text }, { role: "assistant", content: reply.text });
    }
  }

  function newChat() {
    if (state.controller) state.controller.abort();
    state.history = [];
    state.conversationId = newConversationId();
    for (const m of $("log").querySelectorAll(".msg")) m.remove();
    $("empty").hidden = false;
  }

  async function streamReply(text, reply, signal, history) {
    const resp = await fetch(state.api + "chat", {
      method: "POST", headers: headers(true), signal,
      // chat + history: the server wraps the conversation in the chat template ("User: ...\n
      // Assistant: ...\nUser: <text>\nAssistant:") and ends the reply at the next "\nUser:" turn,
      // as /v1/chat/completions does
      body: JSON.stringify({ text, stream: true, chat: true, history, conversation_id: state.conversationId,
                             ...currentParams() }),
    });
    if (!resp.ok) {
      let msg = `HTTP ${resp.status}`;
      try { msg = (await resp.json()).error || msg; } catch (_) { /* not JSON */ }
      if (resp.status === 401) askForToken(msg);
      showError(reply, msg, text, resp.status >= 500);
      return;
    }
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();          // {stream: true} keeps a character split across reads whole
    const parser = new SSEParser();
    let ended = false;
    for (;;) {
      const { value, done } = await reader.read();
      const chunk = done ? decoder.decode() : decoder.decode(value, { stream: true });
      for (const ev of parser.push(chunk)) ended = handleEvent(reply, ev, text) || ended;
      if (done) break;
    }
    if (!ended) showError(reply, "the reply stopped before it was finished", text, true);
  }

  /** Returns true for the events that end a reply. */
  function handleEvent(reply, ev, prompt) {
    let data;
    try { data = JSON.parse(ev.data); } catch (_) { return false; }
    if (ev.event === "message" && "token" in data) {
      reply.append(data.text || "");
      if (data.token !== null) reply.node.dataset.tokens = String(++reply.tokens);
      reply.node.querySelector(".status").textContent = "";
      scrollToEnd(false);
    } else if (ev.event === "status") {
      reply.node.querySelector(".status").textContent = data.status;
    } else if (ev.event === "done") {
      finishReply(reply, "done", data);
      return true;
    } else if (ev.event === "error") {
      showError(reply, data.error, prompt, data.status >= 500);
      return true;
    }
    return false;
  }

  function finishReply(reply, how, done) {
    reply.node.dataset.state = how;
    reply.node.querySelector(".status").textContent = how === "stopped" ? "stopped" : "";
    if (done) {
      if (typeof done.response === "string" && done.response !== reply.text) {
        reply.text = "";                        // the server's whole text wins over what streamed
        reply.append(done.response);
      }
      renderParams(reply.node.querySelector(".params"), done.config);
      renderStats(reply.node.querySelector(".stats"), done.stats);
      renderNodeBar(reply.node.querySelector(".nodebar"), done.stats.node_ms);
      if (done.trimmed_turns) {
        reply.node.querySelector(".status").textContent =
          `${done.trimmed_turns} oldest message${done.trimmed_turns === 1 ? "" : "s"} left out to fit the ` +
          `model's context (n_ctx ${(state.config && state.config.n_ctx) || "?"} tokens with room for the reply)`;
      }
    }
    scrollToEnd(false);
  }

  function showError(reply, message, prompt, retryable) {
    reply.node.dataset.state = "error";
    // the error is the reply: it goes in the reply's bubble, after whatever text streamed before it
    const bubble = reply.textEl.parentNode;
    bubble.querySelectorAll(".error-text").forEach((e) => e.remove());
    bubble.append(el("span", "error-text", (reply.text.trim() ? "\n" : "") + message));
    const status = reply.node.querySelector(".status");
    status.replaceChildren();
    if (retryable) {
      const again = el("button", "ghost small", "Retry");
      again.type = "button";
      again.addEventListener("click", () => { reply.node.remove(); removeLastUser(); send(prompt); });
      status.append(again);
      checkHealth(false);                       // the indicator then keeps retrying by itself
    }
    scrollToEnd(false);
  }

  function removeLastUser() {
    const users = $("log").querySelectorAll(".msg.user");
    if (users.length) users[users.length - 1].remove();
  }

  /** The parameters a reply ran with: tokens, temperature, top-p, top-k, strategy (and seed). */
  function renderParams(box, config) {
    // a knob the strategy did not use comes back null: no chip for it
    const chips = [["tokens", config.tokens_generated], ["temperature", config.temperature],
                   ["top_p", config.top_p], ["top_k", config.top_k], ["strategy", config.decoding_strategy]]
      .filter(([name, value]) => value != null || name === "tokens");
    if (config.seed != null) chips.push(["seed", config.seed]);
    box.replaceChildren(...chips.map(([name, value]) => {
      const chip = el("span", "chip");
      chip.dataset.param = name;
      chip.append(el("span", "key", name.replace("_", "-")), el("span", "value", String(value)));
      return chip;
    }));
  }

  function fmtMs(ms) {
    if (ms == null) return "–";
    return ms >= 1000 ? (ms / 1000).toFixed(2) + " s" : (ms >= 10 ? ms.toFixed(0) : ms.toFixed(1)) + " ms";
  }

  function renderStats(box, stats) {
    const parts = [
      ["tokens", `${stats.tokens} tokens`],
      ["prompt", `prompt ${stats.prompt_tokens != null ? stats.prompt_tokens : "–"} tokens`],
      ["reused", `${stats.cached_tokens || 0} reused from cache`],
      ["prefill", `prefill ${fmtMs(stats.prefill_ms)}`],
      ["ttft", `first token ${fmtMs(stats.ttft_ms)}`],
      ["tps", stats.tokens_per_s != null ? `${stats.tokens_per_s.toFixed(1)} tok/s` : "– tok/s"],
      ["total", `${fmtMs(stats.total_ms)} total`],
    ];
    box.replaceChildren(...parts.map(([name, text]) => {
      const s = el("span", "stat", text);
      s.dataset.stat = name;
      return s;
    }));
  }

  /** One row per node: how long it computed (solid) and waited on the network (light). */
  function renderNodeBar(box, nodeMs) {
    const ranks = Object.keys(nodeMs || {}).sort((a, b) => Number(a) - Number(b));
    if (!ranks.length) { box.replaceChildren(); return; }
    const total = (r) => (nodeMs[r].compute || 0) + (nodeMs[r].transit || 0);
    const longest = Math.max(...ranks.map(total), 1e-9);
    const hostOf = (r) => (state.nodes.find((n) => String(n.rank) === r) || {}).host;
    const rows = ranks.map((r) => {
      const row = el("div", "nb-row");
      row.dataset.rank = r;
      const t = nodeMs[r];
      row.title = `rank ${r}: compute ${fmtMs(t.compute)}, transit ${fmtMs(t.transit)}`;
      const track = el("div", "nb-track");
      const compute = el("span", "nb-compute");
      compute.style.width = (100 * (t.compute || 0) / longest) + "%";
      const transit = el("span", "nb-transit");
      transit.style.width = (100 * (t.transit || 0) / longest) + "%";
      track.append(compute, transit);
      const host = hostOf(r);
      row.append(el("span", "nb-label", host ? `${r} · ${host}` : `rank ${r}`), track, el("span", "nb-ms", fmtMs(total(r))));
      return row;
    });
    const legend = el("div", "nb-legend");
    legend.append(el("span", "sw compute"), "compute", el("span", "sw transit"), "transit");
    box.replaceChildren(...rows, legend);
  }

  // ---------------------------------------------------------------------------------------
  // The Cluster view (#cluster): the ring live, from GET cluster every CLUSTER_EVERY_MS
  //
  //   GET cluster -> {ready, tokens_per_s: {now, predicted_1, ...}, nodes: [{rank, host, status,
  //                   layers, memory_mb: {used, usable}, ms_per_step: {measured, predicted}, ...}],
  //                   events: [{t, kind, rank, text}, ...]}          (docs/WEB.md lists every field)

  const STATUS_TEXT = { up: "up", joining: "joining", rejoining: "rejoining", standby: "standby", gone: "gone" };
  const EVENT_TEXT = { joined: "joined", rejoined: "rejoined", left: "left", died: "died", gone: "gone",
                       drained: "left (drained)", planned: "planned", replanned: "re-planned",
                       slow_stage: "stage timing", ring_up: "ring up" };

  function showView() {
    const view = location.hash === "#cluster" ? "cluster" : "chat";
    document.body.dataset.view = view;
    $("cluster-view").hidden = view !== "cluster";
    $("tab-chat").setAttribute("aria-current", String(view === "chat"));
    $("tab-cluster").setAttribute("aria-current", String(view === "cluster"));
    clearTimeout(state.clusterTimer);
    if (view === "cluster" && state.api !== null) pollCluster();
  }

  async function pollCluster() {
    clearTimeout(state.clusterTimer);
    if (document.hidden) {                   // a background tab does not keep the leader busy
      state.clusterTimer = setTimeout(pollCluster, CLUSTER_EVERY_MS);
      return;
    }
    const r = await call("cluster");
    if (document.body.dataset.view !== "cluster") return;
    renderCluster(r);
    // the top bar's indicator polls /health every 5 s while all is well: when a node went, ask it now
    // (while something is down it retries by itself every 1, 2, 4 ... s)
    if (r.body && r.body.ok === false && $("conn").dataset.state === "up") checkHealth(false);
    state.clusterTimer = setTimeout(pollCluster, CLUSTER_EVERY_MS);
  }

  function fmtNum(x, digits) {
    return x == null ? "–" : Number(x).toFixed(digits);
  }

  function fmtMb(mb) {
    if (mb == null) return "?";
    return mb >= 1024 ? (mb / 1024).toFixed(1) + " GB" : mb.toFixed(0) + " MB";
  }

  function renderCluster(r) {
    const body = r.body || {};
    const box = $("cl-state");
    if (!r.ok && !(body.nodes && body.nodes.length)) {
      box.dataset.state = r.status === 401 ? "auth" : "down";
      $("cl-state-text").textContent = r.status === 401 ? "needs an API token"
        : (body.error || `no answer from the API (HTTP ${r.status})`);
      $("cl-figures").replaceChildren();
      for (const card of $("cl-ring").children) card.dataset.status = "unknown";
      return;
    }
    const nodes = body.nodes || [];
    const up = nodes.filter((n) => n.status === "up").length;
    box.dataset.state = body.ok ? "up" : "degraded";
    $("cl-state-text").textContent = `${body.ready ? "ring up" : "ring down"} · ${up}/${nodes.length} nodes up` +
      (body.model ? ` · ${body.model}` : "");
    const t = body.tokens_per_s || {};
    const figures = [
      ["now", `${fmtNum(t.now, 1)} tok/s now`],
      ["one_stream", `${fmtNum(t.one_stream_measured, 1)} tok/s one stream, measured`],
      ["predicted", `predicted ${fmtNum(t.predicted_1, 1)} (1 stream) · ${fmtNum(t.predicted_8, 1)} (8)`],
      ["sessions", `${body.live_sessions != null ? body.live_sessions : "–"} live`],
    ];
    $("cl-figures").replaceChildren(...figures.map(([name, text]) => {
      const s = el("span", "stat", text);
      s.dataset.figure = name;
      return s;
    }));
    const plan = body.plan || {};
    $("cl-plan").textContent = plan.note ? `Split: ${plan.note}` : (plan.partition ? `Split: ${plan.partition}` : "");
    renderRing(nodes, body.ring || []);
    renderEvents(body.events || []);
  }

  /** The ring's nodes in ring order, an arrow with the link's transit between each and the next,
   *  then the nodes outside the ring (standby: they hold no layers). */
  function renderRing(nodes, ring) {
    const inRing = ring.map((r) => nodes.find((n) => n.rank === r)).filter(Boolean);
    const outside = nodes.filter((n) => !inRing.includes(n));
    const parts = [];
    inRing.forEach((n, i) => {
      if (i > 0) parts.push(linkArrow(inRing[i - 1], n));
      parts.push(nodeCard(n));
    });
    if (inRing.length > 1) {
      const last = inRing[inRing.length - 1];
      const back = el("div", "cl-link back",
                      `↩ ${ring.join(" → ")} → ${ring[0]} · back to rank ${ring[0]}: ${fmtMs(last.transit_ms)}`);
      back.title = "the ring's order: activations go round it and back to rank 0";
      parts.push(back);
    }
    parts.push(...outside.map(nodeCard));
    $("cl-ring").replaceChildren(...parts);
  }

  function linkArrow(from, to) {
    const link = el("div", "cl-link");
    link.title = `rank ${from.rank} → rank ${to.rank}: ${fmtMs(from.transit_ms)} link transit ` +
                 "(median of recent steps)";
    link.append(el("span", "arr", "→"), el("span", "ms", from.transit_ms != null ? fmtMs(from.transit_ms) : ""));
    return link;
  }

  function nodeCard(n) {
    const card = $("cnode-template").content.firstElementChild.cloneNode(true);
    const q = (cls) => card.querySelector(cls);
    card.dataset.rank = String(n.rank);
    card.dataset.status = n.status || "unknown";
    q(".cn-rank").textContent = String(n.rank);
    q(".cn-host").textContent = n.host || "?";
    q(".cn-status").textContent = STATUS_TEXT[n.status] || n.status || "?";
    let layers = layersText(n.layers) || "none";
    if (n.heads) layers += ` · heads ${Array.isArray(n.heads) ? n.heads.join("–") : n.heads}`;
    if (n.split) {
      const { member, members } = n.split;            // a stage split between nodes: each holds a share
      layers += ` · split ${member + 1} of ${members.length} (ranks ${members.join(", ")})`;
    }
    q(".cn-layers").textContent = layers;
    const mem = n.memory_mb || {};
    q(".cn-mem-text").textContent = `${fmtMb(mem.used)} of ${fmtMb(mem.usable)}`;
    const share = mem.used != null && mem.usable ? Math.min(100, 100 * mem.used / mem.usable) : 0;
    q(".cn-mem-used").style.width = share + "%";
    const ms = n.ms_per_step || {};
    q(".cn-ms").textContent = ms.measured == null && ms.predicted == null ? "–"
      : `${fmtMs(ms.measured)} measured · ${fmtMs(ms.predicted)} predicted` +
        (ms.off != null ? ` (${ms.off > 0 ? "+" : ""}${Math.round(ms.off * 100)}%)` : "");
    q(".cn-ms").classList.toggle("off", ms.off != null && Math.abs(ms.off) > 0.25);
    q(".cn-tps").textContent = n.tokens_per_s != null ? `${fmtNum(n.tokens_per_s, 1)} (this stage alone)` : "–";
    q(".cn-transit").textContent = n.transit_ms != null ? `${fmtMs(n.transit_ms)} to the next node` : "–";
    q(".cn-blas").textContent = n.blas || "not reported yet";
    let note = "";
    const downFor = n.down_s != null ? `down for ${n.down_s.toFixed(0)} s` : null;
    if (n.status === "rejoining") note = downFor ? `${downFor}; requests wait for it` : "back, loading its layers";
    else if (n.status === "gone") note = `${downFor || "down"}, past the rejoin grace`;
    else if (n.status === "standby") note = n.standby_reason || "the plan gives it no layers";
    else if (n.last_seen_s != null && n.rank !== 0) note = `last heard ${n.last_seen_s.toFixed(1)} s ago`;
    if (n.status === "gone" && n.gone_reason) note = n.gone_reason;
    q(".cn-note").textContent = note;
    const leave = q(".cn-leave");
    leave.hidden = n.rank === 0 || n.status === "gone";     // rank 0 is the leader: it cannot leave
    leave.disabled = state.leaving.has(n.rank);
    leave.addEventListener("click", () => leaveNode(n.rank, n.host));
    const said = state.leaveSaid[n.rank];
    q(".cn-leave-msg").textContent = said ? said.text : "";
    q(".cn-leave-msg").dataset.kind = said ? said.kind : "";
    return card;
  }

  /** A card's "leave" button: drain that worker (POST cluster/leave {rank}, with the API token the
   *  page keeps, as chat sends it). The leader re-plans without the node, then it stops; the answer
   *  comes once it is drained and shows on the card, whose status turns "gone" at the next refresh. */
  async function leaveNode(rank, host) {
    const who = `rank ${rank}` + (host ? ` (${host})` : "");
    if (!window.confirm(`Drain ${who} from the cluster? The leader re-plans without it (requests in flight ` +
                        "go on), then the node stops.")) return;
    state.leaving.add(rank);
    sayLeave(rank, "busy", `draining ${who}…`);
    const r = await call("cluster/leave", { method: "POST", body: JSON.stringify({ rank }) });
    state.leaving.delete(rank);
    const error = (r.body && r.body.error) || `HTTP ${r.status}`;
    if (r.ok) sayLeave(rank, "ok", (r.body && r.body.message) || `${who} drained`);
    else if (r.status === 401) sayLeave(rank, "error", `${error}: give the API token (above), then leave again`);
    else sayLeave(rank, "error", `cannot drain ${who}: ${error}`);
    if (document.body.dataset.view === "cluster") pollCluster();
  }

  function sayLeave(rank, kind, text) {
    state.leaveSaid[rank] = { kind, text };
    const card = document.querySelector(`#cl-ring .cnode[data-rank="${rank}"]`);
    if (!card) return;
    card.querySelector(".cn-leave-msg").textContent = text;
    card.querySelector(".cn-leave-msg").dataset.kind = kind;
    card.querySelector(".cn-leave").disabled = kind === "busy";
  }

  function renderEvents(events) {
    const items = events.slice().reverse().map((e) => {
      const li = el("li", "cl-event");
      li.dataset.kind = e.kind || "";
      const when = e.t != null ? new Date(e.t * 1000).toLocaleTimeString() : "";
      li.append(el("time", "", when), el("span", "kind", EVENT_TEXT[e.kind] || e.kind || "?"),
                el("span", "text", e.text || ""));
      return li;
    });
    if (!items.length) items.push(el("li", "cl-event none", "nothing yet"));
    $("cl-events").replaceChildren(...items);
  }

  // ---------------------------------------------------------------------------------------
  // Where the API is

  /** Nothing answered at the API's address: say what to start, and where to change the address. */
  function showApiHelp() {
    const panel = $("api-panel");
    if (panel.dataset.reason === "down") return;       // said already; the user may be typing
    panel.dataset.reason = "down";
    panel.hidden = false;
    $("api-input").value = apiLabel();
    const code = (text) => el("code", "", text);
    $("api-note").replaceChildren(
      `Nothing answers at ${apiLabel()}. Start the web app there: `, code("nanopipe web"),
      " (it serves this page and the API on port 8000), with the cluster behind it (",
      code("nanopipe serve --rank 0"), " and its workers; ", code("nanopipe demo"),
      " starts all of it on this machine). Or give the address it runs at, then Connect. A page from ",
      "elsewhere than this machine needs its origin in cors_origins.");
  }

  function saveApi(event) {
    event.preventDefault();
    state.api = normalizeApi($("api-input").value);
    localStorage.setItem(API_KEY, state.api);
    reconnectTo();
  }

  function reconnectTo() {
    $("api-panel").hidden = true;
    $("api-panel").dataset.reason = "";
    state.config = null;
    state.retryMs = RETRY_MIN_MS;
    setConn("unknown", `connecting to ${apiLabel()}…`);
    checkHealth(false);
  }

  // ---------------------------------------------------------------------------------------
  // API token

  function askForToken(message) {
    const panel = $("token-panel");
    panel.hidden = false;
    $("token-note").textContent = message || "This server needs an API token.";
    $("token-input").focus();
  }

  function saveToken(event) {
    event.preventDefault();
    const value = $("token-input").value.trim();
    if (value) localStorage.setItem(TOKEN_KEY, value);
    $("token-input").value = "";
    $("token-panel").hidden = true;
    state.config = null;
    checkHealth(false);
  }

  // ---------------------------------------------------------------------------------------
  // Wiring

  function bindRange(field) {
    const range = $(field + "-range");
    range.addEventListener("input", () => { $(field).value = range.value; });
    $(field).addEventListener("input", () => { range.value = $(field).value; });
  }

  function start() {
    bindRange("temperature");
    bindRange("top_p");
    $("strategy").addEventListener("change", (e) => setStrategyDefaults(e.target.value));
    $("reset").addEventListener("click", resetControls);
    $("composer").addEventListener("submit", (e) => {
      e.preventDefault();
      const text = $("prompt").value;
      if (!text.trim()) return;
      $("prompt").value = "";
      send(text);
    });
    $("prompt").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        $("composer").requestSubmit();
      }
    });
    $("stop").addEventListener("click", () => state.controller && state.controller.abort());
    $("clear").addEventListener("click", newChat);
    $("conn").addEventListener("click", () => { state.retryMs = RETRY_MIN_MS; checkHealth(true); });
    $("token-btn").addEventListener("click", () => {
      const panel = $("token-panel");
      panel.hidden = !panel.hidden;
      if (!panel.hidden) $("token-input").focus();
    });
    $("token-panel").addEventListener("submit", saveToken);
    $("api-btn").addEventListener("click", () => {
      const panel = $("api-panel");
      panel.hidden = !panel.hidden;
      if (!panel.hidden) { $("api-input").value = apiLabel(); $("api-input").focus(); }
    });
    $("api-panel").addEventListener("submit", saveApi);
    $("api-reset").addEventListener("click", async () => {
      localStorage.removeItem(API_KEY);
      state.api = await findApi();
      reconnectTo();
    });
    $("token-clear").addEventListener("click", () => {
      localStorage.removeItem(TOKEN_KEY);
      $("token-note").textContent = "Forgotten.";
    });
    $("settings-btn").addEventListener("click", () => {
      const open = $("settings").classList.toggle("open");
      $("settings-btn").setAttribute("aria-expanded", String(open));
    });
    window.addEventListener("hashchange", showView);
    showView();
    findApi().then((api) => {
      state.api = api;
      loadConfig();
      checkHealth(false);
      showView();
    });
  }

  window.nanopipe = { SSEParser, parseEvent, leaveNode };     // for the browser test and the curious
  start();
})();
