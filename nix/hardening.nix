# The sandbox every unit of module.nix starts from, written once. Each unit takes `sandbox`,
# the address families it needs (`network` or `noNetwork`), `noCapabilities` unless it
# names capabilities of its own, and then states only what it does differently (`//`).
# `systemd-analyze security` scores are in docs/security.md and checked by
# tests/test_unit_security.py.
{ lib }:

{
  # No capabilities. `CapabilityBoundingSet=` (empty) resets the set, so it goes first
  # (mkBefore), and as a list: a definition of your own, e.g. systemd.services
  # .ai-sysadmin-api.serviceConfig.CapabilityBoundingSet = [ "CAP_NET_BIND_SERVICE" ] (or
  # the string), then adds to it, instead of conflicting with a string "" or landing
  # before the empty assignment, which would reset it.
  noCapabilities = {
    CapabilityBoundingSet = lib.mkBefore [ "" ];
    AmbientCapabilities = lib.mkBefore [ "" ];
  };

  # What every unit has: the file system read-only (apart from each unit's own state,
  # cache and ReadWritePaths), /home hidden, no devices, no kernel tunables, modules, logs
  # or clock, no namespaces, no SUID files, no writable+executable memory, the usual
  # system calls only.
  sandbox = {
    NoNewPrivileges = true;
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
    MemoryDenyWriteExecute = true;
    LockPersonality = true;
    RestrictNamespaces = true;
    RestrictRealtime = true;
    RestrictSUIDSGID = true;
    SystemCallArchitectures = "native";
    # Not ~@resources (psql's unit adds it): the helper's nix raises its stack limit and
    # journalctl its open-file limit.
    SystemCallFilter = [
      "@system-service"
      "~@privileged"
    ];
    SystemCallErrorNumber = "EPERM";
  };

  # The layers, the gateway and the daemon talk HTTP.
  network = {
    RestrictAddressFamilies = [
      "AF_INET"
      "AF_INET6"
      "AF_UNIX"
    ];
  };

  # The root units and psql reach systemd, journald, nix-daemon and PostgreSQL over unix
  # sockets, which PrivateNetwork leaves alone, and nothing else.
  noNetwork = {
    RestrictAddressFamilies = [ "AF_UNIX" ];
    PrivateNetwork = true;
  };
}
