"""Helpers shared by the tests: free ports, config files, real processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from layers.config_toml import toml_value, write_toml  # noqa: F401  (re-exported for tests)

REPO = Path(__file__).resolve().parent.parent


def _die_with_parent() -> None:
    from layers.supervisor import _die_with_parent as die

    die()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def layer_config(port: int, **extra: Any) -> dict[str, Any]:
    # No threads: the supervisor splits the cores across the layers a test starts.
    cfg: dict[str, Any] = {"port": port, "context_size": 2048, "parallel": 2}
    cfg.update(extra)
    return cfg


@dataclass
class Proc:
    """An ``ai-sysadmin`` subprocess with its own process group and captured log."""

    argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        env = {**os.environ, **self.env}
        self._log = self.log_path.open("ab")
        self.popen = subprocess.Popen(
            self.argv, stdout=self._log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent,  # a killed test run leaves no server behind
        )
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_http(self, url: str, timeout: float = 240.0, ok: tuple[int, ...] = (200,)) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.popen is not None
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.argv} exited {self.popen.returncode}:\n{self.log()[-3000:]}")
            try:
                if httpx.get(url, timeout=2).status_code in ok:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{url} not ready after {timeout}s:\n{self.log()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            try:
                os.kill(self.popen.pid, sig)
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
            except ProcessLookupError:
                pass
        self._log.close()
        return self.popen.returncode


def cli(config: Path, *args: str, log_path: Path, env: dict[str, str] | None = None) -> Proc:
    return Proc(
        [sys.executable, "-m", "gateway.cli", "--config", str(config), *args],
        log_path=log_path,
        env=env or {},
    )


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); read its state.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def llama_server(binary: Path, model: Path, port: int, log_path: Path, *extra: str) -> Proc:
    """A bare llama-server (no supervisor), for tests that kill or starve one layer."""
    return Proc(
        [str(binary), "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
         "--ctx-size", "2048", "--parallel", "2", "--threads", "2", "--alias", "meta", *extra],
        log_path=log_path,
    )


def gateway_config(tmp: Path, layer_ports: dict[str, int], gateway_port: int,
                   **gateway: Any) -> dict[str, Any]:
    """A gateway config whose layers run elsewhere (``managed = false``)."""
    return {
        "state_dir": str(tmp / "state"),
        "layers": {n: {"port": p, "managed": False, "parallel": 2} for n, p in layer_ports.items()},
        "gateway": {"port": gateway_port, "api_keys": ["test-key"], "admin_key": "admin-key",
                    **gateway},
    }
