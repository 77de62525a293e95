"""Issue 20, browser clients: the CORS allowlist (``gateway.cors_origins``).

Against a real gateway process: preflights are answered before any key check, origins
match exactly, ``Vary: Origin`` is always there, errors, the chat fast path and event
streams carry the headers. The other configurations (empty list, credentials, ``*``)
run through the app exactly as ``make_server`` serves it. The browser's side is in
tests/test_cors_browser.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

from gateway.server import make_server
from layers.config import ConfigError, Settings, load_settings
from tests.reliability_support import AUTH, Gateway, gateway_data
from tests.support import free_port, write_toml

WEBUI = "http://127.0.0.1:3000"
OTHER = "https://chat.example.org"


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("cors")
    port = free_port()
    data = gateway_data(tmp, dict.fromkeys(("trigger", "review", "meta"), free_port()), port,
                        memory={"enabled": False}, pipeline={"stream_keepalive": 1.0})
    # As an admin writes it: a trailing slash and upper case are normalised away.
    data["gateway"]["cors_origins"] = [WEBUI + "/", "https://Chat.Example.org"]
    gateway = Gateway(write_toml(tmp / "gw.toml", data), port, tmp / "gw.log")
    gateway.start()
    yield gateway
    gateway.stop()


def preflight(url: str, origin: str, method: str = "POST",
              headers: str = "authorization, content-type") -> httpx.Response:
    return httpx.options(url, timeout=10, headers={
        "Origin": origin, "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": headers})


def vary(r: httpx.Response) -> set[str]:
    return {v.strip().lower() for v in r.headers.get("vary", "").split(",") if v.strip()}


def test_preflight_of_a_listed_origin_is_answered_before_any_key(gw: Gateway) -> None:
    for path in ("/v1/chat/completions", "/v1/models", "/v1/events/stream", "/v1/alertmanager"):
        r = preflight(f"{gw.url}{path}", WEBUI,
                      headers="authorization, content-type, x-stainless-os")
        assert r.status_code == 204, (path, r.text)
        h = r.headers
        assert h["access-control-allow-origin"] == WEBUI
        assert {"GET", "POST"} <= {m.strip() for m in h["access-control-allow-methods"].split(",")}
        allowed = {x.strip() for x in h["access-control-allow-headers"].split(",")}
        assert {"authorization", "content-type", "x-stainless-os"} <= allowed
        assert "access-control-allow-credentials" not in h
        assert int(h["access-control-max-age"]) > 0 and "origin" in vary(r)
    assert preflight(f"{gw.url}/v1/models", OTHER, "GET").headers[
        "access-control-allow-origin"] == OTHER


@pytest.mark.parametrize("origin", [
    "http://127.0.0.1:3001", "http://127.0.0.1:3000.evil.example", "http://localhost:3000",
    "https://127.0.0.1:3000", "http://127.0.0.1:3000/", "null", "HTTP://127.0.0.1:3000", "",
])
def test_only_the_exact_origin_passes(gw: Gateway, origin: str) -> None:
    r = preflight(f"{gw.url}/v1/chat/completions", origin)
    assert r.status_code == 403, r.text
    assert "access-control-allow-origin" not in r.headers
    err = r.json()["error"]
    assert (err["type"], err["code"], err["param"]) == ("permission_error",
                                                        "cors_origin_not_allowed", "Origin")
    assert "gateway.cors_origins" in err["message"]
    # An actual request is served as ever, but unlabelled: the browser keeps it from the page.
    r = httpx.get(f"{gw.url}/v1/models", headers={**AUTH, "Origin": origin}, timeout=10)
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    assert "origin" in vary(r)


def test_answers_to_a_listed_origin_carry_the_headers(gw: Gateway) -> None:
    h = {"Origin": WEBUI}
    r = httpx.get(f"{gw.url}/v1/models", headers={**AUTH, **h}, timeout=10)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == WEBUI
    assert "origin" in vary(r)
    assert "retry-after" in r.headers["access-control-expose-headers"].lower()
    # Errors too, so the page can show the message: a missing key …
    r = httpx.get(f"{gw.url}/v1/models", headers=h, timeout=10)
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == WEBUI
    # … and the chat fast path (served past FastAPI): an unknown model, a layer that is down.
    for model, status in (("gpt-4", 404), ("trigger", 503)):
        r = httpx.post(f"{gw.url}/v1/chat/completions", headers={**AUTH, **h}, timeout=30,
                       json={"model": model, "stream": True,
                             "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == status, r.text
        assert r.headers["access-control-allow-origin"] == WEBUI and "origin" in vary(r)
    # Without an Origin (curl, the SDK, same-origin pages): no CORS headers, Vary still.
    r = httpx.get(f"{gw.url}/v1/models", headers=AUTH, timeout=10)
    assert "access-control-allow-origin" not in r.headers and "origin" in vary(r)


def test_an_event_stream_carries_the_headers(gw: Gateway) -> None:
    with httpx.stream("GET", f"{gw.url}/v1/events/stream", timeout=10,
                      headers={**AUTH, "Origin": WEBUI}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["access-control-allow-origin"] == WEBUI and "origin" in vary(r)
        first = next(r.iter_bytes())  # a keep-alive comment: the stream is live
        assert first.startswith(b":")


# -- other configurations, as make_server serves them ----------------------------------


def served(tmp: Path, **gateway: Any) -> TestClient:
    settings = Settings.model_validate({
        "state_dir": str(tmp / "state"), "memory": {"enabled": False},
        "gateway": {"api_keys": ["test-key"], **gateway}})
    return TestClient(make_server(settings).config.app, raise_server_exceptions=False)


def test_by_default_there_is_no_cross_origin_access(tmp_path: Path) -> None:
    client = served(tmp_path)
    r = client.options("/v1/models", headers={"Origin": WEBUI,
                                              "Access-Control-Request-Method": "GET"})
    assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
    assert "gateway.cors_origins is empty" in r.json()["error"]["message"]
    r = client.get("/v1/models", headers={**AUTH, "Origin": WEBUI})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    # A plain OPTIONS (no preflight) is the app's, as before.
    assert client.options("/v1/models").status_code == 405


def test_a_cross_site_post_through_the_admins_browser_is_refused(tmp_path: Path) -> None:
    """A form or a "simple" fetch from another site needs no preflight: with no API key
    configured, loopback would serve it — so a state-changing request whose Origin is
    neither listed nor the gateway's own never reaches a route. The dashboard (same
    origin) and clients without an Origin (curl, SDKs, Open WebUI's backend) pass."""
    settings = Settings.model_validate({
        "state_dir": str(tmp_path / "state"), "memory": {"enabled": False}})
    assert settings.gateway.api_keys == []
    with TestClient(make_server(settings).config.app, raise_server_exceptions=False,
                    client=("127.0.0.1", 40000)) as client:  # a loopback peer: the browser
        event = {"events": [{"host": "web1", "source": "api", "message": "hello"}]}
        r = client.post("/v1/events", json=event, headers={"Origin": OTHER,
                                                             "Content-Type": "text/plain"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "cors_origin_not_allowed"
        own = f"http://{client.base_url.host}"
        assert client.post("/v1/events", json=event, headers={"Origin": own}).status_code == 200
        assert client.post("/v1/events", json=event).status_code == 200
        # Reads stay served (the browser keeps the answer from the page).
        assert client.get("/v1/models", headers={"Origin": OTHER}).status_code == 200


def test_credentials_only_when_configured_and_never_for_any_origin(tmp_path: Path) -> None:
    client = served(tmp_path, cors_origins=[WEBUI], cors_allow_credentials=True)
    pre = client.options("/v1/models", headers={"Origin": WEBUI,
                                                "Access-Control-Request-Method": "GET"})
    got = client.get("/v1/models", headers={**AUTH, "Origin": WEBUI})
    for r in (pre, got):
        assert r.headers["access-control-allow-origin"] == WEBUI
        assert r.headers["access-control-allow-credentials"] == "true"
    anyone = served(tmp_path, cors_origins=["*"])
    for origin in (WEBUI, "http://anything.example:8080"):
        r = anyone.get("/v1/models", headers={**AUTH, "Origin": origin})
        assert r.headers["access-control-allow-origin"] == "*"
        assert "access-control-allow-credentials" not in r.headers
    with pytest.raises(ConfigError) as refused:
        load_settings(None, gateway={"cors_origins": ["*"], "cors_allow_credentials": True})
    assert "cors_allow_credentials cannot be used with" in refused.value.lines[0]


@pytest.mark.parametrize(("origin", "why"), [
    ("http://127.0.0.1:3000/chat", "no path"),
    ("127.0.0.1:3000", "scheme://host[:port]"),
    ("https://*.example.org", "no wildcards"),
    ("null", "sandboxed frames"),
    ("ftp://files.example.org", "http or https"),
])
def test_an_origin_that_can_never_match_is_a_config_error(origin: str, why: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings(None, gateway={"cors_origins": [origin]})
    [line] = refused.value.lines
    assert line.startswith("gateway.cors_origins:") and why in line, line


def test_origins_are_normalised_as_browsers_send_them() -> None:
    s = Settings.model_validate({"gateway": {"cors_origins": [
        "HTTP://LocalHost:3000/", "https://chat.example.org:443", "http://[::1]:8080",
        "http://127.0.0.1:80", WEBUI]}})
    assert s.gateway.cors_origins == ["http://localhost:3000", "https://chat.example.org",
                                      "http://[::1]:8080", "http://127.0.0.1", WEBUI]
