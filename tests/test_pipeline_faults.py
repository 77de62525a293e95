"""Layer output that is truncated or garbage never reads as healthy. A real llama-server
cannot be made to answer garbage on demand, so these tests use a fake upstream (an
OpenAI-shaped HTTP server in the test) and say so in their names."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI, Request

from layers.client import LayerClients
from layers.config import Settings
from layers.events import Event
from layers.pipeline.service import IncidentContext
from layers.pipeline.stages import IncidentWorker
from layers.pipeline.trigger import TriggerStage, VerdictBus
from layers.prefilter import Prefilter, load_rules
from layers.store import Store
from tests.support import free_port


@dataclass
class FakeUpstream:
    """Answers /v1/chat/completions with whatever ``content``/``finish_reason`` say."""

    content: str = "{}"
    finish_reason: str = "stop"
    port: int = field(default_factory=free_port)
    calls: int = 0
    temperatures: list[float] = field(default_factory=list)
    sampling: list[tuple[Any, Any]] = field(default_factory=list)

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/health")
        async def health() -> dict[str, str]:
            return {"status": "ok"}

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> dict[str, Any]:
            sent = await request.json()
            self.temperatures.append(sent.get("temperature"))
            self.sampling.append((sent.get("temperature"), sent.get("seed")))
            self.calls += 1
            return {"id": "x", "object": "chat.completion", "model": "fake",
                    "choices": [{"index": 0, "finish_reason": self.finish_reason,
                                 "message": {"role": "assistant", "content": self.content}}]}

        return app


@pytest.fixture
def fake() -> Iterator[FakeUpstream]:
    # Its own thread and event loop: independent of the loop the test runs on.
    up = FakeUpstream()
    server = uvicorn.Server(uvicorn.Config(up.app(), host="127.0.0.1", port=up.port,
                                           log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(500):
        if server.started:
            break
        time.sleep(0.01)
    yield up
    server.should_exit = True
    thread.join(10)


def settings_for(tmp: Path, port: int) -> Settings:
    layers = {n: {"port": port, "managed": False} for n in ("trigger", "review", "meta")}
    return Settings.model_validate({
        "state_dir": str(tmp / "state"), "layers": layers,
        "pipeline": {"layer_retries": 1, "escalate_severity": "warning"},
        "memory": {"enabled": False},
    })


async def classify(settings: Settings, store: Store, clients: LayerClients,
                   events: list[Event]) -> TriggerStage:
    stage = TriggerStage(settings, store, clients["trigger"],
                         Prefilter(load_rules()), VerdictBus())
    await store.events.add(events)
    while await stage.step():
        pass
    return stage


OOM = Event(message="Out of memory: Killed process 4242 (java) total-vm:100kB", host="h1")


async def test_every_retry_samples_differently_never_an_identical_resend_fake_upstream(
    tmp_path: Path, store: Store, fake: FakeUpstream
) -> None:
    """Three tries of a truncated batch (layer_retries 2): each with its own temperature
    or seed — two tries at 0.5 with no seed were identical work (the detection bench
    counted 4 of 84 requests so)."""
    fake.content, fake.finish_reason = '{"v": [', "length"
    settings = settings_for(tmp_path, fake.port)
    settings.pipeline.layer_retries = 2
    clients = LayerClients(settings)
    try:
        await classify(settings, store, clients, [OOM])
    finally:
        await clients.aclose()
    assert fake.calls >= 3
    assert len(set(fake.sampling)) == len(fake.sampling), fake.sampling


async def test_trigger_garbage_fake_upstream_keeps_rule_verdict_unreviewed(
    tmp_path: Path, store: Store, fake: FakeUpstream
) -> None:
    fake.content = "I think everything is fine!"
    settings = settings_for(tmp_path, fake.port)
    clients = LayerClients(settings)
    try:
        await classify(settings, store, clients, [OOM])
    finally:
        await clients.aclose()
    assert fake.calls == 2  # first try + one retry
    # The retry samples (at temperature 0 the same prompt gives the same answer): never an
    # identical resend of work that already failed.
    assert fake.temperatures == [0.0, 0.5]
    (v,) = await store.verdicts.after(0)
    # Never healthy: the rule's critical floor stands, flagged as not classified by a model.
    assert v.anomaly and v.severity == "critical" and v.unreviewed and v.rule == "oom_kill"
    assert v.incident_id is not None


async def test_review_truncated_json_fake_upstream_marks_incident_unreviewed(
    tmp_path: Path, store: Store, fake: FakeUpstream
) -> None:
    settings = settings_for(tmp_path, fake.port)
    clients = LayerClients(settings)
    try:
        fake.content = json.dumps({"v": [["ok", "memory", "java is fine"]]})
        await classify(settings, store, clients, [OOM])
        (v,) = await store.verdicts.after(0)
        # A model saying "fine" cannot dismiss the critical rule.
        assert v.anomaly and v.severity == "critical" and not v.unreviewed
        fake.content, fake.finish_reason = '{"status": "normal", "summary": "all g', "length"
        worker = IncidentWorker(settings, store, clients)
        assert await worker.step()
    finally:
        await clients.aclose()
    inc = await store.incidents.get(v.incident_id or "")
    assert inc is not None and inc.review is None
    assert any(t.kind == "unreviewed" and "truncated" in t.detail["error"] for t in inc.timeline)
    # Critical, at or above escalate_severity: diagnosed all the same, with no review.
    assert inc.status == "escalated" and inc.stage == "meta"


async def test_meta_garbage_fake_upstream_marks_incident_unreviewed(
    tmp_path: Path, store: Store, fake: FakeUpstream
) -> None:
    settings = settings_for(tmp_path, fake.port)
    clients = LayerClients(settings)
    try:
        fake.content = json.dumps({"v": [["critical", "memory", "oom"]]})
        await classify(settings, store, clients, [OOM])
        fake.content = json.dumps({"status": "degraded", "summary": "java was killed",
                                   "findings": ["oom"], "escalate": True,
                                   "reason": "java keeps dying"})
        worker = IncidentWorker(settings, store, clients)
        assert await worker.step()  # review → escalated
        (inc,) = await store.incidents.list()
        assert inc.status == "escalated" and inc.stage == "meta"
        fake.content = '{"diagnosis": 42, "proposals": "rm -rf /"}'
        assert await worker.step()
    finally:
        await clients.aclose()
    detail = await store.incidents.get(inc.id)
    assert detail is not None and detail.status == "unreviewed" and detail.decision is None
    assert detail.proposals == []


async def test_incident_context_lists_open_incidents_and_verdicts(
    tmp_path: Path, store: Store, fake: FakeUpstream
) -> None:
    settings = settings_for(tmp_path, fake.port)
    clients = LayerClients(settings)
    try:
        fake.content = json.dumps({"v": [["critical", "memory", "java OOM"]]})
        await classify(settings, store, clients, [OOM])
    finally:
        await clients.aclose()
    lines = await IncidentContext(store).snippets()
    assert any(line.startswith("incident inc_") and "[open, critical]" in line for line in lines)
    assert any("verdict" in line and "java OOM" in line for line in lines)
