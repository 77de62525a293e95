"""Memory on real parts: embedded ChromaDB, embeddings from the session stack's meta
layer (llama-server ``--embeddings``), never Chroma's default (downloaded) model."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from layers.client import LayerClients
from layers.config import Settings
from layers.events import Decision, IncidentDetail, ProposedAction, Review
from layers.memory import Memory, incident_document
from tests.conftest import Stack

pytestmark = pytest.mark.slow


def incident(i: str, title: str, unit: str | None) -> IncidentDetail:
    now = time.time()
    return IncidentDetail(
        id=i, key=f"h|{unit}", host="h", unit=unit, fingerprint=title.lower(), title=title,
        status="resolved", stage="remember", severity="critical", verdict_count=2,
        opened_at=now, updated_at=now,
        review=Review(status="critical", summary=title, findings=[], escalate=True, reason="r"),
        decision=Decision(diagnosis=f"diagnosis of {title}", rollback_plan="none", proposals=[
            ProposedAction(action="restart_unit", params={"unit": unit or "x"}, rationale="r")]),
        timeline=[], proposals=[],
    )


async def test_memory_remembers_and_recalls_with_layer_embeddings(
    stack: Stack, tmp_path: Path
) -> None:
    settings = Settings.model_validate({
        "state_dir": str(tmp_path / "state"),
        "layers": {n: {"port": p, "managed": False} for n, p in stack.ports.items()},
    })
    clients = LayerClients(settings)
    calls: list[int] = []

    async def embed(texts: list[str]) -> list[list[float]]:
        calls.append(len(texts))
        return await clients["meta"].embeddings(texts)

    try:
        mem = Memory(settings, embed)
        await mem.open()
        oom = incident("inc_a", "memory: java killed by the OOM killer", None)
        await mem.remember(oom)
        await mem.remember(incident("inc_b", "security: ssh brute force", "sshd.service"))
        await mem.remember(oom)  # idempotent by incident id
        assert await mem.count() == 2
        recalled = await mem.recall("java killed by the OOM killer", n=2)
        assert len(recalled) == 2 and incident_document(oom) in recalled
        assert calls  # the layer computed the embeddings
        # Persistent: a new client on the same directory sees the same memories.
        again = Memory(settings, embed)
        await again.open()
        assert await again.count() == 2
    finally:
        await clients.aclose()
