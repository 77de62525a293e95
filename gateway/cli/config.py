"""``ai-sysadmin config check|show``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from gateway.cli.common import PROG, add_command, add_group, settings_for
from layers import config_toml


def register(sub: Any) -> None:
    csub = add_group(sub, "config", "check or show the configuration", "config_command")
    ck = add_command(csub, "check", cmd_config_check, "validate; print each error with its field")
    ck.add_argument("-v", "--verbose", action="store_true", help="also print the result")
    sh = add_command(csub, "show", cmd_config_show, "print the effective configuration as JSON")
    sh.add_argument("--toml", action="store_true", help="print TOML that loads back as is")


def cmd_config_check(args: argparse.Namespace) -> int:
    settings = settings_for(args)
    print(f"{PROG}: configuration is valid", file=sys.stderr)
    if args.verbose:
        print(settings.model_dump_json(indent=2))
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    settings = settings_for(args)
    if args.toml:
        print(config_toml.dumps(settings.model_dump(mode="json")), end="")
    else:
        print(settings.model_dump_json(indent=2))
    return 0
