"""The module's notification options, evaluated with nixpkgs' lib (as tests/test_nix.py):
channel URLs reach the gateway — and only the gateway — as systemd credentials, the
rendered configuration names their credential paths (no secret), and the gateway's real
config loader reads the channels from there."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from layers.config import NOTIFY_KINDS, Settings
from layers.notify.channels import load_channels
from tests.test_nix import (
    MODELS,
    REPO,
    evaluate,
    evaluate_ok,
    evaluation_error,
    needs_lib,
)

CHANNELS = (
    ' notify.channels = ['
    ' { name = "pager"; urlFile = "/run/secrets/ntfy-url"; minSeverity = "critical"; }'
    ' { name = "mail"; urlFile = "/run/secrets/smtp-url"; kinds = [ "approval.pending" ];'
    '   quietHours = "22:00-07:00"; quietAction = "drop"; maxPerHour = 5; }'
    ' ]; notify.dashboardUrl = "https://ops.example.org/ais/";'
)


@needs_lib
def test_channel_urls_are_credentials_of_the_gateway_only(tmp_path: Path) -> None:
    result = evaluate_ok(MODELS + CHANNELS)
    api = result["units"]["ai-sysadmin-api"]["serviceConfig"]["LoadCredential"]
    assert "notify-pager:/run/secrets/ntfy-url" in api
    assert "notify-mail:/run/secrets/smtp-url" in api
    daemon = result["units"]["ai-sysadmin-daemon"]["serviceConfig"].get("LoadCredential", [])
    assert not [c for c in daemon if c.startswith("notify-")]
    notify = result["settings"]["notify"]
    assert notify == {
        "dashboard_url": "https://ops.example.org/ais/",
        "channels": [
            {"name": "pager", "url_file": "/run/credentials/ai-sysadmin-api.service/notify-pager",
             "min_severity": "critical"},
            {"name": "mail", "url_file": "/run/credentials/ai-sysadmin-api.service/notify-mail",
             "kinds": ["approval.pending"], "quiet_hours": "22:00-07:00",
             "quiet_action": "drop", "max_per_hour": 5},
        ],
    }
    assert "/run/secrets" not in json.dumps(result["settings"])
    # The gateway reads what systemd put there (here: a stand-in credentials directory).
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "notify-pager").write_text("ntfys://ntfy.example.org/s3cret-topic\n")
    (creds / "notify-mail").write_text("mailtos://u:pw@smtp.example.org?to=a@example.org\n")
    rendered: dict[str, Any] = json.loads(json.dumps(result["settings"]).replace(
        "/run/credentials/ai-sysadmin-api.service", str(creds)))
    channels, problems = load_channels(Settings(**rendered).notify)
    assert problems == []
    assert [(c.name, c.target, c.min_severity, sorted(c.kinds)) for c in channels] == [
        ("pager", "ntfys://ntfy.example.org", "critical", sorted(NOTIFY_KINDS)),
        ("mail", "mailtos://smtp.example.org", "warning", ["approval.pending"]),
    ]


@needs_lib
def test_no_channels_render_no_notify_section() -> None:
    assert "notify" not in evaluate_ok(MODELS)["settings"]


@needs_lib
def test_bad_channels_are_refused_at_evaluation() -> None:
    twice = evaluate(MODELS + ' notify.channels = [ { name = "a"; urlFile = "/run/s/1"; }'
                     ' { name = "a"; urlFile = "/run/s/2"; } ];')
    assert any("names must be unique (a, a)" in m for m in twice["assertions"])
    err = evaluation_error(MODELS + ' notify.channels = [ { name = "a"; '
                           'urlFile = "/nix/store/abc-url"; } ];')
    assert "outside the Nix store" in err
    err = evaluation_error(MODELS + ' notify.channels = [ { name = "a"; '
                           'urlFile = "/run/secrets/u"; kinds = [ "incident.exploded" ]; } ];')
    assert "incident.exploded" in err


def test_module_kinds_are_the_python_kinds() -> None:
    text = (REPO / "module.nix").read_text()
    block = re.search(r"notifyKinds = \[(.*?)\];", text, re.S)
    assert block is not None
    assert tuple(re.findall(r'"([a-z.]+)"', block.group(1))) == NOTIFY_KINDS
