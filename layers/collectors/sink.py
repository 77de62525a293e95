"""Where collected events go. A sink returns only once the events are stored, so a
collector may advance its cursor after ``send`` returns; it never drops a batch."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

import httpx

from layers.events import Event
from layers.gateway_client import AsyncGateway, Backoff
from layers.store import Store

log = logging.getLogger("ai_sysadmin.collectors")


class EventSink(Protocol):
    async def send(self, events: Sequence[Event]) -> None: ...


class StoreSink:
    """Write straight into the shared store (the daemon on the gateway's machine)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def send(self, events: Sequence[Event]) -> None:
        if events:
            await self.store.events.add(events)


class GatewaySink:
    """``POST /v1/events`` to the gateway, retrying (with backoff) until it answers 2xx
    (layers/gateway_client.py). Event ids make a retried batch idempotent."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        *,
        client: httpx.AsyncClient | None = None,
        max_batch: int = 500,
        retry_wait: float = 1.0,
        retry_wait_max: float = 30.0,
    ) -> None:
        self.gateway = AsyncGateway(base_url, api_key, timeout=30.0, client=client)
        self.max_batch = max_batch
        self.retry_wait = retry_wait
        self.retry_wait_max = retry_wait_max

    async def send(self, events: Sequence[Event]) -> None:
        for i in range(0, len(events), self.max_batch):
            await self._send_batch(events[i : i + self.max_batch])

    async def _send_batch(self, events: Sequence[Event]) -> None:
        body = {"events": [e.model_dump(mode="json") for e in events]}
        await self.gateway.post_retrying("/v1/events", body,
                                         Backoff(self.retry_wait, self.retry_wait_max),
                                         what=f"{len(events)} events", logger=log)

    async def aclose(self) -> None:
        await self.gateway.aclose()
