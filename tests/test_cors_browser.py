"""Issue 20, browser clients in a real browser: a page served from another loopback
origin calls the gateway with ``fetch()``, as Open WebUI's direct connections do. With
the page's origin in ``gateway.cors_origins`` the browser lets it read the model list, an
event stream and a streamed chat answer from the real default model; from an origin not
listed, or with the list empty (the default), the browser refuses and ``fetch`` throws.

Headless Chromium from Debian (``/usr/bin/chromium``) driven by Playwright, as in
tests/test_dashboard_browser.py.
"""

from __future__ import annotations

import shutil
import signal
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.reliability_support import Gateway, gateway_data
from tests.support import free_port, llama_server, write_toml

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update"]
KEY = "test-key"

playwright_sync = pytest.importorskip("playwright.sync_api")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(600),
    pytest.mark.skipif(not CHROMIUM.exists(),
                       reason="needs Debian's chromium (apt-get install chromium)"),
]

PAGE = b"""<!doctype html><meta charset="utf-8"><title>another origin</title>
<p>A page of another origin, like Open WebUI calling a direct connection.</p>"""

# Runs in the page: what a browser client does, and what it gets to see.
FETCH = """async ([url, key, what]) => {
  const auth = {Authorization: `Bearer ${key}`};
  try {
    if (what === "models") {
      const r = await fetch(`${url}/v1/models`, {headers: auth});
      return {ok: true, status: r.status, ids: (await r.json()).data.map(m => m.id)};
    }
    const init = what === "chat"
      ? {method: "POST", headers: {...auth, "Content-Type": "application/json"},
         body: JSON.stringify({model: "trigger", stream: true, max_tokens: 4,
                               messages: [{role: "user", content: "Say hi."}]})}
      : {headers: auth};
    const r = await fetch(`${url}${what === "chat" ? "/v1/chat/completions"
                                                   : "/v1/events/stream"}`, init);
    const reader = r.body.getReader();
    let text = "";
    while (what === "chat" ? !text.includes("[DONE]") : text.length === 0) {
      const {value, done} = await reader.read();
      if (done) break;
      text += new TextDecoder().decode(value);
    }
    reader.cancel();
    return {ok: true, status: r.status, text,
            layer: r.headers.get("X-Ai-Sysadmin-Layer")};
  } catch (e) {
    return {ok: false, error: String(e)};
  }
}"""


class _Page(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(PAGE)))
        self.end_headers()
        self.wfile.write(PAGE)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def origins() -> Iterator[tuple[str, str]]:
    """Two page servers: two origins (the port is part of an origin)."""
    servers = [ThreadingHTTPServer(("127.0.0.1", free_port()), _Page) for _ in range(2)]
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    yield (f"http://127.0.0.1:{servers[0].server_port}",
           f"http://127.0.0.1:{servers[1].server_port}")
    for s in servers:
        s.shutdown()
        s.server_close()


@pytest.fixture(scope="module")
def layer(tmp_path_factory: pytest.TempPathFactory, llama_server_bin: Path,
          model_path: Path) -> Iterator[int]:
    port = free_port()
    proc = llama_server(llama_server_bin, model_path, port,
                        tmp_path_factory.mktemp("cors-layer") / "layer.log").start()
    proc.wait_http(f"http://127.0.0.1:{port}/health", timeout=180)
    yield port
    proc.stop(signal.SIGKILL)


def start_gateway(tmp: Path, layer: int, cors: list[str] | None) -> Gateway:
    port = free_port()
    data = gateway_data(tmp, dict.fromkeys(("trigger", "review", "meta"), layer), port,
                        memory={"enabled": False}, pipeline={"stream_keepalive": 1.0})
    if cors is not None:
        data["gateway"]["cors_origins"] = cors
    return Gateway(write_toml(tmp / f"gw{port}.toml", data), port, tmp / f"gw{port}.log").start()


@pytest.fixture(scope="module")
def gateways(tmp_path_factory: pytest.TempPathFactory, layer: int,
             origins: tuple[str, str]) -> Iterator[tuple[Gateway, Gateway]]:
    tmp = tmp_path_factory.mktemp("cors-gw")
    listed = start_gateway(tmp, layer, [origins[0]])
    default = start_gateway(tmp, layer, None)
    yield listed, default
    listed.stop()
    default.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    profile = tmp_path_factory.mktemp("cors-chromium")
    with playwright_sync.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile), executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield context
        finally:
            context.close()
    shutil.rmtree(profile, ignore_errors=True)


def from_page(browser: Any, origin: str, gateway: Gateway, what: str) -> dict[str, Any]:
    page = browser.new_page()
    try:
        page.goto(f"{origin}/")
        result: dict[str, Any] = page.evaluate(FETCH, [gateway.url, KEY, what])
        return result
    finally:
        page.close()


def test_a_listed_origin_reads_models_streams_and_chats(
    browser: Any, gateways: tuple[Gateway, Gateway], origins: tuple[str, str]
) -> None:
    listed, _ = gateways
    got = from_page(browser, origins[0], listed, "models")
    assert got["ok"] and got["status"] == 200, got
    assert {"ai-sysadmin", "trigger", "review", "meta"} <= set(got["ids"])
    got = from_page(browser, origins[0], listed, "stream")
    assert got["ok"] and got["status"] == 200 and got["text"].startswith(":"), got
    got = from_page(browser, origins[0], listed, "chat")  # the real model, streamed
    assert got["ok"] and got["status"] == 200, got
    assert '"chat.completion.chunk"' in got["text"] and "data: [DONE]" in got["text"], got
    assert got["layer"] == "trigger"  # an exposed header the page may read


@pytest.mark.parametrize("case", ["origin not listed", "empty allowlist"])
def test_the_browser_refuses_without_the_allowlist(
    browser: Any, gateways: tuple[Gateway, Gateway], origins: tuple[str, str], case: str
) -> None:
    listed, default = gateways
    origin, gateway = (origins[1], listed) if case == "origin not listed" else (origins[0],
                                                                               default)
    for what in ("models", "stream", "chat"):
        got = from_page(browser, origin, gateway, what)
        assert not got["ok"], (what, got)
        assert "Failed to fetch" in got["error"], got
