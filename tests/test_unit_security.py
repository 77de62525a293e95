"""The NixOS units as systemd sees them, and the helper's side of the rollback unit.

1. The module's units (evaluated as in tests/test_nix.py) are rendered into unit files the
   way NixOS renders ``systemd.services`` (one ``Key=value`` line per list element, booleans
   as ``true``/``false``, ``environment`` as ``Environment=``, ``path`` as ``PATH``), then
   ``systemd-analyze security --offline=true`` scores each file and ``systemd-analyze
   verify`` parses it. Store paths do not exist here, so each ``Exec*`` program is replaced
   by a stand-in executable in the temporary directory (systemd 252's ``verify --root=``
   does not find unit files given by path, so the lines are rewritten instead).
   The thresholds are the figures of docs/security.md.
2. The helper runs ``nixos_rollback`` as ``systemctl start --wait --
   ai-sysadmin-rollback.service`` and refuses any other change to that unit.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from layers.actions.catalog import ROLLBACK_UNIT
from layers.actions.helper import Helper
from tests.actions_support import make_standins, settings_for
from tests.test_nix import LIB_ENV, MODELS, NIX_INSTANTIATE, NIXPKGS_LIB, exec_argv, run_eval

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


def _systemd_version() -> int:
    if SYSTEMD_ANALYZE is None:
        return 0
    out = subprocess.run([SYSTEMD_ANALYZE, "--version"], capture_output=True, text=True).stdout
    m = re.match(r"systemd (\d+)", out)
    return int(m.group(1)) if m else 0


SYSTEMD_VERSION = _systemd_version()


def _missing() -> str | None:
    if SYSTEMD_ANALYZE is None:
        return "systemd-analyze not installed (Debian's systemd package has it)"
    if SYSTEMD_VERSION < 250:
        return f"systemd-analyze {SYSTEMD_VERSION} has no `security --offline=true` (250+)"
    if NIX_INSTANTIATE is None or NIXPKGS_LIB is None:
        return (f"module evaluation needs nix-instantiate and nixpkgs' lib in ${LIB_ENV} "
                "(docs/nixos.md, 'Testing the module')")
    return None


needs_analyze = pytest.mark.skipif(_missing() is not None, reason=str(_missing()))

# Highest accepted overall exposure per unit (systemd-analyze's 0.0 … 10.0 scale). Every unit
# at most 2.0, the root helper at most 2.5; the measured figures are in docs/security.md.
THRESHOLDS = {
    "llama-trigger": 2.0,
    "llama-review": 2.0,
    "llama-meta": 2.0,
    "ai-sysadmin-api": 2.0,
    "ai-sysadmin-daemon": 2.0,
    "ai-sysadmin-helper": 2.5,
    # Root without capabilities that writes the system profile; the activation it hands to
    # a transient unit is not part of this unit (docs/security.md says what that means).
    "ai-sysadmin-rollback": 2.0,
    "ai-sysadmin-postgresql-setup": 2.0,
    # The fleet agent: the daemon's sandbox (network, journal, read-only /home, all of /proc).
    "ai-sysadmin-agent": 2.0,
}

SCENARIOS = {
    # The whole catalog (so the rollback unit exists), SQLite, CPU.
    "default": MODELS,
    "postgresql": MODELS + ' database.type = "postgresql";',
    "cuda": MODELS + ' llama-cpp.acceleration = "cuda";',
    "rocm": MODELS + ' llama-cpp.acceleration = "rocm";',
    "vulkan": MODELS + ' llama-cpp.acceleration = "vulkan";',
    # Credentials, an environment file, and extra flags that need systemd's quoting.
    "credentials": MODELS
    + ' gateway.apiKeysFile = "/run/secrets/api-keys"; gateway.adminKeyFile = "/run/secrets/admin";'
    ' gateway.environmentFile = "/run/secrets/env";'
    ' layers.review.extraFlags = [ "--chat-template" "a \\"q\\" %s \\${HOME} $x" ];',
    "no-rollback": MODELS + ' actions.allowlist = [ "unit_status" "restart_unit" "nix_gc" ];',
    # A fleet agent: no layers or gateway; the daemon, the helper, the rollback unit and
    # ai-sysadmin-agent, the host key a credential of the agent and the daemon.
    "agent": 'fleet = { role = "agent"; gatewayUrl = "https://ai.example.org:8083";'
    ' keyFile = "/run/secrets/host-key"; };',
}

OVERALL = re.compile(r"Overall exposure level for (?P<unit>\S+): (?P<score>\d+\.\d+) (?P<word>\w+)")


def _value(v: Any) -> str:
    if v is True:
        return "true"
    if v is False:
        return "false"
    return str(v)


def _lines(key: str, value: Any) -> list[str]:
    return [f"{key}={_value(v)}" for v in (value if isinstance(value, list) else [value])]


def render_unit(unit: dict[str, Any], standin_root: Path) -> str:
    """A unit file as NixOS writes one for ``systemd.services.<name>``, with each Exec*
    program swapped for a stand-in under ``standin_root`` (created here)."""
    out = ["[Unit]", f"Description={unit['description']}"]
    for key in ("after", "before", "wants", "requires"):
        if unit[key]:
            out.append(f"{key.capitalize()}={' '.join(unit[key])}")
    if unit["restartTriggers"]:
        out.append(f"X-Restart-Triggers={' '.join(unit['restartTriggers'])}")
    if not unit.get("restartIfChanged", True):
        out.append("X-RestartIfChanged=false")
    out.append("[Service]")
    env = dict(unit["environment"])
    if unit["path"]:
        env["PATH"] = ":".join(f"{p}/bin:{p}/sbin" for p in unit["path"])
    out += [f"Environment={json.dumps(f'{k}={v}')}" for k, v in env.items()]
    for key, value in unit["serviceConfig"].items():
        if key.startswith("Exec"):
            commands = value if isinstance(value, list) else [value]
            value = [_standin(line, standin_root) for line in commands]
        out += _lines(key, value)
    return "\n".join(out) + "\n"


def _standin(command: str, root: Path) -> str:
    program = exec_argv(command)[0]
    assert program.startswith("/"), command
    standin = root / program.lstrip("/")
    standin.parent.mkdir(parents=True, exist_ok=True)
    standin.write_text("#!/bin/sh\nexit 0\n")
    standin.chmod(0o755)
    return str(standin) + command[len(program):]


def write_units(units: dict[str, Any], tmp: Path) -> dict[str, Path]:
    unit_dir = tmp / "units"
    unit_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, unit in units.items():
        path = unit_dir / f"{name}.service"
        path.write_text(render_unit(unit, tmp / "standins"))
        files[name] = path
    return files


def exposure(files: dict[str, Path]) -> dict[str, float]:
    """Overall exposure per unit, from ``systemd-analyze security --offline=true``."""
    assert SYSTEMD_ANALYZE is not None
    proc = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=true", "--no-pager", *map(str, files.values())],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    scores = {m["unit"].removesuffix(".service"): float(m["score"])
              for m in OVERALL.finditer(proc.stdout)}
    assert set(scores) == set(files), proc.stdout[-2000:]
    return scores


def verify(files: dict[str, Path]) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    return subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", "--generators=no", *map(str, files.values())],
        capture_output=True, text=True, timeout=120,
    )


def units_of(scenario: str) -> dict[str, Any]:
    proc = run_eval(SCENARIOS[scenario])
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["assertions"] == [], result["assertions"]
    units: dict[str, Any] = result["units"]
    return units


@needs_analyze
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_every_unit_scores_within_its_threshold_and_verifies(
    scenario: str, tmp_path: Path
) -> None:
    units = units_of(scenario)
    files = write_units(units, tmp_path)
    scores = exposure(files)
    over = {name: (score, THRESHOLDS[name]) for name, score in scores.items()
            if score > THRESHOLDS[name]}
    assert over == {}, f"{scenario}: exposure over the threshold: {over}; all: {scores}"
    proc = verify(files)
    # verify exits 0 on unknown keys and unparsable values: any message is a failure.
    assert proc.returncode == 0 and proc.stderr.strip() == "" and proc.stdout.strip() == "", (
        proc.stdout + proc.stderr)


@needs_analyze
@pytest.mark.skipif(SYSTEMD_VERSION != 252, reason="docs/security.md's figures are systemd "
                    f"252's weights; this is systemd {SYSTEMD_VERSION}")
def test_the_scores_of_docs_security_md(tmp_path: Path) -> None:
    """The table in docs/security.md, measured here (CPU layers, PostgreSQL setup included)."""
    files = write_units(units_of("postgresql"), tmp_path / "pg")
    scores = exposure(files)
    gpu = exposure(write_units({"llama-meta": units_of("cuda")["llama-meta"]}, tmp_path / "gpu"))
    assert scores == {
        "llama-trigger": 1.2, "llama-review": 1.2, "llama-meta": 1.2,
        "ai-sysadmin-api": 1.6, "ai-sysadmin-daemon": 1.7, "ai-sysadmin-helper": 1.5,
        "ai-sysadmin-rollback": 1.0, "ai-sysadmin-postgresql-setup": 0.4,
    }, scores
    assert gpu == {"llama-meta": 1.6}


@needs_analyze
def test_the_agent_scenario_scores_the_agent_unit(tmp_path: Path) -> None:
    """The agent role's units are what the scenario above scores: the agent among them,
    no layer or gateway, and the agent no more exposed than the daemon it resembles."""
    units = units_of("agent")
    assert set(units) == {"ai-sysadmin-agent", "ai-sysadmin-daemon", "ai-sysadmin-helper",
                          "ai-sysadmin-rollback"}
    scores = exposure(write_units(units, tmp_path))
    assert scores["ai-sysadmin-agent"] <= THRESHOLDS["ai-sysadmin-agent"], scores
    assert scores["ai-sysadmin-agent"] <= scores["ai-sysadmin-daemon"], scores


@needs_analyze
def test_the_checks_catch_a_bad_unit(tmp_path: Path) -> None:
    """The harness itself: a mistyped key, a relative path and an unconfined root unit are
    caught (verify prints them; the score is high)."""
    unit = units_of("default")["ai-sysadmin-helper"]
    sc = dict(unit["serviceConfig"])
    sc["ProtectSystm"] = sc.pop("ProtectSystem")
    sc["ReadWritePaths"] = ["var/log/journal"]
    files = write_units({"bad": unit | {"serviceConfig": sc}}, tmp_path)
    proc = verify(files)
    assert "Unknown key 'ProtectSystm'" in proc.stderr
    assert "ReadWritePaths= path is not absolute" in proc.stderr
    bare = {"serviceConfig": {"Type": "exec", "ExecStart": unit["serviceConfig"]["ExecStart"]}}
    files = write_units({"unconfined": unit | bare | {"environment": {}, "path": []}},
                        tmp_path / "bare")
    assert exposure(files)["unconfined"] > 9.0


# -- the helper hands nixos_rollback to the rollback unit --------------------------------------

PEER = (4242, 0, 0)


def _standin_units() -> dict[str, dict[str, Any]]:
    return {
        ROLLBACK_UNIT: {"id": ROLLBACK_UNIT, "names": [ROLLBACK_UNIT]},
        "nginx.service": {"id": "nginx.service", "names": ["nginx.service"]},
    }


async def test_helper_starts_the_rollback_unit_for_nixos_rollback(tmp_path: Path) -> None:
    st = make_standins(tmp_path, _standin_units())
    helper = Helper(settings_for(tmp_path, st))
    reply = await helper.handle({"action": "nixos_rollback", "params": {}}, PEER)
    assert reply["ok"] is True, reply
    assert reply["result"]["exit_code"] == 0
    # No shell, no nixos-rebuild in the helper: systemd runs the unit and reports its result.
    assert st.calls() == [["systemctl", "start", "--wait", "--", ROLLBACK_UNIT]]
    assert reply["argv"] == [str(st.bindir / "systemctl"), "start", "--wait", "--", ROLLBACK_UNIT]


async def test_helper_reports_a_failed_rollback(tmp_path: Path) -> None:
    units = _standin_units()
    units[ROLLBACK_UNIT]["fail"] = True
    st = make_standins(tmp_path, units)
    reply = await Helper(settings_for(tmp_path, st)).handle(
        {"action": "nixos_rollback", "params": {}}, PEER)
    assert reply["ok"] is True and reply["result"]["exit_code"] == 1
    assert "failed" in reply["result"]["output"]


@pytest.mark.parametrize("action", ["start_unit", "restart_unit", "reset_failed_unit"])
async def test_helper_refuses_other_changes_to_the_rollback_unit(
    action: str, tmp_path: Path
) -> None:
    """Starting the unit by name would be a rollback without the high-risk approval —
    even where protected_units (the helper's own configuration) forgot it."""
    st = make_standins(tmp_path, _standin_units())
    settings = settings_for(tmp_path, st)
    reply = await Helper(settings).handle({"action": action, "params": {"unit": ROLLBACK_UNIT}},
                                          PEER)
    assert reply["ok"] is False and reply["code"] == "protected_unit", reply
    assert st.calls() == []
    # Reading it is fine.
    status = await Helper(settings).handle(
        {"action": "unit_status", "params": {"unit": ROLLBACK_UNIT}}, PEER)
    assert status["ok"] is True, status
