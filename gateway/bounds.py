"""Bounds on what clients' generations cost: output caps, stop strings, a chat gate.

Issue 15: the README's first request ran for two minutes and 3,842 tokens, because no
cap applied when the client sent none, and nothing ended the base model's turn. Every
chat and completion a client sends through the gateway now has an output cap (the
layer's ``max_tokens`` when it asks for none, at most its ``max_tokens_ceiling``), the
layer's stop strings, and a place among ``gateway.max_concurrent_chats`` generations so
that chats cannot take the CPU and slots that detection needs. The pipeline's own calls
go to the layers directly and are bounded by their own ``max_tokens``.
"""

from __future__ import annotations

import asyncio
import collections
import os
from typing import Any

from gateway.errors import OpenAIError
from layers.config import GatewayConfig, LayerConfig

# Output-length fields in llama-server's order of precedence: ``n_predict`` (its own
# name) over ``max_tokens`` over ``max_completion_tokens``.
_LENGTH_FIELDS = ("n_predict", "max_tokens", "max_completion_tokens")
_CONSTRAINED = ("json_object", "json_schema")


def cap_output(body: dict[str, Any], layer: LayerConfig) -> int:
    """Give the request its output cap; returns it.

    The length the layer would have used is read as llama-server reads it; none means the
    layer's output cap (``max_tokens``); more than ``max_tokens_ceiling`` (or ``n_predict: -1``,
    unlimited) is lowered to the ceiling — clamped, not refused: frontends send large
    defaults meant for big hosted models, and the answer's ``finish_reason: "length"``
    says where it was cut. The result is written to the field the client used
    (``max_completion_tokens`` stays itself for hosted endpoints that need it)."""
    asked: int | None = None
    field = "max_tokens"
    for name in _LENGTH_FIELDS:
        value = body.get(name)
        if value is not None:
            asked, field = value, name
            break
    if asked is None:
        cap = layer.output_cap()
    elif asked < 0:
        cap = layer.max_tokens_ceiling
    else:
        cap = min(asked, layer.max_tokens_ceiling)
    for name in _LENGTH_FIELDS:
        body.pop(name, None)
    body["max_tokens" if field == "n_predict" else field] = cap
    return cap


def constrained(body: dict[str, Any]) -> bool:
    """Output held to a grammar or JSON schema: it ends when the grammar does."""
    rf = body.get("response_format")
    if isinstance(rf, dict) and rf.get("type") in _CONSTRAINED:
        return True
    return body.get("grammar") is not None or body.get("json_schema") is not None


def add_stops(body: dict[str, Any], stops: list[str]) -> None:
    """Append the layer's stop strings to the client's own (a client's ``stop`` must not
    take away what ends the model's turn). Constrained output is left alone."""
    if not stops or constrained(body):
        return
    own = body.get("stop")
    mine = [own] if isinstance(own, str) else list(own or [])
    body["stop"] = mine + [s for s in stops if s not in mine]


def default_chat_limit() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(2, cores)


class ChatGate:
    """At most ``limit`` client generations at once; up to ``queue`` more wait, each for
    at most ``timeout`` seconds, in arrival order; beyond, ``429`` with ``Retry-After``.
    A slot that is freed goes straight to the longest waiter."""

    RETRY_AFTER = 5

    def __init__(self, limit: int, queue: int, timeout: float) -> None:
        self.limit = limit  # 0: no bound
        self.queue = queue
        self.timeout = timeout
        self.running = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @classmethod
    def from_config(cls, g: GatewayConfig) -> ChatGate:
        limit = default_chat_limit() if g.max_concurrent_chats is None else g.max_concurrent_chats
        return cls(limit, g.chat_queue, g.chat_queue_timeout)

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def _busy(self, why: str) -> OpenAIError:
        return OpenAIError(
            429,
            f"{why}: the gateway runs at most {self.limit} chat generations at once "
            f"(gateway.max_concurrent_chats); retry shortly",
            code="chats_saturated",
            headers={"Retry-After": str(self.RETRY_AFTER)},
        )

    async def acquire(self) -> None:
        if not self.limit:
            return
        if self.running < self.limit and not self._waiters:
            self.running += 1
            return
        if len(self._waiters) >= self.queue:
            raise self._busy(f"{self.running} chats running and {len(self._waiters)} waiting")
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(turn)
        try:
            async with asyncio.timeout(self.timeout):
                await asyncio.shield(turn)
        except TimeoutError:
            if not turn.done():
                raise self._busy(f"no chat slot came free within {self.timeout:.0f}s") from None
        except asyncio.CancelledError:
            if turn.done():  # handed a slot just as the client left: pass it on
                self.release()
            raise
        finally:
            if not turn.done():
                turn.cancel()
                self._waiters.remove(turn)

    def release(self) -> None:
        if not self.limit:
            return
        while self._waiters:
            turn = self._waiters.popleft()
            if not turn.done():
                turn.set_result(None)  # the slot changes hands; ``running`` stays
                return
        self.running -= 1
