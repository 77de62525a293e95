# NixOS module: `services.ai-sysadmin.enable = true;` runs the whole system.
#
#   llama-trigger / llama-review / llama-meta   llama-server, one per layer (DynamicUser)
#   ai-sysadmin-api                             the gateway, OpenAI-compatible API on 8083
#   ai-sysadmin-daemon                          collectors + review/meta/action consumer
#   ai-sysadmin-helper                          root helper that only runs catalog actions
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
      CapabilityBoundingSet = "";
      AmbientCapabilities = "";
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
      ProcSubset = "pid";
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

    CapabilityBoundingSet = "";
    AmbientCapabilities = "";
    NoNewPrivileges = true;
    RestrictAddressFamilies = [
      "AF_INET"
      "AF_INET6"
      "AF_UNIX"
    ];
    ProtectSystem = "strict";
    PrivateTmp = true;
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

  # Without nixos_rollback the helper's catalog only restarts units, vacuums the journal and
  # collects garbage, so the filesystem can stay read-only apart from those paths.
  helperMayRebuild =
    cfg.actionAllowlist == null || lib.elem "nixos_rollback" cfg.actionAllowlist;

  actionPath = lib.makeBinPath [
    config.systemd.package
    pkgs.coreutils
    pkgs.procps
    (config.nix.package or pkgs.nix)
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
    "llama-trigger.service"
    "llama-review.service"
    "llama-meta.service"
  ];

  # pkgs.formats.toml's value type: nested definitions merge key by key, and a conflicting
  # value (say a different layer port) is an error instead of a silent override.
  tomlValue = settingsFormat.type;
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
      type = types.listOf types.str;
      default = defaultProtectedUnits;
      example = literalExpression ''options.services.ai-sysadmin.protectedUnits.default ++ [ "postgresql.service" ]'';
      description = ''
        Units no action ever touches, matched exactly (`name.service`). The default guards
        remote access, the journal, networking and ai-sysadmin itself; replacing the list
        drops those, so extend the default instead.
      '';
    };

    actionAllowlist = mkOption {
      type = types.nullOr (types.listOf types.str);
      default = null;
      example = [
        "unit_status"
        "journal_tail"
        "restart_unit"
        "reset_failed_unit"
      ];
      description = ''
        Catalog actions that may ever run; null: the whole catalog. Leaving out
        `nixos_rollback` also lets the helper run with a read-only root filesystem.
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
        default = "cpu";
        description = ''
          Inference backend. Chooses the matching llama-cpp build (unless `package` is set), the
          device nodes the layer units may open and the default `gpuLayers`. `cuda` needs
          `nixpkgs.config.allowUnfree` and the NVIDIA driver (`hardware.nvidia`); `rocm` and
          `vulkan` need the GPU's kernel driver.
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
          protected_units = cfg.protectedUnits;
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
              (config.nix.package or pkgs.nix)
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
              # limit is the catalog, this socket, and the sandbox below.
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

              NoNewPrivileges = true;
              # systemd and nix-daemon are reached over unix sockets only.
              RestrictAddressFamilies = [
                "AF_UNIX"
                "AF_NETLINK"
              ];
              PrivateNetwork = !helperMayRebuild;
              ProtectHome = true;
              PrivateTmp = true;
              PrivateDevices = !helperMayRebuild;
              ProtectKernelLogs = true;
              ProtectClock = true;
              ProtectHostname = !helperMayRebuild;
              LockPersonality = true;
              RestrictRealtime = true;
              RestrictSUIDSGID = !helperMayRebuild;
              SystemCallArchitectures = "native";
            }
            // lib.optionalAttrs (!helperMayRebuild) {
              ProtectSystem = "strict";
              ReadWritePaths = [
                "/var/log/journal"
                "/nix/var/nix"
              ];
              ProtectKernelModules = true;
              ProtectKernelTunables = true;
              ProtectControlGroups = true;
              MemoryDenyWriteExecute = true;
              SystemCallFilter = [ "@system-service" ];
              # Journal files are root:systemd-journal (vacuum), terminate_process signals
              # other users' processes; units and the store are reached over sockets.
              CapabilityBoundingSet = [
                "CAP_DAC_OVERRIDE"
                "CAP_FOWNER"
                "CAP_KILL"
              ];
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
  ]);
}
