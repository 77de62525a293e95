// Layers: health, model, engine, slots, throughput; start / stop / restart (admin key).

import { api } from "./api.js";
import { h, fmt, badge } from "./dom.js";

let ctx;
let timer = null;
let busy = false;
const tbody = () => document.querySelector("#layers-table tbody");

export function init(c) {
  ctx = c;
  document.getElementById("layers-refresh").addEventListener("click", () => refresh());
}

export function show() {
  refresh();
  clearInterval(timer);
  timer = setInterval(() => { if (!busy) refresh(); }, 5000);
}

export function hide() { clearInterval(timer); timer = null; }

function healthKind(layer) {
  if (layer.state === "stopped" || layer.state === "failed") return "down";
  return { ready: "ok", loading: "warn", starting: "warn", restarting: "warn" }[layer.health] || "down";
}

async function control(name, op, button) {
  busy = true;
  const row = button.closest("tr");
  for (const b of row.querySelectorAll("button")) b.disabled = true;
  ctx.report(`${op} ${name}…`, "ok");
  try {
    await api(`/v1/layers/${encodeURIComponent(name)}/${op}`, { method: "POST", admin: true });
    ctx.report(`layer ${name}: ${op} done`, "ok");
  } catch (err) {
    ctx.fail(err);
  } finally {
    busy = false;
    refresh();
  }
}

function row(layer, controllable) {
  const slots = layer.slots_total === null ? "–"
    : `${layer.slots_busy ?? "?"} / ${layer.slots_total - (layer.slots_busy ?? 0)}`;
  const running = layer.state !== "stopped";
  const why = controllable ? null : "layers run outside this gateway's process (systemd, `layers serve`)";
  const btn = (op, label, enabled) => h("button", {
    type: "button", class: "small", disabled: !controllable || !enabled, title: why,
    "aria-label": `${label} layer ${layer.name}`, onclick: (ev) => control(layer.name, op, ev.currentTarget),
  }, label);
  return h("tr", { dataset: { layer: layer.name, health: layer.health, state: layer.state } },
    h("th", { scope: "row" }, layer.name),
    h("td", {}, badge(["stopped", "failed"].includes(layer.state) ? layer.state : layer.health,
      healthKind(layer)),
      layer.restarts ? h("span", { class: "muted" }, ` ${layer.restarts} restarts`) : null,
      layer.reason ? h("div", { class: "reason" }, layer.reason)
        : layer.last_exit ? h("div", { class: "muted" }, `last exit: ${layer.last_exit}`) : null),
    h("td", { class: "mono" }, layer.model || "–"),
    h("td", {}, layer.engine, layer.endpoints[0] && layer.endpoints[0].build
      ? h("span", { class: "muted" }, ` ${layer.endpoints[0].build}`) : null),
    h("td", { class: "num" }, layer.port),
    h("td", { class: "num slots" }, slots),
    h("td", { class: "num tps" }, fmt(layer.tokens_per_second)),
    h("td", { class: "num" }, `${layer.inflight} running, ${layer.queued} queued`),
    h("td", { class: "controls" },
      btn("start", "Start", !running), btn("stop", "Stop", running), btn("restart", "Restart", running)),
  );
}

export async function refresh() {
  try {
    const [list, overview] = await Promise.all([api("/v1/layers"), api("/v1/dashboard")]);
    const controllable = overview.layer_control;
    tbody().replaceChildren(...list.data.map((l) => row(l, controllable && l.control === "supervisor")));
    document.getElementById("layers-control-note").textContent = controllable
      ? "The layers run in this gateway's process: start, stop and restart need the admin key."
      : "The layers run outside this gateway (systemd units or `ai-sysadmin layers serve`): "
        + "control them there, e.g. `systemctl restart llama-meta`.";
    document.getElementById("layers-updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (err) {
    ctx.fail(err);
  }
}
