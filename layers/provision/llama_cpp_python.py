"""The pip-only fallback engine, ``llama-cpp-python``: proven like llama-server.

pip compiles llama-cpp-python's ggml natively from its sdist, so it faults where a
native llama-server does. Provisioning builds its wheel per variant of
:mod:`layers.provision.cpu` (``CMAKE_ARGS``), caches the wheel under the variant's key,
installs it into this interpreter and proves it by generating tokens; a variant known to
fault here (by llama-server's build of the same ggml, too) is never built.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from layers.config import EngineConfig
from layers.provision.cpu import Variant, machine_key
from layers.provision.engine import (
    EngineError,
    _fetch_sdist,
    _log,
    _run_logged,
    first_proven_variant,
    proof_models,
)
from layers.provision.verify import (
    EngineFault,
    is_proven,
    prove_llama_cpp_python,
    remember_proof,
)


def installed_module() -> Path | None:
    """``llama_cpp/__init__.py`` of the installed package (rewritten by every install, so
    a proof of it lapses when the package changes), or None."""
    spec = importlib.util.find_spec("llama_cpp")
    return Path(spec.origin) if spec is not None and spec.origin else None


def check_llama_cpp_python(config: EngineConfig, models: Sequence[Path] | None = None) -> None:
    """Prove the installed llama-cpp-python (once per boot); one line when it cannot run."""
    module = installed_module()
    if module is None:
        raise EngineError(
            "engine.kind = llama-cpp-python needs llama-cpp-python: run "
            "`python -m layers.provision --llama-cpp-python`"
        )
    proof = proof_models(config, models)
    if is_proven(module, proof):
        return
    try:
        _prove_installed(config, module, proof)
    except EngineFault as fault:
        raise EngineError(
            f"llama-cpp-python {fault}; run `python -m layers.provision --llama-cpp-python` "
            "to build one for this machine"
        ) from None


def _prove_installed(config: EngineConfig, module: Path, proof: list[Path]) -> None:
    """Generate on each model with the installed package; remember it for this boot."""
    for model in dict.fromkeys(proof):
        prove_llama_cpp_python(sys.executable, model, timeout=config.health_timeout)
    remember_proof(module, proof)


def ensure_llama_cpp_python(config: EngineConfig, models: Sequence[Path] | None = None) -> str:
    """Install a llama-cpp-python this machine runs; returns how it was chosen."""
    proof = proof_models(config, models)
    module = installed_module()
    if module is not None and is_proven(module, proof):
        return "installed build, proven on this boot"

    def install_and_prove(variant: Variant) -> None:
        _install(_wheel(config, variant))
        module = installed_module()
        assert module is not None
        _prove_installed(config, module, proof)

    _, variant, skipped = first_proven_variant(config, "llama-cpp-python", install_and_prove)
    why = f" because {'; '.join(skipped)}" if skipped else ""
    return f"{variant.name} build ({variant.description}){why}"


def _wheel(config: EngineConfig, variant: Variant) -> Path:
    version = config.llama_cpp_python_version
    where = (config.cache_dir / "engines"
             / f"llama-cpp-python-{version}-{variant.name}-{machine_key()}")
    found = sorted(where.glob("llama_cpp_python-*.whl"))
    if found:
        return found[-1]
    where.mkdir(parents=True, exist_ok=True)
    sdist = _fetch_sdist(version, config.cache_dir, where)
    _log(f"building llama-cpp-python {version}, {variant.name} build ({variant.description}); "
         "about 10 minutes on 2 cores")
    env_args = " ".join(variant.cmake_flags)
    _run_logged(
        # -v: cmake's "[ 42%]" lines come through, and become the progress shown.
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "-v",
         "-w", str(where), str(sdist)],
        where,
        progress=True,
        env={"CMAKE_ARGS": env_args, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 1)},
    )
    found = sorted(where.glob("llama_cpp_python-*.whl"))
    if not found:
        raise EngineError(f"pip wheel gave no llama-cpp-python wheel in {where}")
    return found[-1]


def _install(wheel: Path) -> None:
    _log(f"installing {wheel.name} into {sys.prefix}")
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    # The wheel itself replaces whatever was installed; then its [server] dependencies.
    _run_logged([*pip, "--no-deps", "--force-reinstall", str(wheel)], wheel.parent)
    _run_logged([*pip, f"{wheel}[server]"], wheel.parent)
