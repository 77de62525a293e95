"""Engine provisioning: find ``llama-server``, or build it once and cache it.

Order: the configured path, then ``llama-server`` on PATH, then a cached build, then a
build from the llama.cpp sources vendored in the pinned ``llama-cpp-python`` sdist
(cmake target ``llama-server``). The cache key holds the sdist version, the machine
architecture and a digest of the CPU flags (the build is ``GGML_NATIVE``), so a
binary is never reused where it could not run.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from layers.config import EngineConfig

# cmake options for a self-contained server binary that needs nothing from the network
# at build time (no prebuilt web UI download, no HTTPS client).
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DGGML_NATIVE=ON",
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


class EngineError(Exception):
    """No usable engine; the message is one line saying what to do."""


def _log(msg: str) -> None:
    print(f"[engine] {msg}", file=sys.stderr, flush=True)


def cache_key(version: str) -> str:
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    digest = hashlib.sha256(flags.encode()).hexdigest()[:10]
    return f"llama-server-{version}-{platform.machine()}-{digest}"


def cached_binary(config: EngineConfig) -> Path:
    return config.cache_dir / "engines" / cache_key(config.llama_cpp_python_version) / "llama-server"


def find_llama_server(config: EngineConfig) -> Path | None:
    """The llama-server to run without building anything, or None."""
    if config.llama_server is not None:
        path = config.llama_server.expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise EngineError(f"engine.llama_server {path}: not an executable file")
        return path
    on_path = shutil.which("llama-server")
    if on_path:
        return Path(on_path)
    cached = cached_binary(config)
    if cached.is_file() and os.access(cached, os.X_OK):
        return cached
    return None


def ensure_llama_server(config: EngineConfig) -> Path:
    """The llama-server binary, built from source on first use."""
    found = find_llama_server(config)
    if found is not None:
        return found
    return build_llama_server(config)


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


def build_llama_server(config: EngineConfig) -> Path:
    target = cached_binary(config)
    with _build_lock(target.parent.with_suffix(".lock")):
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
            _log(f"configuring llama.cpp from llama-cpp-python {version}")
            _run_logged(["cmake", "-S", str(src), "-B", str(build_dir), *CMAKE_OPTIONS], work)
            jobs = str(os.cpu_count() or 1)
            _log(f"building llama-server with {jobs} jobs (about 5 minutes on 2 cores)")
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


def _fetch_vendored_source(version: str, work: Path, cache_dir: Path) -> Path:
    sdist_dir = cache_dir / "sdists"
    sdist_dir.mkdir(parents=True, exist_ok=True)
    name = f"llama_cpp_python-{version}.tar.gz"
    sdist = sdist_dir / name
    if not sdist.is_file():
        _log(f"downloading the llama-cpp-python {version} sdist from the package index")
        _run_logged(
            [
                sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                "-d", str(sdist_dir), f"llama-cpp-python=={version}",
            ],
            work,
        )
        if not sdist.is_file():
            raise EngineError(f"pip download gave no {name} in {sdist_dir}")
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


_PERCENT = re.compile(r"^\[\s*(\d+)%\]")


def _run_logged(argv: list[str], cwd: Path, *, progress: bool = False) -> None:
    """Run a build step; show percentage progress, keep the tail of output for errors."""
    tail: list[str] = []
    last_pct = -1
    with subprocess.Popen(
        argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail = (tail + [line.rstrip()])[-30:]
            if progress:
                m = _PERCENT.match(line)
                if m and int(m.group(1)) >= last_pct + 5:
                    last_pct = int(m.group(1))
                    _log(f"build {last_pct}%")
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
