"""Real execution: catalog actions against real processes the tests own, through the real
executor and through the real root helper over a real unix socket.

``df``, ``ps`` and ``kill`` are the machine's real programs. ``systemctl`` is a throwaway
stand-in (this machine has no systemd) where named so in the test.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from layers.actions import service
from layers.actions.catalog import plan
from layers.actions.executor import execute, run_argv
from layers.actions.helper import HelperRefused, call_helper, serve_helper
from layers.actions.service import ActionRuns
from layers.config import Settings
from layers.store import open_store
from tests.actions_support import make_standins, settings_for
from tests.support import REPO, pid_alive, write_toml
from tests.test_actions_service import make_incident

# The helper fixture's server task must live on the loop the tests run on.
pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory other users can traverse (pytest's tmp_path is 0700 under root)."""
    d = Path(tempfile.mkdtemp(prefix="ai-sysadmin-act-"))
    d.chmod(0o755)
    yield d
    subprocess.run(["rm", "-rf", "--", str(d)], check=False)


async def test_disk_usage_runs_real_df(tmp_path: Path) -> None:
    s = settings_for(tmp_path)
    r = await execute(plan("disk_usage", {"path": str(tmp_path)}, s), s)
    assert r.ok, r
    assert "Filesystem" in r.output and "%" in r.output
    assert 0 < r.duration < 20


async def test_process_status_and_terminate_real_process(
    tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    s = settings_for(tmp_path)
    status = await execute(plan("process_status", {"pid": sleeper.pid}, s), s)
    assert status.ok and str(sleeper.pid) in status.output and "sleep" in status.output
    term = await execute(plan("terminate_process", {"pid": sleeper.pid}, s), s)
    assert term.ok, term
    assert sleeper.wait(timeout=5) == -signal.SIGTERM


async def test_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    s = settings_for(tmp_path)
    code = ("import subprocess,time; p=subprocess.Popen(['sleep','60']); "
            "print(p.pid, flush=True); time.sleep(60)")
    started = time.monotonic()
    r = await run_argv([sys.executable, "-c", code], 1.0, s)
    assert r.timed_out and not r.ok and "timed out" in (r.error or "")
    assert time.monotonic() - started < 10
    grandchild = int(r.output.split()[0])
    deadline = time.monotonic() + 5
    while pid_alive(grandchild) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert not pid_alive(grandchild)


async def test_hostile_argv_element_stays_one_argument_sentinel(tmp_path: Path) -> None:
    s = settings_for(tmp_path)
    sentinel = tmp_path / "SENTINEL"
    hostile = [f"; touch {sentinel}", f"$(touch {sentinel})", f"`touch {sentinel}`",
               f"| touch {sentinel}", f"&& touch {sentinel}", f"\ntouch {sentinel}"]
    r = await run_argv(["/bin/echo", *hostile], 5, s)
    assert r.ok
    assert not sentinel.exists()
    assert f"$(touch {sentinel})" in r.output and f"`touch {sentinel}`" in r.output


async def test_output_is_an_excerpt_and_env_is_clean(tmp_path: Path) -> None:
    s = settings_for(tmp_path, output_excerpt_chars=1000)
    os.environ["AI_SYSADMIN_TEST_SECRET"] = "leak-me"
    try:
        code = "import os; print('A'*50000); print(sorted(os.environ))"
        r = await run_argv([sys.executable, "-c", code], 10, s)
    finally:
        del os.environ["AI_SYSADMIN_TEST_SECRET"]
    assert r.ok and len(r.output) < 1200 and "output shortened" in r.output
    assert "AI_SYSADMIN_TEST_SECRET" not in r.output and "'PATH'" in r.output


# -- the root helper over a real unix socket -------------------------------------------


@pytest.fixture
async def helper_socket(shared_dir: Path, tmp_path: Path) -> AsyncIterator[tuple[Path, Any]]:
    st = make_standins(tmp_path)
    settings = settings_for(tmp_path, st, max_runs_per_unit_per_hour=2,
                            max_runs_per_action_per_hour=50,
                            helper_allowed_users=["nobody"])
    sock = shared_dir / "helper.sock"
    started = asyncio.Event()
    task = asyncio.create_task(serve_helper(settings, sock, started))
    await asyncio.wait_for(started.wait(), 10)
    yield sock, st
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def raw_request(sock: Path, payload: bytes) -> dict[str, Any]:
    reader, writer = await asyncio.open_unix_connection(str(sock), limit=1 << 20)
    writer.write(payload)
    await writer.drain()
    line = await asyncio.wait_for(reader.readline(), 15)
    writer.close()
    result: dict[str, Any] = json.loads(line)
    return result


async def test_helper_runs_catalog_action_standin_systemctl(
    helper_socket: tuple[Path, Any], tmp_path: Path
) -> None:
    sock, st = helper_socket
    r = await call_helper(sock, "restart_unit", {"unit": "nginx.service"}, timeout=30)
    assert r.ok, r
    assert st.calls() == [["systemctl", "restart", "--", "nginx.service"]]
    # and as the executor's privileged path, from the decision path
    settings = settings_for(tmp_path, st, helper_socket=str(sock), autonomy="auto-safe",
                            search_path="/nonexistent-client-path:/usr/bin")
    store = await open_store(Settings(state_dir=tmp_path / "db"))
    try:
        incident = await make_incident(store, "nginx.service: failed", "nginx.service")
        out = await service.handle_proposals(incident, [{"action": "reset_failed_unit",
                                                         "params": {"unit": "nginx.service"},
                                                         "rationale": "x"}], store, settings,
                                             runs=ActionRuns())
    finally:
        await store.close()
    assert out[0].status == "succeeded", out[0]
    assert st.calls()[-1] == ["systemctl", "reset-failed", "--", "nginx.service"]


async def test_helper_never_starts_mode_switching_units_standin_systemctl(
    helper_socket: tuple[Path, Any],
) -> None:
    """The root helper applies the never-start list itself, whoever asks it."""
    sock, st = helper_socket
    for action, unit in [("start_unit", "emergency.service"), ("restart_unit", "rescue.service"),
                         ("start_unit", "initrd-switch-root.service"),
                         ("start_unit", "nixos-upgrade.service")]:
        with pytest.raises(HelperRefused) as info:
            await call_helper(sock, action, {"unit": unit}, timeout=10)
        assert info.value.code == "never_started", (unit, info.value.message)
    assert st.calls() == []


async def test_helper_terminates_real_process(
    helper_socket: tuple[Path, Any], sleeper: subprocess.Popen[bytes]
) -> None:
    sock, _ = helper_socket
    r = await call_helper(sock, "terminate_process", {"pid": sleeper.pid}, timeout=30)
    assert r.ok, r
    assert sleeper.wait(timeout=5) == -signal.SIGTERM


async def test_helper_refuses_hostile_requests_sentinel(
    helper_socket: tuple[Path, Any], tmp_path: Path
) -> None:
    sock, st = helper_socket
    sentinel = tmp_path / "SENTINEL"
    hostile: list[bytes] = [
        json.dumps({"action": "shell", "params": {"cmd": f"touch {sentinel}"}}).encode(),
        json.dumps({"action": "restart_unit", "params": {"unit": f"x.service; touch {sentinel}"}}).encode(),
        json.dumps({"action": "restart_unit", "params": {"unit": "sshd.service"}}).encode(),
        json.dumps({"action": "restart_unit", "params": {"unit": "nginx.service"},
                    "argv": ["touch", str(sentinel)]}).encode(),
        json.dumps({"action": "restart_unit", "params": {"unit": "nginx.service"},
                    "env": {"PATH": str(tmp_path)}}).encode(),
        json.dumps({"action": "terminate_process", "params": {"pid": os.getpid()}}).encode(),
        json.dumps(["restart_unit", {"unit": "nginx.service"}]).encode(),
        b"restart_unit nginx.service; touch " + str(sentinel).encode(),
        b"{" + b" " * (70 * 1024) + b"}",
    ]
    for payload in hostile:
        reply = await raw_request(sock, payload + b"\n")
        assert reply["ok"] is False, (payload[:80], reply)
        assert reply["code"] in {"unknown_action", "invalid_params", "protected_unit",
                                 "invalid_request", "protected_process"}, reply
    assert st.calls() == [] and not sentinel.exists()
    with pytest.raises(HelperRefused):
        await call_helper(sock, "nixos_rollback", {"confirm": True}, timeout=10)


async def test_helper_rate_limit_and_kill_switch_under_burst(
    helper_socket: tuple[Path, Any], tmp_path: Path
) -> None:
    sock, st = helper_socket
    req = json.dumps({"action": "restart_unit", "params": {"unit": "nginx.service"}}).encode()
    replies = await asyncio.gather(*[raw_request(sock, req + b"\n") for _ in range(12)])
    assert sum(r["ok"] for r in replies) == 2  # max_runs_per_unit_per_hour = 2
    assert {r["code"] for r in replies if not r["ok"]} == {"rate_limited"}
    kill = tmp_path / "state" / "actions.kill"
    kill.parent.mkdir(parents=True, exist_ok=True)
    kill.touch()
    req2 = json.dumps({"action": "reset_failed_unit", "params": {"unit": "nginx.service"}}).encode()
    replies = await asyncio.gather(*[raw_request(sock, req2 + b"\n") for _ in range(5)])
    assert all(r["code"] == "kill_switch" for r in replies)
    assert len(st.calls()) == 2


CLIENT = r"""
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
try:  # a refused peer may be answered and hung up on before it even writes
    s.sendall(json.dumps({"action": "restart_unit", "params": {"unit": "nginx.service"}}).encode() + b"\n")
except BrokenPipeError:
    pass
print(s.makefile().readline(), end="")
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
async def test_helper_checks_peer_uid_with_so_peercred(
    helper_socket: tuple[Path, Any], shared_dir: Path
) -> None:
    """A real unprivileged process (uid nobody, allowed) is served; another uid in the
    socket's group (daemon, not allowed) is refused by SO_PEERCRED before any parsing."""
    sock, st = helper_socket
    script = shared_dir / "client.py"
    script.write_text(CLIENT)
    script.chmod(0o644)

    def run_as(user: str) -> dict[str, Any]:
        p = subprocess.run(["/usr/bin/python3", str(script), str(sock)], user=user,
                           group="nogroup", extra_groups=[], capture_output=True, text=True,
                           timeout=30, check=False)
        assert p.returncode == 0, p.stderr
        result: dict[str, Any] = json.loads(p.stdout)
        return result

    refused = await asyncio.to_thread(run_as, "daemon")
    assert refused == {"ok": False, "code": "peer_refused", "message": "uid 1 may not use the helper"}
    assert st.calls() == []
    served = await asyncio.to_thread(run_as, "nobody")
    assert served["ok"] is True and served["result"]["exit_code"] == 0
    assert st.calls() == [["systemctl", "restart", "--", "nginx.service"]]


async def test_helper_cli_process_serves_and_cleans_up(tmp_path: Path, shared_dir: Path) -> None:
    """``ai-sysadmin helper --socket PATH`` as a real process with its own config."""
    st = make_standins(tmp_path)
    cfg = write_toml(tmp_path / "helper.toml", {
        "state_dir": str(tmp_path / "state"),
        "actions": {"search_path": st.search_path, "unit_check": "never"},
    })
    sock = shared_dir / "cli-helper.sock"
    log = (tmp_path / "helper.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "--config", str(cfg), "helper",
                             "--socket", str(sock)], cwd=REPO, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists() and time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "helper.log").read_text()
            await asyncio.sleep(0.05)
        r = await call_helper(sock, "start_unit", {"unit": "nginx.service"}, timeout=30)
        assert r.ok, r
        assert st.calls() == [["systemctl", "start", "--", "nginx.service"]]
        assert oct(sock.stat().st_mode & 0o777) == "0o660"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        log.close()
    assert not sock.exists()
    assert "helper: uid" in (tmp_path / "helper.log").read_text()
