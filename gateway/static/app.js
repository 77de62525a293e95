// The dashboard shell: key entry, view switching (by URL fragment; no key ever goes in
// the URL), and one place to report errors.

import { keys } from "./api.js";
import * as layers from "./layers.js";
import * as incidents from "./incidents.js";
import * as approvals from "./approvals.js";
import * as chat from "./chat.js";
import * as bench from "./bench.js";

const views = { layers, incidents, approvals, chat, bench };
let current = null;
// False until a key is entered where the gateway needs one: no view calls the API before.
let ready = false;

const notice = document.getElementById("notice");
let noticeTimer = null;

export function report(message, kind = "error") {
  notice.textContent = message;
  notice.className = `notice notice-${kind}`;
  notice.hidden = false;
  clearTimeout(noticeTimer);
  noticeTimer = setTimeout(() => { notice.hidden = true; }, kind === "error" ? 12000 : 5000);
}

function explain(err) {
  if (err && (err.status === 401 || err.status === 403)) {
    return `${err.message} — enter a key above.`;
  }
  return err && err.message ? err.message : String(err);
}

export function fail(err) {
  if (err && err.name === "AbortError") return;
  report(explain(err), "error");
}

function show(name) {
  if (!views[name]) name = "layers";
  if (current === name) return;
  if (current) {
    document.getElementById(`view-${current}`).hidden = true;
    views[current].hide?.();
  }
  current = name;
  document.getElementById(`view-${name}`).hidden = false;
  for (const a of document.querySelectorAll(".tabs a")) {
    if (a.dataset.view === name) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  if (ready) views[name].show?.();
}

function activate() {
  const first = !ready;
  ready = true;
  for (const v of Object.values(views)) (first ? v.start : v.keysChanged)?.();
  if (current) views[current].show?.();
}

function setupKeys() {
  const form = document.getElementById("key-form");
  const api = document.getElementById("api-key");
  const admin = document.getElementById("admin-key");
  api.value = keys.api;
  admin.value = keys.admin;
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    keys.save(api.value.trim(), admin.value.trim());
    report("Keys saved for this browser tab.", "ok");
    activate();
  });
  document.getElementById("key-forget").addEventListener("click", () => {
    keys.forget();
    api.value = "";
    admin.value = "";
    report("Keys forgotten.", "ok");
    for (const v of Object.values(views)) v.keysChanged?.();
  });
}

async function keyRequired() {
  if (keys.api || keys.admin) return false;
  try {
    const r = await fetch("/dashboard/session", { cache: "no-store" });
    return !r.ok || (await r.json()).key_required;
  } catch {
    return true;
  }
}

async function start() {
  setupKeys();
  for (const v of Object.values(views)) v.init?.({ report, fail });
  window.addEventListener("hashchange", () => show(location.hash.slice(1)));
  show(location.hash.slice(1) || "layers");
  const needKey = await keyRequired();
  if (ready) return;  // keys were entered meanwhile
  if (needKey) {
    report("Enter the gateway's API key (and the admin key to approve actions or control layers).", "ok");
    document.getElementById("api-key").focus();
  } else {
    activate();
  }
}

start();
