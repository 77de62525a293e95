# The gateway (ai-sysadmin-api), the daemon, the root helper and the rollback unit it starts,
# with the user they run as; on a fleet agent (fleet.role = "agent") the daemon, the helper
# and ai-sysadmin-agent instead, without the gateway. A part of module.nix (nix/common.nix);
# the sandbox each unit starts from is nix/hardening.nix's.
{
  lib,
  config,
  cfg,
  user,
  group,
  stateDir,
  helperSocket,
  configFile,
  layerUnits,
  databaseUnits,
  localPostgres,
  rollbackEnabled,
  isAgent,
  agentUnit,
  nixPackage,
  execCommand,
  cli,
  hardening,
  ...
}:

let
  inherit (lib) mkIf mkMerge;

  # An agent has one secret, its host key; it runs no gateway, so the gateway's keys are
  # the server's business (nix/assertions.nix warns when they are set here).
  credentials =
    if isAgent then
      lib.optional (cfg.fleet.keyFile != null) "host-key:${cfg.fleet.keyFile}"
    else
      lib.optional (cfg.gateway.apiKeysFile != null) "api-keys:${cfg.gateway.apiKeysFile}"
      ++ lib.optional (cfg.gateway.adminKeyFile != null) "admin-key:${cfg.gateway.adminKeyFile}";

  # `%d` is the unit's $CREDENTIALS_DIRECTORY; systemd expands it in Environment=.
  credentialEnvironment =
    if isAgent then
      { AI_SYSADMIN_FLEET__KEY_FILE = "%d/host-key"; }
    else
      lib.optionalAttrs (cfg.gateway.apiKeysFile != null) {
        AI_SYSADMIN_GATEWAY__API_KEYS_FILE = "%d/api-keys";
      }
      // lib.optionalAttrs (cfg.gateway.adminKeyFile != null) {
        AI_SYSADMIN_GATEWAY__ADMIN_KEY_FILE = "%d/admin-key";
      };

  # The key the daemon's collectors post events with: the Python side has no key-file
  # setting of the sink's own (collectors.api_key is the key itself), and falls back to
  # the first line of gateway.api_keys_file (layers/gateway_client.py, api_key). On an
  # agent, which runs no gateway, that file is the host key.
  sinkKeyEnvironment = lib.optionalAttrs isAgent {
    AI_SYSADMIN_GATEWAY__API_KEYS_FILE = "%d/host-key";
  };

  # The daemon and the agent: the collectors and the read-only actions look at the host.
  readsTheHost = {
    # Journal read access, and nothing more.
    SupplementaryGroups = [ "systemd-journal" ];
    # Disk metrics statfs /home; read-only keeps it a measurement.
    ProtectHome = "read-only";
    # CPU, memory and load metrics read /proc/stat, /proc/meminfo, /proc/loadavg.
    ProcSubset = "all";
  };

  # An agent's gateway is another machine's.
  remoteGateway = lib.optional isAgent "network-online.target";

  commonEnvironment = {
    PYTHONUNBUFFERED = "1";
    # Embedded ChromaDB phones home unless told not to.
    ANONYMIZED_TELEMETRY = "False";
    HOME = stateDir;
  };

  # What the gateway and the daemon share: unprivileged, their own user, writing only to
  # their state and cache directories.
  appService =
    hardening.sandbox
    // hardening.network
    // hardening.noCapabilities
    // {
      Type = "exec";
      User = user;
      Group = group;
      StateDirectory = "ai-sysadmin";
      StateDirectoryMode = "0750";
      CacheDirectory = "ai-sysadmin";
      CacheDirectoryMode = "0750";
      WorkingDirectory = stateDir;
      EnvironmentFile = lib.optional (cfg.gateway.environmentFile != null) cfg.gateway.environmentFile;
      LoadCredential = credentials;
      Restart = "on-failure";
      RestartSec = 5;
      UMask = "0027";
      # onnxruntime, imported with chromadb, maps shared objects with an executable stack.
      MemoryDenyWriteExecute = false;
      RemoveIPC = true;
    };

  systemProfile = "/nix/var/nix/profiles/system";
in
{
  # `ai-sysadmin incidents`, `approve` … for admins, reading the same configuration.
  environment.systemPackages = [ cfg.package ];

  users.users.${user} = {
    isSystemUser = true;
    inherit group;
    home = stateDir;
    description = "ai-sysadmin gateway and daemon";
  };
  users.groups.${group} = { };

  networking.firewall.allowedTCPPorts = lib.optional (
    cfg.gateway.openFirewall && !isAgent
  ) cfg.gateway.port;

  systemd.services = mkMerge [
    (mkIf (!isAgent) {
      ai-sysadmin-api = {
        description = "ai-sysadmin gateway (OpenAI-compatible API)";
        wantedBy = [ "multi-user.target" ];
        # Wants, not Requires: with a layer down the API answers 503 for that layer
        # instead of disappearing.
        wants = layerUnits ++ databaseUnits;
        after = [ "network.target" ] ++ layerUnits ++ databaseUnits;
        requires = lib.optional localPostgres "postgresql.service";
        restartTriggers = [ configFile ];
        environment = commonEnvironment // credentialEnvironment;
        serviceConfig = appService // {
          ExecStart = cli [ "gateway" ];
          # The sysadmin's live context and read-only actions (memory, load, ps) read
          # /proc like the daemon does.
          ProcSubset = "all";
        };
      };
    })

    {
      # On an agent the same collectors, posting to the server's gateway (fleet.gatewayUrl).
      ai-sysadmin-daemon = {
        description =
          if isAgent then
            "ai-sysadmin daemon (collectors, posting to the fleet's gateway)"
          else
            "ai-sysadmin daemon (collectors, review, meta, actions)";
        wantedBy = [ "multi-user.target" ];
        wants =
          lib.optional (!isAgent) "ai-sysadmin-api.service"
          ++ remoteGateway
          ++ lib.optional cfg.helper.enable "ai-sysadmin-helper.service";
        after = [
          "network.target"
        ]
        ++ lib.optional (!isAgent) "ai-sysadmin-api.service"
        ++ remoteGateway
        ++ lib.optional cfg.helper.enable "ai-sysadmin-helper.service"
        ++ databaseUnits;
        requires = lib.optional localPostgres "postgresql.service";
        restartTriggers = [ configFile ];
        # journalctl and systemctl for the collectors.
        path = [ config.systemd.package ];
        environment = commonEnvironment // credentialEnvironment // sinkKeyEnvironment;
        serviceConfig = appService // readsTheHost // {
          ExecStart = cli [ "daemon" ];
        };
      };
    }

    (mkIf isAgent {
      # The fleet agent (docs/fleet.md): claims the actions the server approved for this
      # host, checks them again against this host's catalog and policy, runs them (changes
      # through the helper, read-only ones itself) and reports. It talks to the gateway
      # only, with the host key.
      ai-sysadmin-agent = {
        description = "ai-sysadmin fleet agent (runs this host's approved actions)";
        wantedBy = [ "multi-user.target" ];
        wants = remoteGateway ++ lib.optional cfg.helper.enable "ai-sysadmin-helper.service";
        after = [
          "network.target"
        ]
        ++ remoteGateway
        ++ lib.optional cfg.helper.enable "ai-sysadmin-helper.service";
        restartTriggers = [ configFile ];
        # systemctl and journalctl for the read-only actions and the policy's unit checks.
        path = [ config.systemd.package ];
        environment = commonEnvironment // credentialEnvironment;
        serviceConfig = appService // readsTheHost // {
          ExecStart = cli [ "agent" ];
          # Unlike the daemon it never opens the memory (onnxruntime's executable stack).
          MemoryDenyWriteExecute = true;
        };
      };
    })

    (mkIf cfg.helper.enable {
      ai-sysadmin-helper = {
        description = "ai-sysadmin privileged helper (catalog actions only)";
        wantedBy = [ "multi-user.target" ];
        before = [ "ai-sysadmin-daemon.service" ] ++ lib.optional isAgent agentUnit;
        restartTriggers = [ configFile ];
        path = [
          config.systemd.package
          nixPackage
        ];
        environment = {
          PYTHONUNBUFFERED = "1";
          # Garbage collection goes through nix-daemon rather than touching the store.
          NIX_REMOTE = "daemon";
          # /root is hidden (ProtectHome); nix and systemctl get a writable home here.
          HOME = "/var/cache/ai-sysadmin-helper";
        };
        # Root, but no network and the file system read-only apart from ReadWritePaths.
        serviceConfig =
          hardening.sandbox
          // hardening.noNetwork
          // {
            Type = "exec";
            ExecStart = cli [
              "helper"
              "--socket"
              helperSocket
            ];
            # Root for systemctl restart / journalctl --vacuum / nix-collect-garbage; the
            # limit is the catalog, this socket, and the sandbox, the same whatever the
            # allowlist (nixos_rollback runs in ai-sysadmin-rollback.service).
            User = "root";
            # The socket is created root:ai-sysadmin with mode 0660 (UMask), in a 0750
            # directory: only the gateway and daemon's group can connect.
            Group = group;
            UMask = "0007";
            RuntimeDirectory = "ai-sysadmin";
            RuntimeDirectoryMode = "0750";
            CacheDirectory = "ai-sysadmin-helper";
            CacheDirectoryMode = "0700";
            Restart = "on-failure";
            RestartSec = 5;
            # Journal files are root:systemd-journal (vacuum), terminate_process signals
            # other users' processes; units and the store are reached over sockets.
            CapabilityBoundingSet = [
              "CAP_DAC_OVERRIDE"
              "CAP_FOWNER"
              "CAP_KILL"
            ];
            # journalctl --vacuum and nix-collect-garbage's old generations; `-`: a machine
            # with volatile journald storage has no /var/log/journal (226/NAMESPACE otherwise).
            ReadWritePaths = [
              "-/var/log/journal"
              "/nix/var/nix"
            ];
            # terminate_process and process_status look at other processes.
            ProtectProc = "default";
          };
      };
    })

    (mkIf rollbackEnabled {
      # nixos_rollback, started by the helper only (`systemctl start --wait`). It does what
      # `nixos-rebuild switch --rollback` does, without evaluating the current (perhaps
      # broken) configuration: point the system profile at the previous generation, then
      # have systemd run that generation's switch-to-configuration in a transient unit, as
      # nixos-rebuild does, under the name nixos-rebuild uses (so a switch by hand and this
      # one never interleave). The switch outlives this unit and the helper, which it may
      # restart. The activation itself is the previous generation's own code running as
      # unconfined root, like every switch: no sandbox can hold it, because it rewrites
      # /etc, /boot and the users and restarts any unit. What is confined here is the rest:
      # root without capabilities, writing the system profile and nothing else.
      ai-sysadmin-rollback = {
        description = "ai-sysadmin: switch NixOS back to the previous generation (nixos_rollback)";
        # A switch must never restart it: that would roll back a second time.
        restartIfChanged = false;
        environment = {
          NIX_REMOTE = "daemon";
          HOME = "/var/cache/ai-sysadmin-rollback";
        };
        # Root owns the profile directory, and systemd and nix-daemon judge a caller by
        # its uid, so no capability is needed.
        serviceConfig =
          hardening.sandbox
          // hardening.noNetwork
          // hardening.noCapabilities
          // {
            Type = "oneshot";
            ExecStart = [
              (execCommand [
                "${nixPackage}/bin/nix-env"
                "--profile"
                systemProfile
                "--rollback"
              ])
              (execCommand [
                "${config.systemd.package}/bin/systemd-run"
                "--unit=nixos-rebuild-switch-to-configuration"
                "--service-type=exec"
                "--collect"
                "--wait"
                "--pipe"
                "--quiet"
                "--no-ask-password"
                "--setenv=LOCALE_ARCHIVE"
                "${systemProfile}/bin/switch-to-configuration"
                "switch"
              ])
            ];
            # The catalog's timeout for nixos_rollback; a switch still running then finishes.
            TimeoutStartSec = "30min";
            User = "root";
            CacheDirectory = "ai-sysadmin-rollback";
            CacheDirectoryMode = "0700";
            ProtectProc = "invisible";
            # The generation links and the profile's lock; the store is nix-daemon's.
            ReadWritePaths = [ "/nix/var/nix/profiles" ];
          };
      };
    })
  ];
}
