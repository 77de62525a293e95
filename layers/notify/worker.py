"""The delivery worker: it runs in the gateway and empties the store's notification outbox.

Each round it

1. **routes** notifications not routed yet: one delivery row per channel that wants the
   notification (layers/notify/routing.py), written with the notification marked routed
   in one transaction;
2. **delivers** due deliveries: claimed with a lease (``notify.timeout`` + a margin), sent
   in order per channel, one channel at a time per delivery slot (``notify.concurrency``),
   then marked delivered, or due again after an exponential backoff
   (``retry_initial`` doubling up to ``retry_max``; ``failed`` after ``give_up_after``).
   When one delivery of a channel fails, the channel's other claimed deliveries wait for
   the same retry instead of hammering a receiver that is down;
3. **reconciles** now and then: notifications that a crash kept the action stage from
   writing (``store.outbox.reconcile``), and prunes those older than
   ``store.retention_days``.

A gateway killed mid-delivery leaves the claimed deliveries leased; they are due again
when the lease ends (at least once: the receiver may see that one notification twice,
with the same ``ref``). Notifications written by other processes (the daemon) are found
by polling every ``notify.poll_interval`` seconds; the gateway's own wake the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

from layers.config import Settings
from layers.notify.channels import Channel, load_channels
from layers.notify.messages import Message, probe_message, render
from layers.notify.routing import RATE_WINDOW, dedupe_key, plan, wants
from layers.notify.send import Sender, SendResult
from layers.store import Store, StoreError
from layers.store.outbox import DeliveryHistory, OutboxDelivery

log = logging.getLogger("ai_sysadmin.notify")

LEASE_MARGIN = 5.0
RECONCILE_EVERY = 30.0
# Proposals the action stage has not touched for this long are settled: a missing
# notification of theirs was lost to a crash, not still on its way.
SETTLED_AFTER = 30.0
REFUSED_LOOKBACK = 3600.0
PRUNE_EVERY = 3600.0


class NotifyWorker:
    def __init__(self, settings: Settings, store: Store, channels: Sequence[Channel],
                 sender: Sender | None = None) -> None:
        self.settings = settings
        self.cfg = settings.notify
        self.store = store
        self.channels = {c.name: c for c in channels}
        self.sender = sender or Sender(self.cfg.timeout, self.cfg.concurrency)
        self.sender.prepare(list(channels))
        self.wakeup = asyncio.Event()
        self._next_reconcile = 0.0
        self._next_prune = 0.0
        self.delivered = 0
        self.failed_attempts = 0

    def wake(self) -> None:
        self.wakeup.set()

    async def run(self) -> None:
        wait = self.cfg.retry_initial
        while True:
            try:
                did = await self.step()
                wait = self.cfg.retry_initial
                if did:
                    continue
            except StoreError as exc:
                log.warning("notify: store unavailable (%s); retrying in %.0fs", exc, wait)
                await asyncio.sleep(wait)
                wait = min(wait * 2, self.cfg.retry_max)
                continue
            except Exception:
                log.exception("notify: delivery round failed")
                await asyncio.sleep(wait)
                continue
            self.wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wakeup.wait(), self.cfg.poll_interval)

    async def step(self) -> bool:
        """One round; True when it did something (more may be waiting)."""
        now = time.time()
        if now >= self._next_reconcile:
            self._next_reconcile = now + RECONCILE_EVERY
            await self.store.outbox.reconcile(
                settled_before=now - SETTLED_AFTER, refused_since=now - REFUSED_LOOKBACK)
        if now >= self._next_prune:
            self._next_prune = now + PRUNE_EVERY
            pruned = await self.store.outbox.prune(
                now - self.settings.store.retention_days * 86400.0)
            if pruned:
                log.info("notify: pruned %d old notifications", pruned)
        routed = await self.route()
        sent = await self.deliver_due()
        return routed or sent

    # -- routing ----------------------------------------------------------------------

    async def route(self, limit: int = 200) -> bool:
        notes = await self.store.outbox.unrouted(limit)
        for n in notes:
            now = time.time()
            plans = []
            for ch in self.channels.values():
                if not wants(ch, n):
                    continue
                if self.cfg.dedupe_window > 0 or ch.max_per_hour:
                    history = await self.store.outbox.delivery_history(
                        ch.name, dedupe_key(n), dedupe_since=now - self.cfg.dedupe_window,
                        rate_since=now - RATE_WINDOW)
                    if self.cfg.dedupe_window <= 0:
                        history = DeliveryHistory(None, history.sent,
                                                  history.rate_limited_since_last)
                else:
                    history = DeliveryHistory(None, 0, 0)
                p = plan(ch, n, history, now)
                if p.dropped:
                    log.info("notify: %s %s not sent to %s: %s", n.kind, n.subject, ch.name,
                             p.reason)
                plans.append(p)
            await self.store.outbox.route(n.id, plans)
        return bool(notes)

    # -- delivery ---------------------------------------------------------------------

    async def deliver_due(self) -> bool:
        now = time.time()
        lease = now + self.cfg.timeout + LEASE_MARGIN
        claimed = await self.store.outbox.claim_deliveries(now, lease, limit=self.cfg.concurrency * 8)
        if not claimed:
            return False
        by_channel: dict[str, list[OutboxDelivery]] = {}
        for d in claimed:
            by_channel.setdefault(d.channel, []).append(d)
        slots = asyncio.Semaphore(self.cfg.concurrency)

        async def run(queue: list[OutboxDelivery]) -> None:
            async with slots:
                await self._deliver_channel(queue)

        await asyncio.gather(*(run(q) for q in by_channel.values()))
        return True

    async def _deliver_channel(self, queue: list[OutboxDelivery]) -> None:
        for i, d in enumerate(queue):
            result = await self._send(d)
            if result.ok:
                await self.store.outbox.delivery_done(d.seq)
                self.delivered += 1
                log.info("notify: %s %s delivered to %s", d.notification.kind,
                         d.notification.subject, d.channel)
                continue
            self.failed_attempts += 1
            retry_at = self._retry_at(d)
            attempt = d.attempts + 1
            if retry_at is None:
                log.warning("notify: %s %s to %s failed for good after %d attempts: %s",
                            d.notification.kind, d.notification.subject, d.channel, attempt,
                            result.cause)
            else:
                log.warning("notify: %s %s to %s failed (attempt %d): %s; retrying in %.1fs",
                            d.notification.kind, d.notification.subject, d.channel, attempt,
                            result.cause, retry_at - time.time())
            await self.store.outbox.delivery_failed(d.seq, result.cause, retry_at=retry_at)
            # The receiver is failing: the rest of this channel's batch waits with it.
            for rest in queue[i + 1:]:
                await self.store.outbox.delivery_failed(
                    rest.seq, f"waiting: {result.cause}"[:500], attempted=False,
                    retry_at=retry_at if retry_at is not None else time.time())
            return

    def _retry_at(self, d: OutboxDelivery) -> float | None:
        now = time.time()
        if now - d.created_at >= self.cfg.give_up_after:
            return None
        delay = min(self.cfg.retry_initial * 2 ** d.attempts, self.cfg.retry_max)
        return now + delay * random.uniform(0.9, 1.1)

    async def _send(self, d: OutboxDelivery) -> SendResult:
        ch = self.channels.get(d.channel)
        if ch is None:
            return SendResult(False, "channel no longer configured")
        message = render(d.notification, self.settings, suppressed=d.suppressed)
        return await self.sender.send(ch, message)

    async def send_probe(self, only: str | None = None) -> list[dict[str, Any]]:
        """A test notification through each channel (or ``only``), straight, not via the
        outbox: one result per channel."""
        message: Message = probe_message(self.settings, socket.gethostname())
        chosen = [c for c in self.channels.values() if only in (None, c.name)]
        results = await asyncio.gather(*(self.sender.send(c, message) for c in chosen))
        return [{"channel": c.name, "target": c.target, "ok": r.ok, "cause": r.cause or None}
                for c, r in zip(chosen, results, strict=True)]

    def close(self) -> None:
        self.sender.close()


class NotifyService:
    """The notification side of a gateway: channels, the worker task, and what the API
    shows (channels redacted, delivery counts)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.channels, self.problems = ([], []) if not settings.notify.enabled else \
            load_channels(settings.notify)
        self.worker: NotifyWorker | None = None
        self._task: asyncio.Task[None] | None = None
        self._unsubscribe: Callable[[], None] | None = None

    async def start(self, store: Store) -> None:
        for problem in self.problems:
            log.error("%s; this channel is off until fixed", problem)
        if not self.settings.notify.enabled:
            return
        self.worker = NotifyWorker(self.settings, store, self.channels)
        # Woken by every notification written to the store, by any process on it.
        self._unsubscribe = store.wakeups.subscribe("outbox", self.worker.wake)
        self._task = asyncio.create_task(self.worker.run(), name="notify-worker")
        if self.channels:
            log.info("notify: %d channel(s): %s", len(self.channels),
                     ", ".join(f"{c.name} ({c.target})" for c in self.channels))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._unsubscribe is not None:
            self._unsubscribe()
        if self.worker is not None:
            self.worker.close()

    async def channel_view(self, store: Store) -> list[dict[str, Any]]:
        stats = await store.outbox.stats()
        empty = {"pending": 0, "delivered": 0, "failed": 0, "dropped": 0,
                 "last_delivered_at": None, "last_error": None, "last_error_at": None}
        return [{**c.public(), **stats.get(c.name, empty)} for c in self.channels]
