# What the parts of module.nix share: names and paths, systemd's quoting, the enabled
# layers, the database choice and the rendered configuration. module.nix passes this set
# (with its Python mirrors) to each file under nix/, which takes what it uses by name.
{
  config,
  lib,
  pkgs,
}:

rec {
  inherit config lib pkgs;

  cfg = config.services.ai-sysadmin;
  settingsFormat = pkgs.formats.toml { };
  hardening = import ./hardening.nix { inherit lib; };

  layerNames = [
    "trigger"
    "review"
    "meta"
  ];

  stateDir = "/var/lib/ai-sysadmin";
  cacheDir = "/var/cache/ai-sysadmin";
  configPath = "/etc/ai-sysadmin/config.toml";
  helperSocket = "/run/ai-sysadmin/helper.sock";
  user = "ai-sysadmin";
  group = "ai-sysadmin";

  # systemd's ExecStart is not a shell: an argument is a C-escaped double-quoted word, and
  # `%` (specifiers) and `$` (variables) are expanded even inside quotes, so both are doubled.
  # (lib.escapeShellArgs would emit sh quoting such as 'it'\''s', which systemd rejects.)
  # Plain words (store paths, flags, numbers) stay bare so the unit file stays readable.
  escapeExecArg =
    arg:
    let
      s = if builtins.isString arg then arg else toString arg;
    in
    if builtins.match "[[:alnum:]_./:=@+,-]+" s != null then
      s
    else
      lib.replaceStrings [ "%" "$" ] [ "%%" "$$" ] (builtins.toJSON s);
  execCommand = argv: lib.concatMapStringsSep " " escapeExecArg argv;

  exe = lib.getExe' cfg.package "ai-sysadmin";
  cli = args: execCommand ([ exe "--config" configPath ] ++ args);

  isLoopback = host: host == "127.0.0.1" || host == "::1" || host == "localhost";

  # Where a local client reaches a server bound to `h`.
  clientHost =
    h:
    if isLoopback h || h == "0.0.0.0" || h == "::" || h == "" then
      "127.0.0.1"
    else if lib.hasInfix ":" h then
      "[${h}]"
    else
      h;
  apiClientHost = clientHost cfg.gateway.host;

  # fleet.role (docs/fleet.md): "both" is one machine, "server" the layers, gateway and
  # pipeline for many hosts, "agent" a host that only watches itself and runs the actions
  # the server approved for it: no layers, no gateway, no database of its own.
  isAgent = cfg.fleet.role == "agent";
  agentUnit = "ai-sysadmin-agent.service";
  # The host name events and actions carry: fleet.host, else networking.hostName (NixOS
  # sets the kernel's host name from it), else null (the Python side asks the system).
  fleetHost =
    if cfg.fleet.host != null then
      cfg.fleet.host
    else if (config.networking.hostName or "") != "" then
      config.networking.hostName
    else
      null;

  layers = cfg.layers;
  enabledLayers = lib.filter (
    name: !isAgent && cfg.llama-cpp.enable && layers.${name}.enable
  ) layerNames;
  layerUnits = map (name: "llama-${name}.service") enabledLayers;

  accel = cfg.llama-cpp.acceleration;
  onGpu = accel != "cpu";

  # An agent keeps only the collectors' cursors, in SQLite in its state directory.
  localPostgres = !isAgent && cfg.database.type == "postgresql" && cfg.database.createLocally;
  dbName = "ai-sysadmin";
  # An agent handles no incidents, so it recalls none.
  memoryEnabled = cfg.memory.enable && !isAgent;
  chromaService = memoryEnabled && cfg.memory.backend == "chromadb";

  # The units the gateway and the daemon start after.
  databaseUnits =
    lib.optionals localPostgres [
      "postgresql.service"
      "ai-sysadmin-postgresql-setup.service"
    ]
    ++ lib.optional chromaService "chromadb.service";

  # An unmanaged layer with `endpoints` uses exactly those; when this machine also runs the
  # layer's unit, it stays the first endpoint, so extra endpoints add replicas or fallbacks
  # instead of silently replacing the local server.
  withLocalEndpoints =
    settings:
    settings
    // {
      layers = lib.mapAttrs (
        name: l:
        let
          local = "http://${clientHost l.host}:${toString l.port}/v1";
          extra = l.endpoints or [ ];
        in
        if lib.elem name enabledLayers && extra != [ ] && !(lib.any (e: e.url or null == local) extra) then
          l // { endpoints = [ { url = local; } ] ++ extra; }
        else
          l
      ) settings.layers;
    };

  # Read by the gateway, the daemon and the helper; a change restarts them.
  configFile = settingsFormat.generate "ai-sysadmin.toml" (withLocalEndpoints cfg.settings);

  # nixos_rollback rewrites /etc, /boot and the system profile, which the helper's sandbox
  # forbids, so it runs as a unit of its own that the helper starts (layers/actions/helper.py:
  # `systemctl start --wait -- ai-sysadmin-rollback.service`). The helper keeps its tight
  # sandbox whatever the allowlist; the unit exists only where the action may run.
  rollbackUnit = "ai-sysadmin-rollback.service";
  rollbackEnabled =
    cfg.helper.enable && (cfg.actions.allowlist == null || lib.elem "nixos_rollback" cfg.actions.allowlist);
  nixPackage = config.nix.package or pkgs.nix;

  # Alertmanager's side of the webhook (docs/alertmanager.md), the read-only option
  # `alertmanager.receiver`. The key reaches Alertmanager as a systemd credential of its
  # own unit, readable by its DynamicUser, never the store.
  alertmanagerKeyPath = "/run/credentials/alertmanager.service/ai-sysadmin-key";
  alertmanagerReceiver = {
    name = "ai-sysadmin";
    webhook_configs = [
      (
        {
          url = "http://${apiClientHost}:${toString cfg.gateway.port}/v1/alertmanager";
          send_resolved = true;
          # The gateway refuses a notification of more alerts (413, no retry).
          max_alerts = cfg.settings.pipeline.max_batch_events or 1000;
        }
        // lib.optionalAttrs (cfg.alertmanager.keyFile != null) {
          http_config.authorization = {
            type = "Bearer";
            credentials_file = alertmanagerKeyPath;
          };
        }
      )
    ];
  };
}
