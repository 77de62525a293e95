"""Session fixtures: one real three-layer stack (llama-server, real model) and a gateway
in front of it, both as real subprocesses, shared by the tests that only talk to them.
Tests that kill or reconfigure things start their own."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from layers.config import EngineConfig
from layers.provision.engine import ensure_llama_server
from layers.provision.model import default_model
from layers.store import Store, make_store

# Fixtures of the reliability/security suite: own gateways, fake upstreams.
from tests.reliability_support import fakes, gateways  # noqa: F401
from tests.support import Proc, cli, free_port, layer_config, write_toml

# Fixtures that build or find llama-server, assemble the real model, or start the real stack:
# a test that uses one (directly or through a fixture of its own) is `slow`. Tests that start
# llama-server otherwise (`ai-sysadmin run` / `layers serve` on the default engine) carry the
# mark themselves. `make test-fast` (pytest -m "not slow") runs the rest.
SLOW_FIXTURES = frozenset({"stack", "llama_server_bin", "model_path"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    """An open SQLite store of the test's own (test_store.py runs both backends)."""
    s = make_store("", tmp_path)
    await s.open()
    yield s
    await s.close()


@pytest.fixture(scope="session")
def engine_config() -> EngineConfig:
    return EngineConfig()


@pytest.fixture(scope="session")
def llama_server_bin(engine_config: EngineConfig) -> Path:
    return ensure_llama_server(engine_config)


@pytest.fixture(scope="session")
def model_path(engine_config: EngineConfig) -> Path:
    return default_model(engine_config.cache_dir)


@dataclass
class Stack:
    """A running layer supervisor (three llama-servers) and a gateway in front of it."""

    config_path: Path
    state_dir: Path
    ports: dict[str, int]
    gateway_port: int
    layers_proc: Proc
    gateway_proc: Proc

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    def layer_url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"


def stack_config(tmp: Path, ports: dict[str, int], gateway_port: int, **sections: dict) -> dict:
    data: dict = {
        "state_dir": str(tmp / "state"),
        "layers": {n: layer_config(p) for n, p in ports.items()},
        "gateway": {"port": gateway_port, "api_keys": ["test-key"], "admin_key": "admin-key"},
    }
    data["layers"]["meta"]["embeddings"] = True
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return data


@pytest.fixture(scope="session")
def stack(
    tmp_path_factory: pytest.TempPathFactory, llama_server_bin: Path, model_path: Path
) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("stack")
    ports = {n: free_port() for n in ("trigger", "review", "meta")}
    gport = free_port()
    cfg = write_toml(tmp / "config.toml", stack_config(tmp, ports, gport))
    layers = cli(cfg, "layers", "serve", log_path=tmp / "layers.log").start()
    for port in ports.values():
        layers.wait_http(f"http://127.0.0.1:{port}/health")
    # The gateway runs separately from the supervisor, as on NixOS: layers unmanaged there.
    gcfg_data = stack_config(tmp, ports, gport)
    for layer in gcfg_data["layers"].values():
        layer["managed"] = False
    gcfg = write_toml(tmp / "gateway.toml", gcfg_data)
    gateway = cli(gcfg, "gateway", log_path=tmp / "gateway.log").start()
    gateway.wait_http(f"http://127.0.0.1:{gport}/health")
    yield Stack(cfg, tmp / "state", ports, gport, layers, gateway)
    gateway.stop()
    layers.stop()
