"""Engine provisioning: find ``llama-server``, or build it once and cache it — and never
hand out a binary before it has generated tokens on this machine.

Order: the configured path, then ``llama-server`` on PATH (either is proven and, if it
faults, refused with one line: rebuilding behind the admin's back would hide a broken
install), then the build variants of :mod:`layers.provision.cpu`, best first: a cached
one is proven (once per boot), a missing one is built from the llama.cpp sources
vendored in the pinned ``llama-cpp-python`` sdist (cmake target ``llama-server``) and
proven. A variant that faults is remembered and the next one is tried, so a machine that
lists instructions it cannot execute gets a build it can run, and says which and why.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from layers.config import EngineConfig
from layers.errors import UserError
from layers.provision.cpu import Variant, machine_key, variants
from layers.provision.model import default_model
from layers.provision.verify import EngineFault, known_fault, prove_all, remember_fault

# cmake options for a self-contained server binary that needs nothing from the network
# at build time (no prebuilt web UI download, no HTTPS client). The CPU instruction sets
# come from the variant.
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_CURL=OFF",
)


class EngineError(UserError):
    """No usable engine; the message is one line saying what to do."""


def _log(msg: str) -> None:
    print(f"[engine] {msg}", file=sys.stderr, flush=True)


def variant_dir(config: EngineConfig, variant: Variant) -> Path:
    """Where one variant's build is cached: by sdist version, variant and machine."""
    name = f"llama-server-{config.llama_cpp_python_version}-{variant.name}-{machine_key()}"
    return config.cache_dir / "engines" / name


def cached_binary(config: EngineConfig, variant: Variant) -> Path:
    return variant_dir(config, variant) / "llama-server"


def proof_models(config: EngineConfig, models: Sequence[Path] | None) -> list[Path]:
    """The models an engine is proven on: the configured ones, else the packaged one."""
    return list(models) if models else [default_model(config.cache_dir)]


def ensure_llama_server(config: EngineConfig, models: Sequence[Path] | None = None) -> Path:
    """A llama-server binary proven to generate on ``models`` (default: the packaged
    model) on this machine, building one on first use."""
    proof = proof_models(config, models)
    given = _given_binary(config)
    if given is not None:
        where, path = given
        try:
            prove_all(path, proof, load_timeout=config.health_timeout)
        except EngineFault as fault:
            instead = ("unset engine.llama_server" if where == "engine.llama_server"
                       else "remove it from PATH or set engine.llama_server")
            raise EngineError(
                f"{where} {path} {fault}; use a build for this machine, or {instead} "
                "so ai-sysadmin builds one"
            ) from None
        return path
    return _proven_variant(config, proof)


def _given_binary(config: EngineConfig) -> tuple[str, Path] | None:
    if config.llama_server is not None:
        path = config.llama_server.expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise EngineError(f"engine.llama_server {path}: not an executable file")
        return "engine.llama_server", path
    on_path = shutil.which("llama-server")
    return ("llama-server on PATH", Path(on_path)) if on_path else None


def _proven_variant(config: EngineConfig, proof: list[Path]) -> Path:
    def install_and_prove(variant: Variant) -> Path:
        binary = cached_binary(config, variant)
        if not binary.is_file():
            binary = build_llama_server(config, variant)
        prove_all(binary, proof, load_timeout=config.health_timeout)
        return binary

    binary, variant, skipped = first_proven_variant(config, "llama-server", install_and_prove)
    if skipped:
        _log(f"using the {variant.name} build ({variant.description}) because "
             + "; ".join(skipped))
    return binary


T = TypeVar("T")


def first_proven_variant(
    config: EngineConfig, engine: str, install_and_prove: Callable[[Variant], T]
) -> tuple[T, Variant, list[str]]:
    """Walk the variants best first, skipping those known to fault here: the first whose
    ``install_and_prove`` passes wins; one that faults by a signal is remembered (for every
    engine built from the same ggml) and the next is tried. Returns what it gave, the
    variant, and why the better ones were passed over."""
    version = config.llama_cpp_python_version
    skipped: list[str] = []
    for variant in variants():
        reason = known_fault(config.cache_dir, version, variant.name)
        if reason is not None:
            skipped.append(f"{variant.name}: {reason}")
            continue
        try:
            return install_and_prove(variant), variant, skipped
        except EngineFault as fault:
            if fault.signum is None:
                # Not the CPU: a model that does not load, a port, a timeout. Another
                # variant would fail the same way.
                raise EngineError(f"{engine} ({variant.name} build) {fault}") from None
            _log(f"the {engine} {variant.name} build {fault}; trying a build that assumes less")
            remember_fault(config.cache_dir, version, variant.name, str(fault))
            skipped.append(f"{variant.name}: {fault}")
    raise EngineError(f"no {engine} build runs on this machine: " + "; ".join(skipped))


@contextmanager
def _build_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _log("another process is building llama-server; waiting for it")
            fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def build_llama_server(config: EngineConfig, variant: Variant) -> Path:
    target = cached_binary(config, variant)
    with _build_lock(target.parent.with_name(target.parent.name + ".lock")):
        if target.is_file():  # built by the process we waited for
            return target
        for tool in ("cmake", "c++"):
            if shutil.which(tool) is None:
                raise EngineError(
                    f"building llama-server needs {tool}: run `apt-get install cmake g++` "
                    "(or set engine.llama_server to an existing binary)"
                )
        version = config.llama_cpp_python_version
        with tempfile.TemporaryDirectory(prefix="ai-sysadmin-build-") as tmp:
            work = Path(tmp)
            src = _fetch_vendored_source(version, work, config.cache_dir)
            build_dir = work / "build"
            _log(f"configuring llama.cpp from llama-cpp-python {version}, "
                 f"{variant.name} build: {variant.description}")
            _run_logged(
                ["cmake", "-S", str(src), "-B", str(build_dir), *CMAKE_OPTIONS,
                 *variant.cmake_flags],
                work,
            )
            jobs = str(os.cpu_count() or 1)
            _log(f"building llama-server with {jobs} jobs (about 5-10 minutes on 2 cores)")
            _run_logged(
                ["cmake", "--build", str(build_dir), "--target", "llama-server", "-j", jobs],
                work,
                progress=True,
            )
            built = build_dir / "bin" / "llama-server"
            if not built.is_file():
                raise EngineError(f"llama-server build finished but {built} is missing")
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = target.with_suffix(".partial")
            shutil.copy2(built, staging)
            os.replace(staging, target)  # atomic: a half-copied binary is never cached
        _log(f"cached {target}")
        return target


def _fetch_sdist(version: str, cache_dir: Path, work: Path) -> Path:
    """The pinned llama-cpp-python sdist, downloaded once into the cache."""
    sdist_dir = cache_dir / "sdists"
    sdist_dir.mkdir(parents=True, exist_ok=True)
    name = f"llama_cpp_python-{version}.tar.gz"
    sdist = sdist_dir / name
    if not sdist.is_file():
        _log(f"downloading the llama-cpp-python {version} sdist from the package index")
        _run_logged(
            [
                sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                # Only the package itself as an sdist: ":all:" made pip build its build
                # backends (scikit-build-core and friends) from source as well.
                "--no-binary", "llama-cpp-python",
                "-d", str(sdist_dir), f"llama-cpp-python=={version}",
            ],
            work,
        )
        if not sdist.is_file():
            raise EngineError(f"pip download gave no {name} in {sdist_dir}")
    return sdist


def _fetch_vendored_source(version: str, work: Path, cache_dir: Path) -> Path:
    sdist = _fetch_sdist(version, cache_dir, work)
    name = sdist.name
    _log(f"unpacking vendored llama.cpp from {name}")
    prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
        if not members:
            raise EngineError(f"{name} has no vendor/llama.cpp directory")
        tar.extractall(work, members=members, filter="data")
    src = work / prefix
    if not (src / "tools" / "server").is_dir():
        raise EngineError(f"{name}: vendored llama.cpp has no tools/server")
    return src


# make prints "[ 42%] Building …"; ninja (scikit-build-core's default) "[117/250] Building …".
_PERCENT = re.compile(r"^\s*\[\s*(\d+)%\]")
_STEPS = re.compile(r"^\s*\[(\d+)/(\d+)\]")


def _percent(line: str) -> int | None:
    if m := _PERCENT.match(line):
        return int(m.group(1))
    if (m := _STEPS.match(line)) and int(m.group(2)):
        return int(m.group(1)) * 100 // int(m.group(2))
    return None


def _run_logged(
    argv: list[str], cwd: Path, *, progress: bool = False, env: dict[str, str] | None = None
) -> None:
    """Run a build step; show percentage progress, keep the tail of output for errors."""
    tail: list[str] = []
    last_pct = -1
    started = time.monotonic()
    with subprocess.Popen(
        argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, **env} if env else None,
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail = (tail + [line.rstrip()])[-30:]
            pct = _percent(line) if progress else None
            if pct is not None and pct >= last_pct + 5:
                last_pct = pct
                _log(f"build {pct}% ({time.monotonic() - started:.0f}s)")
        code = proc.wait()
    if code != 0:
        detail = "\n".join(tail)
        raise EngineError(f"{argv[0]} {argv[1]} failed with exit code {code}:\n{detail}")


def llama_cpp_python_available() -> bool:
    try:
        import llama_cpp.server  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        return False
    return True
