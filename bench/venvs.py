"""Virtual environments the bench installs for itself, never into the project's venv:
``litellm`` (LiteLLM's proxy, the anchor) and ``tools`` (matplotlib for the plots,
py-spy and pyinstrument for profiling). Under ``~/.cache/ai-sysadmin/bench-venvs``."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

from layers.config import default_cache_dir

VENV_PACKAGES: dict[str, list[str]] = {
    "litellm": ["litellm[proxy]"],
    "tools": ["matplotlib>=3.8", "py-spy>=0.3", "pyinstrument>=4.6"],
}


def venv_root() -> Path:
    return default_cache_dir() / "bench-venvs"


def ensure_venv(name: str) -> Path:
    """Path of the venv's python, creating and installing it once (a stamp records the
    package list, so a change reinstalls)."""
    packages = VENV_PACKAGES[name]
    root = venv_root() / name
    python = root / "bin" / "python"
    stamp = root / f".installed-{hashlib.sha256(' '.join(packages).encode()).hexdigest()[:12]}"
    if stamp.is_file() and python.is_file():
        return python
    print(f"bench: installing {' '.join(packages)} into {root} (once)", flush=True)
    if not python.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(root)], check=True)
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *packages],
        check=True,
    )
    stamp.touch()
    return python


def package_version(python: Path, dist: str) -> str:
    out = subprocess.run(
        [str(python), "-c", f"import importlib.metadata as m; print(m.version({dist!r}))"],
        capture_output=True, text=True, check=False,
    )
    return out.stdout.strip() or "?"
