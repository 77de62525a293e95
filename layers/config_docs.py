"""Render docs/configuration.md from the typed settings, so the reference never drifts.

``python -m layers.config_docs > docs/configuration.md``; a test checks it is current.
"""

from __future__ import annotations

import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from layers.config import Settings

INTRO = """\
# Configuration reference

ai-sysadmin reads one typed configuration, from (highest priority first):

1. environment variables `AI_SYSADMIN_<SECTION>__<FIELD>` (nested fields joined with `__`,
   lists and tables as JSON), e.g. `AI_SYSADMIN_GATEWAY__PORT=9000`,
   `AI_SYSADMIN_LAYERS__META__MODEL=/models/qwen.gguf`;
2. a TOML file: `ai-sysadmin --config PATH`, else `$AI_SYSADMIN_CONFIG`, else
   `/etc/ai-sysadmin/config.toml` when it exists;
3. the embedded defaults below.

Unknown keys and wrong types are errors. `ai-sysadmin config check` validates a
configuration and prints each problem with its field; `ai-sysadmin config show` prints
the effective configuration.

Example `config.toml`:

```toml
state_dir = "/var/lib/ai-sysadmin"

[layers.meta]
model = "/models/qwen2.5-7b-instruct-q4_k_m.gguf"
context_size = 16384

[[layers.meta.endpoints]]
url = "http://gpu-box:8080/v1"
role = "fallback"

[gateway]
api_keys_file = "/run/secrets/ai-sysadmin-keys"

[actions]
autonomy = "auto-safe"
```

This page is generated from the code (`python -m layers.config_docs`).
"""


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        parts = [_type_name(a) for a in args if a is not type(None)]
        optional = any(a is type(None) for a in args)
        return " \\| ".join(parts) + (" (optional)" if optional else "")
    if origin in (list, tuple):
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return f"table of {_type_name(args[1])}" if len(args) == 2 else "table"
    if isinstance(annotation, type):
        if issubclass(annotation, BaseModel):
            return "table"
        return {"str": "string", "int": "integer", "float": "number", "bool": "boolean",
                "Path": "path", "PosixPath": "path"}.get(annotation.__name__, annotation.__name__)
    return str(annotation)


def _default(field: FieldInfo, value: Any) -> str:
    if value is PydanticUndefined:
        return "(required)"
    if isinstance(value, BaseModel):
        return "(table)"
    if value is None:
        return "(unset)"
    if isinstance(value, Path):
        home = str(Path.home())
        shown = str(value).replace(home, "~", 1) if str(value).startswith(home) else value
        return f"`{shown}`"
    return f"`{json.dumps(value, default=str)}`"


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _section(
    model: type[BaseModel], instance: Any, prefix: str, out: list[str], title: str
) -> None:
    rows: list[str] = []
    nested: list[tuple[str, type[BaseModel], Any]] = []
    for name, field in model.model_fields.items():
        key = f"{prefix}.{name}" if prefix else name
        sub = _nested_model(field.annotation)
        if sub is not None and typing.get_origin(field.annotation) is not list:
            nested.append((key, sub, getattr(instance, name, None)))
            continue
        env = "AI_SYSADMIN_" + key.replace(".", "__").upper()
        desc = (field.description or "").replace("\n", " ")
        if sub is not None:
            desc += f" Each entry: {', '.join(f'`{k}`' for k in sub.model_fields)}."
        rows.append(f"| `{key}` | {_type_name(field.annotation)} | "
                    f"{_default(field, getattr(instance, name, PydanticUndefined))} | "
                    f"{desc} <br>`{env}` |")
    if rows:
        out.append(f"\n## {title}\n")
        if model.__doc__ and model is not Settings:
            out.append(model.__doc__.strip().splitlines()[0] + "\n")
        out.append("| key | type | default | meaning / environment variable |")
        out.append("| --- | --- | --- | --- |")
        out.extend(rows)
    for key, sub, value in nested:
        _section(sub, value, key, out, f"`[{key}]`")


def render() -> str:
    out = [INTRO]
    # Defaults without reading the environment or any file.
    _section(Settings, Settings.model_construct(), "", out, "Top level")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
