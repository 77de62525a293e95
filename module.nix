# NixOS module: `services.ai-sysadmin.enable = true;` runs the whole system.
#
#   llama-trigger / llama-review / llama-meta   llama-server, one per layer (DynamicUser)
#   ai-sysadmin-api                             the gateway, OpenAI-compatible API on 8083
#   ai-sysadmin-daemon                          collectors + review/meta/action consumer
#   ai-sysadmin-helper                          root helper that only runs catalog actions
#   ai-sysadmin-rollback                        oneshot the helper starts for nixos_rollback
#   ai-sysadmin-postgresql-setup                oneshot: the extension (database.type = postgresql)
#
# Every unit is sandboxed; `systemd-analyze security` scores are in docs/security.md and
# checked by tests/test_unit_security.py.
#
# The gateway reads /etc/ai-sysadmin/config.toml, rendered from `settings`; the layers run
# under systemd, so that file declares them `managed = false` at the units' host:port.
# Secrets never enter the Nix store: key files are handed over with LoadCredential and
# everything else through an EnvironmentFile of AI_SYSADMIN_* variables.
{
  config,
  lib,
  pkgs,
  ...
}:

let
  inherit (lib)
    mkOption
    mkEnableOption
    mkIf
    mkMerge
    types
    literalExpression
    ;

  cfg = config.services.ai-sysadmin;
  settingsFormat = pkgs.formats.toml { };

  layerNames = [
    "trigger"
    "review"
    "meta"
  ];

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

  # Absolute paths outside the store only: a literal Nix path (./secret) would be copied
  # into the world-readable store, so it is refused rather than silently published.
  secretPath = types.addCheck types.str (
    s: lib.hasPrefix "/" s && !(lib.hasPrefix "${builtins.storeDir}/" s)
  ) // {
    description = "absolute path outside the Nix store (a string, not a Nix path literal)";
  };

  # Where a local client reaches a server bound to `h`.
  clientHost =
    h:
    if isLoopback h || h == "0.0.0.0" || h == "::" || h == "" then
      "127.0.0.1"
    else if lib.hasInfix ":" h then
      "[${h}]"
    else
      h;
  apiClientHost = clientHost cfg.api.host;

  isLoopback = host: host == "127.0.0.1" || host == "::1" || host == "localhost";

  acceleratedPackage =
    {
      cpu = pkgs.llama-cpp.override {
        cudaSupport = false;
        rocmSupport = false;
        vulkanSupport = false;
      };
      cuda = pkgs.llama-cpp.override { cudaSupport = true; };
      rocm = pkgs.llama-cpp.override { rocmSupport = true; };
      vulkan = pkgs.llama-cpp.override { vulkanSupport = true; };
    }
    .${cfg.llama-cpp.acceleration};

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

  # nixpkgs-wide GPU support (`nixpkgs.config.cudaSupport`) picks the acceleration unless it
  # is set; outside NixOS (or with an older nixpkgs) there is no such option, hence `or`.
  nixpkgsConfig = config.nixpkgs.config or { };
  defaultAcceleration =
    if nixpkgsConfig.cudaSupport or false then
      "cuda"
    else if nixpkgsConfig.rocmSupport or false then
      "rocm"
    else
      "cpu";

  # Device nodes each acceleration needs (cgroup device classes from /proc/devices), and the
  # groups owning them. CPU inference gets no devices at all (PrivateDevices).
  deviceAccess = {
    cpu = {
      allow = [ ];
      groups = [ ];
    };
    cuda = {
      allow = [
        "char-nvidiactl"
        "char-nvidia-caps"
        "char-nvidia-frontend"
        "char-nvidia-uvm"
      ];
      groups = [ "video" ];
    };
    rocm = {
      allow = [
        "char-drm"
        "char-kfd"
      ];
      groups = [
        "video"
        "render"
      ];
    };
    vulkan = {
      allow = [ "char-drm" ];
      groups = [
        "video"
        "render"
      ];
    };
  };

  layerModule =
    name:
    { config, ... }:
    {
      options = {
        enable = mkOption {
          type = types.bool;
          default = true;
          description = ''
            Run the ${name} layer's llama-server as `llama-${name}.service`. When false the
            gateway still expects the layer at `host`:`port`, or at the endpoints listed in
            `services.ai-sysadmin.settings.layers.${name}.endpoints`.
          '';
        };
        model = mkOption {
          type = types.nullOr types.path;
          default = null;
          example = literalExpression ''
            pkgs.fetchurl {
              url = "https://huggingface.co/…/resolve/main/model-Q4_K_M.gguf";
              hash = "sha256-…";
            }
          '';
          description = ''
            GGUF file the ${name} layer serves: a path readable by an unprivileged dynamic
            user (not under /home), or a fixed-output derivation such as `pkgs.fetchurl` with
            a hash. The flake's `packages.<system>.default-model` is the small default model.
          '';
        };
        host = mkOption {
          type = types.str;
          default = "127.0.0.1";
          description = "Address the ${name} layer's llama-server binds to.";
        };
        port = mkOption {
          type = types.port;
          default = layerDefaults.${name}.port;
          description = "Port of the ${name} layer's llama-server.";
        };
        contextSize = mkOption {
          type = types.ints.between 256 1048576;
          default = layerDefaults.${name}.contextSize;
          description = "`--ctx-size`: total context of the ${name} layer, shared by all slots.";
        };
        parallel = mkOption {
          type = types.ints.between 1 64;
          default = layerDefaults.${name}.parallel;
          description = "`--parallel`: requests the ${name} layer serves at once (slots).";
        };
        threads = mkOption {
          type = types.nullOr types.ints.positive;
          default = null;
          description = ''
            `--threads`. null: a share of the cores, measured when the unit starts
            (`ai-sysadmin layers exec`): the cores left by the layers that set `threads`,
            split evenly among the enabled layers that do not, at least 1 each — the
            supervisor's rule, so that busy layers do not oversubscribe the CPU.
          '';
        };
        gpuLayers = mkOption {
          type = types.nullOr types.ints.unsigned;
          default = if cfg.llama-cpp.acceleration == "cpu" then null else 999;
          defaultText = literalExpression ''if acceleration == "cpu" then null else 999'';
          description = ''
            `--n-gpu-layers`: model layers offloaded to the GPU (llama-server caps it at the
            model's layer count, so 999 means all of them); null: llama-server's default.
          '';
        };
        embeddings = mkOption {
          type = types.bool;
          default = layerDefaults.${name}.embeddings;
          description = "Also serve `/v1/embeddings` (`--embeddings`); the gateway's memory uses meta's.";
        };
        chatTemplate = mkOption {
          type = types.nullOr types.str;
          default = modelAttr name "chatTemplate";
          defaultText = literalExpression "model.chatTemplate or null";
          example = "gemma";
          description = ''
            A llama-server built-in chat template (`gemma`, `chatml`, `llama3`, …; passed
            as `--no-jinja --chat-template NAME`); null: the GGUF's own. The flake's
            `default-model` carries `gemma`: its GGUF has no template.
          '';
        };
        stop = mkOption {
          type = types.nullOr (types.listOf types.str);
          default = modelAttr name "stopStrings";
          defaultText = literalExpression "model.stopStrings or null";
          description = ''
            Stop strings the gateway adds to chat and completion requests for this layer
            (`layers.<name>.stop`); null: none (the flake's `default-model` carries its
            turn markers).
          '';
        };
        extraFlags = mkOption {
          type = types.listOf types.str;
          default = [ ];
          example = [
            "--flash-attn"
            "on"
          ];
          description = "Further llama-server arguments, each passed as one argument (no shell).";
        };
      };
    };

  layers = lib.genAttrs layerNames (name: cfg.llama-cpp.models.${name});
  # What a model package says about itself (the flake's default-model: its chat template).
  modelAttr =
    name: attr:
    let
      m = cfg.llama-cpp.models.${name}.model;
    in
    if builtins.isAttrs m then m.${attr} or null else null;
  enabledLayers = lib.filter (name: cfg.llama-cpp.enable && layers.${name}.enable) layerNames;
  layerUnits = map (name: "llama-${name}.service") enabledLayers;

  # Layers without `threads` share what the others leave, measured at start (the same
  # rule as layers/supervisor.py's plan_threads): `ai-sysadmin layers exec` appends
  # `--threads <share>` and execs the server.
  sharingLayers = lib.filter (name: layers.${name}.threads == null) enabledLayers;
  reservedThreads = lib.foldl' (
    n: name: n + (if layers.${name}.threads == null then 0 else layers.${name}.threads)
  ) 0 enabledLayers;
  threadShare =
    name:
    lib.optionals (layers.${name}.threads == null) [
      exe
      "layers"
      "exec"
      "--sharers"
      (toString (lib.length sharingLayers))
      "--reserved"
      (toString reservedThreads)
      "--"
    ];

  # The same argv as layers/supervisor.py's engine_command builds for a managed layer.
  layerArgv =
    name:
    let
      l = layers.${name};
    in
    threadShare name
    ++ [
      "${cfg.llama-cpp.package}/bin/llama-server"
      "--model"
      "${l.model}"
      "--alias"
      name
      "--host"
      l.host
      "--port"
      (toString l.port)
      "--ctx-size"
      (toString l.contextSize)
      "--parallel"
      (toString l.parallel)
      "--metrics"
      "--slots"
    ]
    ++ lib.optionals (l.threads != null) [
      "--threads"
      (toString l.threads)
    ]
    ++ lib.optionals (l.gpuLayers != null) [
      "--n-gpu-layers"
      (toString l.gpuLayers)
    ]
    ++ lib.optionals l.embeddings (
      [ "--embeddings" ]
      # OpenAI-style /v1/embeddings needs one pooled vector; chat models default to none.
      ++ lib.optionals (!(lib.elem "--pooling" l.extraFlags)) [
        "--pooling"
        "mean"
      ]
    )
    # Built-in template names need the non-Jinja renderer (layers/generation.py).
    ++ lib.optionals (l.chatTemplate != null) [
      "--no-jinja"
      "--chat-template"
      l.chatTemplate
    ]
    ++ l.extraFlags;

  accel = cfg.llama-cpp.acceleration;
  onGpu = accel != "cpu";

  # No capabilities. `CapabilityBoundingSet=` (empty) resets the set, so it goes first
  # (mkBefore), and as a list: a definition of your own, e.g. systemd.services
  # .ai-sysadmin-api.serviceConfig.CapabilityBoundingSet = [ "CAP_NET_BIND_SERVICE" ] (or
  # the string), then adds to it, instead of conflicting with a string "" or landing
  # before the empty assignment, which would reset it.
  noCapabilities = {
    CapabilityBoundingSet = lib.mkBefore [ "" ];
    AmbientCapabilities = lib.mkBefore [ "" ];
  };

  layerService = name: {
    description = "ai-sysadmin ${name} layer (llama-server)";
    wantedBy = [ "multi-user.target" ];
    after = [ "network.target" ];
    serviceConfig = {
      Type = "exec";
      ExecStart = execCommand (layerArgv name);
      # llama-server finishes in-flight slots on SIGINT.
      KillSignal = "SIGINT";
      Restart = "on-failure";
      RestartSec = 5;

      DynamicUser = true;
      inherit (noCapabilities) CapabilityBoundingSet AmbientCapabilities;
      NoNewPrivileges = true;
      RestrictAddressFamilies = [
        "AF_INET"
        "AF_INET6"
        "AF_UNIX"
      ];
      ProtectSystem = "strict";
      ProtectHome = true;
      PrivateTmp = true;
      PrivateMounts = true;
      # Group-owned GPU nodes need the real supplementary groups, which a user namespace hides.
      PrivateUsers = !onGpu;
      PrivateDevices = !onGpu;
      DevicePolicy = "closed";
      DeviceAllow = deviceAccess.${accel}.allow;
      SupplementaryGroups = deviceAccess.${accel}.groups;
      ProtectClock = true;
      ProtectControlGroups = true;
      ProtectKernelLogs = true;
      ProtectKernelModules = true;
      ProtectKernelTunables = true;
      ProtectHostname = true;
      ProtectProc = "invisible";
      # GPU runtimes read /proc/driver/nvidia, /proc/meminfo and the like, not only
      # /proc/<pid> (nixpkgs' ollama uses "all" too); CPU inference needs its own process only.
      ProcSubset = if onGpu then "all" else "pid";
      # GPU runtimes JIT-compile kernels into writable+executable memory.
      MemoryDenyWriteExecute = !onGpu;
      LockPersonality = true;
      RemoveIPC = true;
      RestrictNamespaces = true;
      RestrictRealtime = true;
      RestrictSUIDSGID = true;
      SystemCallArchitectures = "native";
      SystemCallFilter = [
        "@system-service"
        "~@privileged"
      ];
      SystemCallErrorNumber = "EPERM";
      UMask = "0077";
    };
  };

  localPostgres = cfg.database.type == "postgresql" && cfg.database.createLocally;
  dbName = "ai-sysadmin";
  chromaService = cfg.memory.enable && cfg.memory.backend == "chromadb";

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

  exe = lib.getExe' cfg.package "ai-sysadmin";
  cli = args: execCommand ([ exe "--config" configPath ] ++ args);

  credentials =
    lib.optional (cfg.api.apiKeysFile != null) "api-keys:${cfg.api.apiKeysFile}"
    ++ lib.optional (cfg.api.adminKeyFile != null) "admin-key:${cfg.api.adminKeyFile}";

  # `%d` is the unit's $CREDENTIALS_DIRECTORY; systemd expands it in Environment=.
  credentialEnvironment =
    lib.optionalAttrs (cfg.api.apiKeysFile != null) {
      AI_SYSADMIN_GATEWAY__API_KEYS_FILE = "%d/api-keys";
    }
    // lib.optionalAttrs (cfg.api.adminKeyFile != null) {
      AI_SYSADMIN_GATEWAY__ADMIN_KEY_FILE = "%d/admin-key";
    };

  commonEnvironment = {
    PYTHONUNBUFFERED = "1";
    # Embedded ChromaDB phones home unless told not to.
    ANONYMIZED_TELEMETRY = "False";
    HOME = stateDir;
  };

  databaseUnits =
    lib.optionals localPostgres [
      "postgresql.service"
      "ai-sysadmin-postgresql-setup.service"
    ]
    ++ lib.optional chromaService "chromadb.service";

  # Sandbox shared by the gateway and the daemon: unprivileged, its own user, writes only
  # to its state and cache directories.
  appHardening = {
    User = user;
    Group = group;
    StateDirectory = "ai-sysadmin";
    StateDirectoryMode = "0750";
    CacheDirectory = "ai-sysadmin";
    CacheDirectoryMode = "0750";
    WorkingDirectory = stateDir;
    EnvironmentFile = lib.optional (cfg.api.environmentFile != null) cfg.api.environmentFile;
    Restart = "on-failure";
    RestartSec = 5;
    UMask = "0027";

    inherit (noCapabilities) CapabilityBoundingSet AmbientCapabilities;
    NoNewPrivileges = true;
    RestrictAddressFamilies = [
      "AF_INET"
      "AF_INET6"
      "AF_UNIX"
    ];
    ProtectSystem = "strict";
    PrivateTmp = true;
    PrivateMounts = true;
    PrivateDevices = true;
    DevicePolicy = "closed";
    ProtectClock = true;
    ProtectControlGroups = true;
    ProtectKernelLogs = true;
    ProtectKernelModules = true;
    ProtectKernelTunables = true;
    ProtectHostname = true;
    # onnxruntime, imported with chromadb, maps shared objects with an executable stack.
    MemoryDenyWriteExecute = false;
    LockPersonality = true;
    RemoveIPC = true;
    RestrictNamespaces = true;
    RestrictRealtime = true;
    RestrictSUIDSGID = true;
    SystemCallArchitectures = "native";
    SystemCallFilter = [
      "@system-service"
      "~@privileged"
    ];
    SystemCallErrorNumber = "EPERM";
  };

  # Sandbox shared by the two root units (the helper and the rollback): the file system
  # read-only apart from each unit's ReadWritePaths, no network (systemd, journald and
  # nix-daemon are reached over unix sockets, which PrivateNetwork leaves alone), no
  # devices, no kernel tunables, modules, logs or clock, no namespaces, no SUID files.
  rootSandbox = {
    NoNewPrivileges = true;
    RestrictAddressFamilies = [ "AF_UNIX" ];
    PrivateNetwork = true;
    ProtectSystem = "strict";
    ProtectHome = true;
    PrivateTmp = true;
    PrivateMounts = true;
    PrivateDevices = true;
    DevicePolicy = "closed";
    ProtectClock = true;
    ProtectControlGroups = true;
    ProtectKernelLogs = true;
    ProtectKernelModules = true;
    ProtectKernelTunables = true;
    ProtectHostname = true;
    ProtectProc = "invisible";
    MemoryDenyWriteExecute = true;
    LockPersonality = true;
    RestrictNamespaces = true;
    RestrictRealtime = true;
    RestrictSUIDSGID = true;
    SystemCallArchitectures = "native";
    # Not ~@resources: nix raises its stack limit and journalctl its open-file limit.
    SystemCallFilter = [
      "@system-service"
      "~@privileged"
    ];
    SystemCallErrorNumber = "EPERM";
  };

  # nixos_rollback rewrites /etc, /boot and the system profile, which the helper's sandbox
  # forbids, so it runs as a unit of its own that the helper starts (layers/actions/helper.py:
  # `systemctl start --wait -- ai-sysadmin-rollback.service`). The helper keeps its tight
  # sandbox whatever the allowlist; the unit exists only where the action may run.
  rollbackUnit = "ai-sysadmin-rollback.service";
  rollbackEnabled =
    cfg.helper.enable && (cfg.actionAllowlist == null || lib.elem "nixos_rollback" cfg.actionAllowlist);
  systemProfile = "/nix/var/nix/profiles/system";
  nixPackage = config.nix.package or pkgs.nix;

  actionPath = lib.makeBinPath [
    config.systemd.package
    pkgs.coreutils
    pkgs.procps
    nixPackage
  ];

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
  # Where systemd puts a notification channel's URL for the gateway (LoadCredential).
  notifyCredential = name: "/run/credentials/ai-sysadmin-api.service/notify-${name}";

  # pkgs.formats.toml's value type: nested definitions merge key by key, and a conflicting
  # value (say a different layer port) is an error instead of a silent override.
  tomlValue = settingsFormat.type;

  # Alertmanager's side of the webhook (docs/alertmanager.md). The key reaches Alertmanager
  # as a systemd credential of its own unit, readable by its DynamicUser, never the store.
  alertmanagerKeyPath = "/run/credentials/alertmanager.service/ai-sysadmin-key";
  alertmanagerReceiver = {
    name = "ai-sysadmin";
    webhook_configs = [
      (
        {
          url = "http://${apiClientHost}:${toString cfg.api.port}/v1/alertmanager";
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
in
{
  options.services.ai-sysadmin = {
    enable = mkEnableOption "ai-sysadmin, an AI system administrator built from local llama.cpp models";

    package = mkOption {
      type = types.package;
      default = pkgs.ai-sysadmin or (pkgs.callPackage ./nix/package.nix { });
      defaultText = literalExpression "pkgs.ai-sysadmin or (pkgs.callPackage ./nix/package.nix { })";
      description = "The ai-sysadmin package (gateway, daemon, helper and CLI).";
    };

    autonomyLevel = mkOption {
      type = types.enum [
        "observe"
        "suggest"
        "auto-safe"
        "auto-full"
      ];
      default = "suggest";
      description = ''
        What the sysadmin may do without asking. `observe`: nothing runs; `suggest`: read-only
        actions run, the rest waits for approval; `auto-safe`: low-risk actions run too;
        `auto-full`: everything but high-risk actions runs (needs `allowAutoFull`).
      '';
    };

    allowAutoFull = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Explicit opt-in required for `autonomyLevel = "auto-full"`: medium-risk actions
        (restarting units, garbage collection) then run without a human.
      '';
    };

    protectedUnits = mkOption {
      # A unit name, a template (`worker@`, `worker@.service`) or a name without its type
      # suffix, which means `.service` (as systemctl reads it) — never a glob.
      type = types.listOf (types.strMatching "[A-Za-z0-9_:][A-Za-z0-9_:.-]*(@[A-Za-z0-9_:.-]*)?");
      default = defaultProtectedUnits;
      example = literalExpression ''options.services.ai-sysadmin.protectedUnits.default ++ [ "postgresql.service" ]'';
      description = ''
        Units no action ever changes, also matched through the aliases systemd reports. A
        name without a type suffix means `.service` (`"postgresql"` protects
        `postgresql.service`, as systemctl reads it); a template (`"worker@"` or
        `"worker@.service"`) protects all its instances; globs are refused. The default
        guards remote access, the journal, networking and ai-sysadmin itself; replacing the
        list drops those, so extend the default instead.
      '';
    };

    actionAllowlist = mkOption {
      # The catalog's action names (layers/actions/catalog.py; a test keeps them equal).
      type = types.nullOr (types.listOf (types.enum catalogActions));
      default = null;
      example = [
        "unit_status"
        "journal_tail"
        "restart_unit"
        "reset_failed_unit"
      ];
      description = ''
        Catalog actions that may ever run; null: the whole catalog; `[ ]`: none at all.
        A name outside the catalog is an evaluation error. With `nixos_rollback`
        (and the helper), the module adds `${rollbackUnit}`, the unit the helper starts
        to roll back; leaving the action out leaves that unit out.
      '';
    };

    llama-cpp = {
      enable = mkOption {
        type = types.bool;
        default = true;
        description = ''
          Run the three layers' llama-servers on this machine. When false, point the gateway at
          existing servers with the layers' `host`/`port` or with `settings.layers.<name>.endpoints`.
        '';
      };

      acceleration = mkOption {
        type = types.enum [
          "cpu"
          "cuda"
          "rocm"
          "vulkan"
        ];
        default = defaultAcceleration;
        defaultText = literalExpression ''
          if config.nixpkgs.config.cudaSupport or false then "cuda"
          else if config.nixpkgs.config.rocmSupport or false then "rocm"
          else "cpu"
        '';
        description = ''
          Inference backend. Chooses the matching llama-cpp build (unless `package` is set), the
          device nodes the layer units may open and the default `gpuLayers`. `cuda` needs
          `nixpkgs.config.allowUnfree` and the NVIDIA driver (`hardware.nvidia`); `rocm` and
          `vulkan` need the GPU's kernel driver. A `package` built for a GPU backend other
          than this one is an evaluation error: it would run on the CPU, or without access
          to its devices.
        '';
      };

      package = mkOption {
        type = types.package;
        default = acceleratedPackage;
        defaultText = literalExpression ''pkgs.llama-cpp.override { cudaSupport = acceleration == "cuda"; … }'';
        description = "llama.cpp build whose `bin/llama-server` runs the layers.";
      };

      models = lib.genAttrs layerNames (
        name:
        mkOption {
          type = types.submodule (layerModule name);
          default = { };
          description = "The ${name} layer's llama-server.";
        }
      );
    };

    api = {
      host = mkOption {
        type = types.str;
        default = "127.0.0.1";
        example = "0.0.0.0";
        description = "Address the OpenAI-compatible API binds to.";
      };
      port = mkOption {
        type = types.port;
        default = 8083;
        description = "Port of the OpenAI-compatible API.";
      };
      openFirewall = mkOption {
        type = types.bool;
        default = false;
        description = "Open `api.port` in the firewall (needs a non-loopback `api.host`).";
      };
      apiKeysFile = mkOption {
        type = types.nullOr secretPath;
        default = null;
        example = "/run/secrets/ai-sysadmin-api-keys";
        description = ''
          File with the accepted API keys, one per line. Read by systemd (LoadCredential) and
          handed to the gateway and daemon; it never enters the Nix store. Without keys the API
          answers loopback clients only.
        '';
      };
      adminKeyFile = mkOption {
        type = types.nullOr secretPath;
        default = null;
        example = "/run/secrets/ai-sysadmin-admin-key";
        description = "File holding the admin key (approvals, layer control), via LoadCredential.";
      };
      environmentFile = mkOption {
        type = types.nullOr secretPath;
        default = null;
        example = "/run/secrets/ai-sysadmin.env";
        description = ''
          EnvironmentFile for the gateway and the daemon, for secrets in `AI_SYSADMIN_*`
          variables (e.g. `AI_SYSADMIN_STORE__URL=postgresql://…:password@…`); these override
          the rendered configuration.
        '';
      };
    };

    database = {
      type = mkOption {
        type = types.enum [
          "sqlite"
          "postgresql"
        ];
        default = "sqlite";
        description = "Store of events, incidents and the audit log: SQLite in the state directory, or PostgreSQL.";
      };
      createLocally = mkOption {
        type = types.bool;
        default = true;
        description = ''
          With `type = "postgresql"`: enable `services.postgresql` on this machine with a
          `ai-sysadmin` database owned by the `ai-sysadmin` user (peer authentication over the
          unix socket, no password). When false, set `url` or `AI_SYSADMIN_STORE__URL` in
          `api.environmentFile`.
        '';
      };
      timescaledb = mkOption {
        type = types.bool;
        default = true;
        description = "With a local PostgreSQL: load TimescaleDB (Apache-2 edition) so events live in hypertables.";
      };
      url = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "postgresql://ai-sysadmin@db.example.org/ai-sysadmin";
        description = ''
          Connection URL of a remote PostgreSQL (without a password: put that in
          `api.environmentFile` as `AI_SYSADMIN_STORE__URL`, since this value lands in the store).
        '';
      };
    };

    memory = {
      enable = mkOption {
        type = types.bool;
        default = true;
        description = "Recall past incidents from ChromaDB (embeddings come from the meta layer).";
      };
      backend = mkOption {
        type = types.enum [
          "embedded"
          "chromadb"
        ];
        default = "embedded";
        description = "`embedded`: ChromaDB inside the gateway, in the state directory; `chromadb`: enable and use `services.chromadb`.";
      };
    };

    alertmanager = {
      enable = mkOption {
        type = types.bool;
        default = false;
        description = ''
          Feed Prometheus Alertmanager's alerts into the pipeline (`POST /v1/alertmanager`):
          firing alerts open incidents, resolved ones resolve them. The gateway gets
          `alertmanager.keyFile` as its webhook key; when this machine runs
          `services.prometheus.alertmanager`, its unit gets the same key as a credential and,
          unless you set `services.prometheus.alertmanager.configuration` yourself, a
          configuration that routes every alert to `alertmanager.receiver`. With your own
          configuration, add `config.services.ai-sysadmin.alertmanager.receiver` to its
          `receivers` and route to `"ai-sysadmin"`.
        '';
      };
      keyFile = mkOption {
        type = types.nullOr secretPath;
        default = null;
        example = "/run/secrets/ai-sysadmin-alertmanager-key";
        description = ''
          File holding the webhook's bearer key (one line), good for `POST /v1/alertmanager`
          only. Read by systemd (LoadCredential) for the gateway and for
          `alertmanager.service`; it never enters the Nix store. Needed when the API has keys
          (`api.apiKeysFile`); without any key the API serves loopback clients only, and a local
          Alertmanager posts without one.
        '';
      };
      receiver = mkOption {
        type = types.attrs;
        readOnly = true;
        default = alertmanagerReceiver;
        defaultText = literalExpression ''
          { name = "ai-sysadmin"; webhook_configs = [ { url = "http://127.0.0.1:8083/v1/alertmanager"; send_resolved = true; … } ]; }
        '';
        description = "The Alertmanager receiver that posts to this gateway (read-only; splice it into your own `receivers`).";
      };
    };

    notifications = {
      channels = mkOption {
        type = types.listOf (
          types.submodule {
            options = {
              name = mkOption {
                type = types.strMatching "[a-z0-9][a-z0-9_-]{0,31}";
                example = "pager";
                description = "Channel name, shown in the API and `ai-sysadmin notify test`.";
              };
              urlFile = mkOption {
                type = secretPath;
                example = "/run/secrets/ai-sysadmin-ntfy-url";
                description = ''
                  File whose first line is the channel's apprise URL (`ntfys://…`,
                  `mailtos://…`, `matrixs://…`, `json://…`): it holds tokens or passwords, so
                  the gateway gets it as a systemd credential (LoadCredential); it never
                  enters the Nix store or the rendered configuration.
                '';
              };
              kinds = mkOption {
                type = types.nullOr (types.listOf (types.enum notifyKinds));
                default = null;
                example = [ "incident.opened" "approval.pending" ];
                description = "Kinds of notification this channel gets; null: all.";
              };
              minSeverity = mkOption {
                type = types.nullOr (types.enum [ "info" "warning" "critical" ]);
                default = null;
                description = "Least severity this channel gets; null: `warning` (the gateway's default).";
              };
              maxPerHour = mkOption {
                type = types.nullOr types.ints.unsigned;
                default = null;
                description = "Rate limit of this channel (0: none); null: 30.";
              };
              quietHours = mkOption {
                type = types.nullOr (types.strMatching "([01][0-9]|2[0-3]):[0-5][0-9]-([01][0-9]|2[0-3]):[0-5][0-9]");
                default = null;
                example = "22:00-07:00";
                description = "Local time when only critical notifications are sent; null: none.";
              };
              quietAction = mkOption {
                type = types.nullOr (types.enum [ "hold" "drop" ]);
                default = null;
                description = "Non-critical notifications during quiet hours: sent when they end (`hold`, the default) or never (`drop`).";
              };
            };
          }
        );
        default = [ ];
        example = literalExpression ''
          [
            { name = "pager"; urlFile = "/run/secrets/ntfy-url"; minSeverity = "critical"; }
            { name = "mail"; urlFile = "/run/secrets/smtp-url"; quietHours = "22:00-07:00"; }
          ]
        '';
        description = ''
          Where incidents, pending approvals and actions are announced (docs/notifications.md):
          apprise URLs, each read from a file by systemd and handed to the gateway, which
          delivers from the store's outbox with retries.
        '';
      };
      dashboardUrl = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "https://ops.example.org/ai-sysadmin/";
        description = "Dashboard address put in notifications; null: the API's own address.";
      };
    };

    helper.enable = mkOption {
      type = types.bool;
      default = cfg.autonomyLevel != "observe";
      defaultText = literalExpression ''autonomyLevel != "observe"'';
      description = ''
        Run `ai-sysadmin-helper.service`, the root helper that executes catalog actions for the
        daemon over ${helperSocket} (group `${group}` only). When false, actions run in the
        unprivileged daemon, so changes to the system fail.
      '';
    };

    settings = mkOption {
      type = types.submodule { freeformType = tomlValue; };
      default = { };
      example = literalExpression ''
        {
          gateway.public_models = true;
          gateway.task_layer = "trigger";
          collectors.metrics_interval = 15;
          layers.meta.endpoints = [
            { url = "http://gpu-box:8082/v1"; role = "fallback"; }
          ];
        }
      '';
      description = ''
        The gateway's configuration (docs/configuration.md), rendered to
        `${configPath}`. The module fills in the layers, API address, state
        directory, store, memory and actions from the typed options above; setting one of
        those keys here to a different value is a conflict, so use the option instead.
      '';
    };

    configFile = mkOption {
      type = types.path;
      readOnly = true;
      default = configFile;
      defaultText = literalExpression "the rendered settings";
      description = "The rendered TOML configuration (read-only; for inspection and tests).";
    };
  };

  config = mkIf cfg.enable (mkMerge [
    {
      assertions =
        map (name: {
          assertion = layers.${name}.model != null;
          message = "services.ai-sysadmin.llama-cpp.models.${name}.model must be set: the ${name} layer is enabled but has no GGUF model (use a path or pkgs.fetchurl, or set llama-cpp.models.${name}.enable = false).";
        }) enabledLayers
        ++ (
          let
            claims =
              map (name: {
                who = "llama-cpp.models.${name}.port";
                port = layers.${name}.port;
              }) enabledLayers
              ++ [
                {
                  who = "api.port";
                  port = cfg.api.port;
                }
              ]
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
                message = "services.ai-sysadmin: ${a.who} and ${b.who} are both ${toString a.port}; every layer and the API need their own port.";
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
            assertion = cfg.autonomyLevel != "auto-full" || cfg.allowAutoFull;
            message = "services.ai-sysadmin.autonomyLevel = \"auto-full\" runs medium-risk actions without approval; confirm with services.ai-sysadmin.allowAutoFull = true.";
          }
          {
            assertion = !cfg.api.openFirewall || !(isLoopback cfg.api.host);
            message = "services.ai-sysadmin.api.openFirewall opens port ${toString cfg.api.port}, but api.host is ${cfg.api.host}, which only loopback clients reach; set api.host (e.g. \"0.0.0.0\") or leave the firewall closed.";
          }
          {
            assertion = cfg.database.type != "postgresql" || cfg.database.createLocally || cfg.database.url != null || cfg.api.environmentFile != null;
            message = "services.ai-sysadmin.database: PostgreSQL without createLocally needs database.url or AI_SYSADMIN_STORE__URL in api.environmentFile.";
          }
        ];

      warnings =
        map (
          name: "services.ai-sysadmin.llama-cpp.models.${name}.host is ${layers.${name}.host}: llama-server has no authentication, so anyone who reaches that address can use the ${name} layer; keep it on loopback unless a firewall or VPN guards it."
        ) (lib.filter (name: !(isLoopback layers.${name}.host)) enabledLayers)
        ++ lib.optional (!(isLoopback cfg.api.host) && cfg.api.apiKeysFile == null && cfg.api.environmentFile == null) "services.ai-sysadmin.api.host is ${cfg.api.host} but no api.apiKeysFile is set; the API will refuse every non-loopback client until keys are configured.";

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
          inherit (cfg.api) host port;
        };
        # Empty: SQLite in state_dir. A remote URL may also come from AI_SYSADMIN_STORE__URL.
        store = lib.optionalAttrs (cfg.database.type == "postgresql" && (localPostgres || cfg.database.url != null)) {
          url = if localPostgres then "postgresql:///${dbName}?host=/run/postgresql" else cfg.database.url;
        };
        memory = {
          enabled = cfg.memory.enable;
        }
        // lib.optionalAttrs chromaService {
          chroma_url = "http://${clientHost config.services.chromadb.host}:${toString config.services.chromadb.port}";
        };
        actions = {
          autonomy = cfg.autonomyLevel;
          allow_auto_full = cfg.allowAutoFull;
          # The rollback unit is nixos_rollback's own: starting it by name (start_unit) would
          # be a rollback without the high-risk approval, so it is protected whatever the list.
          protected_units = lib.unique (cfg.protectedUnits ++ [ rollbackUnit ]);
        }
        // lib.optionalAttrs (cfg.actionAllowlist != null) { allowlist = cfg.actionAllowlist; }
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
        collectors.gateway_url = lib.mkDefault "http://${apiClientHost}:${toString cfg.api.port}";
      };

      environment.etc."ai-sysadmin/config.toml".source = configFile;
      # `ai-sysadmin incidents`, `approve` … for admins, reading the same configuration.
      environment.systemPackages = [ cfg.package ];

      users.users.${user} = {
        isSystemUser = true;
        inherit group;
        home = stateDir;
        description = "ai-sysadmin gateway and daemon";
      };
      users.groups.${group} = { };

      networking.firewall.allowedTCPPorts = lib.optional cfg.api.openFirewall cfg.api.port;

      systemd.services = lib.mkMerge [
        (lib.listToAttrs (
          map (name: lib.nameValuePair "llama-${name}" (layerService name)) enabledLayers
        ))
        {
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
            serviceConfig = appHardening // {
              Type = "exec";
              ExecStart = cli [ "gateway" ];
              LoadCredential = credentials;
              ProtectHome = true;
              # The sysadmin's live context and read-only actions (memory, load, ps) read
              # /proc like the daemon does.
              ProcSubset = "all";
            };
          };

          ai-sysadmin-daemon = {
            description = "ai-sysadmin daemon (collectors, review, meta, actions)";
            wantedBy = [ "multi-user.target" ];
            wants = [ "ai-sysadmin-api.service" ] ++ lib.optional cfg.helper.enable "ai-sysadmin-helper.service";
            after = [
              "network.target"
              "ai-sysadmin-api.service"
            ]
            ++ lib.optional cfg.helper.enable "ai-sysadmin-helper.service"
            ++ databaseUnits;
            requires = lib.optional localPostgres "postgresql.service";
            restartTriggers = [ configFile ];
            # journalctl and systemctl for the collectors.
            path = [ config.systemd.package ];
            environment = commonEnvironment // credentialEnvironment;
            serviceConfig = appHardening // {
              Type = "exec";
              ExecStart = cli [ "daemon" ];
              LoadCredential = credentials;
              # Journal read access, and nothing more.
              SupplementaryGroups = [ "systemd-journal" ];
              # Disk metrics statfs /home; read-only keeps it a measurement.
              ProtectHome = "read-only";
              # CPU, memory and load metrics read /proc/stat, /proc/meminfo, /proc/loadavg.
              ProcSubset = "all";
            };
          };
        }
        (mkIf cfg.helper.enable {
          ai-sysadmin-helper = {
            description = "ai-sysadmin privileged helper (catalog actions only)";
            wantedBy = [ "multi-user.target" ];
            before = [ "ai-sysadmin-daemon.service" ];
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
            serviceConfig = {
              Type = "exec";
              ExecStart = cli [
                "helper"
                "--socket"
                helperSocket
              ];
              # Root for systemctl restart / journalctl --vacuum / nix-collect-garbage; the
              # limit is the catalog, this socket, and the sandbox below, the same whatever
              # the allowlist (nixos_rollback runs in ai-sysadmin-rollback.service).
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
            }
            // rootSandbox
            // {
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
            serviceConfig = rootSandbox // {
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
              # Root owns the profile directory, and systemd and nix-daemon judge a caller by
              # its uid, so no capability is needed.
              inherit (noCapabilities) CapabilityBoundingSet AmbientCapabilities;
              # The generation links and the profile's lock; the store is nix-daemon's.
              ReadWritePaths = [ "/nix/var/nix/profiles" ];
            };
          };
        })
        (mkIf localPostgres {
          # CREATE EXTENSION needs a superuser; the app's own role stays unprivileged.
          ai-sysadmin-postgresql-setup = {
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
            serviceConfig = {
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

              # psql talks to the server on /run/postgresql and nothing else.
              inherit (noCapabilities) CapabilityBoundingSet AmbientCapabilities;
              NoNewPrivileges = true;
              RestrictAddressFamilies = [ "AF_UNIX" ];
              PrivateNetwork = true;
              ProtectSystem = "strict";
              ProtectHome = true;
              PrivateTmp = true;
              PrivateMounts = true;
              PrivateDevices = true;
              DevicePolicy = "closed";
              PrivateUsers = true;
              ProtectClock = true;
              ProtectControlGroups = true;
              ProtectKernelLogs = true;
              ProtectKernelModules = true;
              ProtectKernelTunables = true;
              ProtectHostname = true;
              ProtectProc = "invisible";
              ProcSubset = "pid";
              MemoryDenyWriteExecute = true;
              LockPersonality = true;
              # Not RemoveIPC: it would remove the running server's IPC objects, which belong
              # to the same postgres user, when this unit stops.
              RemoveIPC = false;
              RestrictNamespaces = true;
              RestrictRealtime = true;
              RestrictSUIDSGID = true;
              SystemCallArchitectures = "native";
              SystemCallFilter = [
                "@system-service"
                "~@privileged @resources"
              ];
              SystemCallErrorNumber = "EPERM";
              UMask = "0077";
            };
          };
        })
      ];
    }

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
    })

    (mkIf chromaService {
      services.chromadb.enable = true;
    })

    (mkIf (cfg.notifications.channels != [ ] || cfg.notifications.dashboardUrl != null) (
      let
        channels = cfg.notifications.channels;
        names = map (c: c.name) channels;
      in
      {
        assertions = [
          {
            assertion = lib.length names == lib.length (lib.unique names);
            message = "services.ai-sysadmin.notifications.channels: names must be unique (${lib.concatStringsSep ", " names}).";
          }
        ];
        services.ai-sysadmin.settings.notify = {
          channels = map (
            c:
            {
              inherit (c) name;
              url_file = notifyCredential c.name;
            }
            // lib.optionalAttrs (c.kinds != null) { inherit (c) kinds; }
            // lib.optionalAttrs (c.minSeverity != null) { min_severity = c.minSeverity; }
            // lib.optionalAttrs (c.maxPerHour != null) { max_per_hour = c.maxPerHour; }
            // lib.optionalAttrs (c.quietHours != null) { quiet_hours = c.quietHours; }
            // lib.optionalAttrs (c.quietAction != null) { quiet_action = c.quietAction; }
          ) channels;
        }
        // lib.optionalAttrs (cfg.notifications.dashboardUrl != null) {
          dashboard_url = cfg.notifications.dashboardUrl;
        };
        # Only the gateway delivers notifications: only its unit gets the URLs.
        systemd.services.ai-sysadmin-api.serviceConfig.LoadCredential = map (
          c: "notify-${c.name}:${c.urlFile}"
        ) channels;
      }
    ))

    (mkIf cfg.alertmanager.enable (mkMerge [
      {
        assertions = [
          {
            assertion = cfg.alertmanager.keyFile != null || cfg.api.apiKeysFile == null;
            message = "services.ai-sysadmin.alertmanager.enable: the API has keys (api.apiKeysFile), so Alertmanager needs one too; set services.ai-sysadmin.alertmanager.keyFile.";
          }
        ];
        services.prometheus.alertmanager.configuration = lib.mkDefault {
          route = {
            receiver = alertmanagerReceiver.name;
            group_by = [
              "alertname"
              "instance"
            ];
            group_wait = "30s";
            group_interval = "5m";
            repeat_interval = "4h";
          };
          receivers = [ alertmanagerReceiver ];
        };
      }
      (mkIf (cfg.alertmanager.keyFile != null) {
        systemd.services.ai-sysadmin-api = {
          environment.AI_SYSADMIN_ALERTMANAGER__API_KEYS_FILE = "%d/alertmanager-key";
          serviceConfig.LoadCredential = [ "alertmanager-key:${cfg.alertmanager.keyFile}" ];
        };
      })
      (mkIf (cfg.alertmanager.keyFile != null && config.services.prometheus.alertmanager.enable) {
        systemd.services.alertmanager.serviceConfig.LoadCredential = [
          "ai-sysadmin-key:${cfg.alertmanager.keyFile}"
        ];
      })
    ]))
  ]);
}
