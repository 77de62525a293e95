# The store and the memory where this machine runs them: a local PostgreSQL (database.type
# = "postgresql", createLocally) with the oneshot that loads TimescaleDB, and
# services.chromadb (memory.backend = "chromadb"). A part of module.nix (nix/common.nix).
{
  lib,
  config,
  cfg,
  user,
  dbName,
  localPostgres,
  chromaService,
  execCommand,
  hardening,
  ...
}:

let
  inherit (lib) mkIf mkMerge;
in
mkMerge [
  (mkIf localPostgres {
    services.postgresql = {
      enable = true;
      ensureDatabases = [ dbName ];
      ensureUsers = [
        {
          name = user;
          ensureDBOwnership = true;
        }
      ];
      extensions = lib.mkIf cfg.database.timescaledb (ps: [ (ps.timescaledb-apache or ps.timescaledb) ]);
      settings.shared_preload_libraries = lib.mkIf cfg.database.timescaledb "timescaledb";
    };

    # CREATE EXTENSION needs a superuser; the app's own role stays unprivileged.
    systemd.services.ai-sysadmin-postgresql-setup = {
      description = "ai-sysadmin: prepare the PostgreSQL database";
      requires = [ "postgresql.service" ];
      after = [
        "postgresql.service"
        "postgresql-setup.service"
      ];
      before = [
        "ai-sysadmin-api.service"
        "ai-sysadmin-daemon.service"
      ];
      wantedBy = [ "multi-user.target" ];
      # psql talks to the server on /run/postgresql and nothing else.
      serviceConfig =
        hardening.sandbox
        // hardening.noNetwork
        // hardening.noCapabilities
        // {
          Type = "oneshot";
          RemainAfterExit = true;
          User = "postgres";
          Group = "postgres";
          ExecStart = execCommand (
            [
              "${config.services.postgresql.package}/bin/psql"
              "--no-psqlrc"
              "-v"
              "ON_ERROR_STOP=1"
              "-d"
              dbName
              "-c"
            ]
            ++ [
              (
                if cfg.database.timescaledb then
                  "CREATE EXTENSION IF NOT EXISTS timescaledb"
                else
                  "SELECT 1"
              )
            ]
          );
          PrivateUsers = true;
          ProtectProc = "invisible";
          ProcSubset = "pid";
          # Not RemoveIPC: it would remove the running server's IPC objects, which belong
          # to the same postgres user, when this unit stops.
          RemoveIPC = false;
          SystemCallFilter = [
            "@system-service"
            "~@privileged @resources"
          ];
          UMask = "0077";
        };
    };
  })

  (mkIf chromaService {
    services.chromadb.enable = true;
  })
]
