# What a configuration must get right, checked at evaluation (`assertions`, as NixOS
# prints them), and what it had better not do (`warnings`). A part of module.nix
# (nix/common.nix); the notification and Alertmanager checks are in nix/alerting.nix.
{
  lib,
  config,
  cfg,
  layers,
  enabledLayers,
  accel,
  chromaService,
  isLoopback,
  isAgent,
  ...
}:

let
  # The GPU backends a llama-cpp build says it has, from nixpkgs' cmakeFlags
  # (`cmakeBool "GGML_CUDA" cudaSupport` renders -DGGML_CUDA:BOOL=TRUE; older builds used
  # LLAMA_CUBLAS=ON …). A package without cmakeFlags says nothing, so nothing is assumed.
  backendFlags = {
    cuda = [
      "GGML_CUDA"
      "LLAMA_CUDA"
      "LLAMA_CUBLAS"
    ];
    rocm = [
      "GGML_HIP"
      "GGML_HIPBLAS"
      "LLAMA_HIPBLAS"
    ];
    vulkan = [
      "GGML_VULKAN"
      "LLAMA_VULKAN"
    ];
  };
  packageFlags =
    let
      tried = builtins.tryEval (
        let
          flags = cfg.llama-cpp.package.cmakeFlags or [ ];
        in
        builtins.deepSeq flags flags
      );
    in
    if tried.success && builtins.isList tried.value then
      lib.filter builtins.isString tried.value
    else
      [ ];
  flagIs =
    values: backend:
    lib.any (
      name: lib.any (value: lib.elem "-D${name}${value}" packageFlags) values
    ) backendFlags.${backend};
  backendOn = flagIs [
    ":BOOL=TRUE"
    ":BOOL=ON"
    "=ON"
    "=1"
    "=TRUE"
  ];
  backendOff = flagIs [
    ":BOOL=FALSE"
    ":BOOL=OFF"
    "=OFF"
    "=0"
    "=FALSE"
  ];
  packageBackends = lib.filter backendOn (lib.attrNames backendFlags);

  # What an agent does not run, so options of the server's that it ignores.
  ignoredOnAgent =
    lib.optional cfg.gateway.openFirewall "gateway.openFirewall"
    ++ lib.optional (cfg.gateway.apiKeysFile != null) "gateway.apiKeysFile"
    ++ lib.optional (cfg.gateway.adminKeyFile != null) "gateway.adminKeyFile"
    ++ lib.optional (cfg.database.type != "sqlite") "database.type"
    ++ lib.optional (cfg.memory.backend != "embedded") "memory.backend"
    ++ lib.optional (cfg.notify.channels != [ ]) "notify.channels"
    ++ lib.optional (cfg.notify.dashboardUrl != null) "notify.dashboardUrl"
    ++ lib.optional cfg.alertmanager.enable "alertmanager.enable";
in
{
  assertions =
    map (name: {
      assertion = layers.${name}.model != null;
      message = "services.ai-sysadmin.layers.${name}.model must be set: the ${name} layer is enabled but has no GGUF model (use a path or pkgs.fetchurl, or set layers.${name}.enable = false).";
    }) enabledLayers
    ++ (
      let
        claims =
          map (name: {
            who = "layers.${name}.port";
            port = layers.${name}.port;
          }) enabledLayers
          ++ lib.optional (!isAgent) {
            who = "gateway.port";
            port = cfg.gateway.port;
          }
          ++ lib.optional chromaService {
            who = "services.chromadb.port";
            port = config.services.chromadb.port;
          }
          # Open WebUI also defaults to 8080, the trigger layer's port.
          ++ lib.optional (config.services.open-webui.enable or false) {
            who = "services.open-webui.port";
            port = config.services.open-webui.port;
          };
        clash =
          a: b:
          lib.optional (a.port == b.port) {
            assertion = false;
            message = "services.ai-sysadmin: ${a.who} and ${b.who} are both ${toString a.port}; every layer and the gateway need their own port.";
          };
        pairs = lib.concatLists (
          lib.imap0 (i: a: lib.concatMap (b: clash a b) (lib.drop (i + 1) claims)) claims
        );
      in
      pairs
    )
    ++ [
      {
        # A GPU build with acceleration = "cpu" gets PrivateDevices and no device nodes, and
        # quietly runs on the CPU (or fails to start); the other way round, a build that
        # says it lacks the chosen backend runs on the CPU with GPU devices opened for nothing.
        assertion =
          !cfg.llama-cpp.enable
          || enabledLayers == [ ]
          || (if accel == "cpu" then packageBackends == [ ] else !(backendOff accel));
        message =
          if accel == "cpu" then
            "services.ai-sysadmin.llama-cpp.package is built with ${lib.concatStringsSep " and " packageBackends} but llama-cpp.acceleration is \"cpu\": the layers would get no GPU devices and run on the CPU. Set llama-cpp.acceleration = \"${lib.head (packageBackends ++ [ "cpu" ])}\" or use a CPU build of llama-cpp."
          else
            "services.ai-sysadmin.llama-cpp.package is built without ${accel} support but llama-cpp.acceleration is \"${accel}\": the layers would run on the CPU. Use a llama-cpp built with ${accel} support, or leave llama-cpp.package at its default.";
      }
      {
        assertion = cfg.actions.autonomy != "auto-full" || cfg.actions.allowAutoFull;
        message = "services.ai-sysadmin.actions.autonomy = \"auto-full\" runs medium-risk actions without approval; confirm with services.ai-sysadmin.actions.allowAutoFull = true.";
      }
      {
        assertion = isAgent || !cfg.gateway.openFirewall || !(isLoopback cfg.gateway.host);
        message = "services.ai-sysadmin.gateway.openFirewall opens port ${toString cfg.gateway.port}, but gateway.host is ${cfg.gateway.host}, which only loopback clients reach; set gateway.host (e.g. \"0.0.0.0\") or leave the firewall closed.";
      }
      {
        assertion = cfg.fleet.role != "agent" || cfg.fleet.gatewayUrl != null;
        message = "services.ai-sysadmin.fleet.role = \"agent\" needs services.ai-sysadmin.fleet.gatewayUrl: the server's gateway, where this host's events go and its actions come from (e.g. \"https://ai.example.org:8083\").";
      }
      {
        assertion = cfg.fleet.role != "agent" || cfg.fleet.keyFile != null;
        message = "services.ai-sysadmin.fleet.role = \"agent\" needs services.ai-sysadmin.fleet.keyFile: a file (outside the Nix store) holding this host's key, made on the server with `ai-sysadmin hosts add ${if cfg.fleet.host != null then cfg.fleet.host else "<host>"}`.";
      }
      {
        # [fleet] role is the typed option's: settings.fleet.role would leave the units
        # of one role running under the configuration of another.
        assertion = (cfg.settings.fleet.role or cfg.fleet.role) == cfg.fleet.role;
        message = "services.ai-sysadmin.settings.fleet.role is \"${toString (cfg.settings.fleet.role or "")}\" but the units are fleet.role's (\"${cfg.fleet.role}\"); set services.ai-sysadmin.fleet.role instead.";
      }
      {
        assertion = isAgent || cfg.database.type != "postgresql" || cfg.database.createLocally || cfg.database.url != null || cfg.gateway.environmentFile != null;
        message = "services.ai-sysadmin.database: PostgreSQL without createLocally needs database.url or AI_SYSADMIN_STORE__URL in gateway.environmentFile.";
      }
    ];

  warnings =
    map (
      name: "services.ai-sysadmin.layers.${name}.host is ${layers.${name}.host}: llama-server has no authentication, so anyone who reaches that address can use the ${name} layer; keep it on loopback unless a firewall or VPN guards it."
    ) (lib.filter (name: !(isLoopback layers.${name}.host)) enabledLayers)
    ++ lib.optional (isAgent && ignoredOnAgent != [ ]) "services.ai-sysadmin.fleet.role is \"agent\": this host runs no gateway, layers or database (the server does), so ${lib.concatStringsSep ", " ignoredOnAgent} ${if lib.length ignoredOnAgent == 1 then "is" else "are"} ignored here; set ${if lib.length ignoredOnAgent == 1 then "it" else "them"} on the server."
    ++ lib.optional (!isAgent && !(isLoopback cfg.gateway.host) && cfg.gateway.apiKeysFile == null && cfg.gateway.environmentFile == null) "services.ai-sysadmin.gateway.host is ${cfg.gateway.host} but no gateway.apiKeysFile is set; the API will refuse every non-loopback client until keys are configured.";
}
