"""The exception tree of layers/errors.py and its two mappers (issue 18).

1. Every exception class defined in gateway/ and layers/ derives from AiSysadminError
   and is drawn in the tree of layers/errors.py's docstring (found by importing every
   module of both packages, so a new class cannot be forgotten).
2. HTTP: gateway/errors.py answers representative classes with OpenAI's error shape and
   the status the routes gave them before the mapping moved there, also through an app.
3. CLI: gateway.cli.main ends a failure of ours as ``ai-sysadmin: <message>`` on stderr
   and the class's exit code.
"""

from __future__ import annotations

import importlib
import inspect
import io
import json
import logging
import pkgutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

import gateway
import layers
import layers.errors
from gateway.cli import main, report
from gateway.cli.common import CliError
from gateway.errors import OpenAIError, install_error_handlers, openai_error, response_for
from layers.actions.service import ActionError
from layers.client import LayerError, LayerTimeout
from layers.config import ConfigError
from layers.errors import AiSysadminError, Refused, Unavailable, UserError
from layers.gateway_client import GatewayError
from layers.http import ConnectError
from layers.store.base import StoreError, StoreUnavailable
from layers.store.hosts import HostKeyError
from layers.supervisor import SupervisorError


def defined_exceptions() -> Iterator[type[BaseException]]:
    """Each exception class a module of gateway/ or layers/ defines. ``__main__`` modules
    run their command when imported; a private class (``_StaleConnection``) is a signal
    inside its module that never crosses into a caller."""
    for package in (gateway, layers):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if info.name.rsplit(".", 1)[-1] == "__main__":
                continue
            module = importlib.import_module(info.name)
            for name, obj in vars(module).items():
                if (inspect.isclass(obj) and issubclass(obj, BaseException)
                        and obj.__module__ == module.__name__ and not name.startswith("_")):
                    yield obj


def test_every_exception_class_derives_from_the_root() -> None:
    found = list(defined_exceptions())
    assert len(found) > 25  # the walk did reach the modules
    outside = sorted(f"{c.__module__}.{c.__qualname__}" for c in found
                     if not issubclass(c, AiSysadminError))
    assert outside == [], "derive these from layers/errors.py's tree: " + ", ".join(outside)


def test_the_tree_drawn_in_the_docstring_names_every_class() -> None:
    doc = layers.errors.__doc__ or ""
    transport = ("ConnectError", "ProtocolError", "TimeoutException", "ConnectTimeout",
                 "ReadTimeout")  # drawn as "its transport tree" under HTTPError
    missing = sorted(c.__name__ for c in defined_exceptions()
                     if c.__name__ not in doc and c.__name__ not in transport)
    assert missing == [], "draw these in layers/errors.py's docstring: " + ", ".join(missing)


def test_builtin_bases_that_callers_catch_are_kept() -> None:
    assert issubclass(HostKeyError, UserError) and issubclass(HostKeyError, ValueError)
    assert issubclass(ConfigError, UserError) and issubclass(CliError, UserError)
    assert issubclass(ConnectError, Unavailable) and issubclass(StoreUnavailable, Unavailable)
    assert issubclass(ActionError, Refused) and issubclass(SupervisorError, Refused)
    assert issubclass(OpenAIError, AiSysadminError)


# -- HTTP ------------------------------------------------------------------------------


def shape(error: OpenAIError) -> tuple[int, dict[str, object], dict[str, str]]:
    response = error.response()
    body = json.loads(bytes(response.body))
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return response.status_code, body["error"], dict(response.headers)


def test_store_errors_are_a_503_to_retry(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="ai_sysadmin.gateway"):
        status, err, headers = shape(openai_error(StoreUnavailable("store: disk is full")))
    assert status == 503 and headers["retry-after"] == "2"
    assert err == {"message": "the store is unavailable, retry later (store: disk is full)",
                   "type": "service_unavailable_error", "param": None,
                   "code": "store_unavailable"}
    assert "store unavailable: store: disk is full" in caplog.text
    assert "Traceback" not in caplog.text


def test_layer_errors_keep_the_layers_status_code_param_and_retry_after() -> None:
    busy = LayerError(429, "layer trigger is busy", code="layer_busy", retry_after=3.4,
                      upstream_body={"error": {"param": "messages"}})
    status, err, headers = shape(openai_error(busy))
    assert status == 429 and headers["retry-after"] == "3"
    assert err == {"message": "layer trigger is busy", "type": "rate_limit_error",
                   "param": "messages", "code": "layer_busy"}
    status, err, _ = shape(openai_error(LayerTimeout("layer review timed out", deadline=1.0,
                                                     alive=True, final=True)))
    assert status == 504 and err["code"] == "upstream_timeout"
    assert err["type"] == "timeout_error"


@pytest.mark.parametrize(("code", "status"), [
    ("not_found", 404), ("not_pending", 409), ("refused", 409), ("bad_approver", 400),
])
def test_action_errors_by_their_code(code: str, status: int) -> None:
    got, err, _ = shape(openai_error(ActionError(code, f"action x: {code}")))
    assert got == status
    assert err["code"] == f"action_{code}" and err["message"] == f"action x: {code}"


def test_a_refused_layer_control_is_a_409() -> None:
    status, err, _ = shape(openai_error(SupervisorError("layer meta: port 8013 is taken")))
    assert status == 409
    assert err == {"message": "layer meta: port 8013 is taken", "type": "conflict_error",
                   "param": None, "code": "layer_control_refused"}


@pytest.mark.parametrize("exc", [
    ConfigError(["config file /etc/secret.toml: not found"]),
    ConnectError("cannot connect to 10.0.0.7:8011"),
    GatewayError("http://10.0.0.7:8080/v1/events", status=502),
    RuntimeError("a bug"),
])
def test_others_are_a_500_whose_message_stays_in_the_log(
        exc: Exception, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="ai_sysadmin.gateway"):
        response = response_for(exc)
    assert response.status_code == 500
    err = json.loads(bytes(response.body))["error"]
    assert err == {"message": "internal error in the gateway", "type": "server_error",
                   "param": None, "code": "internal_error"}
    assert "unhandled error" in caplog.text and str(exc) in caplog.text


def test_an_openai_error_is_its_own_answer() -> None:
    own = OpenAIError(404, "no incident 'x'", param="incident_id", code="incident_not_found")
    assert openai_error(own) is own


def test_the_app_maps_errors_routes_raise_as_they_come() -> None:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/approve")
    async def approve() -> None:
        raise ActionError("not_pending", "action 7 is rejected, not pending")

    @app.get("/store")
    async def store() -> None:
        raise StoreError("store: not open")

    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.post("/approve")
        assert r.status_code == 409
        assert r.json() == {"error": {"message": "action 7 is rejected, not pending",
                                      "type": "conflict_error", "param": None,
                                      "code": "action_not_pending"}}
        r = client.get("/store")
        assert r.status_code == 503 and r.headers["retry-after"] == "2"
        assert r.json()["error"]["code"] == "store_unavailable"


# -- CLI -------------------------------------------------------------------------------


@pytest.mark.parametrize("exc", [
    CliError("hosts revoke: no active host 'web1'"),
    StoreUnavailable("store: database or disk is full"),
    GatewayError("http://127.0.0.1:8080", status=503),
    SupervisorError("layer trigger: died by SIGILL"),
])
def test_the_cli_prints_one_line_and_the_class_exit_code(exc: AiSysadminError) -> None:
    out = io.StringIO()
    assert report(exc, out) == exc.exit_code == 1
    assert out.getvalue() == f"ai-sysadmin: {exc}\n"


def test_a_config_error_is_one_line_per_problem() -> None:
    out = io.StringIO()
    assert report(ConfigError(["gateway.port: too large", "layers.meta: unknown"]), out) == 1
    assert out.getvalue() == ("ai-sysadmin: config: gateway.port: too large\n"
                              "ai-sysadmin: config: layers.meta: unknown\n")


def test_main_ends_a_failure_as_its_line(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.toml"
    assert main(["--config", str(missing), "config", "check"]) == 1
    captured = capsys.readouterr()
    assert captured.err == f"ai-sysadmin: config: config file {missing}: not found\n"
    assert captured.out == ""
