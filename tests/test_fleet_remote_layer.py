"""Issue 21, layers as a pool across machines: a server whose meta layer runs on another
host (the GPU box), its trigger and review layers here.

Real parts: the session's llama-servers for trigger and review, a llama-server of its own
for meta bound only to 127.0.0.2 (another address: nothing reaches it as "localhost"),
a real gateway process whose meta layer is that one endpoint (``managed = false``,
``endpoints = [{url = …}]``) and the real ``openai`` SDK.
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import Stack
from tests.support import Proc, cli, free_port, write_toml

KEY = {"Authorization": "Bearer test-key"}
REMOTE = "127.0.0.2"


@pytest.fixture
def remote_meta(tmp_path: Path, llama_server_bin: Path,
                model_path: Path) -> Iterator[tuple[Proc, str]]:
    port = free_port()
    proc = Proc([str(llama_server_bin), "--model", str(model_path), "--host", REMOTE,
                 "--port", str(port), "--ctx-size", "2048", "--parallel", "1", "--threads", "1",
                 "--alias", "meta", "--metrics"], log_path=tmp_path / "remote-meta.log").start()
    url = f"http://{REMOTE}:{port}"
    proc.wait_http(f"{url}/health")
    yield proc, url
    proc.stop(signal.SIGKILL)


def _predicted(url: str) -> float:
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    m = re.search(r"^llamacpp:tokens_predicted_total\s+(\S+)", metrics, re.M)
    return float(m.group(1)) if m else 0.0


def test_a_server_whose_meta_layer_is_on_another_host(
    tmp_path: Path, stack: Stack, remote_meta: tuple[Proc, str]
) -> None:
    remote, remote_url = remote_meta
    port = free_port()
    data = {
        "state_dir": str(tmp_path / "state"), "memory": {"enabled": False},
        "layers": {
            "trigger": {"port": stack.ports["trigger"], "managed": False},
            "review": {"port": stack.ports["review"], "managed": False},
            "meta": {"managed": False, "endpoints": [{"url": f"{remote_url}/v1"}]},
        },
        "gateway": {"port": port, "api_keys": ["test-key"], "admin_key": "admin-key"},
    }
    gw = cli(write_toml(tmp_path / "server.toml", data), "gateway",
             log_path=tmp_path / "gateway.log").start()
    try:
        url = f"http://127.0.0.1:{port}"
        gw.wait_http(f"{url}/health", timeout=60)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ready = httpx.get(f"{url}/ready", headers=KEY, timeout=10).json()["layers"]
            if ready["meta"]["state"] == "ready":
                break
            time.sleep(0.5)
        (endpoint,) = ready["meta"]["endpoints"]
        assert endpoint["url"] == f"{remote_url}/v1" and endpoint["health"] == "ready"
        assert ready["trigger"]["state"] == "ready"

        # A chat for the meta layer is answered by the remote llama-server.
        before = _predicted(remote_url)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="test-key", max_retries=0)
        answer = client.chat.completions.create(
            model="meta", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8,
            temperature=0)
        assert answer.choices[0].message.content is not None
        assert _predicted(remote_url) > before

        # The remote host goes away: the server says so, and a meta chat fails in the
        # OpenAI shape instead of hanging.
        remote.stop(signal.SIGKILL)
        with pytest.raises(openai.APIStatusError) as failed:
            client.chat.completions.create(
                model="meta", messages=[{"role": "user", "content": "Say hello."}],
                max_tokens=8, timeout=60)
        assert failed.value.status_code in (502, 503)
        body = failed.value.response.json()["error"]
        assert "meta" in body["message"]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ready = httpx.get(f"{url}/ready", headers=KEY, timeout=10).json()["layers"]
            if ready["meta"]["state"] != "ready":
                break
            time.sleep(0.5)
        assert ready["meta"]["state"] != "ready"
        assert ready["trigger"]["state"] == "ready"  # the local layers are unaffected
    finally:
        gw.stop()

