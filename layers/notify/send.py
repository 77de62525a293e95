"""One delivery through apprise.

apprise is synchronous (requests, smtplib), so every send runs in a thread of this
module's own pool, bounded by ``notify.timeout`` three ways: the plugin's connect and read
timeouts, apprise's own call timeout, and ``asyncio.wait_for`` around the thread (a
thread that still hangs past it is abandoned; the pool has a spare for it; apprise 1.x
has no call timeout, the other two hold). The result
is ok, or the cause in one line: apprise's warning with the underlying reason
(``Connection refused``, ``SMTP AUTH extension not supported``), redacted of the
channel's secrets.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from layers.notify.channels import Channel, guard_logs, redact, secret_parts
from layers.notify.messages import Message

MAX_CAUSE = 240
_ERRNO = re.compile(r"\[Errno -?\d+\] [^\"')\]]+|timed out|[Rr]ead timed out|"
                    r"SMTP AUTH extension not supported[^\"')]*|Name or service not known")


@dataclass(frozen=True)
class SendResult:
    ok: bool
    cause: str = ""


# What apprise logs during one delivery (apprise 1.x has no per-call logs): a handler on
# its logger appends to the list of the delivery running in this context.
_CAPTURE: contextvars.ContextVar[list[tuple[str, str]] | None] = contextvars.ContextVar(
    "ai_sysadmin_notify_capture", default=None)


class _Collector(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        entries = _CAPTURE.get()
        if entries is not None:
            with contextlib.suppress(Exception):
                entries.append((record.levelname, record.getMessage()))


_COLLECTOR = _Collector(logging.DEBUG)


def _cause(logs: list[tuple[str, str]], secrets: set[str]) -> str:
    warnings = [m for level, m in logs if level in ("WARNING", "ERROR", "CRITICAL")]
    detail = None
    for _, message in logs:
        m = _ERRNO.search(message)
        if m:
            detail = m.group(0).strip()
    cause = warnings[-1] if warnings else "not delivered (no reason given)"
    if detail and detail not in cause:
        cause = f"{cause.rstrip('.')} ({detail})"
    return " ".join(redact(cause, secrets).split())[:MAX_CAUSE]


@functools.cache
def _per_call_options() -> bool:
    """apprise 2.3+: ``notify`` takes a call ``timeout`` and returns per-call logs."""
    import apprise

    return "log_level" in inspect.signature(apprise.Apprise.notify).parameters


def send_blocking(channel: Channel, message: Message, timeout: float) -> SendResult:
    """Deliver ``message`` through ``channel`` (blocking; run it in a thread)."""
    import apprise

    secrets = secret_parts(channel.url)
    apprise_log = logging.getLogger("apprise")
    if _COLLECTOR not in apprise_log.handlers:
        apprise_log.addHandler(_COLLECTOR)
    entries: list[tuple[str, str]] = []
    token = _CAPTURE.set(entries)
    try:
        try:
            plugin = apprise.Apprise.instantiate(channel.url)
        except Exception as exc:  # noqa: BLE001 - a plugin that cannot parse its URL
            return SendResult(False, redact(f"URL not usable: {type(exc).__name__}", secrets))
        if plugin is None:
            return SendResult(False, f"URL not understood by apprise (scheme {channel.target})")
        for attr in ("socket_connect_timeout", "socket_read_timeout"):
            if hasattr(plugin, attr):
                setattr(plugin, attr, timeout)
        ap = apprise.Apprise()
        ap.add(plugin)
        call: dict[str, Any] = {
            "body": message.body, "title": message.title,
            "notify_type": apprise.NotifyType(message.type),
            "body_format": apprise.NotifyFormat.TEXT,
        }
        if _per_call_options():
            call.update(timeout=timeout, log_level=logging.DEBUG)
        try:
            result = ap.notify(**call)
        except Exception as exc:  # noqa: BLE001 - a plugin bug is a failed delivery, reported
            return SendResult(False, " ".join(redact(f"{type(exc).__name__}: {exc}",
                                                     secrets).split())[:MAX_CAUSE])
        if result:
            return SendResult(True)
        logs = list(entries)
        with contextlib.suppress(Exception):
            logs += [(str(e.level), str(e.message)) for e in result.logs()]
        return SendResult(False, _cause(logs, secrets))
    finally:
        _CAPTURE.reset(token)


class Sender:
    """Runs deliveries in a bounded thread pool, each within ``timeout`` seconds."""

    def __init__(self, timeout: float, threads: int = 4) -> None:
        self.timeout = timeout
        # One spare thread: a delivery abandoned at its timeout may still hold one.
        self._pool = ThreadPoolExecutor(max_workers=threads + 1, thread_name_prefix="notify")

    def prepare(self, channels: list[Channel]) -> None:
        guard_logs(channels)

    async def send(self, channel: Channel, message: Message) -> SendResult:
        guard_logs([channel])
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self._pool, send_blocking, channel, message, self.timeout)
        try:
            return await asyncio.wait_for(fut, self.timeout + 2.0)
        except TimeoutError:
            return SendResult(False, f"timed out after {self.timeout:.0f} s")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
