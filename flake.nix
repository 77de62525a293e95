{
  description = "ai-sysadmin: an AI system administrator for NixOS built from local llama.cpp models";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems =
        f:
        lib.genAttrs systems (
          system:
          f (
            import nixpkgs {
              inherit system;
              overlays = [ self.overlays.default ];
              # The default model is Gemma (its own terms of use); nothing else is unfree.
              config.allowUnfreePredicate = pkg: lib.hasPrefix "gemma-3-270m" (pkg.name or "");
            }
          )
        );

      # Evaluate a NixOS system with the module, for the evaluation checks.
      evalSystem =
        system: modules:
        lib.nixosSystem {
          modules = [
            self.nixosModules.default
            {
              nixpkgs.hostPlatform = system;
              nixpkgs.overlays = [ self.overlays.default ];
              boot.loader.grub.enable = false;
              fileSystems."/".device = "/dev/vda";
              system.stateVersion = "25.05";
            }
          ]
          ++ modules;
        };

      someModel = "/var/lib/models/tiny.gguf";
      allModels = {
        trigger.model = someModel;
        review.model = someModel;
        meta.model = someModel;
      };
    in
    {
      overlays.default = final: _prev: {
        ai-sysadmin = final.callPackage ./nix/package.nix { };
        ai-sysadmin-default-model = final.callPackage ./nix/default-model.nix { };
      };

      # Uses the system's pkgs: `pkgs.ai-sysadmin` when the overlay is applied, otherwise
      # the package is built from this checkout with the system's nixpkgs.
      nixosModules.default = ./module.nix;
      nixosModules.ai-sysadmin = self.nixosModules.default;

      packages = forAllSystems (pkgs: {
        default = pkgs.ai-sysadmin;
        ai-sysadmin = pkgs.ai-sysadmin;
        default-model = pkgs.ai-sysadmin-default-model;
      });

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          inputsFrom = [ pkgs.ai-sysadmin ];
          packages = [
            pkgs.llama-cpp
            pkgs.postgresql
            pkgs.nixfmt
            (pkgs.python3.withPackages (
              ps:
              pkgs.ai-sysadmin.pythonDependencies
              ++ [
                ps.pytest
                ps.pytest-asyncio
                ps.pytest-timeout
                ps.openai
                ps.mypy
              ]
            ))
            pkgs.ruff
          ];
          # Point the engine at nixpkgs' llama-server instead of building one.
          AI_SYSADMIN_ENGINE__LLAMA_SERVER = "${pkgs.llama-cpp}/bin/llama-server";
          AI_SYSADMIN_NIXPKGS_LIB = "${nixpkgs}/lib";
        };
      });

      checks = forAllSystems (
        pkgs:
        let
          inherit (pkgs.stdenv.hostPlatform) system;
          # Failing assertion messages of a configuration (what nixos-rebuild would print).
          failedAssertions =
            cfg:
            map (a: a.message) (
              lib.filter (a: !a.assertion) (evalSystem system [ cfg ]).config.assertions
            );
          good = (evalSystem system [
            {
              services.ai-sysadmin = {
                enable = true;
                layers = allModels;
              };
            }
          ]).config;
          # Unit texts as NixOS renders them; context dropped so that checking them builds
          # nothing (no llama-cpp, no Python).
          unitText = name: builtins.unsafeDiscardStringContext good.systemd.units.${name}.text;
          expectFailure =
            name: cfg: needle:
            let
              messages = failedAssertions cfg;
            in
            assert lib.assertMsg (lib.any (lib.hasInfix needle) messages)
              "${name}: expected an assertion mentioning '${needle}', got: ${builtins.toJSON messages}";
            name;
        in
        {
          package = pkgs.ai-sysadmin;
          vm-test = pkgs.testers.runNixOSTest (import ./nix/vm-test.nix { inherit self; });

          module-eval =
            assert lib.assertMsg (failedAssertions {
              services.ai-sysadmin = {
                enable = true;
                layers = allModels;
              };
            } == [ ]) "a complete configuration must pass every assertion";
            pkgs.runCommand "ai-sysadmin-module-eval"
              {
                units = lib.concatMapStringsSep "\n" unitText [
                  "llama-trigger.service"
                  "llama-review.service"
                  "llama-meta.service"
                  "ai-sysadmin-api.service"
                  "ai-sysadmin-daemon.service"
                  "ai-sysadmin-helper.service"
                ];
              }
              ''
                printf '%s\n' "$units" > units
                grep -q 'ExecStart=.*/bin/llama-server --model ${someModel} --alias trigger --host 127.0.0.1 --port 8080' units
                grep -q '^DynamicUser=true' units
                grep -q '^ProtectSystem=strict' units
                grep -q '^SupplementaryGroups=systemd-journal' units
                grep -q 'ExecStart=.*/bin/ai-sysadmin --config /etc/ai-sysadmin/config.toml gateway' units
                cp units "$out"
              '';

          module-assertions = pkgs.writeText "ai-sysadmin-module-assertions" (
            lib.concatStringsSep "\n" [
              (expectFailure "missing model" {
                services.ai-sysadmin = {
                  enable = true;
                  layers = allModels // {
                    review.model = null;
                  };
                };
              } "layers.review.model must be set")
              (expectFailure "same port twice" {
                services.ai-sysadmin = {
                  enable = true;
                  layers = lib.recursiveUpdate allModels { meta.port = 8083; };
                };
              } "are both 8083")
              (expectFailure "auto-full without opt-in" {
                services.ai-sysadmin = {
                  enable = true;
                  layers = allModels;
                  actions.autonomy = "auto-full";
                };
              } "allowAutoFull")
            ]
          );
        }
      );

      formatter = forAllSystems (pkgs: pkgs.nixfmt);
    };
}
