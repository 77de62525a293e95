// Talking to the gateway: keys from sessionStorage in the Authorization header (never in
// a URL), errors in OpenAI's shape, Server-Sent Events read with fetch() because
// EventSource cannot send headers.

const API_KEY = "ai-sysadmin.api-key";
const ADMIN_KEY = "ai-sysadmin.admin-key";

export const keys = {
  get api() { return sessionStorage.getItem(API_KEY) || ""; },
  get admin() { return sessionStorage.getItem(ADMIN_KEY) || ""; },
  save(api, admin) {
    if (api) sessionStorage.setItem(API_KEY, api); else sessionStorage.removeItem(API_KEY);
    if (admin) sessionStorage.setItem(ADMIN_KEY, admin); else sessionStorage.removeItem(ADMIN_KEY);
  },
  forget() { sessionStorage.removeItem(API_KEY); sessionStorage.removeItem(ADMIN_KEY); },
};

export class ApiError extends Error {
  constructor(status, body, text) {
    const msg = body && body.error && body.error.message ? body.error.message : (text || `HTTP ${status}`);
    super(msg);
    this.status = status;
    this.code = body && body.error ? body.error.code : null;
  }
}

function headers(admin, json) {
  const h = {};
  const key = admin ? (keys.admin || keys.api) : (keys.api || keys.admin);
  if (key) h.Authorization = `Bearer ${key}`;
  if (json) h["Content-Type"] = "application/json";
  return h;
}

async function failure(r) {
  const text = await r.text();
  let body = null;
  try { body = JSON.parse(text); } catch { /* not JSON */ }
  return new ApiError(r.status, body, text.slice(0, 300));
}

export async function api(path, { method = "GET", body, admin = false, signal } = {}) {
  const r = await fetch(path, {
    method, signal, cache: "no-store",
    headers: headers(admin, body !== undefined),
    body: body !== undefined ? JSON.stringify(body) : undefined,
  });
  if (!r.ok) throw await failure(r);
  return r.status === 204 ? null : r.json();
}

// Split a byte stream into SSE frames: {id, event, data} (data lines joined with "\n").
async function* frames(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const frame = { id: null, event: "message", data: [] };
        for (const line of block.split("\n")) {
          if (!line || line.startsWith(":")) continue;
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          let val = colon < 0 ? "" : line.slice(colon + 1);
          if (val.startsWith(" ")) val = val.slice(1);
          if (field === "data") frame.data.push(val);
          else if (field === "id") frame.id = val;
          else if (field === "event") frame.event = val;
        }
        if (frame.data.length) yield { ...frame, data: frame.data.join("\n") };
      }
    }
  } finally {
    reader.releaseLock();
  }
}

// An SSE stream of the gateway (GET), resumable: pass the last id seen.
export async function* sse(path, { lastEventId, signal, onOpen } = {}) {
  const h = headers(false, false);
  h.Accept = "text/event-stream";
  if (lastEventId) h["Last-Event-ID"] = String(lastEventId);
  const r = await fetch(path, { headers: h, signal, cache: "no-store" });
  if (!r.ok) throw await failure(r);
  if (onOpen) onOpen();
  yield* frames(r);
}

// A streamed chat completion: yields each chunk object until [DONE].
export async function* chatStream(body, { signal } = {}) {
  const r = await fetch("/v1/chat/completions", {
    method: "POST", signal, cache: "no-store",
    headers: headers(false, true),
    body: JSON.stringify({ ...body, stream: true, stream_options: { include_usage: true } }),
  });
  if (!r.ok) throw await failure(r);
  for await (const frame of frames(r)) {
    if (frame.data === "[DONE]") return;
    const chunk = JSON.parse(frame.data);
    if (chunk.error) throw new ApiError(502, chunk, chunk.error.message);
    yield chunk;
  }
}
