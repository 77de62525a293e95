"""Wake-ups across processes: a committed write wakes the workers waiting for it at once,
in this process and, on PostgreSQL, in every other gateway or daemon on the same database.

Every worker also polls (``pipeline.poll_interval``, the agents' claim loop), so a lost
wake-up only delays work, never loses it: this module is about latency and the CPU an
idle fleet spends asking "anything for me?".

- A write inside a transaction calls :meth:`Wakeups.signal` with a topic; listeners of
  that topic run after the transaction commits (never before: a woken worker must find
  the row), and only if it commits.
- PostgreSQL: the same transaction runs ``pg_notify`` on one channel with the topic as
  payload, which PostgreSQL delivers to every ``LISTEN``-ing connection when (and only
  when) it commits. Each store keeps one listening connection of its own (reconnected
  with backoff when the server goes away) and fires its local listeners for what arrives
  from other connections; its own writes' notifications come back too and are skipped
  (their listeners were woken at the commit).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any, Literal, get_args

log = logging.getLogger("ai_sysadmin.store")

Topic = Literal["events", "incidents", "proposals", "outbox"]
TOPICS: tuple[Topic, ...] = get_args(Topic)
# The one PostgreSQL channel; the payload is the topic.
CHANNEL = "ai_sysadmin_wakeup"


class Wakeups:
    """Listeners by topic and the topics signalled by the transaction in progress (a
    store runs one transaction at a time, so one pending set is enough)."""

    def __init__(self) -> None:
        self._listeners: dict[str, list[Callable[[], None]]] = {t: [] for t in TOPICS}
        self._pending: set[str] = set()
        # Run at the first subscription (PostgreSQL starts listening then: a process that
        # only writes, like a CLI command, never holds a listening connection).
        self.on_first_subscribe: Callable[[], None] | None = None
        # Whether other processes' writes wake us too (PostgreSQL, while listening); a
        # caller that waits for them polls often when not.
        self.across_processes: Callable[[], bool] = lambda: False

    def subscribe(self, topic: Topic, listener: Callable[[], None]) -> Callable[[], None]:
        """Call ``listener`` (synchronously, so keep it to setting an event) after each
        committed write of ``topic``; returns the function that unsubscribes it."""
        if self.on_first_subscribe is not None and not any(self._listeners.values()):
            self.on_first_subscribe()
        self._listeners[topic].append(listener)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._listeners[topic].remove(listener)

        return unsubscribe

    @contextlib.contextmanager
    def listening(self, topic: Topic, listener: Callable[[], None]) -> Iterator[None]:
        """:meth:`subscribe` for the duration of a ``with`` block (a worker's run, a
        long poll)."""
        unsubscribe = self.subscribe(topic, listener)
        try:
            yield
        finally:
            unsubscribe()

    def signal(self, topic: Topic) -> bool:
        """Mark ``topic`` written by the transaction in progress; False when it already was."""
        if topic in self._pending:
            return False
        self._pending.add(topic)
        return True

    def committed(self) -> None:
        """The transaction committed: wake the listeners of what it wrote."""
        topics, self._pending = self._pending, set()
        for topic in topics:
            self.fire(topic)

    def rolled_back(self) -> None:
        self._pending.clear()

    def fire(self, topic: str) -> None:
        for listener in list(self._listeners.get(topic, ())):
            try:
                listener()
            except Exception:
                log.exception("wake-up listener for %s failed", topic)


class PgListener:
    """One ``LISTEN`` connection that turns other processes' ``pg_notify`` into local
    wake-ups. Reconnects with backoff; while it is down, the workers' polling carries on."""

    def __init__(self, url: str, wakeups: Wakeups, own_pid: Callable[[], int | None], *,
                 retry_max: float = 30.0) -> None:
        self.url = url
        self.wakeups = wakeups
        # The server process of the store's own (writing) connection: its notifications
        # are our own commits.
        self.own_pid = own_pid
        self.retry_max = retry_max
        self.connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="store-listen")

    async def close(self) -> None:
        if self._task is not None:
            task, self._task = self._task, None
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        import psycopg

        wait = 0.5
        lost = False
        while True:
            conn: Any = None
            try:
                conn = await psycopg.AsyncConnection.connect(self.url, autocommit=True)
                await conn.execute(f"LISTEN {CHANNEL}")
                self.connected.set()
                wait = 0.5
                if lost:
                    # Wake everyone once: what was written while we were not listening.
                    for topic in TOPICS:
                        self.wakeups.fire(topic)
                async for note in conn.notifies():
                    if note.pid != self.own_pid():
                        self.wakeups.fire(note.payload)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # psycopg.Error, OSError: the server went away
                log.warning("store: wake-up listener lost its connection (%s); "
                            "retrying in %.1fs", " ".join(str(exc).split()), wait)
            finally:
                lost = True
                self.connected.clear()
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close()
            await asyncio.sleep(wait)
            wait = min(wait * 2, self.retry_max)
