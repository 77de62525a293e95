"""What machine and checkout a figure was measured on. Standard library only: the
benchmarks that run in a venv of their own (bench/http_ab.py) import it too."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("?" where it says none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


def git_head() -> str:
    """This checkout's short commit ("?" outside git)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                             capture_output=True, text=True, check=False)
    except OSError:
        return "?"
    return out.stdout.strip() or "?"
