"""``python -m layers.provision [--llama-cpp-python]``: assemble the models, then build
and prove the engine now, so the first ``ai-sysadmin run`` starts in seconds. Safe to
run repeatedly: what is cached and proven on this boot takes a second.

``--llama-cpp-python`` also installs a proven llama-cpp-python (the fallback engine)
into this interpreter, as when ``engine.kind = "llama-cpp-python"``.
"""

from __future__ import annotations

import argparse
import sys
import time

from layers.config import ConfigError, load_settings
from layers.provision.engine import EngineError, ensure_llama_server
from layers.provision.model import ModelError, resolve_model


def _say(msg: str) -> None:
    print(f"provision: {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m layers.provision")
    parser.add_argument("--llama-cpp-python", action="store_true",
                        help="also install a proven llama-cpp-python (fallback engine)")
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
        models = []
        for name, layer in settings.layers.items():
            if layer.managed:
                models.append(resolve_model(layer.model, settings.engine.cache_dir, layer=name))
        if models:
            _say("models " + ", ".join(sorted({str(m) for m in models})))
        t0 = time.monotonic()
        if settings.engine.kind == "llama-server":
            binary = ensure_llama_server(settings.engine, models)
            _say(f"llama-server {binary} (proven in {time.monotonic() - t0:.1f}s)")
        if args.llama_cpp_python or settings.engine.kind == "llama-cpp-python":
            from layers.provision.llama_cpp_python import ensure_llama_cpp_python

            t0 = time.monotonic()
            chosen = ensure_llama_cpp_python(settings.engine, models)
            _say(f"llama-cpp-python: {chosen} ({time.monotonic() - t0:.1f}s)")
    except ConfigError as exc:
        for line in exc.lines:
            _say(f"config: {line}")
        return 1
    except (ModelError, EngineError) as exc:
        _say(str(exc))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
