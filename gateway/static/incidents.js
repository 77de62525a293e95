// Incidents: a live timeline. New verdicts arrive over the gateway's SSE stream
// (GET /v1/events/stream, read with fetch so the key goes in a header, resumed with
// Last-Event-ID after a drop); the incidents they belong to are fetched as they change.
// Reviews and diagnoses are written later by the daemon, so the list is also re-read
// every few seconds while it is on screen.

import { api, sse } from "./api.js";
import { h, time, badge } from "./dom.js";

const RANK = { info: 0, warning: 1, critical: 2 };
const FEED_MAX = 50;

let ctx;
const incidents = new Map();   // id -> incident summary
const details = new Map();     // id -> {node, loaded}
const open = new Set();        // ids whose details are expanded
let generation = 0;
let controller = null;
let lastSeq = 0;
let pollTimer = null;
const pending = new Map();     // id -> timer (coalesces bursts of verdicts)

const $ = (id) => document.getElementById(id);

export function init(c) {
  ctx = c;
  $("incident-filters").addEventListener("input", render);
  $("incident-filters").addEventListener("submit", (ev) => ev.preventDefault());
}

export function start() { startStream(); }

export function keysChanged() { startStream(); }

export function show() {
  loadList();
  clearInterval(pollTimer);
  pollTimer = setInterval(loadList, 8000);
}

export function hide() { clearInterval(pollTimer); pollTimer = null; }

function setStreamState(text, kind) {
  const el = $("stream-state");
  el.textContent = `stream: ${text}`;
  el.className = `pill pill-${kind}`;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function startStream() {
  const gen = ++generation;
  if (controller) controller.abort();
  controller = new AbortController();
  const { signal } = controller;
  try {
    const overview = await api("/v1/dashboard", { signal });
    // Start from now: the list below holds the past; the stream brings what is new.
    lastSeq = Math.max(lastSeq, overview.last_verdict_seq || 0);
  } catch (err) {
    if (gen === generation) { setStreamState("needs a key", "down"); ctx.fail(err); }
    return;
  }
  await loadList();
  let backoff = 1000;
  while (gen === generation) {
    try {
      setStreamState("connecting", "warn");
      const onOpen = () => { setStreamState("live", "ok"); backoff = 1000; };
      for await (const frame of sse("/v1/events/stream", { lastEventId: lastSeq, signal, onOpen })) {
        if (frame.id) lastSeq = Number(frame.id);
        if (frame.event === "verdict") onVerdict(JSON.parse(frame.data));
      }
      setStreamState("reconnecting", "warn");
    } catch (err) {
      if (err.name === "AbortError" || gen !== generation) return;
      if (err.status === 401 || err.status === 403) {
        setStreamState("needs a key", "down");
        ctx.fail(err);
        return;
      }
      setStreamState("reconnecting", "warn");
    }
    await sleep(backoff);
    backoff = Math.min(backoff * 2, 30000);
  }
}

function onVerdict(v) {
  const feed = $("verdict-feed");
  feed.prepend(h("li", { class: `verdict sev-${v.severity}`, dataset: { seq: v.seq } },
    badge(v.severity),
    v.anomaly ? badge("anomaly", "warn") : badge("normal", "ok"),
    h("span", { class: "mono" }, ` ${v.host}${v.unit ? " · " + v.unit : ""} `),
    h("span", { title: v.summary_by === "rule" ? "the rule's verdict" : "the trigger model's summary" },
      v.summary || v.category),
    h("span", { class: "muted" }, ` ${time(v.created_at)}`)));
  while (feed.children.length > FEED_MAX) feed.lastElementChild.remove();
  if (v.incident_id) refreshIncident(v.incident_id);
}

function refreshIncident(id) {
  clearTimeout(pending.get(id));
  pending.set(id, setTimeout(async () => {
    pending.delete(id);
    try {
      const inc = await api(`/v1/incidents/${encodeURIComponent(id)}`);
      incidents.set(id, inc);
      if (open.has(id)) fillDetail(id, inc);
      render();
    } catch (err) { ctx.fail(err); }
  }, 150));
}

async function loadList() {
  try {
    const list = await api("/v1/incidents?limit=200");
    for (const inc of list.data) {
      const known = incidents.get(inc.id);
      incidents.set(inc.id, inc);
      if (open.has(inc.id) && known && known.updated_at !== inc.updated_at) loadDetail(inc.id);
    }
    render();
  } catch (err) { ctx.fail(err); }
}

function matches(inc, f) {
  if (f.host && !inc.host.toLowerCase().includes(f.host.toLowerCase())) return false;
  if (f.severity && RANK[inc.severity] < RANK[f.severity]) return false;
  if (f.state && inc.status !== f.state) return false;
  return true;
}

function render() {
  const f = {
    host: $("f-host").value.trim(), severity: $("f-severity").value, state: $("f-state").value,
  };
  const all = [...incidents.values()].sort((a, b) => b.updated_at - a.updated_at);
  const shown = all.filter((i) => matches(i, f));
  $("incident-list").replaceChildren(...shown.map(card));
  $("incident-empty").hidden = shown.length > 0;
  const hosts = [...new Set(all.map((i) => i.host))].sort();
  $("f-host-list").replaceChildren(...hosts.map((x) => h("option", { value: x })));
}

function card(inc) {
  const det = details.get(inc.id) || { node: h("div", { class: "detail" }, "Loading…"), loaded: false };
  details.set(inc.id, det);
  const box = h("details", { open: open.has(inc.id) },
    h("summary", {}, "Events, review and diagnosis"), det.node);
  box.addEventListener("toggle", () => {
    if (box.open) { open.add(inc.id); if (!det.loaded) loadDetail(inc.id); } else open.delete(inc.id);
  });
  return h("li", { class: `incident sev-${inc.severity}`, dataset: { id: inc.id, status: inc.status } },
    h("div", { class: "inc-head" },
      badge(inc.severity), " ", badge(inc.status), " ",
      h("strong", { class: "inc-title" }, inc.title)),
    h("div", { class: "muted" },
      `${inc.host}${inc.unit ? " · " + inc.unit : ""}${inc.rule ? " · rule " + inc.rule : ""}`
      + ` · ${inc.verdict_count} verdict${inc.verdict_count === 1 ? "" : "s"}`
      + ` · opened ${time(inc.opened_at)} · updated ${time(inc.updated_at)}`),
    // The title above is facts (rule and log line); review and diagnosis are a model's view.
    inc.review ? h("p", { class: "inc-review" }, h("b", {}, "Review (model's assessment): "), inc.review.summary) : null,
    inc.decision ? h("p", { class: "inc-diagnosis" }, h("b", {}, "Diagnosis (model's assessment): "), inc.decision.diagnosis) : null,
    box);
}

async function loadDetail(id) {
  try {
    fillDetail(id, await api(`/v1/incidents/${encodeURIComponent(id)}`));
  } catch (err) { ctx.fail(err); }
}

function entryText(e) {
  const d = e.detail || {};
  switch (e.kind) {
    case "event": return `${d.unit ? d.unit + ": " : ""}${d.message ?? ""}`;
    case "verdict": return `${d.severity} ${d.category}: ${d.summary}${d.unreviewed ? " (rule only: trigger layer failed or refused)" : " (trigger model)"}`;
    case "status": return `status → ${d.status}`;
    case "review": return `model's assessment: ${d.status ?? ""} ${d.summary ?? ""}`.trim();
    case "decision": return `model's diagnosis: ${d.diagnosis ?? JSON.stringify(d)}`;
    case "unreviewed": return `${d.stage ?? ""} layer gave no usable answer: ${d.error ?? ""}`;
    default: return JSON.stringify(d);
  }
}

function fillDetail(id, inc) {
  const det = details.get(id) || { node: h("div", { class: "detail" }), loaded: false };
  details.set(id, det);
  det.loaded = true;
  const parts = [];
  if (inc.review) {
    const r = inc.review;
    parts.push(h("section", { class: "review" }, h("h4", {}, "Review — the model's assessment"),
      h("p", {}, badge(r.status), " ", r.summary),
      r.findings.length ? h("ul", {}, r.findings.map((x) => h("li", {}, x))) : null,
      h("p", { class: "muted" }, r.escalate ? `Escalated: ${r.reason}` : `Not escalated: ${r.reason}`)));
  } else {
    parts.push(h("p", { class: "muted" }, inc.status === "unreviewed"
      ? "Unreviewed: the review layer failed or its answer was refused; nothing is assumed healthy."
      : "Not reviewed yet."));
  }
  if (inc.decision) {
    const d = inc.decision;
    parts.push(h("section", { class: "diagnosis" }, h("h4", {}, "Diagnosis — the model's assessment"), h("p", {}, d.diagnosis),
      d.rollback_plan ? h("p", { class: "muted" }, `Rollback: ${d.rollback_plan}`) : null));
  }
  if (inc.proposals && inc.proposals.length) {
    parts.push(h("section", {}, h("h4", {}, "Proposed actions"),
      h("ul", {}, inc.proposals.map((p) => h("li", {},
        badge(p.status), " ", h("code", {}, p.action), " ", h("span", { class: "mono" }, JSON.stringify(p.params)),
        " — ", p.rationale,
        p.status === "pending" ? h("span", {}, " ", h("a", { href: "#approvals" }, "review in Approvals")) : null)))));
  }
  parts.push(h("section", {}, h("h4", {}, "Timeline"),
    h("ol", { class: "timeline" }, (inc.timeline || []).map((e) => h("li", { class: `tl-${e.kind}` },
      h("span", { class: "muted" }, time(e.ts)), " ", badge(e.kind, "kind"), " ",
      h("span", { class: e.kind === "event" ? "mono" : "" }, entryText(e)))))));
  det.node.replaceChildren(...parts);
}
