"""The paths under test, each a real process on a free loopback port, all pointed at the
same upstream: the upstream itself (direct), the minimal passthrough, this project's
gateway with its production features on, and LiteLLM's proxy."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from bench.procs import Server, free_port
from bench.venvs import ensure_venv
from layers.config_toml import write_toml

GATEWAY_KEY = "sk-bench-gateway-6b1f0c9e2d7a4e53b8c1"
GATEWAY_ADMIN_KEY = "sk-bench-admin-0e4d2b7f9a1c3e5d7f90"
LITELLM_KEY = "sk-bench-litellm-3f9c2a7e5d1b4c8a9e6f0a1b"
MODEL = "trigger"  # every path gets the same body; the gateway passes `trigger` to its layer


@dataclass
class Path_:
    """One way to reach the upstream: a server to watch and how to call it."""

    name: str
    server: Server
    headers: dict[str, str]

    @property
    def url(self) -> str:
        return self.server.base + "/v1/chat/completions"


def stub_server(work: Path, *, chunks: int = 8, chunk_delay: float = 0.0, tag: str = "stub") -> Server:
    port = free_port()
    return Server(
        tag,
        [sys.executable, "-m", "bench.stub_upstream", "--port", str(port),
         "--chunks", str(chunks), "--chunk-delay", str(chunk_delay)],
        port, "/health", work / f"{tag}.log", ready_timeout=20,
    )


def llama_server(work: Path, *, parallel: int = 4, ctx: int = 4096) -> Server:
    from layers.config import EngineConfig
    from layers.provision.engine import ensure_llama_server
    from layers.provision.model import default_model

    engine = EngineConfig()
    binary = ensure_llama_server(engine)
    model = default_model(engine.cache_dir)
    port = free_port()
    return Server(
        "llama-server",
        [str(binary), "--model", str(model), "--alias", MODEL, "--host", "127.0.0.1",
         "--port", str(port), "--ctx-size", str(ctx), "--parallel", str(parallel),
         "--metrics", "--slots"],
        port, "/health", work / "llama-server.log", ready_timeout=240,
    )


def passthrough_server(work: Path, upstream: Server) -> Server:
    port = free_port()
    return Server(
        "passthrough",
        [sys.executable, "-m", "uvicorn", "bench.minimal_passthrough:app", "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "warning", "--no-access-log",
         "--timeout-keep-alive", "30"],
        port, "/docs", work / "passthrough.log",
        env={"BENCH_UPSTREAM": upstream.base}, ready_timeout=60,
    )


def relay_server(work: Path, upstream: Server) -> Server:
    port = free_port()
    return Server("relay", [sys.executable, "-m", "bench.tcp_relay", str(port), str(upstream.port)],
                  port, "/health", work / "relay.log", ready_timeout=60)


def lean_server(work: Path, upstream: Server) -> Server:
    port = free_port()
    return Server(
        "lean",
        [sys.executable, "-m", "uvicorn", "bench.lean_proxy:app", "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "warning", "--no-access-log",
         "--timeout-keep-alive", "30"],
        port, "/health", work / "lean.log",
        env={"BENCH_UPSTREAM": upstream.base}, ready_timeout=60,
    )


def gateway_server(work: Path, upstream: Server, *, slots: int, replicas: int = 1,
                   max_queue: int = 64, tag: str = "gateway",
                   pipeline: dict[str, Any] | None = None) -> Server:
    """``python -m gateway.cli --config X gateway`` with API-key auth, metrics, limits and
    breakers on, every layer unmanaged and pointed at ``upstream``. ``replicas`` lists the
    same upstream several times: the stub has no slot limit, the gateway's limiter counts
    ``slots`` per endpoint."""
    port = free_port()
    layer: dict[str, Any] = {
        "managed": False, "host": "127.0.0.1", "port": upstream.port,
        "parallel": slots, "max_queue": max_queue,
    }
    if replicas > 1:
        layer["endpoints"] = [{"url": upstream.base + "/v1", "role": "replica"}] * replicas
    config = write_toml(work / f"{tag}.toml", {
        "state_dir": str(work / f"{tag}-state"),
        # The chat gate (gateway.max_concurrent_chats, one per core) protects CPU layers
        # on this machine; these suites measure the relay in front of an upstream with no
        # such limit (the stub), so it is off here — the detection suite measures the gate.
        "gateway": {"host": "127.0.0.1", "port": port, "api_keys": [GATEWAY_KEY],
                    "admin_key": GATEWAY_ADMIN_KEY, "log_level": "warning",
                    "max_concurrent_chats": 0},
        "memory": {"enabled": False},
        "pipeline": pipeline or {},
        "layers": {"trigger": dict(layer), "review": dict(layer), "meta": dict(layer)},
    })
    return Server(
        tag, [sys.executable, "-m", "gateway.cli", "--config", str(config), "gateway"],
        port, "/health", work / f"{tag}.log", ready_timeout=90,
    )


def litellm_server(work: Path, upstream: Server, *, tag: str = "litellm") -> Server:
    python = ensure_venv("litellm")
    port = free_port()
    config = work / f"{tag}.yaml"
    # LiteLLM's YAML; JSON is valid YAML, so no YAML writer is needed here.
    import json

    config.write_text(json.dumps({
        "model_list": [{"model_name": MODEL, "litellm_params": {
            "model": f"openai/{MODEL}", "api_base": upstream.base + "/v1",
            "api_key": "bench-upstream-needs-no-key"}}],
        "litellm_settings": {"drop_params": True, "telemetry": False},
        "general_settings": {"master_key": LITELLM_KEY},
    }, indent=2))
    return Server(
        tag,
        [str(python.parent / "litellm"), "--config", str(config), "--host", "127.0.0.1",
         "--port", str(port), "--num_workers", "1"],
        port, "/health/liveliness", work / f"{tag}.log",
        # No network here: use the bundled model cost map instead of fetching it.
        env={"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR"},
        ready_timeout=180,
    )


# -- the managed stack: the supervisor's layers, the gateway in front of them -----------


@dataclass
class Layers:
    """``python -m gateway.cli --config X layers serve``: the supervisor running the local
    layers as a user's config has them (their own slots, context and flags), each on a
    free port. ``threads`` None leaves ``layers.<name>.threads`` unset (the supervisor's
    choice); an int sets it for every managed layer."""

    server: Server
    ports: dict[str, int]
    managed: tuple[str, ...]
    state_dir: Path

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def wait_ready(self) -> None:
        """The supervisor's first layer answers ``/health`` (the Server's own check), then
        every other managed layer does."""
        self.server.wait_ready()
        for name in self.managed:
            probe = Server(name, [], self.ports[name], "/health", self.server.log_path,
                           ready_timeout=self.server.ready_timeout, popen=self.server.popen)
            probe.wait_ready()

    def engine_processes(self) -> dict[str, list[str]]:
        """The command line of each layer's engine process, by layer (from the alias)."""
        out: dict[str, list[str]] = {}
        for proc in self.server.tree()[1:]:
            try:
                argv = proc.cmdline()
            except psutil.Error:
                continue
            for flag in ("--alias", "--model_alias"):
                if flag in argv[:-1]:
                    out[argv[argv.index(flag) + 1]] = argv
        return out

    def effective_threads(self) -> dict[str, int | None]:
        """Threads each layer's llama-server reports using (``n_threads = N`` in its log)."""
        out: dict[str, int | None] = {}
        for name in self.managed:
            log = self.state_dir / "logs" / f"{name}.log"
            try:
                found = re.findall(r"n_threads = (\d+)", log.read_text(errors="replace"))
            except OSError:
                found = []
            out[name] = int(found[-1]) if found else None
        return out


def layers_server(work: Path, *, tag: str, threads: int | None = None,
                  managed: tuple[str, ...] = ("trigger", "review", "meta")) -> Layers:
    ports = {name: free_port() for name in ("trigger", "review", "meta")}
    layers: dict[str, Any] = {}
    for name, port in ports.items():
        layer: dict[str, Any] = {"managed": name in managed, "port": port}
        if threads is not None and name in managed:
            layer["threads"] = threads
        layers[name] = layer
    state = work / f"{tag}-state"
    config = write_toml(work / f"{tag}.toml", {
        "state_dir": str(state),
        "gateway": {"log_level": "warning"},
        "memory": {"enabled": False},
        "layers": layers,
    })
    first = managed[0]
    server = Server(
        tag, [sys.executable, "-m", "gateway.cli", "--config", str(config), "layers", "serve"],
        ports[first], "/health", work / f"{tag}.log",
        # The supervisor proves the engine before it starts a layer (seconds once cached).
        ready_timeout=600,
    )
    return Layers(server, ports, managed, state)


def counting_relay_server(work: Path, upstream_port: int, *,
                          tag: str = "relay-trigger") -> tuple[Server, Path]:
    """``bench/counting_relay.py`` in front of a layer; returns the server and its log."""
    port = free_port()
    log = work / f"{tag}.jsonl"
    return Server(tag, [sys.executable, "-m", "bench.counting_relay", str(port),
                        str(upstream_port), str(log)],
                  port, "/health", work / f"{tag}.log", ready_timeout=60), log


def stack_gateway_server(work: Path, ports: dict[str, int], *, tag: str = "gateway-stack",
                         pipeline: dict[str, Any] | None = None) -> tuple[Server, Server]:
    """The rest of what ``ai-sysadmin run`` starts, in front of layers run elsewhere: the
    gateway (``ai-sysadmin gateway``: the API, the prefilter and the trigger stage) and
    the daemon (``ai-sysadmin daemon``: the review → meta stages), sharing one config and
    store. Layers unmanaged at ``ports``, each with its default slots and queue; API-key
    auth on; memory and the collectors off, so the only events are the bench's."""
    port = free_port()
    config = write_toml(work / f"{tag}.toml", {
        "state_dir": str(work / f"{tag}-state"),
        "gateway": {"host": "127.0.0.1", "port": port, "api_keys": [GATEWAY_KEY],
                    "admin_key": GATEWAY_ADMIN_KEY, "log_level": "warning"},
        "memory": {"enabled": False},
        "collectors": {"journald": False, "metrics": False, "failed_units": False,
                       "gateway_url": f"http://127.0.0.1:{port}"},
        "pipeline": pipeline or {},
        "layers": {name: {"managed": False, "host": "127.0.0.1", "port": p}
                   for name, p in ports.items()},
    })
    gateway = Server(
        tag, [sys.executable, "-m", "gateway.cli", "--config", str(config), "gateway"],
        port, "/health", work / f"{tag}.log", ready_timeout=90,
    )
    # No port of its own: "ready" is the gateway it follows answering, while it runs.
    daemon = Server(
        f"{tag}-daemon", [sys.executable, "-m", "gateway.cli", "--config", str(config), "daemon"],
        port, "/health", work / f"{tag}-daemon.log", ready_timeout=90,
    )
    return gateway, daemon


def paths_for(upstream: Server, servers: dict[str, Server]) -> dict[str, Path_]:
    """Each started proxy as a path, plus the upstream itself as ``direct``."""
    headers = {
        "direct": {},
        "relay": {},
        "passthrough": {},
        "lean": {},
        "gateway": {"authorization": f"Bearer {GATEWAY_KEY}"},
        "litellm": {"authorization": f"Bearer {LITELLM_KEY}"},
    }
    out = {"direct": Path_("direct", upstream, {})}
    for name, server in servers.items():
        out[name] = Path_(name, server, headers[name])
    return out
