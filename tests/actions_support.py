"""Stand-in executables for action tests on a machine without systemd.

This machine's PID 1 is not systemd, so ``systemctl``/``journalctl``/``nixos-rebuild``/
``nix-collect-garbage`` cannot act on anything real. Tests that need them put a throwaway
stand-in first on ``actions.search_path`` for that test only: a tiny Python program that
records the argv it was given (one JSON line per call) and answers like the real tool
for the few verbs the catalog uses. Tests then assert on the exact argv received.
``systemctl show`` answers from the units table: ``id`` (what systemd reports as the
unit's real name), ``names`` (all its names: aliases) and ``props`` (RefuseManualStart,
AllowIsolate, FailureAction, Wants, Triggers, ...).
``df``, ``ps``, ``free`` and ``kill`` are the real programs.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from layers.config import Settings

STANDIN = r'''#!{python}
import json, os, sys
log = {log!r}
with open(log, "a") as fh:
    fh.write(json.dumps([os.path.basename(sys.argv[0]), *sys.argv[1:]]) + "\n")
units = json.load(open({units!r}))
args = sys.argv[1:]
prog = os.path.basename(sys.argv[0])
if prog == "systemctl" and args[:1] == ["show"]:
    # As systemd answers: the unit's real name (Id), all its names, its properties; only
    # those asked for with --property=, the ones without a value left out.
    unit = args[-1]
    info = units.get(unit)
    if info is None:
        props = {{"Id": unit, "Names": unit, "LoadState": "not-found"}}
    else:
        props = {{"Id": info["id"], "Names": " ".join(info["names"]), "LoadState": "loaded",
                 **info.get("props", {{}})}}
    asked = [a.split("=", 1)[1].split(",") for a in args if a.startswith("--property=")]
    for key in (asked[0] if asked else props):
        if props.get(key):
            print(f"{{key}}={{props[key]}}")
    sys.exit(0)
if prog == "systemctl" and args[:1] in (["restart"], ["start"], ["reset-failed"]):
    unit = args[-1]
    if unit not in units:
        print(f"Failed to {{args[0]}} {{unit}}: Unit {{unit}} not found.", file=sys.stderr)
        sys.exit(5)
    if units[unit].get("fail"):
        print(f"Job for {{unit}} failed because the control process exited with error code.",
              file=sys.stderr)
        sys.exit(1)
    sys.exit(0)
print(prog, *args)
'''

PROGRAMS = ("systemctl", "journalctl", "nix-collect-garbage", "nixos-rebuild")


@dataclass
class StandIns:
    bindir: Path
    log: Path
    units_file: Path

    def calls(self) -> list[list[str]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines() if line]

    def set_units(self, units: dict[str, dict[str, Any]]) -> None:
        self.units_file.write_text(json.dumps(units))

    @property
    def search_path(self) -> str:
        return f"{self.bindir}:/usr/bin:/bin"


def make_standins(tmp: Path, units: dict[str, dict[str, Any]] | None = None) -> StandIns:
    bindir = tmp / "standin-bin"
    bindir.mkdir(parents=True, exist_ok=True)
    s = StandIns(bindir, tmp / "standin-calls.jsonl", tmp / "standin-units.json")
    s.set_units(units if units is not None else {
        "nginx.service": {"id": "nginx.service", "names": ["nginx.service"]},
        "broken.service": {"id": "broken.service", "names": ["broken.service"], "fail": True},
        "openssh.service": {"id": "sshd.service", "names": ["sshd.service", "openssh.service"]},
    })
    for prog in PROGRAMS:
        path = bindir / prog
        path.write_text(STANDIN.format(python=sys.executable, log=str(s.log), units=str(s.units_file)))
        path.chmod(0o755)
    os.chmod(bindir, 0o755)
    return s


def settings_for(tmp: Path, standins: StandIns | None = None, **actions: Any) -> Settings:
    cfg: dict[str, Any] = {"unit_check": "never"}
    if standins is not None:
        cfg["search_path"] = standins.search_path
    cfg.update(actions)
    return Settings(state_dir=tmp / "state", actions=cfg)  # type: ignore[arg-type]
