"""Virtual environments the bench installs for itself, never into the project's venv:
``litellm`` (LiteLLM's proxy, the anchor), ``tools`` (matplotlib for the plots,
py-spy and pyinstrument for profiling) and ``http_ab`` (aiohttp, the other side of
bench/http_ab.py, with what the layer client imports). Under
``~/.cache/ai-sysadmin/bench-venvs``.

The anchor is pinned: LiteLLM by exact version, installed in pip's hash-checking mode
from ``bench/requirements/litellm.txt`` (``--require-hashes``, wheels only), then its
``[proxy]`` dependencies resolved against that installed version. A venv that holds
another version is refused rather than measured.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from layers.config import default_cache_dir

REQUIREMENTS = Path(__file__).resolve().parent / "requirements"


@dataclass(frozen=True)
class VenvSpec:
    packages: list[str]
    hashed: Path | None = None  # requirements with --hash lines, installed first, no deps
    pins: dict[str, str] = field(default_factory=dict)  # distribution → exact version


def _pinned(requirements: Path) -> dict[str, str]:
    """``name==version`` lines of a requirements file."""
    found = re.findall(r"^([A-Za-z0-9_.-]+)==([^\s\\;]+)", requirements.read_text(), re.M)
    return {name.lower(): version for name, version in found}


LITELLM_REQUIREMENTS = REQUIREMENTS / "litellm.txt"
LITELLM_VERSION = _pinned(LITELLM_REQUIREMENTS)["litellm"]

# aiohttp by exact version: bench/http_ab.py compares layers/http.py with it.
AIOHTTP_VERSION = "3.14.5"


def _as_here(*dists: str) -> list[str]:
    """``dist==version`` as installed where the bench runs (the project's venv): the
    layer client imported from another venv runs on the same versions."""
    out = []
    for d in dists:
        try:
            out.append(f"{d}=={importlib.metadata.version(d)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(d)  # not here (imported from elsewhere): pip's newest
    return out


VENVS: dict[str, VenvSpec] = {
    "litellm": VenvSpec([f"litellm[proxy]=={LITELLM_VERSION}"], hashed=LITELLM_REQUIREMENTS,
                        pins={"litellm": LITELLM_VERSION}),
    "tools": VenvSpec(["matplotlib>=3.8", "py-spy>=0.3", "pyinstrument>=4.6"]),
    "http_ab": VenvSpec([f"aiohttp=={AIOHTTP_VERSION}",
                         *_as_here("pydantic", "pydantic-settings", "uvloop")],
                        pins={"aiohttp": AIOHTTP_VERSION}),
}


class VenvError(Exception):
    pass


def venv_root() -> Path:
    return default_cache_dir() / "bench-venvs"


def _stamp(spec: VenvSpec) -> str:
    text = " ".join(spec.packages) + (spec.hashed.read_text() if spec.hashed else "")
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def install_commands(python: Path, spec: VenvSpec) -> list[list[str]]:
    """The pip commands that install ``spec`` into the venv of ``python``."""
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    cmds = []
    if spec.hashed is not None:
        # Hash-checking mode covers every package of the command: hence the pinned ones
        # alone first (no deps, wheels only: the hashes are the wheels'), then the rest.
        cmds.append([*pip, "--require-hashes", "--no-deps", "--only-binary", ":all:",
                     "-r", str(spec.hashed)])
    cmds.append([*pip, *spec.packages])
    return cmds


def ensure_venv(name: str) -> Path:
    """Path of the venv's python, creating and installing it once (a stamp records the
    package list and pins, so a change reinstalls)."""
    spec = VENVS[name]
    root = venv_root() / name
    python = root / "bin" / "python"
    stamp = root / f".installed-{_stamp(spec)}"
    if not (stamp.is_file() and python.is_file()):
        print(f"bench: installing {' '.join(spec.packages)} into {root} (once)", flush=True)
        if not python.is_file():
            subprocess.run([sys.executable, "-m", "venv", str(root)], check=True)
        for cmd in install_commands(python, spec):
            subprocess.run(cmd, check=True)
        stamp.touch()
    for dist, version in spec.pins.items():
        got = package_version(python, dist)
        if got != version:
            raise VenvError(f"{root}: {dist} {got} installed, the bench pins {version}; "
                            f"remove {root} to reinstall")
    return python


def package_version(python: Path, dist: str) -> str:
    out = subprocess.run(
        [str(python), "-c", f"import importlib.metadata as m; print(m.version({dist!r}))"],
        capture_output=True, text=True, check=False,
    )
    return out.stdout.strip() or "?"
