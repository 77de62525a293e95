"""Real receivers for the notification tests: a JSON webhook server (stdlib HTTP, in a
thread, stoppable and restartable on the same port) and an SMTP server (aiosmtpd on
loopback), plus a way to open real incidents in a store."""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from aiosmtpd.controller import Controller

from layers.events import Event
from layers.store import Prefiltered, Store, VerdictInput

REF = re.compile(r"ref (\S+)$")


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    at: float

    @property
    def ref(self) -> str | None:
        m = REF.search(str(self.body.get("message", "")))
        return m.group(1) if m else None


@dataclass
class WebhookReceiver:
    """Accepts JSON POSTs (apprise ``json://``) and records them; ``status`` and ``delay``
    say how it answers."""

    port: int
    status: int = 200
    delay: float = 0.0
    received: list[Received] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> WebhookReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if receiver.delay:
                    time.sleep(receiver.delay)
                status = receiver.status
                if 200 <= status < 300:
                    with receiver._lock:
                        receiver.received.append(Received(
                            self.path, dict(self.headers.items()), json.loads(raw or b"{}"),
                            time.time()))
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

        class Server(ThreadingHTTPServer):
            allow_reuse_address = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a client that gave up (a timeout under test) is no error here

        self._server = Server(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def refs(self) -> list[str | None]:
        with self._lock:
            return [r.ref for r in self.received]


class _Mailbox:
    def __init__(self) -> None:
        self.messages: list[Any] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        self.messages.append(envelope)
        return "250 OK"


class SmtpReceiver:
    """A real SMTP server (aiosmtpd) on loopback, no TLS, no auth."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.mailbox = _Mailbox()
        self._controller = Controller(self.mailbox, hostname="127.0.0.1", port=port)

    def start(self) -> SmtpReceiver:
        self._controller.start()
        return self

    def stop(self) -> None:
        self._controller.stop()

    @property
    def messages(self) -> list[Any]:
        return self.mailbox.messages


_seq = iter(range(10**9))


async def open_incidents(store: Store, n: int, *, severity: str = "critical",
                         host: str = "web1", tag: str = "") -> list[str]:
    """Open ``n`` incidents through the store's own path (events → prefilter → verdicts),
    one unit each; returns their ids."""
    tag = tag or f"t{next(_seq)}"
    events = [Event(id=f"{tag}-{i}", host=host, source="journald", unit=f"svc{i}-{tag}.service",
                    priority=3, message=f"Main process exited, code=exited, status={i}/FAILURE")
              for i in range(n)]
    await store.events.add(events)
    stored = [e for e in await store.events.in_state("new", 10_000) if e.id.startswith(tag)]
    await store.events.mark_prefiltered([Prefiltered(e.seq, True, f"fp-{e.id}", "unit_failed")
                                         for e in stored])
    cands = [e for e in await store.events.in_state("candidate", 10_000) if e.id.startswith(tag)]
    verdicts = await store.verdicts.record([
        VerdictInput(e, True, severity, "service", "unit failed",  # type: ignore[arg-type]
                     rule_category="service") for e in cands])
    return [v.incident_id for v in verdicts if v.incident_id]
