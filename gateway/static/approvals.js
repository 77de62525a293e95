// Approvals: pending actions with their dry run and rationale; approve or reject with the
// admin key; recent decisions and the audit log.

import { api } from "./api.js";
import { h, time, badge } from "./dom.js";

let ctx;
let timer = null;
const $ = (id) => document.getElementById(id);

export function init(c) {
  ctx = c;
  $("approvals-refresh").addEventListener("click", () => refresh());
}

export function show() {
  refresh();
  clearInterval(timer);
  timer = setInterval(refresh, 10000);
}

export function hide() { clearInterval(timer); timer = null; }

function approver() {
  const v = $("approver").value.trim();
  return /^[A-Za-z0-9._@+-]{1,64}$/.test(v) ? v : "dashboard";
}

async function decide(p, verb, card) {
  for (const b of card.querySelectorAll("button")) b.disabled = true;
  const body = { approver: approver() };
  if (verb === "reject") {
    const reason = card.querySelector("input[name=reason]").value.trim();
    if (reason) body.reason = reason;
  }
  try {
    const res = await api(`/v1/actions/${encodeURIComponent(p.id)}/${verb}`, { method: "POST", admin: true, body });
    ctx.report(`${p.action}: ${res.status}`, res.status === "failed" ? "error" : "ok");
  } catch (err) {
    ctx.fail(err);
  }
  refresh();
}

function pendingCard(p) {
  const reasonId = `reason-${p.id}`;
  const card = h("li", { class: `card risk-${p.risk || "unknown"}`, dataset: { id: p.id, status: p.status } });
  card.append(...[
    h("div", { class: "inc-head" }, badge(p.risk || "risk?", `risk-${p.risk}`), " ",
      h("strong", {}, h("code", {}, p.action)), " ",
      h("span", { class: "mono" }, JSON.stringify(p.params))),
    p.incident ? h("p", { class: "muted" }, "Incident: ",
      p.incident.title ? `${p.incident.title} (${p.incident.severity}, ${p.incident.host})` : p.incident.id) : null,
    h("p", {}, h("b", {}, "Rationale: "), p.rationale || "–"),
    h("p", { class: "label" }, "Dry run"),
    h("pre", { class: "dry-run" }, p.dry_run || "(no dry run)"),
    h("p", { class: "muted" }, `proposed ${time(p.created_at)}`,
      p.expires_at ? ` · expires ${time(p.expires_at)}` : "",
      p.merge_count ? ` · proposed ${p.merge_count + 1} times` : ""),
    h("div", { class: "row" },
      h("button", { type: "button", "aria-label": `Approve ${p.action} ${JSON.stringify(p.params)}`,
        onclick: () => decide(p, "approve", card) }, "Approve"),
      h("label", { for: reasonId, class: "sr-only" }, "Reason for rejecting"),
      h("input", { id: reasonId, name: "reason", type: "text", placeholder: "reason (optional)", maxlength: 500 }),
      h("button", { type: "button", class: "danger", "aria-label": `Reject ${p.action} ${JSON.stringify(p.params)}`,
        onclick: () => decide(p, "reject", card) }, "Reject")),
  ].filter(Boolean));  // native append() would print "null"
  return card;
}

function actionRow(p) {
  const result = p.result
    ? `exit ${p.result.exit_code ?? "?"} in ${p.result.duration.toFixed(1)}s${p.result.output ? ": " + p.result.output.slice(0, 160) : ""}`
    : "";
  return h("tr", { dataset: { id: p.id, status: p.status } },
    h("td", {}, time(p.decided_at || p.created_at)),
    h("td", {}, h("code", {}, p.action)),
    h("td", { class: "mono" }, JSON.stringify(p.params)),
    h("td", {}, badge(p.status)),
    h("td", {}, p.decided_by || ""),
    h("td", { class: "mono small-text" }, result));
}

function auditRow(e) {
  return h("tr", { dataset: { seq: e.seq, kind: e.kind } },
    h("td", { class: "num" }, e.seq),
    h("td", {}, time(e.ts)),
    h("td", {}, e.actor),
    h("td", {}, e.kind),
    h("td", { class: "mono" }, e.subject),
    h("td", { class: "mono small-text" }, JSON.stringify(e.detail).slice(0, 200)));
}

export async function refresh() {
  try {
    const [pending, recent, audit] = await Promise.all([
      api("/v1/actions?status=pending&limit=100"),
      api("/v1/actions?limit=50"),
      api("/v1/audit?limit=50"),
    ]);
    const focused = document.activeElement && document.activeElement.closest("#pending-list");
    if (!focused) $("pending-list").replaceChildren(...pending.data.map(pendingCard));
    $("pending-empty").hidden = pending.data.length > 0;
    const done = recent.data.filter((p) => p.status !== "pending");
    document.querySelector("#actions-table tbody").replaceChildren(...done.map(actionRow));
    document.querySelector("#audit-table tbody").replaceChildren(...audit.data.slice().reverse().map(auditRow));
  } catch (err) {
    ctx.fail(err);
  }
}
