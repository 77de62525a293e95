# Loose stand-ins for the NixOS options module.nix writes to, so that the module can be
# evaluated with nothing but nixpkgs' `lib` (lib.evalModules). They declare just enough
# type to merge definitions the way NixOS does: lists concatenate, attribute sets merge,
# conflicting scalars are errors. They are not NixOS: the flake's checks evaluate the
# module against the real thing.
{ lib, pkgs }:

let
  inherit (lib) mkOption types;

  atom = types.oneOf [
    types.bool
    types.int
    types.str
    types.path
    types.package
  ];
  # NixOS' unitOption (nixos/lib/systemd-unit-options.nix): a value or a list of values;
  # when any definition is a list, all of them concatenate (in mkOrder order), else they
  # must be equal.
  unitValue = lib.mkOptionType {
    name = "systemd option";
    check = v: atom.check v || (builtins.isList v && lib.all atom.check v);
    merge =
      loc: defs:
      let
        defs' = lib.filterOverrides defs;
      in
      if lib.any (def: builtins.isList def.value) defs' then
        lib.concatMap (def: lib.toList def.value) defs'
      else
        lib.mergeEqualOption loc defs';
  };

  serviceModule = {
    options = {
      description = mkOption {
        type = types.str;
        default = "";
      };
      wantedBy = mkOption {
        type = types.listOf types.str;
        default = [ ];
      };
      after = mkOption {
        type = types.listOf types.str;
        default = [ ];
      };
      before = mkOption {
        type = types.listOf types.str;
        default = [ ];
      };
      wants = mkOption {
        type = types.listOf types.str;
        default = [ ];
      };
      requires = mkOption {
        type = types.listOf types.str;
        default = [ ];
      };
      path = mkOption {
        type = types.listOf types.package;
        default = [ ];
      };
      restartTriggers = mkOption {
        type = types.listOf types.unspecified;
        default = [ ];
      };
      environment = mkOption {
        type = types.attrsOf types.str;
        default = { };
      };
      serviceConfig = mkOption {
        type = types.attrsOf unitValue;
        default = { };
      };
      restartIfChanged = mkOption {
        type = types.bool;
        default = true;
      };
    };
  };

  loose = types.attrsOf types.anything;
in
{
  options = {
    assertions = mkOption {
      type = types.listOf types.unspecified;
      default = [ ];
    };
    warnings = mkOption {
      type = types.listOf types.str;
      default = [ ];
    };

    systemd.package = mkOption {
      type = types.package;
      default = pkgs.systemd;
    };
    systemd.services = mkOption {
      type = types.attrsOf (types.submodule serviceModule);
      default = { };
    };

    users.users = mkOption {
      type = types.attrsOf loose;
      default = { };
    };
    users.groups = mkOption {
      type = types.attrsOf loose;
      default = { };
    };

    # NixOS' default is "nixos"; "" means the name comes from DHCP at run time.
    networking.hostName = mkOption {
      type = types.str;
      default = "nixos";
    };

    networking.firewall.allowedTCPPorts = mkOption {
      type = types.listOf types.port;
      default = [ ];
    };

    environment.etc = mkOption {
      type = types.attrsOf loose;
      default = { };
    };
    environment.systemPackages = mkOption {
      type = types.listOf types.package;
      default = [ ];
    };

    # The merged nixpkgs configuration (cudaSupport, rocmSupport, allowUnfree …).
    nixpkgs.config = mkOption {
      type = loose;
      default = { };
    };

    nix.package = mkOption {
      type = types.package;
      default = pkgs.nix;
    };

    services.postgresql = {
      enable = mkOption {
        type = types.bool;
        default = false;
      };
      package = mkOption {
        type = types.package;
        default = pkgs.postgresql;
      };
      ensureDatabases = mkOption {
        type = types.listOf types.str;
        default = [ ];
      };
      ensureUsers = mkOption {
        type = types.listOf loose;
        default = [ ];
      };
      extensions = mkOption {
        type = types.functionTo (types.listOf types.unspecified);
        default = _: [ ];
      };
      settings = mkOption {
        type = loose;
        default = { };
      };
    };

    services.open-webui = {
      enable = mkOption {
        type = types.bool;
        default = false;
      };
      port = mkOption {
        type = types.port;
        default = 8080;
      };
    };

    services.prometheus.alertmanager = {
      enable = mkOption {
        type = types.bool;
        default = false;
      };
      # NixOS declares it `nullOr attrs`: definitions replace each other, they do not merge.
      configuration = mkOption {
        type = types.nullOr types.attrs;
        default = null;
      };
    };

    services.chromadb = {
      enable = mkOption {
        type = types.bool;
        default = false;
      };
      host = mkOption {
        type = types.str;
        default = "127.0.0.1";
      };
      port = mkOption {
        type = types.port;
        default = 8000;
      };
    };
  };
}
