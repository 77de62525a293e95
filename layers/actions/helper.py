"""The narrow privileged path: a small root helper on a unix socket.

``ai-sysadmin helper --socket PATH`` runs as root; the gateway and daemon run as an
unprivileged user and send it one request per connection, a single JSON line::

    {"action": "restart_unit", "params": {"unit": "nginx.service"}}

The helper trusts nothing in it. It

1. checks the peer with ``SO_PEERCRED`` (kernel-reported uid, not a claim): root or a
   uid of ``actions.helper_allowed_users``, anything else is refused before reading;
2. re-plans the request against the catalog from its *own* configuration file
   (exact action name, strict params, argv built here, programs resolved on its own
   PATH, never the client's);
3. re-applies the policy that does not depend on approval: allowlist, protected units
   and processes, unit existence, kill switch, and its own per-action/per-unit hourly
   rate limits counted in memory, independent of the store the client writes;
4. runs the argv (no shell), with the catalog's timeout, and answers one JSON line
   with the exit code, output excerpt and duration, or a refusal code.

There is no "run this command" request and no way to name a program: the helper can
only do what the catalog can do.

``nixos_rollback`` rewrites /etc, /boot and the system profile, which the helper's own
sandbox forbids: its catalog argv starts the unit that does it (``systemctl start --wait
-- ai-sysadmin-rollback.service``, defined by the NixOS module), and the helper answers
with that job's result. No other action may change that unit: starting it by name would
be a rollback without the high-risk approval.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import logging
import os
import pwd
import socket
import struct
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from layers.actions.catalog import ROLLBACK_UNIT, PlannedAction, Refusal, plan, program_path
from layers.actions.executor import ExecResult, run_argv
from layers.actions.policy import MemoryRunLedger, Policy, UnitInventory
from layers.config import Settings

log = logging.getLogger("ai_sysadmin.helper")

MAX_REQUEST_BYTES = 64 * 1024
READ_TIMEOUT = 10.0


class HelperRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    action: str
    params: dict[str, Any]


class HelperRefused(Refusal):
    """The helper refused the request (its code says why)."""


def refuse_rollback_unit(planned: PlannedAction) -> None:
    """Only nixos_rollback may start the rollback unit: a change to it by name would be a
    rollback without the high-risk approval — even where protected_units forgot it."""
    if (planned.name != "nixos_rollback" and planned.spec.is_change
            and ROLLBACK_UNIT in planned.params.units()):
        raise Refusal("protected_unit", f"{ROLLBACK_UNIT} runs nixos_rollback only")


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end, as the kernel reports it."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def allowed_uids(settings: Settings) -> set[int]:
    uids = {0}
    for name in settings.actions.helper_allowed_users:
        try:
            uids.add(pwd.getpwnam(name).pw_uid)
        except KeyError:
            log.warning("helper: allowed user %r does not exist; ignored", name)
    return uids


class Helper:
    """The root helper's request handling, independent of the socket plumbing."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.ledger = MemoryRunLedger()
        self.uids = allowed_uids(settings)
        self._lock = asyncio.Lock()

    async def handle(self, request: dict[str, Any], peer: tuple[int, int, int]) -> dict[str, Any]:
        try:
            req = HelperRequest.model_validate(request)
            planned = plan(req.action, req.params, self.settings)
            inventory = None
            if UnitInventory.enabled(self.settings):
                inventory = UnitInventory(self.settings, program_path("systemctl", self.settings))
            policy = Policy(self.settings, self.ledger, inventory)
            refuse_rollback_unit(planned)
            async with self._lock:  # screen + count + record atomically under a burst
                await policy.screen(planned)
                await policy.check_rate(planned)
                if planned.spec.is_change:
                    self.ledger.record(planned.name, planned.params.units())
        except ValidationError:
            return self._refuse(
                peer, request, "invalid_request", 'request must be {"action": str, "params": {}}'
            )
        except Refusal as refusal:
            return self._refuse(peer, request, refusal.code, refusal.message)
        log.warning("helper: uid %d pid %d runs %s", peer[1], peer[0], planned.argv)
        result = await run_argv(planned.argv, planned.spec.timeout, self.settings)
        log.warning(
            "helper: %s exited %s in %.2fs", planned.name, result.exit_code, result.duration
        )
        return {"ok": True, "result": result.model_dump(), "argv": planned.argv}

    @staticmethod
    def _refuse(
        peer: tuple[int, int, int], request: Any, code: str, message: str
    ) -> dict[str, Any]:
        log.warning("helper: refused uid %d pid %d: %s: %s (request %.300r)",
                    peer[1], peer[0], code, message, request)
        return {"ok": False, "code": code, "message": message}

    async def serve_connection(self, reader: asyncio.StreamReader,
                               writer: asyncio.StreamWriter) -> None:
        try:
            sock = writer.get_extra_info("socket")
            peer = peer_credentials(sock)
            if peer[1] not in self.uids:
                reply = self._refuse(peer, None, "peer_refused",
                                     f"uid {peer[1]} may not use the helper")
            else:
                try:
                    line = await asyncio.wait_for(reader.readline(), READ_TIMEOUT)
                except (TimeoutError, ValueError):
                    line = b""
                try:
                    if len(line) > MAX_REQUEST_BYTES or not line.endswith(b"\n"):
                        raise ValueError("request too long or not one line")
                    request = json.loads(line)
                except ValueError:
                    reply = self._refuse(peer, None, "invalid_request", "one JSON line expected")
                else:
                    reply = await self.handle(request, peer)
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


async def serve_helper(settings: Settings, socket_path: Path,
                       started: asyncio.Event | None = None) -> None:
    """Listen on ``socket_path`` until cancelled."""
    helper = Helper(settings)
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        socket_path.unlink()
    server = await asyncio.start_unix_server(
        helper.serve_connection, path=str(socket_path), limit=MAX_REQUEST_BYTES + 1
    )
    # Connecting needs write permission on the socket: owner and the group of the first
    # allowed user. SO_PEERCRED remains the real check.
    os.chmod(socket_path, 0o660)
    if os.geteuid() == 0:
        for name in settings.actions.helper_allowed_users:
            with contextlib.suppress(KeyError):
                os.chown(socket_path, 0, pwd.getpwnam(name).pw_gid)
                log.info("helper: socket group %s", grp.getgrgid(pwd.getpwnam(name).pw_gid).gr_name)
                break
    log.warning("helper: listening on %s for uids %s", socket_path, sorted(helper.uids))
    if started is not None:
        started.set()
    try:
        async with server:
            await server.serve_forever()
    finally:
        with contextlib.suppress(FileNotFoundError):
            socket_path.unlink()


async def call_helper(socket_path: Path, action: str, params: dict[str, Any], *,
                      timeout: float) -> ExecResult:
    """Ask the helper to run one catalog action. Raises HelperRefused when it refuses."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(str(socket_path), limit=4 * 1024 * 1024), timeout=10
        )
    except (OSError, TimeoutError) as exc:
        return ExecResult(exit_code=None, output="", duration=0.0,
                          error=f"root helper unavailable at {socket_path}: {exc}")
    try:
        writer.write(json.dumps({"action": action, "params": params}).encode() + b"\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout=timeout)
    except (OSError, TimeoutError) as exc:
        return ExecResult(exit_code=None, output="", duration=0.0,
                          error=f"root helper did not answer: {exc!r}")
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    try:
        reply = json.loads(line)
        if not reply.get("ok"):
            raise HelperRefused(str(reply.get("code")), f"root helper: {reply.get('message')}")
        return ExecResult.model_validate(reply["result"])
    except (ValueError, KeyError, TypeError, AttributeError, ValidationError) as exc:
        return ExecResult(exit_code=None, output="", duration=0.0,
                          error=f"root helper answered garbage: {exc!r}")
