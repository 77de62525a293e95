"""The ``ai-sysadmin`` command line.

Every failure a user can cause ends in one readable line on stderr and a non-zero exit:
``ai-sysadmin: <what>: <why>``. Tracebacks are for bugs only. ``main`` is the one place
that does it: it catches the root of layers/errors.py (:func:`report`).

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
from typing import TextIO

from gateway.cli import actions, config, fleet, layers, notify, pipeline, quality, serve
from gateway.cli.common import PROG
from layers.config import ConfigError
from layers.errors import AiSysadminError

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


def report(exc: AiSysadminError, stream: TextIO | None = None) -> int:
    """The one place a failure of ours becomes the command's end: its line on stderr
    (a ConfigError's one line per problem), then the class's exit code. Every command
    raises the layers' errors as they come; layers/errors.py is the tree."""
    out = sys.stderr if stream is None else stream
    lines = [f"config: {line}" for line in exc.lines] if isinstance(exc, ConfigError) \
        else [str(exc)]
    for line in lines:
        print(f"{PROG}: {line}", file=out)
    return exc.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.handler(args)
        return code
    except AiSysadminError as exc:
        return report(exc)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        with contextlib.suppress(Exception):
            sys.stdout.close()
        return 0
