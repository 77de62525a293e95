# The gateway's configuration (docs/configuration.md) that the typed options decide,
# merged into `services.ai-sysadmin.settings` and rendered to /etc/ai-sysadmin/config.toml.
# A part of module.nix (nix/common.nix).
{
  lib,
  config,
  pkgs,
  cfg,
  layerNames,
  layers,
  stateDir,
  cacheDir,
  configFile,
  helperSocket,
  user,
  localPostgres,
  dbName,
  memoryEnabled,
  chromaService,
  isAgent,
  agentUnit,
  fleetHost,
  clientHost,
  apiClientHost,
  rollbackUnit,
  nixPackage,
  ...
}:

let
  actionPath = lib.makeBinPath [
    config.systemd.package
    pkgs.coreutils
    pkgs.procps
    nixPackage
  ];

  # A server's and an agent's host name is explicit (networking.hostName unless
  # fleet.host); "both" names one only when fleet.host says so.
  renderedHost = if cfg.fleet.role == "both" then cfg.fleet.host else fleetHost;
in
{
  services.ai-sysadmin.settings = {
    state_dir = stateDir;
    engine.cache_dir = cacheDir;
    layers = lib.genAttrs layerNames (
      name:
      let
        l = layers.${name};
      in
      {
        # systemd runs the servers; the gateway only talks to host:port.
        managed = false;
        inherit (l) host port embeddings;
        context_size = l.contextSize;
        parallel = l.parallel;
      }
      // lib.optionalAttrs (l.model != null) { model = "${l.model}"; }
      // lib.optionalAttrs (l.threads != null) { threads = l.threads; }
      // lib.optionalAttrs (l.gpuLayers != null) { gpu_layers = l.gpuLayers; }
      // lib.optionalAttrs (l.extraFlags != [ ]) { extra_flags = l.extraFlags; }
      # The model is always a path here: say "the GGUF's own" explicitly when unset.
      // { chat_template = if l.chatTemplate != null then l.chatTemplate else "model"; }
      // lib.optionalAttrs (l.stop != null) { inherit (l) stop; }
    );
    gateway = {
      inherit (cfg.gateway) host port;
    };
    # Empty: SQLite in state_dir. A remote URL may also come from AI_SYSADMIN_STORE__URL.
    store = lib.optionalAttrs (cfg.database.type == "postgresql" && (localPostgres || cfg.database.url != null)) {
      url = if localPostgres then "postgresql:///${dbName}?host=/run/postgresql" else cfg.database.url;
    };
    memory = {
      enabled = memoryEnabled;
    }
    // lib.optionalAttrs chromaService {
      chroma_url = "http://${clientHost config.services.chromadb.host}:${toString config.services.chromadb.port}";
    };
    actions = {
      autonomy = cfg.actions.autonomy;
      allow_auto_full = cfg.actions.allowAutoFull;
      # The rollback unit is nixos_rollback's own: starting it by name (start_unit) would
      # be a rollback without the high-risk approval, so it is protected whatever the list.
      # An agent restarting itself would lose the action it runs (its lease expires).
      protected_units = lib.unique (
        cfg.actions.protectedUnits ++ [ rollbackUnit ] ++ lib.optional isAgent agentUnit
      );
    }
    // lib.optionalAttrs (cfg.actions.allowlist != null) { inherit (cfg.actions) allowlist; }
    // lib.optionalAttrs cfg.helper.enable {
      helper_socket = helperSocket;
      # The helper's peer check (SO_PEERCRED) and its socket's group.
      helper_allowed_users = [ user ];
    }
    // {
      # Where catalog actions find systemctl, journalctl, df, free, ps, kill and
      # nix-collect-garbage; nixos-rebuild comes from the running system.
      search_path = lib.mkDefault "${actionPath}:/run/current-system/sw/bin";
    };
    # An agent's collectors post to the server's gateway, with the host key (nix/services.nix).
    collectors = {
      gateway_url = lib.mkDefault (
        if isAgent && cfg.fleet.gatewayUrl != null then
          cfg.fleet.gatewayUrl
        else
          "http://${apiClientHost}:${toString cfg.gateway.port}"
      );
    }
    # Events must carry the name the host key is scoped to (the gateway refuses others).
    // lib.optionalAttrs (renderedHost != null) {
      hostname = lib.mkDefault renderedHost;
    };
  }
  # "both", the default, renders nothing of [fleet] unless fleet.host is set.
  // lib.optionalAttrs (cfg.fleet.role != "both" || renderedHost != null) {
    fleet =
      lib.optionalAttrs (cfg.fleet.role != "both") { inherit (cfg.fleet) role; }
      // lib.optionalAttrs (renderedHost != null) { host = renderedHost; }
      # The key is the units' credential: AI_SYSADMIN_FLEET__KEY_FILE=%d/host-key.
      // lib.optionalAttrs (isAgent && cfg.fleet.gatewayUrl != null) {
        gateway_url = cfg.fleet.gatewayUrl;
      };
  };

  environment.etc."ai-sysadmin/config.toml".source = configFile;
}
