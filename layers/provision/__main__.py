"""``python -m layers.provision``: assemble the default model and build llama-server now,
so the first ``ai-sysadmin run`` starts in seconds. Safe to run repeatedly."""

from __future__ import annotations

import sys

from layers.config import ConfigError, load_settings
from layers.provision.engine import EngineError, ensure_llama_server
from layers.provision.model import ModelError, resolve_model


def main() -> int:
    try:
        settings = load_settings()
        for name, layer in settings.layers.items():
            if layer.managed:
                path = resolve_model(layer.model, settings.engine.cache_dir, layer=name)
                print(f"provision: layer {name} model {path}", file=sys.stderr)
        if settings.engine.kind == "llama-server":
            binary = ensure_llama_server(settings.engine)
            print(f"provision: llama-server {binary}", file=sys.stderr)
    except ConfigError as exc:
        for line in exc.lines:
            print(f"provision: config: {line}", file=sys.stderr)
        return 1
    except (ModelError, EngineError) as exc:
        print(f"provision: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
