"""Issue 20, the NixOS side of the Alertmanager webhook: ``services.ai-sysadmin.alertmanager``
gives the gateway its webhook key as a credential, the local ``alertmanager.service`` the
same key as a credential of its own, and (unless the admin configures Alertmanager) a
configuration routing every alert to the gateway, which Debian's ``amtool`` accepts.
Evaluated like tests/test_nix.py: nixpkgs' lib, stub NixOS options (nix/tests/stubs.nix).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from layers.config import load_settings
from tests.test_nix import EVAL, MODELS, NIX_INSTANTIATE, NIXPKGS_LIB, _toml, needs_lib

AMTOOL = shutil.which("amtool")
KEY = ' alertmanager.keyFile = "/run/secrets/am-key";'
LOCAL_AM = "services.prometheus.alertmanager.enable = true;"


def evaluate(body: str, extra: str = "") -> dict[str, Any]:
    """A scenario that may read ``config`` (tests/test_nix.py's gives it no ``config``)."""
    assert NIX_INSTANTIATE is not None and NIXPKGS_LIB is not None
    scenario = (f"{{ config, pkgs, lib, ... }}: {{ services.ai-sysadmin = {{ enable = true; "
                f"{MODELS} {body} }}; {extra} }}")
    proc = subprocess.run(
        [NIX_INSTANTIATE, "--store", "dummy://", "--eval", "--strict", "--json", str(EVAL),
         "--arg", "lib", f"import {json.dumps(str(NIXPKGS_LIB))}", "--arg", "scenario", scenario],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


@needs_lib
def test_off_by_default() -> None:
    result = evaluate("", LOCAL_AM)
    assert result["assertions"] == []
    assert result["alertmanager"]["configuration"] is None
    assert "alertmanager" not in result["units"]
    env = result["units"]["ai-sysadmin-api"]["environment"]
    assert "AI_SYSADMIN_ALERTMANAGER__API_KEYS_FILE" not in env


@needs_lib
def test_the_key_reaches_gateway_and_alertmanager_as_credentials(tmp_path: Path) -> None:
    result = evaluate(' gateway.apiKeysFile = "/run/secrets/api-keys"; alertmanager.enable = true;'
                      + KEY, LOCAL_AM)
    assert result["assertions"] == []
    api = result["units"]["ai-sysadmin-api"]
    assert sorted(api["serviceConfig"]["LoadCredential"]) == [
        "alertmanager-key:/run/secrets/am-key", "api-keys:/run/secrets/api-keys"]
    assert api["environment"]["AI_SYSADMIN_ALERTMANAGER__API_KEYS_FILE"] == "%d/alertmanager-key"
    # The daemon never posts alerts: it gets no webhook key.
    daemon = result["units"]["ai-sysadmin-daemon"]
    assert "alertmanager-key:/run/secrets/am-key" not in daemon["serviceConfig"]["LoadCredential"]
    assert "AI_SYSADMIN_ALERTMANAGER__API_KEYS_FILE" not in daemon["environment"]
    assert result["units"]["alertmanager"]["serviceConfig"]["LoadCredential"] == [
        "ai-sysadmin-key:/run/secrets/am-key"]
    conf = result["alertmanager"]["configuration"]
    assert conf["route"]["receiver"] == "ai-sysadmin"
    [receiver] = conf["receivers"]
    [hook] = receiver["webhook_configs"]
    assert hook["url"] == "http://127.0.0.1:8083/v1/alertmanager" and hook["send_resolved"]
    assert hook["max_alerts"] == 1000
    assert hook["http_config"]["authorization"] == {
        "type": "Bearer",
        "credentials_file": "/run/credentials/alertmanager.service/ai-sysadmin-key"}
    assert "/run/secrets" not in json.dumps(result["settings"])
    # What the gateway reads once systemd expands %d.
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "api-keys").write_text("user-key\n")
    (creds / "alertmanager-key").write_text("# the webhook's\nam-key-1\n")
    config = tmp_path / "config.toml"
    config.write_text(_toml(result["settings"]))
    saved = {k: os.environ.get(k) for k in api["environment"]}
    try:
        for k, v in api["environment"].items():
            os.environ[k] = v.replace("%d", str(creds))
        settings = load_settings(config)
    finally:
        for k, old in saved.items():
            if old is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = old
    assert settings.alertmanager.resolved_api_keys() == ["am-key-1"]


@needs_lib
def test_an_admins_own_configuration_wins_and_can_use_the_receiver() -> None:
    own = (LOCAL_AM + ' services.prometheus.alertmanager.configuration = { route.receiver = '
           '"team"; receivers = [ { name = "team"; } '
           "config.services.ai-sysadmin.alertmanager.receiver ]; };")
    result = evaluate(" gateway.port = 9000; alertmanager.enable = true;", own)
    conf = result["alertmanager"]["configuration"]
    assert conf["route"] == {"receiver": "team"}
    assert [r["name"] for r in conf["receivers"]] == ["team", "ai-sysadmin"]
    # Without a key: a loopback API without keys takes the local Alertmanager's posts.
    hook = conf["receivers"][1]["webhook_configs"][0]
    assert hook["url"] == "http://127.0.0.1:9000/v1/alertmanager" and "http_config" not in hook
    assert "alertmanager" not in result["units"]  # no credential to load


@needs_lib
def test_an_api_with_keys_needs_a_webhook_key() -> None:
    result = evaluate(' gateway.apiKeysFile = "/run/secrets/api-keys"; alertmanager.enable = true;')
    assert any("alertmanager.keyFile" in a for a in result["assertions"]), result["assertions"]


@needs_lib
@pytest.mark.skipif(AMTOOL is None, reason="needs amtool (apt-get install prometheus-alertmanager)")
def test_debians_alertmanager_accepts_the_configuration(tmp_path: Path) -> None:
    result = evaluate(" alertmanager.enable = true;" + KEY, LOCAL_AM)
    path = tmp_path / "alertmanager.yml"
    path.write_text(json.dumps(result["alertmanager"]["configuration"]))  # JSON is YAML
    assert AMTOOL is not None
    done = subprocess.run([AMTOOL, "check-config", str(path)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 receivers" in done.stdout
