"""Proof that an engine runs here: load a model and generate a few tokens.

``llama-server --version`` succeeds even for a binary that dies on its first matrix
multiply, so nothing short of an inference proves a build. A proof is remembered next to
the binary for this boot and this model; a fault (death by a signal) is remembered per
ggml variant and machine, so a variant that faulted is not built again here.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import httpx

from layers.errors import Unavailable
from layers.provision.cpu import boot_id, machine_key

# Long enough that prompt processing runs batched matrix multiplies (the kernels a
# native build specialises), short enough to take well under a second.
PROBE_PROMPT = (
    "The journal of the server shows that the disk is almost full, that the database "
    "service failed to start, and that the administrator should"
)
PROBE_TOKENS = 8

_SIGNAL_CAUSES = {
    signal.SIGILL: "illegal instruction: this build uses CPU instructions this machine "
    "cannot run",
    signal.SIGSEGV: "segmentation fault",
    signal.SIGBUS: "bus error (a truncated or unreadable model file, or bad memory)",
    signal.SIGFPE: "arithmetic fault",
    signal.SIGABRT: "aborted",
    signal.SIGKILL: "killed (out of memory?)",
}


class EngineFault(Unavailable):
    """The engine ran but could not generate; ``signal`` is set when a signal ended it."""

    def __init__(self, message: str, *, signum: int | None = None) -> None:
        super().__init__(message)
        self.signum = signum


def describe_exit(returncode: int) -> str:
    """One phrase for how a process ended, naming the signal and its likely cause."""
    if returncode >= 0:
        return f"exit code {returncode}"
    signum = -returncode
    try:
        sig = signal.Signals(signum)
    except ValueError:
        return f"signal {signum}"
    cause = _SIGNAL_CAUSES.get(sig)
    return f"{sig.name} ({cause})" if cause else sig.name


# -- what is remembered -----------------------------------------------------------


def _model_key(model: Path) -> str:
    st = model.stat()
    return f"{model.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def _proof_path(binary: Path) -> Path:
    return binary.with_name(binary.name + ".proof.json")


def is_proven(binary: Path, models: Iterable[Path]) -> bool:
    try:
        proof = json.loads(_proof_path(binary).read_text())
        st = binary.stat()
    except (OSError, ValueError):
        return False
    if proof.get("boot_id") != boot_id() or proof.get("binary") != [st.st_size, st.st_mtime_ns]:
        return False
    return {_model_key(m) for m in models} <= set(proof.get("models", []))


def remember_proof(binary: Path, models: Iterable[Path]) -> None:
    st = binary.stat()
    old: set[str] = set()
    with contextlib.suppress(OSError, ValueError):
        proof = json.loads(_proof_path(binary).read_text())
        if proof.get("boot_id") == boot_id() and proof.get("binary") == [st.st_size, st.st_mtime_ns]:
            old = set(proof.get("models", []))
    data = {
        "boot_id": boot_id(),
        "binary": [st.st_size, st.st_mtime_ns],
        "models": sorted(old | {_model_key(m) for m in models}),
        "proven_at": time.time(),
    }
    _write_atomic(_proof_path(binary), json.dumps(data, indent=2))


def _fault_path(cache_dir: Path, version: str, variant: str) -> Path:
    return cache_dir / "engines" / "faults" / f"ggml-{version}-{variant}-{machine_key()}.txt"


def known_fault(cache_dir: Path, version: str, variant: str) -> str | None:
    """Why this ggml variant faulted on a machine like this one, if it did."""
    try:
        return _fault_path(cache_dir, version, variant).read_text().strip() or "faulted"
    except OSError:
        return None


def remember_fault(cache_dir: Path, version: str, variant: str, reason: str) -> None:
    _write_atomic(_fault_path(cache_dir, version, variant), reason + "\n")


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


# -- the proofs ----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _tail(path: Path, lines: int = 1) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


def prove_llama_server(binary: Path, model: Path, *, load_timeout: float = 180.0) -> None:
    """Start ``binary`` on ``model``, generate a few tokens, stop it. Raises
    :class:`EngineFault` with one line when it cannot."""
    port = _free_port()
    argv = [
        str(binary), "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
        "--ctx-size", "512", "--parallel", "1", "--no-webui",
    ]
    with tempfile.NamedTemporaryFile(prefix="ai-sysadmin-proof-", suffix=".log") as log:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            _generate_via_http(proc, port, load_timeout, Path(log.name))
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _generate_via_http(
    proc: subprocess.Popen[bytes], port: int, load_timeout: float, log: Path
) -> None:
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + load_timeout
    with httpx.Client(timeout=httpx.Timeout(60.0, connect=2.0)) as client:
        while True:
            if proc.poll() is not None:
                raise _died(proc.returncode, "while loading the model", log)
            with contextlib.suppress(httpx.HTTPError):
                if client.get(f"{base}/health").status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise EngineFault(f"did not load the model within {load_timeout:.0f}s")
            time.sleep(0.2)
        body = {"prompt": PROBE_PROMPT, "n_predict": PROBE_TOKENS, "temperature": 0}
        try:
            r = client.post(f"{base}/completion", json=body)
        except httpx.HTTPError as exc:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(2.0)  # let a dying process finish dying, to name its signal
            if proc.returncode is not None:
                raise _died(proc.returncode, "on its first inference", log) from None
            raise EngineFault(f"first inference failed ({type(exc).__name__})") from None
    if r.status_code != 200:
        raise EngineFault(f"first inference answered HTTP {r.status_code}: {r.text[:200]}")
    predicted = r.json().get("tokens_predicted", 0)
    if not predicted:
        raise EngineFault("first inference generated no tokens")


def prove_llama_cpp_python(python: str, model: Path, *, timeout: float = 240.0) -> None:
    """Load ``model`` with llama-cpp-python in a fresh interpreter and generate a few
    tokens: its ggml is compiled natively by pip too, and faults the same way."""
    code = (
        "import sys, llama_cpp\n"
        "m = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=512, verbose=False)\n"
        "out = m.create_completion(sys.argv[2], max_tokens=int(sys.argv[3]), temperature=0)\n"
        "assert out['usage']['completion_tokens'] > 0, out\n"
    )
    argv = [python, "-c", code, str(model), PROBE_PROMPT, str(PROBE_TOKENS)]
    try:
        done = subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        raise EngineFault(f"llama-cpp-python did not generate within {timeout:.0f}s") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [""])[-1]
        if done.returncode < 0:
            raise EngineFault(
                f"died by {describe_exit(done.returncode)} on its first inference",
                signum=-done.returncode,
            )
        raise EngineFault(f"could not generate ({describe_exit(done.returncode)}): {last}")


def _died(returncode: int, when: str, log: Path) -> EngineFault:
    if returncode < 0:
        return EngineFault(f"died by {describe_exit(returncode)} {when}", signum=-returncode)
    last = _tail(log)
    return EngineFault(f"exited with {describe_exit(returncode)} {when}: {last}")


def prove_all(binary: Path, models: Sequence[Path], *, load_timeout: float) -> None:
    """Prove ``binary`` on every distinct model (quantisation types take different
    kernels), unless already proven on this boot."""
    if is_proven(binary, models):
        return
    for model in dict.fromkeys(models):
        prove_llama_server(binary, model, load_timeout=load_timeout)
    remember_proof(binary, models)
