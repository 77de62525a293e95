"""The action stage: proposals in; run, wait for approval, or refuse; everything audited.

Entry point for the pipeline's meta stage::

    async def handle_proposals(
        incident_id: str | None,
        proposals: Sequence[Proposal | ProposedAction | Mapping[str, Any]],
        store: Store,
        settings: Settings,
        *,
        runs: ActionRuns,
        on_result: Callable[[Proposal], Awaitable[None]] | None = None,
    ) -> list[Proposal]

``proposals`` may be the records ``Store.record_decision`` just stored (status
``pending``, not yet screened) or raw proposals (``ProposedAction`` or plain dicts with
exactly ``action``, ``params``, ``rationale``). Each one ends in exactly one of:

- ``refused`` — unknown action, malformed or extra params, a risk claim, protected
  unit, a unit never started, not allowlisted, kill switch, rate limit (the reason is in
  the audit log);
- ``pending`` — waits for an admin (``approve``/``reject``), expires after
  ``actions.approval_ttl``; an identical pending proposal absorbs it (merge count). A
  change that the autonomy level would run waits too when it is not about the
  incident's own units (``incident_scope``: from the events' recorded unit fields);
- ``succeeded`` / ``failed`` — ran under the autonomy level; a failure re-opens the
  incident. Results go to the proposal record, the incident timeline, the audit log and
  ``on_result`` (the memory hook).

Nothing from a proposal is "fixed up": it is used exactly as given or refused.

``runs`` is the process's :class:`ActionRuns` (its run lock and the approved actions
still running), held by whoever runs the loop: the gateway (``GatewayState.action_runs``)
or the daemon. Every call in one process passes the same one.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel

from layers.actions.catalog import CATALOG, PlannedAction, Refusal, Risk, lookup, plan, program_path
from layers.actions.executor import ExecResult, execute
from layers.actions.policy import (
    NO_SCOPE,
    RUNS_AT,
    IncidentScope,
    Policy,
    Ruling,
    UnitInventory,
    effective_autonomy,
    evidence_units,
)
from layers.config import Settings
from layers.errors import Refused
from layers.events import ActionResult, Proposal, ProposalStatus, ProposedAction
from layers.store import Store

ResultHook = Callable[[Proposal], Awaitable[None]]
PROPOSAL_KEYS = frozenset({"action", "params", "rationale"})
MAX_RATIONALE = 2000



class ActionRuns:
    """One process's action runs: the lock under which proposals are screened, counted
    and marked "running", and the approved actions still running after their approval
    call returned.

    Screening, counting and marking happen under ``lock`` so that a burst of proposals in
    one process cannot overrun a rate limit; that holds only when every caller in the
    process shares one instance, so it is made by whoever runs the event loop (the
    gateway's state, the daemon) and passed in. (The root helper keeps its own count as a
    second, independent limit across processes.)"""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        # Strong references: the event loop keeps only weak ones to its tasks.
        self._tasks: set[asyncio.Task[Proposal]] = set()

    def start(self, run: Coroutine[Any, Any, Proposal]) -> asyncio.Task[Proposal]:
        """Run an approved action in the background (it outlives a short ``wait``)."""
        task = asyncio.create_task(run)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def drain(self) -> None:
        """Wait for approved actions still running (shutdown, tests)."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


class ActionError(Refused):
    """An approval request that cannot be honoured; ``code`` says why."""

    def __init__(self, code: str, message: str, proposal: Proposal | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.proposal = proposal


def _policy(store: Store, settings: Settings) -> Policy:
    inventory = None
    if UnitInventory.enabled(settings):
        try:
            inventory = UnitInventory(settings, program_path("systemctl", settings))
        except Refusal:
            inventory = None
    return Policy(settings, store, inventory)


async def incident_scope(store: Store, incident_id: str | None) -> IncidentScope:
    """The units the incident's stored events tie it to (see ``evidence_units``); the
    model's words, the incident's title and the log lines' text play no part."""
    if incident_id is None:
        return NO_SCOPE
    detail = await store.get_incident(incident_id)
    if detail is None:
        return IncidentScope(incident_id, frozenset())
    ids = list(dict.fromkeys(
        str(t.detail["id"]) for t in detail.timeline if t.kind == "event" and t.detail.get("id")
    ))
    units: set[str] = set()
    for at in range(0, len(ids), 500):
        units |= evidence_units(await store.get_events(ids[at:at + 500]))
    return IncidentScope(incident_id, frozenset(units))


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value, sort_keys=True)
        return value
    except (TypeError, ValueError):
        return {"unparseable": repr(value)[:500]}


def _raw_fields(raw: ProposedAction | Mapping[str, Any]) -> tuple[Any, Any, str, Refusal | None]:
    """(action, params, rationale, refusal) of a raw proposal, refusing odd shapes."""
    if isinstance(raw, BaseModel):
        data: dict[str, Any] = raw.model_dump()
    elif isinstance(raw, Mapping):
        data = dict(raw)
    else:
        return repr(raw)[:64], {}, "", Refusal("invalid_proposal", "proposal must be an object")
    action, params = data.get("action"), data.get("params", {})
    rationale = data.get("rationale", "")
    refusal = None
    extra = sorted(str(k) for k in data if k not in PROPOSAL_KEYS)
    if "risk" in data:
        refusal = Refusal("risk_claim", "proposals may not state a risk; the catalog fixes it")
    elif extra:
        refusal = Refusal("invalid_proposal", f"unknown proposal fields: {', '.join(extra)}")
    elif not isinstance(rationale, str):
        refusal = Refusal("invalid_proposal", "rationale must be a string")
    return action, params, rationale if isinstance(rationale, str) else repr(rationale), refusal


def _plan_checked(action: Any, params: Any, settings: Settings) -> PlannedAction:
    if isinstance(params, Mapping) and "risk" in params:
        raise Refusal("risk_claim", "proposals may not state a risk; the catalog fixes it")
    return plan(action, params, settings)


async def _audit(store: Store, actor: str, kind: str, p: Proposal, **detail: Any) -> None:
    await store.append_audit(
        actor, kind, p.id,
        {"incident": p.incident_id, "action": p.action, "params": p.params, **detail},
    )


async def _refuse(store: Store, p: Proposal, refusal: Refusal, actor: str) -> Proposal:
    done = await store.transition_proposal(
        p.id, "refused", expected=("pending", "approved"), decided_by=actor
    )
    await _audit(store, actor, "refused", p, code=refusal.code, reason=refusal.message)
    if p.incident_id:
        await store.add_timeline(p.incident_id, "action_refused",
                                 {"proposal": p.id, "action": p.action, "code": refusal.code,
                                  "reason": refusal.message})
    await store.notify_proposal(p.id, "refused", code=refusal.code, reason=refusal.message)
    return done or p


async def handle_proposals(
    incident_id: str | None,
    proposals: Sequence[Proposal | ProposedAction | Mapping[str, Any]],
    store: Store,
    settings: Settings,
    *,
    runs: ActionRuns,
    on_result: ResultHook | None = None,
    actor: str = "pipeline",
) -> list[Proposal]:
    """Screen, decide and (where the autonomy level allows) run each proposal.
    ``actor`` is who proposed (the audit log's first entry): the pipeline, or ``chat:…``
    for a change asked for in a chat (incident-less: it always waits for an admin)."""
    await expire_due(store)
    scope = await incident_scope(store, incident_id)
    host = await _incident_host(store, incident_id)
    out: list[Proposal] = []
    for item in proposals:
        out.append(await _handle_one(incident_id, scope, item, store, settings, runs,
                                     on_result, actor, host))
    return out


async def _incident_host(store: Store, incident_id: str | None) -> str | None:
    """The host an incident's actions are for (None: no incident, this machine)."""
    if incident_id is None:
        return None
    inc = await store.get_incident(incident_id)
    return inc.host if inc is not None else None


async def runs_elsewhere(store: Store, settings: Settings, host: str | None) -> bool:
    """Whether an action for ``host`` is left to that host's agent: not this machine's,
    and either this is a fleet server (``fleet.role = "server"``) or the host has a host
    key. A single machine (``both``) keeps running the actions of hosts without an agent
    (events posted for them, alerts of other instances) here, as it always did."""
    if settings.fleet.is_local(host):
        return False
    if settings.fleet.role == "server":
        return True
    from layers.store.hosts import Hosts

    return await Hosts(store).known(str(host))


async def _dispatch(store: Store, settings: Settings, p: Proposal, actor: str) -> Proposal:
    """An approved action for another host is left for that host's agent to claim
    (docs/fleet.md): it never runs here."""
    await _audit(store, actor, "dispatched", p, host=p.host,
                 expires_in=settings.fleet.dispatch_ttl)
    return p


async def _handle_one(
    incident_id: str | None,
    scope: IncidentScope,
    item: Proposal | ProposedAction | Mapping[str, Any],
    store: Store,
    settings: Settings,
    runs: ActionRuns,
    on_result: ResultHook | None,
    actor: str = "pipeline",
    host: str | None = None,
) -> Proposal:
    if isinstance(item, Proposal):
        stored: Proposal | None = item
        action, params, rationale = item.action, item.params, item.rationale
        shape_refusal = None
        if item.status != "pending":
            return item
        if item.dry_run is not None:  # already screened: this one merged into it
            await _audit(store, actor, "merged", item, merge_count=item.merge_count,
                         from_incident=incident_id)
            return item
    else:
        stored = None
        action, params, rationale, shape_refusal = _raw_fields(item)
    rationale = rationale[:MAX_RATIONALE]
    policy = _policy(store, settings)
    try:
        if shape_refusal is not None:
            raise shape_refusal
        planned = _plan_checked(action, params, settings)
    except Refusal as refusal:
        if stored is None:
            name = action if isinstance(action, str) else repr(action)
            stored = await store.add_proposal(
                name[:64], _jsonable(params) if isinstance(params, Mapping) else
                {"unparseable": repr(params)[:500]}, rationale, incident_id=incident_id,
                status="refused", host=host,
            )
            await _audit(store, actor, "proposed", stored, rationale=rationale)
            await _audit(store, "policy", "refused", stored, code=refusal.code,
                         reason=refusal.message)
            if incident_id:
                await store.add_timeline(incident_id, "action_refused",
                                         {"proposal": stored.id, "code": refusal.code,
                                          "reason": refusal.message})
            await store.notify_proposal(stored.id, "refused", code=refusal.code,
                                        reason=refusal.message)
            return stored
        await _audit(store, actor, "proposed", stored, rationale=rationale)
        return await _refuse(store, stored, refusal, "policy")

    async with runs.lock:
        decision = await policy.decide(planned, scope)
        if stored is None:
            if decision.verdict is Ruling.WAIT:
                stored = await store.add_proposal(
                    planned.name, planned.params_dict(), rationale, incident_id=incident_id,
                    status="pending", risk=planned.risk.value, dry_run=planned.dry_run,
                    expires_at=time.time() + settings.actions.approval_ttl, host=host,
                )
                if stored.merge_count > 0:
                    await _audit(store, actor, "merged", stored, merge_count=stored.merge_count,
                                 from_incident=incident_id, rationale=rationale)
                    return stored
            else:
                stored = await store.add_proposal(
                    planned.name, planned.params_dict(), rationale, incident_id=incident_id,
                    status="approved" if decision.verdict is Ruling.RUN else "refused",
                    risk=planned.risk.value, dry_run=planned.dry_run, host=host,
                )
            await _audit(store, actor, "proposed", stored, rationale=rationale,
                         risk=planned.risk.value, dry_run=planned.dry_run)
        else:
            await _audit(store, actor, "proposed", stored, rationale=rationale,
                         risk=planned.risk.value, dry_run=planned.dry_run)
            await store.transition_proposal(stored.id, "pending", expected=("pending",),
                                            risk=planned.risk.value, dry_run=planned.dry_run)
            await _set_expiry(store, stored.id, time.time() + settings.actions.approval_ttl)
        if decision.verdict is Ruling.REFUSE:
            return await _refuse(store, stored, Refusal(decision.code, decision.reason), "policy")
        if decision.verdict is Ruling.WAIT:
            await _audit(store, "policy", "pending", stored, code=decision.code,
                         reason=decision.reason,
                         expires_in=settings.actions.approval_ttl)
            if stored.incident_id:
                await store.add_timeline(stored.incident_id, "action_pending",
                                         {"proposal": stored.id, "action": planned.name,
                                          "dry_run": planned.dry_run, "code": decision.code,
                                          "reason": decision.reason})
            await store.notify_proposal(stored.id, "pending", code=decision.code,
                                        reason=decision.reason)
            return await store.get_proposal(stored.id) or stored
        actor = "policy:" + decision.reason.rsplit(" ", 1)[-1]
        if stored.status == "pending":
            await store.transition_proposal(stored.id, "approved", expected=("pending",),
                                            decided_by=actor)
        await _audit(store, actor, "approved", stored, reason=decision.reason)
        if await runs_elsewhere(store, settings, stored.host):
            return await _dispatch(store, settings, await store.get_proposal(stored.id)
                                   or stored, actor)
        running = await store.transition_proposal(stored.id, "running", expected=("approved",))
    if running is None:
        return await store.get_proposal(stored.id) or stored
    return await _run(store, settings, planned, running, on_result)


async def _run(store: Store, settings: Settings, planned: PlannedAction, p: Proposal,
               on_result: ResultHook | None) -> Proposal:
    await _audit(store, "executor", "run", p, argv=planned.argv)
    try:
        result = await execute(planned, settings)
    except Refusal as refusal:  # the root helper's own checks said no
        result = ExecResult(exit_code=None, output="", duration=0.0,
                            error=f"{refusal.code}: {refusal.message}")
    except Exception as exc:  # noqa: BLE001 - any executor bug must still close the record
        result = ExecResult(exit_code=None, output="", duration=0.0, error=f"executor: {exc!r}")
    status: ProposalStatus = "succeeded" if result.ok else "failed"
    output = result.output if result.error is None else f"{result.error}\n{result.output}"
    done = await store.record_action_result(
        p.id, status, ActionResult(exit_code=result.exit_code, output=output,
                                   duration=result.duration),
    )
    final = done or p
    await _audit(store, "executor", "result", final, status=status, exit_code=result.exit_code,
                 duration=round(result.duration, 3), timed_out=result.timed_out,
                 output=output[:1000])
    if p.incident_id:
        await store.add_timeline(p.incident_id, "action_result",
                                 {"proposal": p.id, "action": p.action, "status": status,
                                  "exit_code": result.exit_code,
                                  "duration": round(result.duration, 3),
                                  "output": output[:1000]})
        if status == "failed":
            await reopen_incident(store, p.incident_id, f"action {p.id} ({p.action}) failed")
    if on_result is not None:
        await on_result(final)
    return final


async def _set_expiry(store: Store, proposal_id: str, expires_at: float) -> None:
    """Proposals stored by ``record_decision`` without a TTL get the approval TTL."""
    async with store.tx() as tx:
        await tx.execute(
            "UPDATE proposals SET expires_at = ? WHERE id = ? AND expires_at IS NULL",
            (expires_at, proposal_id),
        )


async def reopen_incident(store: Store, incident_id: str, why: str) -> bool:
    """Put an incident back in front of the reviewer (status open, stage review)."""
    now = time.time()
    async with store.tx() as tx:
        rows = await tx.execute(
            "UPDATE incidents SET status = 'open', stage = 'review', resolved_at = NULL,"
            " updated_at = ? WHERE id = ? RETURNING id",
            (now, incident_id),
        )
    if rows:
        await store.add_timeline(incident_id, "status", {"status": "open", "by": why})
    return bool(rows)


# -- approvals ------------------------------------------------------------------------------


async def expire_due(store: Store) -> list[Proposal]:
    expired = await store.expire_proposals()
    for p in expired:
        await _audit(store, "policy", "expired", p)
        if p.incident_id:
            await store.add_timeline(p.incident_id, "action_expired",
                                     {"proposal": p.id, "action": p.action})
    return expired


async def _pending(store: Store, proposal_id: str) -> Proposal:
    await expire_due(store)
    p = await store.get_proposal(proposal_id)
    if p is None:
        raise ActionError("not_found", f"no action {proposal_id!r}")
    if p.status != "pending":
        raise ActionError("not_pending", f"action {p.id} is {p.status}, not pending", p)
    return p


async def approve(store: Store, settings: Settings, proposal_id: str, approver: str, *,
                  runs: ActionRuns, wait: float = 30.0,
                  on_result: ResultHook | None = None) -> Proposal:
    """Approve a pending proposal and run it (waiting up to ``wait`` seconds for it).

    The proposal is planned and screened again first: the catalog, protected units,
    units never started, allowlist, kill switch and rate limits apply to approved
    actions too; the autonomy level and the incident's scope are what the approval
    overrides."""
    p = await _pending(store, proposal_id)
    actor = f"admin:{approver}"
    try:
        planned = _plan_checked(p.action, p.params, settings)
    except Refusal as refusal:
        p = await _refuse(store, p, refusal, actor)
        raise ActionError("refused", f"{refusal.code}: {refusal.message}", p) from None
    async with runs.lock:
        policy = _policy(store, settings)
        try:
            await policy.screen(planned)
            await policy.check_rate(planned)
        except Refusal as refusal:
            p = await _refuse(store, p, refusal, actor)
            raise ActionError("refused", f"{refusal.code}: {refusal.message}", p) from None
        approved = await store.transition_proposal(p.id, "approved", expected=("pending",),
                                                   decided_by=actor)
        if approved is None:
            raise ActionError("not_pending", f"action {p.id} was decided meanwhile")
        await _audit(store, actor, "approved", approved, dry_run=planned.dry_run)
        if await runs_elsewhere(store, settings, approved.host):
            return await _dispatch(store, settings, approved, actor)
        running = await store.transition_proposal(p.id, "running", expected=("approved",))
    if running is None:
        raise ActionError("not_pending", f"action {p.id} was decided meanwhile")
    task = runs.start(_run(store, settings, planned, running, on_result))
    try:
        return await asyncio.wait_for(asyncio.shield(task), timeout=wait)
    except TimeoutError:
        return await store.get_proposal(p.id) or running


async def reject(store: Store, proposal_id: str, approver: str, reason: str = "") -> Proposal:
    p = await _pending(store, proposal_id)
    actor = f"admin:{approver}"
    done = await store.transition_proposal(p.id, "rejected", expected=("pending",),
                                           decided_by=actor)
    if done is None:
        raise ActionError("not_pending", f"action {p.id} was decided meanwhile")
    await _audit(store, actor, "rejected", done, reason=reason[:500])
    if p.incident_id:
        await store.add_timeline(p.incident_id, "action_rejected",
                                 {"proposal": p.id, "action": p.action, "by": actor})
    return done


# -- evidence reads (the meta stage's evidence loop) ------------------------------------------


@dataclass(frozen=True)
class ReadOutcome:
    """What one evidence read did: ran (``ok``/``failed``) or was refused (never ran)."""

    status: Literal["ok", "failed", "refused"]
    params: dict[str, Any]
    dry_run: str | None = None
    exit_code: int | None = None
    output: str = ""
    duration: float = 0.0
    code: str | None = None
    reason: str | None = None


def runnable_reads(settings: Settings, *, installed: bool = True) -> list[str]:
    """Read-only catalog actions the policy lets run without an admin: inside the
    allowlist and at an autonomy level that runs read-only actions (not ``observe``);
    with ``installed``, only those whose program is found (no ``nix-env`` off NixOS)."""
    allow = settings.actions.allowlist
    out = []
    for name, spec in CATALOG.items():
        if spec.is_change or (allow is not None and name not in allow):
            continue
        if Risk.READ_ONLY not in RUNS_AT[effective_autonomy(name, settings)]:
            continue
        if installed:
            try:
                program_path(spec.program, settings)
            except Refusal:
                continue
        out.append(name)
    return out


async def run_read(store: Store, settings: Settings, incident_id: str | None, action: Any,
                   params: Any) -> ReadOutcome:
    """Run one read-only catalog action for an incident's evidence, through the catalog,
    the policy (allowlist, unit check, autonomy, the incident's scope) and the executor.
    A change is refused before anything is planned: evidence never changes the machine,
    and a read is never left waiting for approval (it is refused instead)."""
    raw = dict(params) if isinstance(params, Mapping) else {}
    try:
        spec = lookup(action)
        if spec.is_change:
            raise Refusal("not_read_only", f"{spec.name} is a {spec.risk} change: evidence "
                          "is gathered with read-only actions only")
        planned = _plan_checked(action, params, settings)
    except Refusal as refusal:
        return ReadOutcome("refused", raw, code=refusal.code, reason=refusal.message)
    decision = await _policy(store, settings).decide(planned, await incident_scope(store, incident_id))
    if decision.verdict is not Ruling.RUN:
        return ReadOutcome("refused", planned.params_dict(), planned.dry_run, code=decision.code,
                           reason=decision.reason)
    try:
        result = await execute(planned, settings)
    except Exception as exc:  # noqa: BLE001 - an executor bug is a failed read, not a crash
        result = ExecResult(exit_code=None, output="", duration=0.0, error=f"executor: {exc!r}")
    output = result.output if result.error is None else f"{result.error}\n{result.output}"
    return ReadOutcome("ok" if result.ok else "failed", planned.params_dict(), planned.dry_run,
                       result.exit_code, output, result.duration)
