# The options of services.ai-sysadmin: module.nix sets `options.services.ai-sysadmin` to
# this set. A function of the shared set (nix/common.nix and module.nix's Python mirrors).
# Where the gateway's TOML has a word for a thing, the option uses it (`gateway.port`,
# `layers.<name>.contextSize` for `layers.<name>.context_size`, `actions.autonomy`,
# `notify.channels`); nix/renamed.nix keeps the names of earlier releases working.
{
  lib,
  pkgs,
  config,
  cfg,
  layerNames,
  layerDefaults,
  defaultProtectedUnits,
  catalogActions,
  notifyKinds,
  settingsFormat,
  configFile,
  configPath,
  helperSocket,
  group,
  rollbackUnit,
  alertmanagerReceiver,
  ...
}:

let
  inherit (lib)
    mkOption
    mkEnableOption
    types
    literalExpression
    ;

  # Absolute paths outside the store only: a literal Nix path (./secret) would be copied
  # into the world-readable store, so it is refused rather than silently published.
  secretPath = types.addCheck types.str (
    s: lib.hasPrefix "/" s && !(lib.hasPrefix "${builtins.storeDir}/" s)
  ) // {
    description = "absolute path outside the Nix store (a string, not a Nix path literal)";
  };

  # llama-cpp.package's default: nixpkgs' build for the chosen acceleration.
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

  # What a model package says about itself (the flake's default-model: its chat template).
  modelAttr =
    name: attr:
    let
      m = cfg.layers.${name}.model;
    in
    if builtins.isAttrs m then m.${attr} or null else null;

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

  # pkgs.formats.toml's value type: nested definitions merge key by key, and a conflicting
  # value (say a different layer port) is an error instead of a silent override.
  tomlValue = settingsFormat.type;
in
{
  enable = mkEnableOption "ai-sysadmin, an AI system administrator built from local llama.cpp models";

  package = mkOption {
    type = types.package;
    default = pkgs.ai-sysadmin or (pkgs.callPackage ./package.nix { });
    defaultText = literalExpression "pkgs.ai-sysadmin or (pkgs.callPackage ./nix/package.nix { })";
    description = "The ai-sysadmin package (gateway, daemon, helper and CLI).";
  };

  # What the sysadmin may do: the TOML's `[actions]` (docs/configuration.md), in its words.
  actions = {
    autonomy = mkOption {
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
        Explicit opt-in required for `autonomy = "auto-full"`: medium-risk actions
        (restarting units, garbage collection) then run without a human.
      '';
    };

    protectedUnits = mkOption {
      # A unit name, a template (`worker@`, `worker@.service`) or a name without its type
      # suffix, which means `.service` (as systemctl reads it) — never a glob.
      type = types.listOf (types.strMatching "[A-Za-z0-9_:][A-Za-z0-9_:.-]*(@[A-Za-z0-9_:.-]*)?");
      default = defaultProtectedUnits;
      example = literalExpression ''options.services.ai-sysadmin.actions.protectedUnits.default ++ [ "postgresql.service" ]'';
      description = ''
        Units no action ever changes, also matched through the aliases systemd reports. A
        name without a type suffix means `.service` (`"postgresql"` protects
        `postgresql.service`, as systemctl reads it); a template (`"worker@"` or
        `"worker@.service"`) protects all its instances; globs are refused. The default
        guards remote access, the journal, networking and ai-sysadmin itself; replacing the
        list drops those, so extend the default instead.
      '';
    };

    allowlist = mkOption {
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
  };

  llama-cpp = {
    enable = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Run the three layers' llama-servers on this machine. When false, point the gateway at
        existing servers with `layers.<name>.host`/`port` or with `settings.layers.<name>.endpoints`.
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
        device nodes the layer units may open and the default `layers.<name>.gpuLayers`. `cuda` needs
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
  };

  # The layers, as the TOML's `[layers.<name>]`: the same keys, in camelCase.
  layers = lib.genAttrs layerNames (
    name:
    mkOption {
      type = types.submodule (layerModule name);
      default = { };
      description = "The ${name} layer's llama-server (the TOML's `layers.${name}`).";
    }
  );

  # The gateway, as the TOML's `[gateway]` (and the secrets it reads).
  gateway = {
    host = mkOption {
      type = types.str;
      default = "127.0.0.1";
      example = "0.0.0.0";
      description = "Address the gateway's OpenAI-compatible API binds to.";
    };
    port = mkOption {
      type = types.port;
      default = 8083;
      description = "Port of the OpenAI-compatible API.";
    };
    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = "Open `gateway.port` in the firewall (needs a non-loopback `gateway.host`).";
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
        `gateway.environmentFile`.
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
        `gateway.environmentFile` as `AI_SYSADMIN_STORE__URL`, since this value lands in the store).
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
        (`gateway.apiKeysFile`); without any key the API serves loopback clients only, and a local
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

  # Notification channels, as the TOML's `[notify]`.
  notify = {
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

  # One server for many hosts (docs/fleet.md), as the TOML's `[fleet]`.
  fleet = {
    role = mkOption {
      type = types.enum [
        "both"
        "server"
        "agent"
      ];
      default = "both";
      description = ''
        What this machine is in a fleet (docs/fleet.md). `both`: the whole system on one
        machine. `server`: the same units (layers, gateway, daemon, helper), for many hosts:
        actions for another host wait for that host's agent. `agent`: no layers, gateway
        or database; the daemon watches this host and posts its events to
        `fleet.gatewayUrl`, and `ai-sysadmin-agent.service` runs the actions the server
        approved for this host (through the root helper), both with `fleet.keyFile`.
      '';
    };
    host = mkOption {
      type = types.nullOr (types.strMatching "[^[:space:]]{1,255}");
      default = null;
      example = "web1";
      description = ''
        This machine's name in events and actions, the name its host key was made for
        (`ai-sysadmin hosts add NAME` on the server). null: `networking.hostName` (rendered
        for a server and an agent; `both` leaves it to the system's host name at run time).
      '';
    };
    gatewayUrl = mkOption {
      type = types.nullOr (types.strMatching "https?://[^[:space:]]+");
      default = null;
      example = "https://ai.example.org:8083";
      description = "Agent: the server's gateway, where events go and actions come from (required).";
    };
    keyFile = mkOption {
      type = types.nullOr secretPath;
      default = null;
      example = "/run/secrets/ai-sysadmin-host-key";
      description = ''
        Agent: file holding this host's key (`ai-sysadmin hosts add NAME` on the server
        prints it; required). Read by systemd (LoadCredential) for the agent and the
        daemon; it never enters the Nix store.
      '';
    };
  };

  helper.enable = mkOption {
    type = types.bool;
    default = cfg.actions.autonomy != "observe";
    defaultText = literalExpression ''actions.autonomy != "observe"'';
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
      `${configPath}`. The module fills in the layers, the gateway's address, state
      directory, store, memory, actions and notification channels from the typed options
      above, which carry the same names (`layers.<name>.contextSize` renders
      `layers.<name>.context_size`, `gateway.port` renders `gateway.port`); setting one of
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
}
