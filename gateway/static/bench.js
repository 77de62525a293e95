// Benchmark: one prompt against each layer, one request at a time, streamed through the
// gateway. Time to first token and tokens per second are measured here in the browser;
// llama-server's own timing (timings.predicted_per_second) is shown beside it.

import { chatStream } from "./api.js";
import { h, s, fmt } from "./dom.js";

let ctx;
let running = false;
const $ = (id) => document.getElementById(id);

export function init(c) {
  ctx = c;
  $("bench-form").addEventListener("submit", (ev) => { ev.preventDefault(); run(); });
}

async function measure(layer, prompt, maxTokens) {
  const t0 = performance.now();
  let first = null;
  let chunks = 0;
  let usage = null;
  let timings = null;
  for await (const chunk of chatStream({
    model: layer, messages: [{ role: "user", content: prompt }], max_tokens: maxTokens, temperature: 0,
  })) {
    const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
    if (delta && delta.content) {
      if (first === null) first = performance.now();
      chunks += 1;
    }
    if (chunk.usage) usage = chunk.usage;
    if (chunk.timings) timings = chunk.timings;
  }
  const end = performance.now();
  const tokens = usage ? usage.completion_tokens : chunks;
  const decodeSeconds = first === null ? 0 : (end - first) / 1000;
  return {
    layer,
    ttft: first === null ? null : first - t0,
    tokens,
    tps: tokens > 1 && decodeSeconds > 0 ? (tokens - 1) / decodeSeconds : null,
    serverTps: timings ? timings.predicted_per_second : null,
    total: end - t0,
  };
}

function resultRow(r, run) {
  return h("tr", { dataset: { layer: r.layer } },
    h("th", { scope: "row" }, r.layer), h("td", { class: "num" }, run),
    h("td", { class: "num ttft" }, fmt(r.ttft, 0)), h("td", { class: "num" }, r.tokens),
    h("td", { class: "num tps" }, fmt(r.tps)), h("td", { class: "num" }, fmt(r.serverTps)),
    h("td", { class: "num" }, fmt(r.total, 0)));
}

const mean = (xs) => {
  const v = xs.filter((x) => x !== null && x !== undefined);
  return v.length ? v.reduce((a, b) => a + b, 0) / v.length : null;
};

// Two horizontal bar charts side by side: mean TTFT (ms) and mean tokens/s per layer.
function chart(results) {
  const layers = [...new Set(results.map((r) => r.layer))];
  const rows = layers.map((l) => {
    const rs = results.filter((r) => r.layer === l);
    return { layer: l, ttft: mean(rs.map((r) => r.ttft)), tps: mean(rs.map((r) => r.tps)) };
  });
  const W = 720, barH = 26, gap = 10, top = 28, label = 70, panel = (W - 2 * label - 40) / 2;
  const H = top + rows.length * (barH + gap) + 10;
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, width: "100%", role: "img",
    "aria-label": "Bar charts of mean time to first token and mean tokens per second per layer" });
  const panels = [
    { key: "ttft", title: "TTFT (ms, lower is better)", x: 0, color: "#2a6fdb", digits: 0 },
    { key: "tps", title: "tokens/s (higher is better)", x: label + panel + 40, color: "#1b8a5a", digits: 1 },
  ];
  for (const p of panels) {
    const max = Math.max(1e-9, ...rows.map((r) => r[p.key] || 0));
    svg.append(s("text", { x: p.x + label, y: 16, class: "chart-title" }, p.title));
    rows.forEach((r, i) => {
      const y = top + i * (barH + gap);
      const v = r[p.key];
      const w = v ? (v / max) * (panel - 60) : 0;
      svg.append(s("text", { x: p.x + label - 8, y: y + barH * 0.68, "text-anchor": "end", class: "chart-label" }, r.layer));
      svg.append(s("rect", { x: p.x + label, y, width: Math.max(w, 1), height: barH, fill: p.color, rx: 3 },
        s("title", {}, `${r.layer}: ${fmt(v, p.digits)}`)));
      svg.append(s("text", { x: p.x + label + w + 6, y: y + barH * 0.68, class: "chart-value" }, fmt(v, p.digits)));
    });
  }
  return svg;
}

async function run() {
  if (running) return;
  const prompt = $("bench-prompt").value.trim();
  const layers = [...document.querySelectorAll("#bench-form input[name=layer]:checked")].map((i) => i.value);
  const maxTokens = Math.min(1024, Math.max(8, Number($("bench-tokens").value) || 48));
  const runs = Math.min(10, Math.max(1, Number($("bench-runs").value) || 1));
  if (!prompt || !layers.length) { ctx.report("Choose a prompt and at least one layer.", "error"); return; }
  running = true;
  $("bench-run").disabled = true;
  const tbody = document.querySelector("#bench-table tbody");
  tbody.replaceChildren();
  $("bench-chart").hidden = true;
  const results = [];
  try {
    for (const layer of layers) {
      for (let i = 1; i <= runs; i++) {
        $("bench-state").textContent = `running ${layer} (${i}/${runs})…`;
        const r = await measure(layer, prompt, maxTokens);
        results.push(r);
        tbody.append(resultRow(r, i));
      }
    }
    $("bench-state").textContent = `done: ${results.length} run${results.length === 1 ? "" : "s"}`;
  } catch (err) {
    $("bench-state").textContent = "failed";
    ctx.fail(err);
  } finally {
    running = false;
    $("bench-run").disabled = false;
  }
  if (results.length) {
    $("bench-svg").replaceChildren(chart(results));
    $("bench-chart").hidden = false;
  }
}
