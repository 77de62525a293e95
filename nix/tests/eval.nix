# Evaluate module.nix with nixpkgs' lib and stub NixOS options, and return what a test
# checks, as plain data (for `nix-instantiate --eval --strict --json`):
#
#   nix-instantiate --eval --strict --json nix/tests/eval.nix \
#     --arg lib 'import /path/to/nixpkgs-lib/lib' \
#     --arg scenario '{ pkgs, ... }: { services.ai-sysadmin.enable = true; … }'
#
# Failing assertions are reported, as NixOS does, instead of the units (which may not
# evaluate when an assertion fails, e.g. a layer without a model).
{
  lib,
  scenario,
}:

let
  pkgs = import ./fake-pkgs.nix { inherit lib; };

  evaluated = lib.evalModules {
    specialArgs = {
      inherit pkgs;
    };
    modules = [
      (import ./stubs.nix { inherit lib pkgs; })
      ../../module.nix
      scenario
    ];
  };
  config = evaluated.config;

  failed = map (a: a.message) (lib.filter (a: !a.assertion) config.assertions);

  unit = s: {
    inherit (s)
      description
      wantedBy
      after
      before
      wants
      requires
      environment
      serviceConfig
      restartIfChanged
      ;
    path = map toString s.path;
    restartTriggers = map toString s.restartTriggers;
  };
in
{
  assertions = failed;
  warnings = config.warnings;
}
// lib.optionalAttrs (failed == [ ]) {
  units = lib.mapAttrs (_: unit) config.systemd.services;
  settings = config.services.ai-sysadmin.configFile.renderedValue;
  etc = lib.mapAttrs (_: e: toString e.source) config.environment.etc;
  configFile = toString config.services.ai-sysadmin.configFile;
  firewall = config.networking.firewall.allowedTCPPorts;
  users = config.users.users;
  groups = lib.attrNames config.users.groups;
  llamaPackage = toString config.services.ai-sysadmin.llama-cpp.package;
  postgresql = {
    inherit (config.services.postgresql) enable ensureDatabases ensureUsers settings;
    extensions = config.services.postgresql.extensions {
      timescaledb = "timescaledb";
      timescaledb-apache = "timescaledb-apache";
    };
  };
  chromadb = config.services.chromadb.enable;
  alertmanager = {
    inherit (config.services.prometheus.alertmanager) enable configuration;
    receiver = config.services.ai-sysadmin.alertmanager.receiver;
  };
}
