"""Labelled examples: journal lines whose verdict is known, and the one nearest to a new
candidate, by embedding.

The packaged rules cast a wide net at the ``info`` floor (``error_words``,
``priority_error``): it catches failures that no specific rule names, and with them
harmless lines in an error's words (a firewall's ``refused connection`` flood, ACPI
firmware complaints). Only the trigger layer may dismiss such a line, and a small model
does not (docs/quality.md). The examples do: a candidate whose rule is at the ``info``
floor and whose nearest labelled example is harmless gets a "not an anomaly" verdict
that names the example, and never reaches the trigger layer. Lines a warning or critical
rule matched are never dismissed, so the examples can make the product quieter, never
louder.

Measured on the quality corpus with the packaged model's embeddings (docs/quality.md,
"Labelled examples"): of the 58 false alarms the rules let through, 34 dismissed; of the
202 failures they catch, 4 lost (F1 0.86 → 0.92).

Embeddings come from ``gateway.embeddings_layer`` (the layer that serves
``/v1/embeddings``). When it cannot embed (down, or started without embeddings), the
stage goes on without the examples: every candidate goes to the trigger layer, as it
would with ``pipeline.examples = false``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from layers import tomlfile
from layers.client import LayerClients, LayerError
from layers.config import Settings
from layers.errors import UserError
from layers.memory import Embed

log = logging.getLogger("ai_sysadmin.pipeline.examples")

# After a failed embeddings call, how long the stage goes without the examples before
# it asks again (a layer that is down is not asked for every batch).
RETRY_AFTER = 60.0
# Longest text embedded: a log line is clipped like it is in the trigger prompt.
MAX_CHARS = 240
# The embeddings layer is the meta layer by default: when its slots are busy deciding,
# the trigger stage does not wait longer than this for it (the batch goes to the trigger
# layer as it would without examples).
EMBED_SECONDS = 15.0
# Nearest examples remembered by event fingerprint: a flood of one message is embedded
# once, not once per line.
CACHE_SIZE = 4096


class ExamplesError(UserError):
    """The examples file cannot be read or is not valid."""


class Example(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    message: str = Field(min_length=1, max_length=2000)
    anomaly: bool


class ExampleSet(BaseModel):
    model_config = ConfigDict(extra="forbid")

    example: list[Example] = Field(min_length=1)


def load_examples(path: Path | None = None) -> list[Example]:
    """The examples in ``path``, or the packaged ones (layers/rules/examples.toml)."""
    return tomlfile.load(path, "rules/examples.toml", ExampleSet, ExamplesError,
                         "labelled examples").example


@dataclass(frozen=True)
class Nearest:
    example: Example
    similarity: float


def _unit(v: Sequence[float]) -> list[float]:
    n = math.sqrt(sum(x * x for x in v)) or 1.0
    return [x / n for x in v]


class Examples:
    """The examples, embedded once (on first use), and the nearest one to each text."""

    def __init__(self, examples: Sequence[Example], embed: Embed) -> None:
        self.examples = list(examples)
        self.embed = embed
        self._vectors: list[list[float]] | None = None
        self._failed_at: float | None = None
        self._cache: OrderedDict[str, Nearest] = OrderedDict()

    async def _embed(self, texts: list[str]) -> list[list[float]]:
        try:
            return await asyncio.wait_for(self.embed([t[:MAX_CHARS] for t in texts]),
                                          EMBED_SECONDS)
        except TimeoutError:
            raise LayerError(504, f"no embeddings within {EMBED_SECONDS:.0f}s") from None

    async def nearest(self, texts: Sequence[str],
                      keys: Sequence[str] | None = None) -> list[Nearest] | None:
        """The nearest example to each text (cosine similarity), or None when the
        embeddings layer cannot answer now (the caller goes on without the examples).
        ``keys`` (e.g. the events' fingerprints) say which texts are alike: a key seen
        before is answered from memory."""
        keys = list(keys) if keys is not None else list(texts)
        todo = {k: t for k, t in zip(keys, texts, strict=True) if k not in self._cache}
        if todo:
            found = await self._nearest(list(todo.values()))
            if found is None:
                return None
            for k, n in zip(todo, found, strict=True):
                self._cache[k] = n
                if len(self._cache) > CACHE_SIZE:
                    self._cache.popitem(last=False)
        out = []
        for k in keys:
            self._cache.move_to_end(k)
            out.append(self._cache[k])
        return out

    async def _nearest(self, texts: list[str]) -> list[Nearest] | None:
        if self._failed_at is not None and time.monotonic() - self._failed_at < RETRY_AFTER:
            return None
        try:
            if self._vectors is None:
                self._vectors = [_unit(v) for v in
                                 await self._embed([e.message for e in self.examples])]
            vectors = [_unit(v) for v in await self._embed(texts)]
        except LayerError as exc:
            if self._failed_at is None:
                log.warning("labelled examples unused for now: %s", exc.message)
            self._failed_at = time.monotonic()
            return None
        if self._failed_at is not None:
            log.info("labelled examples in use again")
            self._failed_at = None
        if any(len(v) != len(self._vectors[0]) for v in vectors):
            # The layer's model changed under us: embed the examples again next time.
            self._vectors = None
            return None
        out = []
        for v in vectors:
            sims = [sum(a * b for a, b in zip(v, ev, strict=True)) for ev in self._vectors]
            best = max(range(len(sims)), key=sims.__getitem__)
            out.append(Nearest(self.examples[best], sims[best]))
        return out


def configured(settings: Settings, layers: LayerClients) -> Examples | None:
    """The examples the settings ask for (``pipeline.examples``, ``examples_file``),
    embedded by ``gateway.embeddings_layer``; None when they are off."""
    cfg = settings.pipeline
    if not cfg.examples:
        return None
    return Examples(load_examples(cfg.examples_file),
                    layers[settings.gateway.embeddings_layer].embeddings)
