# The few packages module.nix reads, as derivation-shaped attribute sets with fixed store
# paths: evaluation needs their paths, never their builds. `override` records the flags
# in the name, so a test can see which llama-cpp build an acceleration picked, and in
# `cmakeFlags` the way nixpkgs' llama-cpp renders them (`cmakeBool "GGML_CUDA" cudaSupport`).
{ lib }:

let
  cmakeNames = {
    cudaSupport = "GGML_CUDA";
    rocmSupport = "GGML_HIP";
    vulkanSupport = "GGML_VULKAN";
  };
  fakeWith =
    extra: name:
    {
      type = "derivation";
      inherit name;
      outPath = "${builtins.storeDir}/${builtins.substring 0 32 (builtins.hashString "sha256" name)}-${name}";
      meta.mainProgram = name;
      override =
        args:
        fakeWith
          {
            cmakeFlags = lib.mapAttrsToList (
              flag: on: "-D${cmakeNames.${flag}}:BOOL=${if on then "TRUE" else "FALSE"}"
            ) (lib.filterAttrs (flag: _: cmakeNames ? ${flag}) args);
          }
          (
            lib.concatStringsSep "-" (
              [ name ] ++ lib.sort lib.lessThan (lib.attrNames (lib.filterAttrs (_: v: v == true) args))
            )
          );
    }
    // extra;
  fake = fakeWith { };

  # What pkgs.formats.toml accepts; rendering is a build, so `generate` returns a file-shaped
  # value that carries the data for inspection.
  tomlValue =
    types:
    let
      valueType =
        types.oneOf [
          types.bool
          types.int
          types.float
          types.str
          types.path
          (types.attrsOf valueType)
          (types.listOf valueType)
        ]
        // {
          description = "TOML value";
        };
    in
    valueType;
in
{
  llama-cpp = fake "llama-cpp";
  ai-sysadmin = fake "ai-sysadmin";
  systemd = fake "systemd";
  nix = fake "nix";
  coreutils = fake "coreutils";
  procps = fake "procps";
  postgresql = fake "postgresql";
  fetchurl =
    { url, hash, ... }:
    fake "fetched-${baseNameOf url}";
  formats.toml =
    { }:
    {
      type = tomlValue lib.types;
      generate =
        name: value:
        fake name
        // {
          renderedValue = value;
        };
    };
}
