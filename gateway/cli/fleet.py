"""CLI for the fleet (docs/fleet.md): ``hosts add|list|revoke`` on the server, and
``agent`` on each host.

``hosts`` works on the configured store directly (run it on the server, as the user the
gateway runs as); a key is printed once and kept hashed. ``agent`` runs the agent loop
with ``fleet.gateway_url`` and the key in ``fleet.key_file`` (or ``--url``/``--key-file``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path
from typing import Any

from gateway.cli.common import CliError, add_command, add_group, run_async, settings_for, when


async def _with_hosts(args: argparse.Namespace, work: Any) -> Any:
    from layers.store import open_store

    store = await open_store(settings_for(args))
    try:
        return await work(store.hosts)
    finally:
        await store.close()


def cmd_hosts_add(args: argparse.Namespace) -> int:
    from layers.store.hosts import HostKeyError

    try:
        key = asyncio.run(_with_hosts(args, lambda h: h.add(args.name)))
    except HostKeyError as exc:
        raise CliError(f"hosts add: {exc}") from None
    print(key)
    print(f"# the key of host {args.name}: shown once, kept hashed; put it in the agent's "
          "fleet.key_file", flush=True)
    return 0


def cmd_hosts_list(args: argparse.Namespace) -> int:
    hosts = asyncio.run(_with_hosts(args, lambda h: h.list()))
    if not hosts:
        print("no fleet hosts (ai-sysadmin hosts add NAME)")
    for h in hosts:
        state = f"revoked {when(h.revoked_at)}" if h.revoked_at else "active"
        print(f"{h.name:<32} {state:<28} made {when(h.created_at)}  last seen "
              f"{when(h.last_seen)}")
    return 0


def cmd_hosts_revoke(args: argparse.Namespace) -> int:
    if not asyncio.run(_with_hosts(args, lambda h: h.revoke(args.name))):
        raise CliError(f"hosts revoke: no active host {args.name!r}")
    print(f"revoked {args.name}: its key is refused from the next request on")
    return 0


def cmd_agent(args: argparse.Namespace) -> int:
    from layers.agent import Agent, AgentError

    settings = settings_for(args)
    url = args.url or settings.fleet.gateway_url
    key_file: Path | None = args.key_file or settings.fleet.key_file
    if not url:
        raise CliError("agent: no gateway: set fleet.gateway_url (or --url)")
    if key_file is None:
        raise CliError("agent: no host key: set fleet.key_file (or --key-file); make one on "
                       "the server with `ai-sysadmin hosts add NAME`")
    try:
        key = key_file.read_text().strip()
    except OSError as exc:
        raise CliError(f"agent: cannot read the host key {key_file}: {exc.strerror}") from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)

    async def main() -> int:
        agent = Agent(settings, url, key)
        print(f"ai-sysadmin: agent of host {settings.fleet.local_host()} taking its actions "
              f"from {url}", flush=True)
        try:
            await agent.run()
        except AgentError as exc:
            raise CliError(f"agent: {exc}") from None
        finally:
            await agent.aclose()
        return 0

    return run_async(main)


def register(sub: Any) -> None:
    hsub = add_group(sub, "hosts", "fleet hosts and their keys (on the server)",
                     "hosts_command")
    a = add_command(hsub, "add", cmd_hosts_add, "make a host's key (printed once)")
    a.add_argument("name", help="the host's name, as its events carry it")
    add_command(hsub, "list", cmd_hosts_list, "hosts, when made, last seen, revoked")
    r = add_command(hsub, "revoke", cmd_hosts_revoke, "refuse a host's key from now on")
    r.add_argument("name")
    ag = add_command(sub, "agent", cmd_agent,
                     "run this host's agent: take its approved actions from the server")
    ag.add_argument("--url", default=None, help="the server's gateway (fleet.gateway_url)")
    ag.add_argument("--key-file", type=Path, default=None,
                    help="this host's key (fleet.key_file)")
