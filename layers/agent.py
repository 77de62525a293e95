"""The fleet agent: runs, on its own host, the actions the server approved for it.

An agent (``ai-sysadmin agent``, ``fleet.role = "agent"``) holds a host key scoped to its
host name (layers/store/hosts.py). Its loop asks the server's gateway for the next action
meant for its host (``POST /v1/agent/claim``, a long poll; the claim is a lease, so two
agents or two gateways never take the same action), checks it again against **its own**
catalog and policy — the action must exist in this host's catalog with valid params, and
pass this host's protected units, units never started, allowlist, kill switch and rate
limits — runs it through the local executor (the root helper for changes), and reports
the result (``POST /v1/agent/actions/{id}/result``). What the server or a model sent
decides nothing here beyond naming a catalog action: argv is built by this host's catalog.

An action it refuses is reported as failed with the refusal, never run. An agent that
dies holding a lease leaves the action to expire as failed (``lease_expired``) on the
server: an action runs at most once.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import httpx

from layers.actions.catalog import Refusal, plan
from layers.actions.executor import ExecResult, execute
from layers.actions.policy import MemoryRunLedger, Policy, UnitInventory
from layers.config import Settings
from layers.errors import Unavailable

log = logging.getLogger("ai_sysadmin.agent")

OUTPUT_LIMIT = 64_000  # characters of output reported (the server keeps it in the store)


class AgentError(Unavailable):
    """The agent cannot work (no gateway, no key, a key refused): one readable line."""


@dataclass(frozen=True)
class Outcome:
    status: str  # succeeded | failed
    exit_code: int | None
    output: str
    duration: float
    refused: str | None = None

    def body(self) -> dict[str, Any]:
        return {"status": self.status, "exit_code": self.exit_code,
                "output": self.output[-OUTPUT_LIMIT:], "duration": round(self.duration, 3),
                "refused": self.refused}


async def run_here(settings: Settings, action: Any, params: Any,
                   runs: MemoryRunLedger) -> Outcome:
    """Check an action against this host's catalog and policy, then run it here."""
    try:
        planned = plan(action, params, settings)
        inventory = None
        if UnitInventory.enabled(settings):
            from layers.actions.catalog import program_path

            inventory = UnitInventory(settings, program_path("systemctl", settings))
        policy = Policy(settings, runs, inventory)
        await policy.screen(planned)
        await policy.check_rate(planned)
    except Refusal as refusal:
        return Outcome("failed", None, "", 0.0, refused=f"{refusal.code}: {refusal.message}")
    runs.record(planned.name, planned.params.units())
    try:
        result: ExecResult = await execute(planned, settings)
    except Refusal as refusal:  # the root helper's own checks said no
        return Outcome("failed", None, "", 0.0, refused=f"{refusal.code}: {refusal.message}")
    output = result.output if result.error is None else f"{result.error}\n{result.output}"
    return Outcome("succeeded" if result.ok else "failed", result.exit_code, output,
                   result.duration)


class Agent:
    """The claim → check → run → report loop (see the module docstring)."""

    def __init__(self, settings: Settings, url: str, key: str, *,
                 client: httpx.AsyncClient | None = None) -> None:
        self.settings = settings
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {key}"}
        self.client = client or httpx.AsyncClient(timeout=settings.fleet.poll_seconds + 30)
        self.runs = MemoryRunLedger()  # this host's own runs, for its rate limits
        self.done = 0

    async def once(self) -> bool:
        """Claim one action and run it; False when there was none."""
        r = await self.client.post(f"{self.url}/v1/agent/claim", headers=self.headers,
                                   json={"wait": self.settings.fleet.poll_seconds})
        if r.status_code == 204:
            return False
        if r.status_code in (401, 403):
            raise AgentError(f"the gateway refused this host's key ({r.status_code}): "
                             f"{_message(r)}")
        r.raise_for_status()
        action = r.json()
        log.info("running %s %s (action %s)", action["action"], action["params"], action["id"])
        outcome = await run_here(self.settings, action["action"], action["params"], self.runs)
        report = await self.client.post(
            f"{self.url}/v1/agent/actions/{action['id']}/result", headers=self.headers,
            json=outcome.body())
        if report.status_code >= 400:
            log.warning("action %s: the gateway did not take its result (%s): %s",
                        action["id"], report.status_code, _message(report))
        self.done += 1
        return True

    async def run(self, stop: asyncio.Event | None = None) -> None:
        stop = stop or asyncio.Event()
        backoff = 1.0
        while not stop.is_set():
            try:
                await self.once()
                backoff = 1.0
            except AgentError:
                raise
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                log.warning("gateway %s: %s; retrying in %.0f s", self.url, exc, backoff)
                try:
                    await asyncio.wait_for(stop.wait(), timeout=backoff)
                except TimeoutError:
                    pass
                backoff = min(backoff * 2, 30.0)

    async def aclose(self) -> None:
        await self.client.aclose()


def _message(r: httpx.Response) -> str:
    try:
        return str(r.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return r.text[:200]
