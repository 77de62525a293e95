# NixOS module: `services.ai-sysadmin.enable = true;` runs the whole system.
#
#   llama-trigger / llama-review / llama-meta   llama-server, one per layer (DynamicUser)
#   ai-sysadmin-api                             the gateway, OpenAI-compatible API on 8083
#   ai-sysadmin-daemon                          collectors + review/meta/action consumer
#   ai-sysadmin-helper                          root helper that only runs catalog actions
#   ai-sysadmin-rollback                        oneshot the helper starts for nixos_rollback
#   ai-sysadmin-postgresql-setup                oneshot: the extension (database.type = postgresql)
#   ai-sysadmin-agent                           fleet.role = "agent": runs the actions the server
#                                               approved for this host (then no layers, no gateway)
#
# Every unit is sandboxed; `systemd-analyze security` scores are in docs/security.md and
# checked by tests/test_unit_security.py.
#
# The gateway reads /etc/ai-sysadmin/config.toml, rendered from `settings`; the layers run
# under systemd, so that file declares them `managed = false` at the units' host:port.
# Secrets never enter the Nix store: key files are handed over with LoadCredential and
# everything else through an EnvironmentFile of AI_SYSADMIN_* variables.
#
# This file is the entry point (flake.nix's nixosModules.default); the module itself is
# written in parts under nix/, each a function of one shared set (nix/common.nix plus the
# Python mirrors below) that takes what it uses by name:
#
#   nix/options.nix      every option of services.ai-sysadmin
#   nix/assertions.nix   assertions and warnings
#   nix/settings.nix     the rendered configuration the typed options decide
#   nix/hardening.nix    the one sandbox every unit starts from
#   nix/layers.nix       the llama-server units
#   nix/services.nix     gateway, daemon, helper, rollback and fleet agent units, the user
#                        they run as
#   nix/database.nix     local PostgreSQL (and its setup oneshot), services.chromadb
#   nix/alerting.nix     notification channels and Alertmanager's webhook
#   nix/renamed.nix      old option names (api.*, llama-cpp.models.*, autonomyLevel …) and
#                        the TOML-named options they now set, imported below as
#                        lib.mkRenamedOptionModule shims that warn on use
{
  config,
  lib,
  pkgs,
  ...
}:

let
  # Mirrors of the Python side, kept equal by the tests (tests/test_nix.py and
  # tests/test_notify_nix.py read the last two lists from this file).
  python = {
    # Per-layer defaults, the same as layers/config.py so that `ai-sysadmin run` and the
    # NixOS units serve the same shapes.
    layerDefaults = {
      trigger = {
        port = 8080;
        contextSize = 8192;
        parallel = 4;
        embeddings = false;
      };
      review = {
        port = 8081;
        contextSize = 4096;
        parallel = 2;
        embeddings = false;
      };
      meta = {
        port = 8082;
        contextSize = 8192;
        parallel = 2;
        embeddings = true;
      };
    };

    # actions.protectedUnits' default: ActionsConfig().protected_units (layers/config.py).
    defaultProtectedUnits = [
      "sshd.service"
      "ssh.service"
      "dbus.service"
      "dbus-broker.service"
      "systemd-journald.service"
      "systemd-logind.service"
      "systemd-networkd.service"
      "systemd-resolved.service"
      "systemd-udevd.service"
      "ai-sysadmin-api.service"
      "ai-sysadmin-daemon.service"
      "ai-sysadmin-helper.service"
      "ai-sysadmin-rollback.service"
      "ai-sysadmin-agent.service"
      "llama-trigger.service"
      "llama-review.service"
      "llama-meta.service"
    ];

    # Every action of the catalog (layers/actions/catalog.py).
    catalogActions = [
      "unit_status" "journal_tail" "disk_usage" "list_failed_units" "memory_usage"
      "journal_disk_usage" "process_status" "unit_show" "unit_cat" "kernel_log" "list_timers"
      "nixos_generations" "nixos_closure_diff" "start_unit" "restart_unit" "reset_failed_unit"
      "terminate_process" "journal_vacuum" "nix_gc" "nixos_rollback"
    ];

    # Notification kinds (layers/config.py NOTIFY_KINDS; a test keeps them equal).
    notifyKinds = [
      "incident.opened" "incident.escalated" "incident.resolved" "approval.pending"
      "action.succeeded" "action.failed" "action.refused"
    ];
  };

  shared = import ./nix/common.nix { inherit config lib pkgs; } // python;
  part = file: import file shared;
in
{
  # The options carry the TOML's words (gateway.*, layers.<name>.*, actions.*, notify.*);
  # the names they had before still work, with a warning.
  imports =
    let
      under = path: [
        "services"
        "ai-sysadmin"
      ]
      ++ path;
    in
    map (r: lib.mkRenamedOptionModule (under r.from) (under r.to)) (
      import ./nix/renamed.nix { inherit (shared) layerNames; }
    );

  options.services.ai-sysadmin = part ./nix/options.nix;

  config = lib.mkIf shared.cfg.enable (
    lib.mkMerge [
      (part ./nix/assertions.nix)
      (part ./nix/settings.nix)
      (part ./nix/layers.nix)
      (part ./nix/services.nix)
      (part ./nix/database.nix)
      (part ./nix/alerting.nix)
    ]
  );
}
