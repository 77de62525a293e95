"""The loop every pipeline worker runs: do owed work until none is left, then sleep until
woken or the poll interval passes. A layer that is down or saturated makes the work wait
with exponential backoff; the work itself stays queued in the store."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from layers.client import LayerError
from layers.config import PipelineConfig

log = logging.getLogger("ai_sysadmin.pipeline")


async def work_loop(
    step: Callable[[], Awaitable[bool]],
    wakeup: asyncio.Event,
    cfg: PipelineConfig,
    what: str,
    on_layer_error: Callable[[], None] | None = None,
) -> None:
    wait = cfg.retry_wait
    while True:
        try:
            did = await step()
            wait = cfg.retry_wait
            if did:
                continue
        except LayerError as exc:
            if on_layer_error is not None:
                on_layer_error()
            log.warning("%s: layer unavailable (%s); retrying in %.0fs", what, exc.message, wait)
            await asyncio.sleep(wait)
            wait = min(wait * 2, cfg.retry_wait_max)
            continue
        except Exception:
            log.exception("%s failed", what)
            await asyncio.sleep(wait)
            continue
        wakeup.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wakeup.wait(), cfg.poll_interval)
