"""Issue 9, nobody let in: every route of the app (enumerated from ``app.routes``, so a new
route without auth fails here) refuses missing and wrong keys; admin routes refuse user
keys; keys are compared in constant time; keys never reach the logs; without a key the
gateway serves and binds loopback only."""

from __future__ import annotations

import ast
import inspect
import re
import textwrap
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute
from starlette.routing import Route
from starlette.testclient import TestClient

from gateway import auth
from gateway.app import create_app
from gateway.fastpath import ROUTES, FastPaths
from layers.config import Settings
from tests.reliability_support import AUTH, GatewayFactory
from tests.support import REPO, free_port, run_cli, write_toml

USER_KEY = "sk-user-Zq81ticketSECRET"
ADMIN_KEY = "sk-admin-Wm27ticketSECRET"
WRONG_KEY = "sk-wrong-Pp55ticketSECRET"

# Public by design, nothing else: liveness, and the dashboard's static page, its assets
# and the "must I ask for a key?" probe (they hold no data; every API call the page
# makes carries the key). The model list is public only when configured so.
PUBLIC = {"/health", "/", "/static/{name}", "/dashboard/session"}
MODEL_LIST = {"/v1/models", "/models", "/v1/models/{model_id}"}
# Routes that change what the sysadmin does: approvals, resolving, layer control.
ADMIN = re.compile(r"/(approve|reject|resolve)$|^/v1/layers/[^/]+/[^/]+$")


def settings(tmp: Path, **gateway: object) -> Settings:
    return Settings.model_validate({
        "state_dir": str(tmp / "state"),
        "gateway": {"api_keys": [USER_KEY], "admin_key": ADMIN_KEY, **gateway},
    })


def routes(app: object) -> list[tuple[str, str]]:
    """(method, path) of every HTTP route, through included routers (FastAPI ≥ 0.16x
    keeps them as lazily included router objects in ``app.routes``)."""
    out: list[tuple[str, str]] = []

    def walk(items: list[Any], prefix: str) -> None:
        for r in items:
            inner = getattr(r, "original_router", None)
            if inner is not None:
                ctx = getattr(r, "include_context", None)
                walk(list(inner.routes), prefix + (getattr(ctx, "prefix", "") or ""))
            elif isinstance(r, APIRoute | Route):
                out.extend((m, prefix + r.path) for m in sorted(r.methods or ()) if m != "HEAD")

    walk(list(app.routes), "")  # type: ignore[attr-defined]
    return out


def concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x1", path)


@pytest.mark.parametrize("public_models", [False, True])
def test_every_route_refuses_missing_and_wrong_keys(tmp_path: Path, public_models: bool) -> None:
    app = create_app(settings(tmp_path, public_models=public_models))
    found = routes(app)
    assert len(found) >= 20, found  # the enumeration sees the whole API
    # No lifespan: a route that reaches its handler without auth fails (or answers) here,
    # an authenticated one is refused before any store or layer is touched. The app as
    # served: the FastAPI routes behind the fast path.
    client = TestClient(FastPaths(app), raise_server_exceptions=False)
    open_routes = PUBLIC | (MODEL_LIST if public_models else set())
    checked = 0
    for method, path in found:
        url = concrete(path)
        for headers in ({}, {"Authorization": f"Bearer {WRONG_KEY}"},
                        {"Authorization": WRONG_KEY}, {"Authorization": "Basic dXNlcjpwYXNz"}):
            r = client.request(method, url, headers=headers, json={})
            if path in open_routes:
                assert r.status_code != 401, (method, path)
                continue
            assert r.status_code == 401, (method, path, headers, r.status_code, r.text[:200])
            err = r.json()["error"]
            assert err["type"] == "authentication_error" and err["code"] in (
                "missing_api_key", "invalid_api_key")
            checked += 1
        if ADMIN.search(path):
            r = client.request(method, url, headers={"Authorization": f"Bearer {USER_KEY}"},
                               json={})
            assert r.status_code == 403, (method, path, r.text[:200])
            assert r.json()["error"]["code"] == "admin_key_required"
    assert checked >= 60
    # The admin routes the issue names exist and are recognised as such.
    admin_paths = {p for _, p in found if ADMIN.search(p)}
    assert {"/v1/actions/{action_id}/approve", "/v1/actions/{action_id}/reject",
            "/v1/layers/{name}/{operation}"} <= admin_paths


def _find_route(inner: list[Any], method: str, path: str) -> APIRoute | None:
    for r in inner:
        sub = getattr(r, "original_router", None)
        if sub is not None and (found := _find_route(list(sub.routes), method, path)):
            return found
        if isinstance(r, APIRoute) and r.path == path and method in r.methods:
            return r
    return None


def test_fast_path_routes_are_the_fastapi_routes_with_the_same_key_check(tmp_path: Path) -> None:
    """The routes served past FastAPI run the handler and the dependency FastAPI's own
    route declares, so the fast path can never be a way around a key."""
    app = create_app(settings(tmp_path))
    assert ROUTES
    for (method, path), (guard, handler) in ROUTES.items():
        route = _find_route(list(app.routes), method, path)
        assert route is not None, (method, path)
        assert route.endpoint is handler
        assert [d.call for d in route.dependant.dependencies] == [guard]


def test_openapi_schema_and_docs_need_a_key(tmp_path: Path) -> None:
    client = TestClient(create_app(settings(tmp_path)), raise_server_exceptions=False)
    assert client.get("/openapi.json").status_code == 401
    assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404
    schema = client.get("/openapi.json", headers={"Authorization": f"Bearer {USER_KEY}"})
    assert schema.status_code == 200 and "/v1/chat/completions" in schema.json()["paths"]


def test_key_comparison_is_constant_time() -> None:
    """Read, don't time: every comparison of a presented key goes through
    hmac.compare_digest, and nothing in auth.py compares it with == / != / in."""
    src = textwrap.dedent(inspect.getsource(auth.KeyRing))
    assert src.count("hmac.compare_digest(presented") == 3  # each user key, admin twice
    tree = ast.parse(Path(auth.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and not all(
            isinstance(op, ast.Is | ast.IsNot) for op in node.ops  # `is None` leaks nothing
        ):
            names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
            attrs = {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)}
            assert "presented" not in names and not attrs & {"keys", "admin"}, ast.unparse(node)
    # And it decides right, including keys of other lengths and prefixes.
    ring = auth.KeyRing(Settings.model_validate(
        {"gateway": {"api_keys": [USER_KEY], "admin_key": ADMIN_KEY}}))
    assert ring.is_key(USER_KEY.encode()) and ring.is_key(ADMIN_KEY.encode())
    for bad in (USER_KEY[:-1], USER_KEY + "x", "", USER_KEY.upper(), WRONG_KEY):
        assert not ring.is_key(bad.encode())
    assert not ring.is_admin(USER_KEY.encode()) and ring.is_admin(ADMIN_KEY.encode())


def test_no_key_serves_loopback_only(tmp_path: Path) -> None:
    app = create_app(Settings.model_validate({"state_dir": str(tmp_path / "s")}))
    # TestClient's peer is "testclient", not a loopback address.
    r = TestClient(app, raise_server_exceptions=False).get("/v1/models")
    assert r.status_code == 403 and r.json()["error"]["code"] == "loopback_only"
    r = TestClient(app, client=("127.0.0.1", 5555), raise_server_exceptions=False).get("/v1/models")
    assert r.status_code == 200
    chat = {"model": "trigger", "messages": [{"role": "user", "content": "hi"}]}
    r = TestClient(FastPaths(app), raise_server_exceptions=False).post("/v1/chat/completions",
                                                                       json=chat)
    assert r.status_code == 403 and r.json()["error"]["code"] == "loopback_only"


def test_no_key_refuses_to_bind_beyond_loopback(tmp_path: Path) -> None:
    for host in ("0.0.0.0", "::"):
        cfg = write_toml(tmp_path / "open.toml", {
            "state_dir": str(tmp_path / "state"),
            "gateway": {"host": host, "port": free_port()},
        })
        done = run_cli("--config", str(cfg), "gateway", timeout=60)
        assert done.returncode != 0
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert lines[-1].startswith("ai-sysadmin: gateway.host"), done.stderr[-500:]
        assert "API key" in lines[-1]


@pytest.mark.parametrize("level", ["info", "debug"])
def test_keys_never_reach_the_log(tmp_path: Path, gateways: GatewayFactory, level: str) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"# keys\n{USER_KEY}\n")
    admin = tmp_path / "admin"
    admin.write_text(ADMIN_KEY + "\n")
    gw = gateways(1, gateway={"api_keys_file": str(keys), "admin_key_file": str(admin),
                              "log_level": level, "api_keys": []})
    with httpx.Client(timeout=10) as c:
        for key in (USER_KEY, ADMIN_KEY, WRONG_KEY, f"{WRONG_KEY} {USER_KEY}"):
            h = {"Authorization": f"Bearer {key}"}
            c.get(f"{gw.url}/v1/models", headers=h)
            c.get(f"{gw.url}/v1/incidents?x={key[:6]}", headers=h)
            c.post(f"{gw.url}/v1/chat/completions", headers=h,
                   json={"model": "meta", "messages": [{"role": "user", "content": "hi"}]})
            c.post(f"{gw.url}/v1/actions/act_x/approve", headers=h, json={})
            c.get(f"{gw.url}/v1/nope", headers=h)
        # Keys in places they do not belong still stay out of the log.
        c.get(f"{gw.url}/v1/models", headers={"X-Api-Key": USER_KEY, **AUTH})
    gw.stop()
    log = gw.log()
    assert "GET /v1/models" in log or level == "info"  # debug really logs requests
    for secret in (USER_KEY, ADMIN_KEY, WRONG_KEY, "ticketSECRET"):
        assert secret not in log, f"{secret} leaked into the {level} log"


def test_repo_has_no_key_logging_statements() -> None:
    """A cheap guard for new code: no log call formats an Authorization header."""
    offenders = []
    for path in (REPO / "gateway").rglob("*.py"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"log\.\w+\(.*(authorization|api_key|admin_key|presented)", line,
                         re.IGNORECASE):
                offenders.append(f"{path.name}:{n}: {line.strip()}")
    assert not offenders
