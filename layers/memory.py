"""Memory: resolved incidents with their diagnosis and outcome, in ChromaDB, recalled
for the meta layer and for the ``ai-sysadmin`` chat.

Embedded ``PersistentClient`` under ``<state_dir>/memory`` by default, a Chroma server
when ``memory.chroma_url`` is set. Embeddings come from a layer's llama.cpp
``/v1/embeddings`` (``LayerPool.embeddings``) through the collection's embedding
function — never Chroma's default model, which would be a hub download.

Chroma's client is synchronous, so every call runs in a worker thread; the embedding
function hops back onto the event loop to call the layer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from layers.config import Settings
from layers.errors import Unavailable
from layers.events import IncidentDetail

log = logging.getLogger("ai_sysadmin.memory")

Embed = Callable[[list[str]], Coroutine[Any, Any, list[list[float]]]]


class MemoryUnavailable(Unavailable):
    """Memory cannot be used; one readable line."""


def _embedding_function(embed: Embed, loop: asyncio.AbstractEventLoop) -> Any:
    from chromadb.api.types import Documents, EmbeddingFunction, Embeddings

    class LayerEmbeddingFunction(EmbeddingFunction[Documents]):
        """Embeds through the configured layer's ``/v1/embeddings`` endpoint."""

        def __init__(self) -> None:
            pass

        def __call__(self, input: Documents) -> Embeddings:  # noqa: A002 - Chroma's name
            future: Future[list[list[float]]] = asyncio.run_coroutine_threadsafe(
                embed(list(input)), loop
            )
            import numpy as np

            return [np.asarray(v, dtype=np.float32) for v in future.result(timeout=120)]

        @staticmethod
        def name() -> str:
            return "ai-sysadmin-layer"

        def get_config(self) -> dict[str, Any]:
            return {}

        @staticmethod
        def build_from_config(config: dict[str, Any]) -> LayerEmbeddingFunction:
            raise NotImplementedError("built by ai-sysadmin at runtime")

    return LayerEmbeddingFunction()


def incident_document(inc: IncidentDetail) -> str:
    """The text remembered for an incident: what happened, what was concluded, outcome."""
    parts = [f"{inc.title} (host {inc.host}, unit {inc.unit or '-'}, {inc.severity})"]
    if inc.review is not None:
        parts.append(f"review: {inc.review.status}: {inc.review.summary}")
    if inc.decision is not None:
        parts.append(f"diagnosis: {inc.decision.diagnosis}")
        for proposed in inc.decision.proposals:
            parts.append(f"proposed {proposed.action} {proposed.params}")
    for p in inc.proposals:
        if p.status in ("succeeded", "failed", "refused", "rejected"):
            parts.append(f"outcome: {p.action} {p.status}")
    return "\n".join(parts)[:4000]


class Memory:
    def __init__(self, settings: Settings, embed: Embed) -> None:
        self.settings = settings.memory
        self.path = settings.state_dir / "memory"
        self.embed = embed
        self._collection: Any = None

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        self._collection = await asyncio.to_thread(self._open_sync, loop)

    def _open_sync(self, loop: asyncio.AbstractEventLoop) -> Any:
        import chromadb
        from chromadb.config import Settings as ChromaSettings

        chroma_settings = ChromaSettings(anonymized_telemetry=False)
        try:
            if self.settings.chroma_url:
                u = urlparse(self.settings.chroma_url)
                client = chromadb.HttpClient(
                    host=u.hostname or "127.0.0.1",
                    port=u.port or (443 if u.scheme == "https" else 8000),
                    ssl=u.scheme == "https",
                    settings=chroma_settings,
                )
            else:
                Path(self.path).mkdir(parents=True, exist_ok=True)
                client = chromadb.PersistentClient(path=str(self.path), settings=chroma_settings)
            return client.get_or_create_collection(
                self.settings.collection,
                embedding_function=_embedding_function(self.embed, loop),
                metadata={"hnsw:space": "cosine"},
            )
        except Exception as exc:
            raise MemoryUnavailable(f"memory: cannot open ChromaDB: {exc}") from exc

    async def remember(self, inc: IncidentDetail) -> None:
        """Store (or update) a resolved incident; idempotent by incident id."""
        doc = incident_document(inc)
        meta = {"host": inc.host, "unit": inc.unit or "", "severity": inc.severity,
                "status": inc.status, "opened_at": inc.opened_at}
        await asyncio.to_thread(
            self._collection.upsert, ids=[inc.id], documents=[doc], metadatas=[meta]
        )

    async def recall(self, text: str, n: int = 3) -> list[str]:
        """The documents of the ``n`` most similar remembered incidents."""
        count = await asyncio.to_thread(self._collection.count)
        if count == 0:
            return []
        res = await asyncio.to_thread(
            self._collection.query, query_texts=[text], n_results=min(n, count)
        )
        docs = res.get("documents") or [[]]
        return [d for d in docs[0] if d]

    async def count(self) -> int:
        c: int = await asyncio.to_thread(self._collection.count)
        return c
