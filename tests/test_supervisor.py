"""Issue 2: the supervisor runs real llama-server layers on the real model."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import Stack
from tests.support import (
    cli,
    free_port,
    layer_config,
    pid_alive,
    run_cli,
    write_toml,
)


def _status(state_dir: Path) -> dict:
    return json.loads((state_dir / "layers.json").read_text())


def _wait(predicate, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_each_layer_answers_a_chat_completion(stack: Stack) -> None:
    for name in ("trigger", "review", "meta"):
        r = httpx.post(
            f"{stack.layer_url(name)}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "Say ok."}], "max_tokens": 4},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == name  # the supervisor gives each server its layer's alias
        assert body["usage"]["completion_tokens"] >= 1


def test_status_file_lists_every_layer_with_pid_and_model(stack: Stack, model_path: Path) -> None:
    status = _status(stack.state_dir)
    assert set(status["layers"]) == {"trigger", "review", "meta"}
    for name, layer in status["layers"].items():
        assert layer["state"] == "ready"
        assert pid_alive(layer["pid"])
        assert layer["port"] == stack.ports[name]
        assert layer["model"] == str(model_path)


@pytest.mark.slow  # real llama-server layers, started by the CLI
def test_layers_start_status_kill_restart_stop(tmp_path: Path) -> None:
    """`layers start` backgrounds the supervisor; a layer killed with SIGKILL is
    restarted and healthy again while the other never stops; `layers stop` leaves no
    process behind."""
    ports = {"trigger": free_port(), "review": free_port()}
    cfg = write_toml(
        tmp_path / "c.toml",
        {
            "state_dir": str(tmp_path / "state"),
            "engine": {"restart_backoff_initial": 0.5},
            "layers": {
                "trigger": layer_config(ports["trigger"]),
                "review": layer_config(ports["review"]),
                # meta runs elsewhere: not managed here.
                "meta": {"port": free_port(), "managed": False},
            },
            "gateway": {"port": free_port()},
        },
    )
    state_dir = tmp_path / "state"
    try:
        started = run_cli("--config", str(cfg), "layers", "start", timeout=300)
        assert started.returncode == 0, started.stderr
        assert "TRIGGER" not in started.stderr  # the status table goes to stdout
        assert "trigger" in started.stdout
        status = _status(state_dir)
        supervisor = status["supervisor_pid"]
        pids = {n: status["layers"][n]["pid"] for n in ports}
        assert set(status["layers"]) == {"trigger", "review"}

        shown = run_cli("--config", str(cfg), "layers", "status", "--json")
        rows = {r["layer"]: r for r in json.loads(shown.stdout)}
        assert rows["trigger"]["health"] == "ok" and rows["review"]["health"] == "ok"
        assert rows["trigger"]["pid"] == pids["trigger"]
        assert rows["trigger"]["slots"] == "0/2"
        assert rows["meta"]["pid"] == "-"

        os.kill(pids["trigger"], signal.SIGKILL)
        new = _wait(
            lambda: (s := _status(state_dir)["layers"]["trigger"])["pid"] != pids["trigger"]
            and s["state"] == "ready" and s,
            90, "trigger to be restarted and healthy",
        )
        assert new["restarts"] == 1
        assert new["last_exit"].startswith("SIGKILL")  # how the crashed process ended
        assert httpx.get(f"http://127.0.0.1:{ports['trigger']}/health").status_code == 200
        # The other layer never stopped.
        assert _status(state_dir)["layers"]["review"]["pid"] == pids["review"]
        assert pid_alive(pids["review"])
        log = (state_dir / "logs" / "supervisor.log").read_text()
        assert "layer trigger: SIGKILL" in log and "restart 1" in log
    finally:
        stopped = run_cli("--config", str(cfg), "layers", "stop", timeout=60)
    assert stopped.returncode == 0, stopped.stderr
    assert "layers stopped" in stopped.stderr
    for pid in [supervisor, new["pid"], pids["review"]]:
        assert not pid_alive(pid), f"pid {pid} survived `layers stop`"


@pytest.mark.slow  # real llama-server layers, started by the CLI
def test_sigkill_of_supervisor_leaves_no_layer_behind(tmp_path: Path) -> None:
    port = free_port()
    cfg = write_toml(
        tmp_path / "c.toml",
        {
            "state_dir": str(tmp_path / "state"),
            "layers": {
                "trigger": layer_config(port),
                "review": {"port": free_port(), "managed": False},
                "meta": {"port": free_port(), "managed": False},
            },
            "gateway": {"port": free_port()},
        },
    )
    proc = cli(cfg, "layers", "serve", log_path=tmp_path / "serve.log").start()
    proc.wait_http(f"http://127.0.0.1:{port}/health")
    child = _status(tmp_path / "state")["layers"]["trigger"]["pid"]
    os.kill(proc.pid, signal.SIGKILL)
    proc.stop()
    _wait(lambda: not pid_alive(child), 30, f"layer pid {child} to die with its supervisor")


# -- refusals: a clear line, a non-zero exit, nothing started ----------------------------


def _bad_config(tmp_path: Path, **trigger: object) -> tuple[Path, int]:
    port = free_port()
    cfg = write_toml(
        tmp_path / "c.toml",
        {
            "state_dir": str(tmp_path / "state"),
            "layers": {
                "trigger": layer_config(port, **trigger),
                "review": layer_config(free_port()),
                "meta": layer_config(free_port()),
            },
            "gateway": {"port": free_port()},
        },
    )
    return cfg, port


def _assert_nothing_started(tmp_path: Path, port: int) -> None:
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, "a layer is listening after a refusal"
    status = tmp_path / "state" / "layers.json"
    assert not status.exists() or not json.loads(status.read_text())["layers"]


def test_missing_model_is_refused_naming_layer_and_path(tmp_path: Path) -> None:
    cfg, port = _bad_config(tmp_path, model=str(tmp_path / "nope.gguf"))
    r = run_cli("--config", str(cfg), "layers", "serve")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == (
        f"ai-sysadmin: layer trigger: model {tmp_path / 'nope.gguf'}: no such file"
    )
    _assert_nothing_started(tmp_path, port)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"not a model at all" * 100, "not a GGUF file (bad magic)"),
        (b"GGUF\x03\x00\x00\x00" + b"\x01" + b"\x00" * 15, "truncated"),
    ],
    ids=["not-gguf", "truncated"],
)
def test_corrupt_model_is_refused(tmp_path: Path, content: bytes, reason: str) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(content)
    cfg, port = _bad_config(tmp_path, model=str(bad))
    r = run_cli("--config", str(cfg), "run")
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"ai-sysadmin: layer trigger: model {bad}: ") and reason in last
    _assert_nothing_started(tmp_path, port)


def test_port_in_use_is_refused_naming_layer_and_port(tmp_path: Path) -> None:
    cfg, port = _bad_config(tmp_path)
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", port))
        blocker.listen()
        r = run_cli("--config", str(cfg), "run")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == (
        f"ai-sysadmin: layer trigger: port {port} on 127.0.0.1 is already in use"
    )
    _assert_nothing_started(tmp_path, port)


def test_unknown_key_and_wrong_type_are_reported_with_their_field(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[gateway]\nport = "eighty"\nprot = 1\n[layers.meta]\nctx = 4\n')
    r = run_cli("--config", str(cfg), "config", "check")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert any(line.startswith("ai-sysadmin: config: gateway.port: ") and "integer" in line
               for line in lines), lines
    assert any("gateway.prot: unknown key" in line for line in lines), lines
    assert any("layers.meta.ctx: unknown key" in line for line in lines), lines
    assert "Traceback" not in r.stderr
    # The same file makes `run` stop before anything starts.
    assert run_cli("--config", str(cfg), "run").returncode == 1


def test_environment_overrides_file_and_duplicate_ports_are_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[gateway]\nport = 9100\n")
    ok = run_cli("--config", str(cfg), "config", "show",
                 env={"AI_SYSADMIN_GATEWAY__PORT": "9200"})
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["gateway"]["port"] == 9200
    bad = run_cli("--config", str(cfg), "config", "check",
                  env={"AI_SYSADMIN_LAYERS__REVIEW__PORT": "8080"})
    assert bad.returncode == 1
    assert "layers.review.port: port 8080 is also used by layers.trigger" in bad.stderr


def test_missing_config_file_is_one_line(tmp_path: Path) -> None:
    r = run_cli("--config", str(tmp_path / "absent.toml"), "config", "check")
    assert r.returncode == 1
    assert r.stderr.strip() == f"ai-sysadmin: config: config file {tmp_path / 'absent.toml'}: not found"


@pytest.mark.slow  # real llama-server layers, started by the CLI
def test_run_serves_the_stack_and_sigterm_leaves_nothing(tmp_path: Path) -> None:
    """`ai-sysadmin run` (what `make run` starts): layers, gateway and collector; it prints
    where the gateway listens, answers a chat, and SIGTERM stops every process."""
    ports = {n: free_port() for n in ("trigger", "review", "meta")}
    gport = free_port()
    cfg = write_toml(tmp_path / "c.toml", {
        "state_dir": str(tmp_path / "state"),
        "layers": {n: layer_config(p) for n, p in ports.items()},
        "gateway": {"port": gport},
    })
    proc = cli(cfg, "run", log_path=tmp_path / "run.log").start()
    try:
        _wait(lambda: "gateway listening" in proc.log(), 240, "the gateway line")
        assert f"gateway listening on http://127.0.0.1:{gport}" in proc.log()
        r = httpx.post(f"http://127.0.0.1:{gport}/v1/chat/completions", timeout=120, json={
            "model": "ai-sysadmin", "max_tokens": 4,
            "messages": [{"role": "user", "content": "hello"}]})
        assert r.status_code == 200 and r.json()["model"] == "ai-sysadmin"
        pids = [v["pid"] for v in _status(tmp_path / "state")["layers"].values()]
        assert len(pids) == 3 and all(pid_alive(p) for p in pids)
    finally:
        code = proc.stop(signal.SIGTERM)
    assert code == 0, proc.log()[-2000:]
    for pid in pids:
        assert not pid_alive(pid)
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", gport)) != 0


def test_config_show_toml_loads_back_as_the_same_configuration(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[layers.meta]\nmodel = "/models/x.gguf"\nextra_flags = ["--flash-attn", "on"]\n'
                   '[[layers.meta.endpoints]]\nurl = "http://10.0.0.7:8082/v1"\nrole = "fallback"\n')
    shown = run_cli("--config", str(cfg), "config", "show", "--toml")
    assert shown.returncode == 0, shown.stderr
    again = tmp_path / "again.toml"
    again.write_text(shown.stdout)
    first = json.loads(run_cli("--config", str(cfg), "config", "show").stdout)
    second = json.loads(run_cli("--config", str(again), "config", "show").stdout)
    assert first == second and second["layers"]["meta"]["endpoints"][0]["role"] == "fallback"
