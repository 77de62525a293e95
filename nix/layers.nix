# The layers' llama-servers, `llama-<layer>.service` for each enabled layer: the same argv
# as layers/supervisor.py builds for a managed layer, under a DynamicUser with the devices
# of the chosen acceleration and nothing else. A part of module.nix (nix/common.nix).
{
  lib,
  cfg,
  layers,
  enabledLayers,
  accel,
  onGpu,
  exe,
  execCommand,
  hardening,
  ...
}:

let
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

  layerService = name: {
    description = "ai-sysadmin ${name} layer (llama-server)";
    wantedBy = [ "multi-user.target" ];
    after = [ "network.target" ];
    serviceConfig =
      hardening.sandbox
      // hardening.network
      // hardening.noCapabilities
      // {
        Type = "exec";
        ExecStart = execCommand (layerArgv name);
        # llama-server finishes in-flight slots on SIGINT.
        KillSignal = "SIGINT";
        Restart = "on-failure";
        RestartSec = 5;

        DynamicUser = true;
        # Group-owned GPU nodes need the real supplementary groups, which a user namespace hides.
        PrivateUsers = !onGpu;
        PrivateDevices = !onGpu;
        DeviceAllow = deviceAccess.${accel}.allow;
        SupplementaryGroups = deviceAccess.${accel}.groups;
        ProtectProc = "invisible";
        # GPU runtimes read /proc/driver/nvidia, /proc/meminfo and the like, not only
        # /proc/<pid> (nixpkgs' ollama uses "all" too); CPU inference needs its own process only.
        ProcSubset = if onGpu then "all" else "pid";
        # GPU runtimes JIT-compile kernels into writable+executable memory.
        MemoryDenyWriteExecute = !onGpu;
        RemoveIPC = true;
        UMask = "0077";
      };
  };
in
{
  systemd.services = lib.listToAttrs (
    map (name: lib.nameValuePair "llama-${name}" (layerService name)) enabledLayers
  );
}
