"""The ``ai-sysadmin`` command line.

Every failure a user can cause ends in one readable line on stderr and a non-zero exit:
``ai-sysadmin: <what>: <why>``. Tracebacks are for bugs only.

One module per command group, each with ``register(subparsers)``, called in order by
``build_parser``; what they share is in ``common``:

- ``serve``: ``run``, ``gateway``
- ``layers``: ``layers start|stop|status|serve|exec``
- ``config``: ``config check|show``
- ``actions``: ``approvals``, ``audit``, ``kill-switch``, ``helper``
- ``pipeline``: ``daemon``, ``events tail``, ``incidents list|show``
- ``quality``: ``eval``
- ``notify``: ``notify test|status``
- ``fleet``: ``hosts add|list|revoke``, ``agent``
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path

from gateway.cli import actions, config, fleet, layers, notify, pipeline, quality, serve
from gateway.cli.common import EXIT_FAILURE, PROG, CliError
from gateway.server import BindRefused
from layers.config import ConfigError
from layers.provision.engine import EngineError
from layers.provision.model import ModelError
from layers.supervisor import SupervisorError

# One place that decides which exceptions are the user's to fix (a line, exit 1).
USER_ERRORS: tuple[type[Exception], ...] = (
    CliError,
    ConfigError,
    ModelError,
    EngineError,
    SupervisorError,
    BindRefused,
)

# In the order `ai-sysadmin --help` lists their commands.
COMMAND_MODULES = (serve, layers, config, actions, pipeline, quality, notify, fleet)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="An AI system administrator built from local llama.cpp models."
    )
    parser.add_argument(
        "--config", type=Path, default=None,
        help="TOML configuration file (default: $AI_SYSADMIN_CONFIG or /etc/ai-sysadmin/config.toml)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.handler(args)
        return code
    except ConfigError as exc:
        for line in exc.lines:
            print(f"{PROG}: config: {line}", file=sys.stderr)
        return EXIT_FAILURE
    except USER_ERRORS as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        with contextlib.suppress(Exception):
            sys.stdout.close()
        return 0
