# Options renamed to the words of the gateway's TOML (docs/configuration.md), so that
# `services.ai-sysadmin.layers.meta.contextSize` is `layers.meta.context_size` and
# `services.ai-sysadmin.gateway.port` is `gateway.port`. module.nix imports one
# lib.mkRenamedOptionModule per entry: a configuration that sets an old name still
# evaluates to the same system, with a warning naming the new one. Paths are relative to
# services.ai-sysadmin; docs/nixos.md ("Renamed options") has the same table.
{ layerNames }:

[
  {
    from = [ "autonomyLevel" ];
    to = [ "actions" "autonomy" ];
  }
  {
    from = [ "allowAutoFull" ];
    to = [ "actions" "allowAutoFull" ];
  }
  {
    from = [ "protectedUnits" ];
    to = [ "actions" "protectedUnits" ];
  }
  {
    from = [ "actionAllowlist" ];
    to = [ "actions" "allowlist" ];
  }
]
# The whole layer at once: every sub-option (model, port, contextSize, …) keeps its name.
++ map (name: {
  from = [ "llama-cpp" "models" name ];
  to = [ "layers" name ];
}) layerNames
++ map
  (option: {
    from = [ "api" option ];
    to = [ "gateway" option ];
  })
  [
    "host"
    "port"
    "openFirewall"
    "apiKeysFile"
    "adminKeyFile"
    "environmentFile"
  ]
++ map
  (option: {
    from = [ "notifications" option ];
    to = [ "notify" option ];
  })
  [
    "channels"
    "dashboardUrl"
  ]
