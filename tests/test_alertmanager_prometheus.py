"""Issue 20, the whole chain with real parts: Debian's Prometheus scrapes Debian's
node-exporter (its textfile collector serves a metric the test sets), a rule fires,
Debian's Alertmanager posts to the gateway's webhook with a bearer key from a
``credentials_file``, the trigger stage (the real default model on a llama-server)
classifies the alert and an incident opens; the metric clears, the rule resolves, and
Alertmanager's resolved notification resolves the incident. Alertmanager's repeat
notifications along the way store nothing twice.

Everything runs on loopback ports with 1-second intervals, storage in a temp dir,
Alertmanager's clustering off. Skipped, with the package to install, when the binaries
are missing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.notify_support import WebhookReceiver
from tests.reliability_support import AUTH, Gateway, gateway_data, metric, wait_until
from tests.support import Proc, free_port, llama_server, write_toml

PROMETHEUS = Path("/usr/bin/prometheus")
ALERTMANAGER = Path("/usr/bin/prometheus-alertmanager")
NODE_EXPORTER = Path("/usr/bin/prometheus-node-exporter")
INTAKE_KEY = "am-intake-Kp40SECRET"
# Bounds on the waits: the trigger model's verdict on two cores shared with other work.
VERDICT_WAIT = 400.0

missing = [str(p) for p in (PROMETHEUS, ALERTMANAGER, NODE_EXPORTER) if not p.exists()]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(900),
    pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)} (apt-get install "
                       "prometheus prometheus-alertmanager prometheus-node-exporter; "
                       "scripts/bootstrap.sh test does it)"),
]

RULES = """\
groups:
  - name: ai-sysadmin-test
    rules:
      - alert: DemoUnitFailed
        expr: demo_unit_failed > 0
        labels:
          severity: critical
        annotations:
          summary: "{{ $labels.name }} failed on {{ $labels.instance }}"
"""


@dataclass
class Monitoring:
    textfile: Path
    alertmanager_url: str
    procs: list[Proc]

    def set_metric(self, value: int) -> None:
        """What node-exporter serves next scrape (written whole: never half a file)."""
        tmp = self.textfile.with_suffix(".tmp")
        tmp.write_text(f'demo_unit_failed{{name="web.service"}} {value}\n')
        os.replace(tmp, self.textfile)

    def notifications(self) -> float:
        text = httpx.get(f"{self.alertmanager_url}/metrics", timeout=5).text
        return metric(text, "alertmanager_notifications_total", integration="webhook") or 0.0


@pytest.fixture(scope="module")
def trigger_layer(tmp_path_factory: pytest.TempPathFactory, llama_server_bin: Path,
                  model_path: Path) -> Iterator[int]:
    port = free_port()
    log = tmp_path_factory.mktemp("am-layer") / "layer.log"
    proc = llama_server(llama_server_bin, model_path, port, log).start()
    proc.wait_http(f"http://127.0.0.1:{port}/health", timeout=180)
    yield port
    proc.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def hook() -> Iterator[WebhookReceiver]:
    """Where the admin's notifications go: a JSON webhook on loopback (apprise json://)."""
    rx = WebhookReceiver(free_port()).start()
    yield rx
    rx.stop()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, trigger_layer: int,
            hook: WebhookReceiver) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("am-gateway")
    port = free_port()
    data = gateway_data(
        tmp, dict.fromkeys(("trigger", "review", "meta"), trigger_layer), port,
        memory={"enabled": False},
        alertmanager={"api_keys": [INTAKE_KEY]},
        notify={"channels": [{"name": "hook", "url": f"json://127.0.0.1:{hook.port}/in",
                              "kinds": ["incident.opened", "incident.resolved"]}],
                "poll_interval": 0.2},
        # One try per verdict: the alert rule's critical floor makes the incident whatever
        # the model answers; a retry of a refused answer would only double the wait.
        pipeline={"poll_interval": 0.2, "layer_retries": 0},
    )
    gw = Gateway(write_toml(tmp / "gw.toml", data), port, tmp / "gw.log")
    gw.start()
    yield gw
    gw.stop()


def _yaml(value: Any) -> str:
    return json.dumps(value)  # JSON is YAML: no YAML library needed to write configs


@pytest.fixture(scope="module")
def monitoring(tmp_path_factory: pytest.TempPathFactory, gateway: Gateway) -> Iterator[Monitoring]:
    tmp = tmp_path_factory.mktemp("monitoring")
    (tmp / "textfile").mkdir()
    key = tmp / "ai-sysadmin-key"
    key.write_text(INTAKE_KEY + "\n")
    key.chmod(0o600)
    ne_port, prom_port, am_port = free_port(), free_port(), free_port()
    (tmp / "rules.yml").write_text(RULES)
    (tmp / "prometheus.yml").write_text(_yaml({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(tmp / "rules.yml")],
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{am_port}"]}]}]},
        "scrape_configs": [{"job_name": "node", "static_configs": [
            {"targets": [f"127.0.0.1:{ne_port}"], "labels": {"instance": "web1:9100"}}]}],
    }))
    (tmp / "alertmanager.yml").write_text(_yaml({
        "global": {"resolve_timeout": "5s"},
        "route": {"receiver": "ai-sysadmin", "group_by": ["alertname", "instance"],
                  "group_wait": "1s", "group_interval": "1s", "repeat_interval": "2s"},
        "receivers": [{"name": "ai-sysadmin", "webhook_configs": [{
            "url": f"{gateway.url}/v1/alertmanager", "send_resolved": True, "max_alerts": 100,
            "http_config": {"authorization": {"type": "Bearer",
                                              "credentials_file": str(key)}},
        }]}],
    }))
    mon = Monitoring(tmp / "textfile" / "demo.prom", f"http://127.0.0.1:{am_port}", [])
    mon.set_metric(0)
    specs = [
        ([str(NODE_EXPORTER), f"--web.listen-address=127.0.0.1:{ne_port}",
          "--collector.disable-defaults", "--collector.textfile",
          f"--collector.textfile.directory={tmp / 'textfile'}"],
         f"http://127.0.0.1:{ne_port}/metrics"),
        ([str(ALERTMANAGER), f"--config.file={tmp / 'alertmanager.yml'}",
          f"--storage.path={tmp / 'am-data'}", f"--web.listen-address=127.0.0.1:{am_port}",
          "--cluster.listen-address="],
         f"{mon.alertmanager_url}/-/ready"),
        ([str(PROMETHEUS), f"--config.file={tmp / 'prometheus.yml'}",
          f"--storage.tsdb.path={tmp / 'prom-data'}", f"--web.listen-address=127.0.0.1:{prom_port}",
          "--rules.alert.resend-delay=1s"],
         f"http://127.0.0.1:{prom_port}/-/ready"),
    ]
    try:
        for argv, ready in specs:
            proc = Proc(argv, log_path=tmp / f"{Path(argv[0]).name}.log").start()
            mon.procs.append(proc)
            proc.wait_http(ready, timeout=60)
        yield mon
    finally:
        for proc in reversed(mon.procs):
            proc.stop()
        shutil.rmtree(tmp / "prom-data", ignore_errors=True)


def alert_incidents(gw: Gateway) -> list[dict[str, Any]]:
    r = httpx.get(f"{gw.url}/v1/incidents", headers=AUTH, timeout=10)
    assert r.status_code == 200, r.text
    return [i for i in r.json()["data"] if i["rule"] == "alert_critical"]


def incident(gw: Gateway, incident_id: str) -> dict[str, Any]:
    r = httpx.get(f"{gw.url}/v1/incidents/{incident_id}", headers=AUTH, timeout=10)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def test_a_prometheus_alert_opens_an_incident_and_its_resolution_resolves_it(
    gateway: Gateway, monitoring: Monitoring, hook: WebhookReceiver
) -> None:
    assert alert_incidents(gateway) == []
    monitoring.set_metric(1)
    assert wait_until(lambda: bool(alert_incidents(gateway)), VERDICT_WAIT, 0.5), (
        f"no incident; gateway log:\n{gateway.log()[-3000:]}")
    [opened] = alert_incidents(gateway)
    assert (opened["host"], opened["unit"], opened["severity"]) == ("web1", "web.service",
                                                                     "critical")
    assert opened["status"] == "open" and opened["category"] == "alert"
    assert opened["title"] == ("alert: alert_critical — web.service: DemoUnitFailed: "
                               "web.service failed on web1:9100")
    # Alertmanager repeats the firing notification every 2 s (repeat_interval): each is a
    # duplicate of the stored event, so still one event, one verdict, one incident.
    sent = monitoring.notifications()
    assert wait_until(lambda: monitoring.notifications() >= sent + 2, 30, 0.5)
    detail = incident(gateway, opened["id"])
    events = [t for t in detail["timeline"] if t["kind"] == "event"]
    assert len(events) == 1 and detail["verdict_count"] == 1
    assert events[0]["detail"]["id"].startswith("alertmanager:")
    assert len(alert_incidents(gateway)) == 1
    # The admin hears of it where they look: one notification, however often it repeats.
    assert wait_until(lambda: f"incident.opened:{opened['id']}" in hook.refs(), 30, 0.3)

    monitoring.set_metric(0)  # the unit recovers: the rule stops firing
    assert wait_until(lambda: incident(gateway, opened["id"])["status"] == "resolved", 60, 0.3), (
        f"not resolved; gateway log:\n{gateway.log()[-3000:]}")
    done = incident(gateway, opened["id"])
    assert {"status": "resolved", "by": "alertmanager"} in [t["detail"] for t in done["timeline"]]
    [note] = [t["detail"] for t in done["timeline"] if t["kind"] == "note"]
    assert note["alertname"] == "DemoUnitFailed" and note["ends_at"]
    assert len(alert_incidents(gateway)) == 1  # the resolved notice opened nothing new
    def resolved_notice() -> bool:
        return any("Incident resolved" in str(r.body.get("title")) and
                   opened["id"] in str(r.body.get("message")) for r in hook.received)

    assert wait_until(resolved_notice, 30, 0.3), [r.body.get("title") for r in hook.received]
    assert hook.refs().count(f"incident.opened:{opened['id']}") == 1
