"""The web dashboard in a real browser against a real stack.

Headless Chromium from Debian (``/usr/bin/chromium``; never a downloaded browser) driven
by Playwright, against ``ai-sysadmin run``: three real llama-server layers on the real
model, the gateway and the daemon in one process — the one way to run the stack where
the dashboard can also start, stop and restart layers (the session ``stack`` fixture runs
its layers in a separate process, as systemd would, so it cannot serve that part).
``systemctl`` is a throwaway stand-in on ``actions.search_path`` (no systemd here).

Screenshots of every view go to ``test-artifacts/dashboard/``.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from layers.actions import service
from layers.actions.service import ActionRuns
from layers.config import load_settings
from layers.store import open_store
from tests.actions_support import StandIns, make_standins
from tests.support import REPO, Proc, cli, free_port, layer_config, write_toml

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = REPO / "test-artifacts" / "dashboard"
API_KEY, ADMIN_KEY = "test-key", "admin-key"
USER = {"Authorization": f"Bearer {API_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
# Bounds for waits on model answers (a trigger verdict, a chat reply, a benchmark): far
# above what they take on an idle 2-core machine, for runs beside other suites.
SLOW = 420_000

playwright_sync = pytest.importorskip("playwright.sync_api")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(900),
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium)"),
]


@dataclass
class DashStack:
    url: str
    config: Path
    standins: StandIns
    proc: Proc


@pytest.fixture(scope="module")
def dash(tmp_path_factory: pytest.TempPathFactory, llama_server_bin: Path,
         model_path: Path) -> Iterator[DashStack]:
    tmp = tmp_path_factory.mktemp("dashboard")
    st = make_standins(tmp, {"web1.service": {"id": "web1.service", "names": ["web1.service"]}})
    gport = free_port()
    layers = {n: layer_config(free_port()) for n in ("trigger", "review", "meta")}
    layers["meta"]["embeddings"] = True
    cfg = write_toml(tmp / "config.toml", {
        "state_dir": str(tmp / "state"),
        "layers": layers,
        "gateway": {"port": gport, "api_keys": [API_KEY], "admin_key": ADMIN_KEY},
        "actions": {"autonomy": "suggest", "search_path": st.search_path, "unit_check": "never"},
        "collectors": {"journald": False, "metrics": False, "failed_units": False},
        "memory": {"enabled": False},
    })
    proc = cli(cfg, "run", log_path=tmp / "run.log").start()
    url = f"http://127.0.0.1:{gport}"
    try:
        proc.wait_http(f"{url}/health", timeout=300)
        deadline = time.monotonic() + 300
        while httpx.get(f"{url}/ready", headers=USER, timeout=10).status_code != 200:
            assert time.monotonic() < deadline, "layers not ready"
            time.sleep(0.5)
        yield DashStack(url, cfg, st, proc)
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def browser(dash: DashStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    profile = tmp_path_factory.mktemp("chromium-profile")
    with playwright_sync.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile), executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True,
            viewport={"width": 1360, "height": 900},
        )
        try:
            yield context
        finally:
            context.close()
    shutil.rmtree(profile, ignore_errors=True)


class Page:
    """A dashboard tab with its console errors, failed requests and every URL it asked for."""

    def __init__(self, context: Any, base: str) -> None:
        self.page = context.new_page()
        self.base = base
        self.errors: list[str] = []
        self.urls: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        self.page.on("request", lambda r: self.urls.append(r.url))

    def open(self, view: str = "layers") -> Any:
        p = self.page
        p.goto(f"{self.base}/#{view}")
        p.fill("#api-key", API_KEY)
        p.fill("#admin-key", ADMIN_KEY)
        p.click("#key-form button[type=submit]")
        return p

    def shot(self, name: str) -> None:
        self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)

    def close(self) -> None:
        assert not self.errors, f"console errors: {self.errors}"
        assert not any(API_KEY in u or ADMIN_KEY in u for u in self.urls), "a key went into a URL"
        self.page.close()


@pytest.fixture
def tab(browser: Any, dash: DashStack) -> Iterator[Page]:
    page = Page(browser, dash.url)
    yield page
    page.close()


def layer_rows(p: Any) -> dict[str, dict[str, str]]:
    rows: dict[str, dict[str, str]] = p.eval_on_selector_all(
        "#layers-table tbody tr",
        "rows => Object.fromEntries(rows.map(r => [r.dataset.layer, {health: r.dataset.health,"
        " state: r.dataset.state, slots: r.querySelector('.slots').textContent,"
        " tps: r.querySelector('.tps').textContent}]))",
    )
    return rows


def test_page_loads_layers_healthy_keys_stay_out_of_urls(tab: Page, dash: DashStack) -> None:
    r = httpx.get(f"{dash.url}/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert "script-src 'self'" in r.headers["content-security-policy"]
    p = tab.open("layers")
    for name in ("trigger", "review", "meta"):
        p.wait_for_selector(f"#layers-table tr[data-layer={name}][data-health=ready]", timeout=60_000)
    rows = layer_rows(p)
    assert set(rows) == {"trigger", "review", "meta"}
    for name, row in rows.items():
        busy, free = (int(x) for x in row["slots"].split("/"))
        assert busy + free == 2, (name, row)  # --parallel 2 in the test config
    # The key lives in this tab's session storage, not in the URL or local storage.
    assert p.evaluate("sessionStorage.getItem('ai-sysadmin.api-key')") == API_KEY
    assert p.evaluate("localStorage.length") == 0
    assert API_KEY not in p.url
    # Every form control has a label a screen reader can read.
    unlabeled = p.evaluate(
        "[...document.querySelectorAll('input, select, textarea')]"
        ".filter(e => e.type !== 'hidden' && !e.labels.length && !e.getAttribute('aria-label'))"
        ".map(e => e.id || e.name)"
    )
    assert unlabeled == []
    # Keyboard: the view tabs are reachable and activate with Enter.
    p.focus(".tabs a[data-view=layers]")
    p.keyboard.press("Tab")
    assert p.evaluate("document.activeElement.dataset.view") == "incidents"
    p.keyboard.press("Enter")
    p.wait_for_selector("#view-incidents:not([hidden])")
    p.focus(".tabs a[data-view=layers]")
    p.keyboard.press("Enter")
    p.wait_for_selector("#view-layers:not([hidden])")
    tab.shot("layers")


def test_injected_incident_appears_on_the_timeline_without_reload(tab: Page, dash: DashStack) -> None:
    p = tab.open("incidents")
    p.wait_for_selector("#stream-state.pill-ok", timeout=60_000)
    marker = p.evaluate("window.__marker = Math.random()")  # survives only without a reload
    unit = f"dash-{uuid.uuid4().hex[:8]}.service"
    event = {"id": f"dash-{uuid.uuid4().hex}", "host": "web-7", "unit": unit, "priority": 3,
             "source": "remote", "message": f"Failed to start {unit}: exit code 1."}
    r = httpx.post(f"{dash.url}/v1/events", json={"events": [event]}, headers=USER, timeout=30)
    assert r.status_code == 200 and r.json()["accepted"] == 1
    card = p.locator("#incident-list li", has_text=unit)
    card.wait_for(timeout=SLOW)
    assert p.evaluate("window.__marker") == marker
    assert "critical" in card.inner_text() or "warning" in card.inner_text()
    p.locator("#verdict-feed li", has_text=unit).wait_for(timeout=10_000)
    # Filters: another host hides it, its own host shows it.
    p.fill("#f-host", "no-such-host")
    assert card.count() == 0
    p.fill("#f-host", "web-7")
    card.wait_for()
    # The events behind it.
    card.locator("summary").click()
    card.locator(".timeline", has_text=f"Failed to start {unit}").wait_for(timeout=30_000)
    tab.shot("incidents")


async def _propose(config: Path, unit: str) -> str:
    settings = load_settings(config)
    store = await open_store(settings)
    try:
        [p] = await service.handle_proposals(
            None, [{"action": "restart_unit", "params": {"unit": unit},
                    "rationale": f"{unit} keeps failing after the last deploy"}],
            store, settings, runs=ActionRuns(),
        )
    finally:
        await store.close()
    assert p.status == "pending", p
    return p.id


def test_approving_a_pending_action_changes_state_and_audit(tab: Page, dash: DashStack) -> None:
    # Playwright's sync API keeps an event loop in this thread: the store gets its own.
    with ThreadPoolExecutor(1) as pool:
        action_id = pool.submit(asyncio.run, _propose(dash.config, "web1.service")).result()
    p = tab.open("approvals")
    card = p.locator(f"#pending-list li[data-id='{action_id}']")
    card.wait_for(timeout=30_000)
    assert "systemctl restart -- web1.service" in card.locator("pre.dry-run").inner_text()
    assert "keeps failing after the last deploy" in card.inner_text()
    tab.shot("approvals-pending")
    card.get_by_role("button", name="Approve restart_unit").click()
    p.locator(f"#actions-table tr[data-id='{action_id}'][data-status=succeeded]").wait_for(
        timeout=60_000
    )
    assert card.count() == 0
    audit = p.locator("#audit-table tbody tr", has_text=action_id)
    audit.first.wait_for()
    kinds = audit.evaluate_all("rows => rows.map(r => r.dataset.kind)")
    assert any("approv" in k for k in kinds), kinds
    assert ["systemctl", "restart", "--", "web1.service"] in [c[:4] for c in dash.standins.calls()]
    got = httpx.get(f"{dash.url}/v1/actions/{action_id}", headers=USER).json()
    assert got["status"] == "succeeded" and got["decided_by"] == "admin:dashboard"
    tab.shot("approvals-decided")


def test_chat_streams_a_reply_token_by_token(tab: Page) -> None:
    p = tab.open("chat")
    p.fill("#chat-input", "In one sentence: what should I check first when a service fails?")
    p.press("#chat-input", "Enter")
    body = ".msg-assistant .msg-body"
    p.wait_for_selector(f"{body}.streaming")
    # Watch the reply grow while it is still streaming: a buffered answer would appear
    # in one step. Then Stop, as a user would, which also bounds the test's time.
    lengths: list[int] = []
    deadline = time.monotonic() + SLOW / 1000
    while time.monotonic() < deadline:
        state = p.evaluate(
            f"(() => {{ const b = document.querySelector('{body}');"
            " return [b.textContent.length, b.classList.contains('streaming')]; })()"
        )
        if not state[1]:
            break
        if state[0] and (not lengths or state[0] > lengths[-1]):
            lengths.append(state[0])
        if len(lengths) >= 4:
            break
        time.sleep(0.05)
    assert len(lengths) >= 3, f"reply did not grow while streaming: {lengths}"
    if p.is_enabled("#chat-stop"):
        p.click("#chat-stop")
    p.wait_for_selector(f"{body}:not(.streaming)", timeout=30_000)
    assert p.inner_text(body).strip()
    assert "first token after" in p.inner_text("#chat-stats")
    assert p.is_enabled("#chat-send") and p.is_disabled("#chat-stop")
    tab.shot("chat")


def test_benchmark_fills_table_and_chart(tab: Page, dash: DashStack) -> None:
    p = tab.open("bench")
    p.fill("#bench-tokens", "16")
    p.click("#bench-run")
    p.wait_for_selector("#bench-chart:not([hidden])", state="attached", timeout=SLOW)
    rows = p.eval_on_selector_all(
        "#bench-table tbody tr",
        "rs => rs.map(r => [r.dataset.layer, r.querySelector('.ttft').textContent,"
        " r.querySelector('.tps').textContent])",
    )
    assert [r[0] for r in rows] == ["trigger", "review", "meta"]
    for _, ttft, tps in rows:
        assert float(ttft) > 0 and float(tps) > 0
    assert p.locator("#bench-svg svg rect").count() == 6
    tab.shot("benchmark")
    # Every layer has generated now: the layers view reports its measured speed.
    layers = httpx.get(f"{dash.url}/v1/layers", headers=USER, timeout=30).json()["data"]
    assert all(x["tokens_per_second"] and x["tokens_per_second"] > 0 for x in layers), layers


def test_restart_a_layer_from_the_dashboard(tab: Page, dash: DashStack) -> None:
    before = httpx.get(f"{dash.url}/v1/layers/trigger", headers=USER, timeout=30).json()
    assert before["control"] == "supervisor" and before["pid"]
    p = tab.open("layers")
    p.wait_for_selector("#layers-table tr[data-layer=trigger][data-health=ready]", timeout=60_000)
    p.get_by_role("button", name="Restart layer trigger").click()
    p.locator("#notice", has_text="layer trigger: restart done").wait_for(timeout=SLOW)
    p.wait_for_selector("#layers-table tr[data-layer=trigger][data-health=ready]", timeout=30_000)
    after = httpx.get(f"{dash.url}/v1/layers/trigger", headers=USER, timeout=30).json()
    assert after["pid"] != before["pid"] and after["health"] == "ready"
    # Stop keeps it down (no crash restart); start brings it back.
    r = httpx.post(f"{dash.url}/v1/layers/trigger/stop", headers=ADMIN, timeout=60)
    assert r.status_code == 200 and r.json()["state"] == "stopped"
    time.sleep(2.5)  # longer than the restart backoff: a crash-restart would show here
    assert httpx.get(f"{dash.url}/v1/layers/trigger", headers=USER).json()["state"] == "stopped"
    p.click("#layers-refresh")
    p.wait_for_selector("#layers-table tr[data-layer=trigger][data-state=stopped]")
    tab.shot("layers-stopped")
    r = httpx.post(f"{dash.url}/v1/layers/trigger/start", headers=ADMIN, timeout=300)
    assert r.status_code == 200 and r.json()["health"] == "ready"
    r = httpx.post(f"{dash.url}/v1/layers/trigger/restart", headers=USER)
    assert r.status_code == 403 and r.json()["error"]["code"] == "admin_key_required"


def test_layer_control_answers_409_when_layers_run_elsewhere(tmp_path: Path) -> None:
    """`ai-sysadmin gateway` (layers under systemd or `layers serve`) cannot control them."""
    port = free_port()
    cfg = write_toml(tmp_path / "gw.toml", {
        "state_dir": str(tmp_path / "state"),
        "layers": {n: {**layer_config(free_port()), "managed": False}
                   for n in ("trigger", "review", "meta")},
        "gateway": {"port": port, "api_keys": [API_KEY], "admin_key": ADMIN_KEY},
    })
    proc = cli(cfg, "gateway", log_path=tmp_path / "gw.log").start()
    try:
        url = f"http://127.0.0.1:{port}"
        proc.wait_http(f"{url}/health", timeout=60)
        r = httpx.post(f"{url}/v1/layers/meta/restart", headers=ADMIN)
        assert r.status_code == 409
        err = r.json()["error"]
        assert err["code"] == "layer_not_supervised" and "systemctl restart llama-meta" in err["message"]
        assert set(err) == {"message", "type", "param", "code"}
        listed = httpx.get(f"{url}/v1/layers", headers=USER, timeout=30).json()["data"]
        assert [(x["name"], x["control"], x["health"]) for x in listed] == [
            ("trigger", "external", "down"), ("review", "external", "down"), ("meta", "external", "down")]
        assert httpx.get(f"{url}/v1/layers", timeout=10).status_code == 401
        assert httpx.post(f"{url}/v1/layers/nope/restart", headers=ADMIN).status_code == 404
        r = httpx.post(f"{url}/v1/layers/meta/explode", headers=ADMIN)
        assert r.status_code == 400 and r.json()["error"]["param"] == "operation"
        assert httpx.get(f"{url}/static/../gateway/app.py").status_code == 404
        assert httpx.get(f"{url}/static/app.js").headers["content-type"].startswith("text/javascript")
        d = httpx.get(f"{url}/v1/dashboard", headers=USER).json()
        assert d["layer_control"] is False and d["admin_key_configured"] is True
        assert json.loads(httpx.get(f"{url}/v1/audit", headers=USER).text)["data"] == []
    finally:
        proc.stop()
