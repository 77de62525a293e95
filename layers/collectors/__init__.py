"""Collectors: journald, metrics and failed units, each turning what it sees into
``Event``s handed to a sink (the gateway's ``POST /v1/events``, or the store)."""

from __future__ import annotations

from pathlib import Path


def systemd_running() -> bool:
    """True when this machine was booted with systemd (sd_booted(3)'s test)."""
    return Path("/run/systemd/system").is_dir()
