"""Supervision of the local layer servers (process lifecycle only; proxying lives elsewhere).

Each managed layer is one engine process in its own process group. The supervisor
checks every port and proves the engine (:mod:`layers.provision`) before starting
anything, splits the CPU's threads across the layers, waits for ``/health`` (503 while
the model loads), restarts a crashed layer with exponential backoff, and on stop
terminates whole process groups so no child survives. ``PR_SET_PDEATHSIG`` makes the
kernel kill a layer even if the supervisor itself is killed with SIGKILL.

A layer that dies soon after start several times in a row (``engine.crash_loop_limit``)
is not restarted: restarting a binary that faults on its first inference only hides the
cause. It is marked ``failed`` with one line naming the signal and its likely cause.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import httpx

from layers.config import LayerConfig, LayerName, Settings
from layers.errors import Refused
from layers.generation import template_args
from layers.provision.engine import ensure_llama_server
from layers.provision.model import resolve_model
from layers.provision.verify import describe_exit

log = logging.getLogger("ai_sysadmin.supervisor")

LayerState = Literal["stopped", "starting", "loading", "ready", "restarting", "failed"]


class SupervisorError(Refused):
    """The stack cannot start; the message is one line naming the layer."""

    # Over HTTP it answers a layer control request (POST /v1/layers/{name}/…).
    http_status = 409
    openai_code = "layer_control_refused"


def port_is_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def plan_threads(settings: Settings, cores: int | None = None) -> dict[LayerName, int]:
    """Threads of each managed layer. Layers that set ``threads`` keep it; the cores left
    are shared evenly by the others, at least one each. llama-server's default (every
    core per server) collapses throughput when layers are busy at once: on 2 cores,
    three busy layers made 6.3 tok/s in total with 2 threads each, 42.9 with 1 each."""
    cores = usable_cores() if cores is None else cores
    managed = [(n, c) for n, c in settings.layers.items() if c.managed]
    fixed = {n: c.threads for n, c in managed if c.threads}
    free = [n for n, c in managed if not c.threads]
    share = thread_share(cores, sum(fixed.values()), len(free)) if free else 0
    return {n: fixed.get(n, share) for n, _ in managed}


def thread_share(cores: int, reserved: int, sharers: int) -> int:
    """One layer's share of ``cores`` once ``reserved`` threads are taken by layers that
    set their own, split among ``sharers`` layers: at least one thread."""
    return max(1, (cores - reserved) // max(1, sharers))


def engine_command(
    settings: Settings, name: LayerName, layer: LayerConfig, model: Path, binary: Path | None
) -> list[str]:
    """argv of one layer's server. Every value is a separate argument: no shell."""
    if settings.engine.kind == "llama-cpp-python":
        argv = [
            sys.executable, "-m", "llama_cpp.server",
            "--model", str(model), "--model_alias", name,
            "--host", layer.host, "--port", str(layer.port),
            "--n_ctx", str(layer.context_size),
        ]
        if layer.threads:
            argv += ["--n_threads", str(layer.threads)]
        if layer.gpu_layers is not None:
            argv += ["--n_gpu_layers", str(layer.gpu_layers)]
        if layer.embeddings:
            argv += ["--embedding", "true"]
        argv += template_args(settings.engine.kind, layer)
        return argv + list(layer.extra_flags)
    assert binary is not None
    argv = [
        str(binary),
        "--model", str(model), "--alias", name,
        "--host", layer.host, "--port", str(layer.port),
        "--ctx-size", str(layer.context_size), "--parallel", str(layer.parallel),
        "--metrics", "--slots",
    ]
    if layer.threads:
        argv += ["--threads", str(layer.threads)]
    if layer.gpu_layers is not None:
        argv += ["--n-gpu-layers", str(layer.gpu_layers)]
    if layer.embeddings:
        argv += ["--embeddings"]
        if "--pooling" not in layer.extra_flags:
            # OpenAI-style /v1/embeddings needs a pooled vector; chat models default to none.
            argv += ["--pooling", "mean"]
    # The packaged model has no chat template of its own (layers/generation.py).
    argv += template_args(settings.engine.kind, layer)
    return argv + list(layer.extra_flags)


@dataclass
class LayerProcess:
    name: LayerName
    config: LayerConfig
    argv: list[str]
    model: Path
    engine: str
    log_path: Path
    state: LayerState = "stopped"
    pid: int | None = None
    restarts: int = 0
    started_at: float | None = None
    threads: int | None = None
    # How the last process ended ("SIGILL (illegal instruction: …) after 2.5s"), and why
    # a failed layer is not restarted.
    last_exit: str | None = None
    reason: str | None = None
    early_deaths: int = 0
    proc: asyncio.subprocess.Process | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    # The task that restarts this layer when it crashes; None while an admin holds it stopped.
    watcher: asyncio.Task[None] | None = None
    control: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def health_path(self) -> str:
        # llama-cpp-python's server has no /health; its model list answers once loaded.
        return "/v1/models" if self.engine == "llama-cpp-python" else "/health"

    def status(self) -> dict[str, object]:
        return {
            "name": self.name,
            "state": self.state,
            "pid": self.pid,
            "host": self.config.host,
            "port": self.config.port,
            "model": str(self.model),
            "engine": self.engine,
            "restarts": self.restarts,
            "started_at": self.started_at,
            "threads": self.threads,
            "last_exit": self.last_exit,
            "reason": self.reason,
            "log": str(self.log_path),
        }


class Supervisor:
    """Starts, watches and stops the managed layer servers."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.layers: dict[str, LayerProcess] = {}
        self._watchers: list[asyncio.Task[None]] = []
        self._stopping = False
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(5.0))
        self.status_file = settings.state_dir / "layers.json"
        # Set when a layer is given up on; `run` and `layers serve` exit non-zero then.
        self.failed = asyncio.Event()
        self.failure: str | None = None

    # -- preparation: everything that can fail does so before any process starts --

    def prepare(self) -> None:
        s = self.settings
        managed = [(n, c) for n, c in s.layers.items() if c.managed]
        for name, layer in managed:
            if not port_is_free(layer.host, layer.port):
                raise SupervisorError(
                    f"layer {name}: port {layer.port} on {layer.host} is already in use"
                )
        models = {n: resolve_model(c.model, s.engine.cache_dir, layer=n) for n, c in managed}
        binary: Path | None = None
        if managed and s.engine.kind == "llama-server":
            binary = ensure_llama_server(s.engine, list(models.values()))
        elif managed:
            from layers.provision.llama_cpp_python import check_llama_cpp_python

            check_llama_cpp_python(s.engine, list(models.values()))
        logs = s.state_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        threads = plan_threads(s)
        for name, layer in managed:
            planned = layer.model_copy(update={"threads": threads[name]})
            self.layers[name] = LayerProcess(
                name=name,
                config=layer,
                argv=engine_command(s, name, planned, models[name], binary),
                model=models[name],
                engine=s.engine.kind,
                log_path=logs / f"{name}.log",
                threads=threads[name],
            )

    # -- lifecycle --

    async def start(self, *, wait: bool = True) -> None:
        if not self.layers:
            self.prepare()
        for layer in self.layers.values():
            await self._spawn(layer)
            layer.watcher = asyncio.create_task(self._watch(layer))
            self._watchers.append(layer.watcher)
        self._write_status()
        if wait:
            await self.wait_ready()

    async def wait_ready(self, timeout: float | None = None) -> None:
        timeout = timeout or self.settings.engine.health_timeout
        async def every_layer_ready() -> None:
            for lp in self.layers.values():
                await lp.ready.wait()

        all_ready = asyncio.create_task(every_layer_ready())
        given_up = asyncio.create_task(self.failed.wait())
        try:
            async with asyncio.timeout(timeout):
                await asyncio.wait({all_ready, given_up}, return_when=asyncio.FIRST_COMPLETED)
            if self.failure is not None:
                raise SupervisorError(self.failure)
        except TimeoutError:
            slow = [n for n, lp in self.layers.items() if not lp.ready.is_set()]
            raise SupervisorError(
                f"layer {', '.join(slow)}: not healthy after {timeout:.0f}s "
                f"(see {self.settings.state_dir / 'logs'})"
            ) from None
        finally:
            for fut in (all_ready, given_up):
                fut.cancel()

    async def _spawn(self, layer: LayerProcess) -> None:
        layer.state = "starting"
        layer.ready.clear()
        log_fh = layer.log_path.open("ab")
        try:
            layer.proc = await asyncio.create_subprocess_exec(
                *layer.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_fh,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        finally:
            log_fh.close()
        layer.pid = layer.proc.pid
        layer.started_at = time.time()
        log.info("layer %s: started pid %s on port %s with %s threads",
                 layer.name, layer.pid, layer.config.port, layer.threads or "default")
        asyncio.create_task(self._await_health(layer, layer.proc))

    async def _await_health(self, layer: LayerProcess, proc: asyncio.subprocess.Process) -> None:
        url = f"{layer.config.local_url}{layer.health_path}"
        delay = 0.1
        while proc.returncode is None and layer.proc is proc and not self._stopping:
            try:
                r = await self._client.get(url)
                if r.status_code == 200:
                    layer.state = "ready"
                    layer.ready.set()
                    log.info("layer %s: healthy", layer.name)
                    self._write_status()
                    return
                layer.state = "loading"
            except httpx.HTTPError:
                pass
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 1.0)

    async def _watch(self, layer: LayerProcess) -> None:
        backoff = self.settings.engine.restart_backoff_initial
        while not self._stopping:
            proc = layer.proc
            assert proc is not None
            code = await proc.wait()
            if self._stopping:
                break
            _kill_group(proc.pid, signal.SIGKILL)  # leftovers of a crashed group
            ran_for = time.time() - (layer.started_at or time.time())
            if ran_for > 60:
                backoff = self.settings.engine.restart_backoff_initial
            layer.last_exit = f"{describe_exit(code)} after {ran_for:.1f}s"
            early = not layer.ready.is_set() or ran_for < self.settings.engine.crash_window
            layer.early_deaths = layer.early_deaths + 1 if early else 0
            if layer.early_deaths >= self.settings.engine.crash_loop_limit:
                self._give_up(layer, code)
                break
            layer.state = "restarting"
            layer.restarts += 1
            self._write_status()
            log.warning(
                "layer %s: %s; restart %d in %.1fs",
                layer.name, layer.last_exit, layer.restarts, backoff,
            )
            await asyncio.sleep(backoff)
            if self._stopping:
                break
            backoff = min(backoff * 2, self.settings.engine.restart_backoff_max)
            await self._spawn(layer)
            self._write_status()

    def _give_up(self, layer: LayerProcess, code: int) -> None:
        """Stop restarting a layer that dies on start: say why in one line."""
        n = layer.early_deaths
        how = f"died by {describe_exit(code)}" if code < 0 else f"exited with {describe_exit(code)}"
        layer.reason = (f"layer {layer.name}: {how} {n} times in a row soon after start; "
                        f"not restarted (log: {layer.log_path})")
        layer.state = "failed"
        layer.ready.clear()
        self._write_status()
        log.error("%s", layer.reason)
        if self.failure is None:
            self.failure = layer.reason
        self.failed.set()

    async def stop(self, grace: float = 10.0) -> None:
        """Stop every layer (in parallel) and leave no process of their groups behind."""
        self._stopping = True
        await asyncio.gather(*(self._halt(lp, grace) for lp in self.layers.values()))
        for task in self._watchers:  # watchers of layers replaced by start_layer
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for lp in self.layers.values():
            if lp.state != "failed":  # the reason stays readable after `run` exits
                lp.state = "stopped"
            lp.ready.clear()
        if self.layers:
            self._write_status()
        await self._client.aclose()

    # -- control of one layer (dashboard and API: start / stop / restart) --

    def layer(self, name: str) -> LayerProcess:
        try:
            return self.layers[name]
        except KeyError:
            raise SupervisorError(f"layer {name}: not run by this supervisor") from None

    async def stop_layer(self, name: str, grace: float = 10.0) -> None:
        """Stop one layer and keep it stopped (no crash restart) until :meth:`start_layer`."""
        lp = self.layer(name)
        async with lp.control:
            await self._halt(lp, grace)
            lp.state = "stopped"
            lp.ready.clear()
            self._write_status()
            log.info("layer %s: stopped on request", name)

    async def start_layer(self, name: str, *, wait: bool = True) -> None:
        """Start a layer that was stopped with :meth:`stop_layer`."""
        lp = self.layer(name)
        async with lp.control:
            if self._stopping:
                raise SupervisorError(f"layer {name}: the supervisor is shutting down")
            if lp.watcher is not None and not lp.watcher.done():
                raise SupervisorError(f"layer {name}: already running (pid {lp.pid})")
            if not port_is_free(lp.config.host, lp.config.port):
                raise SupervisorError(
                    f"layer {name}: port {lp.config.port} on {lp.config.host} is already in use"
                )
            lp.reason, lp.early_deaths = None, 0  # an admin's start is a fresh chance
            await self._spawn(lp)
            lp.watcher = asyncio.create_task(self._watch(lp))
            self._watchers.append(lp.watcher)
            self._write_status()
        if wait:
            await self._wait_one(lp)

    async def restart_layer(self, name: str, *, wait: bool = True) -> None:
        await self.stop_layer(name)
        await self.start_layer(name, wait=wait)

    async def _wait_one(self, lp: LayerProcess) -> None:
        timeout = self.settings.engine.health_timeout
        try:
            await asyncio.wait_for(lp.ready.wait(), timeout)
        except TimeoutError:
            raise SupervisorError(
                f"layer {lp.name}: not healthy after {timeout:.0f}s (see {lp.log_path})"
            ) from None

    async def _halt(self, lp: LayerProcess, grace: float) -> None:
        """Cancel the layer's watcher first (so the exit is not taken for a crash), then
        end its whole process group."""
        if lp.watcher is not None:
            lp.watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await lp.watcher
            lp.watcher = None
        proc = lp.proc
        if proc is None or proc.returncode is not None:
            return
        _kill_group(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except TimeoutError:
            log.warning("layer %s: did not stop in %.0fs; killing", lp.name, grace)
            _kill_group(proc.pid, signal.SIGKILL)
            await proc.wait()
        _kill_group(proc.pid, signal.SIGKILL)

    def _write_status(self) -> None:
        data = {
            "supervisor_pid": os.getpid(),
            "updated_at": time.time(),
            "layers": {n: lp.status() for n, lp in self.layers.items()},
        }
        self.status_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.status_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, self.status_file)


def _kill_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def read_status(state_dir: Path) -> dict[str, object] | None:
    try:
        data: dict[str, object] = json.loads((state_dir / "layers.json").read_text())
    except (OSError, ValueError):
        return None
    return data
