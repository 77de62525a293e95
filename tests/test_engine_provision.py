"""Issue 15: an engine is proven by generating tokens before anything uses it; a build
that faults is replaced by a variant this machine runs; a given binary that faults is
refused in one line; a layer that dies on start is given up with its reason.

The faulting engines are fakes (tests/fake_engine.py): a real build faults only on the
machines whose CPUs it does not fit, so a test cannot make one fault on demand.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from layers.config import EngineConfig
from layers.provision import cpu
from layers.provision.engine import EngineError, cached_binary, ensure_llama_server
from layers.provision.verify import describe_exit, known_fault
from layers.supervisor import plan_threads
from tests.fake_engine import start_count, write_fake_engine
from tests.support import free_port, run_cli, write_toml

# /proc/cpuinfo flags of the two kinds of machine this project runs on.
INTEL_AMX = frozenset(
    "fpu sse sse2 ssse3 sse4_1 sse4_2 avx f16c fma bmi2 avx2 avx512f avx512dq avx512cd "
    "avx512bw avx512vl avx512ifma avx512vbmi avx_vnni avx512_bf16 avx512_vnni amx_bf16 "
    "avx512_fp16 amx_tile amx_int8".split()
)
AMD_EPYC = frozenset("fpu sse sse2 ssse3 sse4_1 sse4_2 avx f16c fma bmi2 avx2".split())


# -- variants -----------------------------------------------------------------------------


def test_an_amx_cpu_gets_a_variant_with_everything_but_amx() -> None:
    names = [v.name for v in cpu.variants(INTEL_AMX, "x86_64")]
    assert names == ["native", "no-amx", "x86-64-v3", "generic"]
    no_amx = cpu.variants(INTEL_AMX, "x86_64")[1]
    flags = set(no_amx.cmake_flags)
    assert "-DGGML_NATIVE=OFF" in flags
    assert {"-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"} <= flags
    # everything else the CPU lists stays on: no speed is given up but AMX
    assert {"-DGGML_AVX512=ON", "-DGGML_AVX512_VNNI=ON", "-DGGML_AVX_VNNI=ON"} <= flags


def test_a_cpu_without_amx_goes_from_native_to_portable_builds() -> None:
    variants = cpu.variants(AMD_EPYC, "x86_64")
    assert [v.name for v in variants] == ["native", "generic"]  # x86-64-v3 is all it lists
    for v in variants[1:]:
        assert not any(f.endswith("=ON") and "AMX" in f for f in v.cmake_flags)
    assert [v.name for v in cpu.variants(frozenset(), "aarch64")] == ["native", "generic"]


def test_signals_are_named_with_their_likely_cause() -> None:
    assert describe_exit(-4).startswith("SIGILL (illegal instruction: this build uses CPU")
    assert describe_exit(-9).startswith("SIGKILL")
    assert describe_exit(1) == "exit code 1"


def test_threads_are_split_so_the_layers_do_not_oversubscribe() -> None:
    from layers.config import load_settings

    settings = load_settings(None)
    assert plan_threads(settings, cores=2) == {"trigger": 1, "review": 1, "meta": 1}
    assert plan_threads(settings, cores=16) == {"trigger": 5, "review": 5, "meta": 5}
    settings.layers.meta.threads = 8
    assert plan_threads(settings, cores=16) == {"trigger": 4, "review": 4, "meta": 8}
    settings.layers.review.managed = False
    assert plan_threads(settings, cores=2) == {"trigger": 1, "meta": 8}


# -- proofs -------------------------------------------------------------------------------


@pytest.fixture
def no_path_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """No llama-server on PATH, whatever this machine has installed."""
    monkeypatch.setenv("PATH", "/usr/bin:/bin")


def test_a_configured_engine_that_faults_is_refused_in_one_line(
    tmp_path: Path, model_path: Path, no_path_engine: None
) -> None:
    starts = tmp_path / "starts"
    fake = write_fake_engine(tmp_path / "llama-server", "sigill-on-inference", starts)
    config = EngineConfig(llama_server=fake, cache_dir=tmp_path / "cache")
    with pytest.raises(EngineError) as err:
        ensure_llama_server(config, [model_path])
    line = str(err.value)
    assert "\n" not in line
    assert line.startswith(f"engine.llama_server {fake} died by SIGILL (illegal instruction")
    assert "unset engine.llama_server" in line
    assert start_count(starts) == 1
    assert not (tmp_path / "cache" / "engines").exists()  # nothing built behind the admin's back


def test_a_llama_server_on_path_that_faults_is_refused(
    tmp_path: Path, model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    write_fake_engine(bindir / "llama-server", "sigill-on-inference", tmp_path / "starts")
    monkeypatch.setenv("PATH", f"{bindir}:/usr/bin:/bin")
    with pytest.raises(EngineError, match=r"^llama-server on PATH .* died by SIGILL .* remove it"):
        ensure_llama_server(EngineConfig(cache_dir=tmp_path / "cache"), [model_path])


def test_a_cached_build_that_faults_is_replaced_by_the_next_variant(
    tmp_path: Path, model_path: Path, no_path_engine: None, capfd: pytest.CaptureFixture[str]
) -> None:
    config = EngineConfig(cache_dir=tmp_path / "cache")
    best, fallback = cpu.variants()[:2]
    bad_starts, good_starts = tmp_path / "bad", tmp_path / "good"
    for variant, mode, starts in ((best, "sigill-on-inference", bad_starts),
                                  (fallback, "ok", good_starts)):
        target = cached_binary(config, variant)
        target.parent.mkdir(parents=True)
        write_fake_engine(target, mode, starts)

    chosen = ensure_llama_server(config, [model_path])
    assert chosen == cached_binary(config, fallback)
    said = capfd.readouterr().err
    assert f"the llama-server {best.name} build died by SIGILL" in said
    assert f"using the {fallback.name} build ({fallback.description}) because {best.name}:" in said
    assert known_fault(config.cache_dir, config.llama_cpp_python_version, best.name)

    # Proven once per boot: the next start runs neither binary again.
    assert ensure_llama_server(config, [model_path]) == chosen
    assert (start_count(bad_starts), start_count(good_starts)) == (1, 1)
    # A changed binary is proven again.
    time.sleep(0.01)
    chosen.touch()
    ensure_llama_server(config, [model_path])
    assert start_count(good_starts) == 2


def test_the_real_engine_is_proven_on_the_real_model(
    llama_server_bin: Path, model_path: Path
) -> None:
    proof = json.loads(llama_server_bin.with_name("llama-server.proof.json").read_text())
    assert any(key.startswith(str(model_path.resolve())) for key in proof["models"])


# -- a layer that dies on start -------------------------------------------------------------


def test_a_layer_dying_by_sigill_on_start_is_given_up_and_run_exits_nonzero(
    tmp_path: Path, model_path: Path
) -> None:
    fake = write_fake_engine(tmp_path / "llama-server", "sigill-as-layer", tmp_path / "starts")
    state = tmp_path / "state"
    port = free_port()
    cfg = write_toml(tmp_path / "c.toml", {
        "state_dir": str(state),
        "engine": {"llama_server": str(fake), "restart_backoff_initial": 0.2,
                   "crash_loop_limit": 3},
        "layers": {
            "trigger": {"port": port},
            "review": {"port": free_port(), "managed": False},
            "meta": {"port": free_port(), "managed": False},
        },
        "gateway": {"port": free_port()},
    })
    t0 = time.monotonic()
    done = run_cli("--config", str(cfg), "run", timeout=120)
    took = time.monotonic() - t0
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ai-sysadmin: layer trigger: died by SIGILL (illegal instruction")
    assert "3 times in a row soon after start; not restarted" in last
    assert took < 60  # given up, not waited out until the health timeout
    assert start_count(tmp_path / "starts") == 1 + 3  # the proof, then three layer starts
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)

    # The reason stays readable after `run` exited.
    recorded = json.loads((state / "layers.json").read_text())["layers"]["trigger"]
    assert recorded["state"] == "failed"
    assert recorded["last_exit"].startswith("SIGILL")
    shown = run_cli("--config", str(cfg), "layers", "status", "--json")
    row = next(r for r in json.loads(shown.stdout) if r["layer"] == "trigger")
    assert row["state"] == "failed" and "died by SIGILL" in row["reason"]


def test_a_layer_failing_after_start_is_shown_failed_with_its_reason(
    tmp_path: Path, model_path: Path
) -> None:
    """The gateway keeps serving; /ready and the dashboard's /v1/layers say which layer
    failed and why, and the other layers stay ready."""
    from tests.support import cli

    fake = write_fake_engine(tmp_path / "llama-server", "sigill-after-ready", tmp_path / "starts")
    gport = free_port()
    cfg = write_toml(tmp_path / "c.toml", {
        "state_dir": str(tmp_path / "state"),
        "engine": {"llama_server": str(fake), "restart_backoff_initial": 0.2,
                   "crash_loop_limit": 2, "crash_window": 30},
        "layers": {
            "trigger": {"port": free_port()},
            "review": {"port": free_port(), "managed": False},
            "meta": {"port": free_port(), "managed": False},
        },
        "gateway": {"port": gport, "api_keys": ["k"]},
    })
    proc = cli(cfg, "run", log_path=tmp_path / "run.log",
               env={"FAKE_ENGINE_DELAY": "2"}).start()
    try:
        proc.wait_http(f"http://127.0.0.1:{gport}/health", timeout=60)
        headers = {"Authorization": "Bearer k"}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ready = httpx.get(f"http://127.0.0.1:{gport}/ready", headers=headers, timeout=10)
            if ready.json()["layers"]["trigger"]["state"] == "failed":
                break
            time.sleep(0.5)
        assert ready.status_code == 503
        trigger = ready.json()["layers"]["trigger"]
        assert trigger["state"] == "failed"
        assert trigger["reason"].startswith("layer trigger: died by SIGILL (illegal instruction")
        shown = httpx.get(f"http://127.0.0.1:{gport}/v1/layers", headers=headers, timeout=10)
        row = next(r for r in shown.json()["data"] if r["name"] == "trigger")
        assert row["state"] == "failed" and row["reason"] == trigger["reason"]
        assert row["last_exit"].startswith("SIGILL")
        assert httpx.get(f"http://127.0.0.1:{gport}/health").status_code == 200  # still serving
    finally:
        proc.stop()
