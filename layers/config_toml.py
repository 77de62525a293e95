"""Writing configuration as TOML (the standard library only reads it).

Used by ``ai-sysadmin config show --toml`` to print a file that loads back as the same
configuration, and by the tests and benchmarks to write the configs they run with.
Keys whose value is ``None`` are left out: TOML has no null, and absent means default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        items = ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items() if x is not None)
        return "{ " + items + " }"
    s = str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{s}"'


def dumps(data: dict[str, Any]) -> str:
    """Nested dicts as TOML tables; scalars and lists of a table before its sub-tables."""
    lines: list[str] = []

    def emit(prefix: str, table: dict[str, Any]) -> None:
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict) and v is not None}
        tables = {k: v for k, v in table.items() if isinstance(v, dict)}
        if prefix and scalars:
            lines.append(f"[{prefix}]")
        for k, v in scalars.items():
            lines.append(f"{k} = {toml_value(v)}")
        for k, v in tables.items():
            emit(f"{prefix}.{k}" if prefix else k, v)

    emit("", data)
    return "\n".join(lines) + "\n"


def write_toml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(dumps(data))
    return path
