// Chat with the `ai-sysadmin` model (the meta layer with live incident context),
// streamed token by token.

import { chatStream } from "./api.js";
import { h } from "./dom.js";

let ctx;
let history = [];
let controller = null;
const $ = (id) => document.getElementById(id);

export function init(c) {
  ctx = c;
  $("chat-form").addEventListener("submit", (ev) => { ev.preventDefault(); send(); });
  $("chat-input").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) { ev.preventDefault(); send(); }
  });
  $("chat-stop").addEventListener("click", () => controller && controller.abort());
  $("chat-clear").addEventListener("click", () => {
    if (controller) controller.abort();
    history = [];
    $("chat-log").replaceChildren();
    $("chat-stats").textContent = "";
    $("chat-input").focus();
  });
}

export function show() { $("chat-input").focus(); }

function bubble(role, text) {
  const body = h("div", { class: "msg-body" }, text);
  const li = h("li", { class: `msg msg-${role}` },
    h("span", { class: "msg-role" }, role === "user" ? "You" : "ai-sysadmin"), body);
  $("chat-log").append(li);
  li.scrollIntoView({ block: "end" });
  return body;
}

async function send() {
  const input = $("chat-input");
  const text = input.value.trim();
  if (!text || controller) return;
  input.value = "";
  bubble("user", text);
  history.push({ role: "user", content: text });
  const out = bubble("assistant", "");
  out.parentElement.setAttribute("aria-busy", "true");
  out.classList.add("streaming");
  controller = new AbortController();
  $("chat-send").disabled = true;
  $("chat-stop").disabled = false;
  $("chat-stats").textContent = "thinking…";
  const started = performance.now();
  let first = null;
  let reply = "";
  let usage = null;
  try {
    for await (const chunk of chatStream({ model: "ai-sysadmin", messages: history, max_tokens: 512 },
      { signal: controller.signal })) {
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) {
        if (first === null) first = performance.now();
        reply += delta.content;
        out.textContent = reply;
        out.parentElement.scrollIntoView({ block: "end" });
      }
      if (chunk.usage) usage = chunk.usage;
    }
  } catch (err) {
    if (err.name !== "AbortError") {
      ctx.fail(err);
      out.append(h("span", { class: "error-text" }, ` [${err.message}]`));
    } else {
      out.append(h("span", { class: "muted" }, " [stopped]"));
    }
  } finally {
    out.classList.remove("streaming");
    out.parentElement.removeAttribute("aria-busy");
    controller = null;
    $("chat-send").disabled = false;
    $("chat-stop").disabled = true;
    input.focus();
  }
  if (reply) history.push({ role: "assistant", content: reply });
  const total = (performance.now() - started) / 1000;
  $("chat-stats").textContent = first === null ? "" :
    `first token after ${((first - started) / 1000).toFixed(2)}s · ${total.toFixed(1)}s`
    + (usage ? ` · ${usage.completion_tokens} tokens` : "");
}
