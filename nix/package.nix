# ai-sysadmin, the Python application (gateway, daemon, helper, CLI), from nixpkgs' Python
# packages. llama-server is not a dependency: on NixOS the layers are their own units.
{
  lib,
  python3Packages,
}:

let
  pyproject = lib.importTOML ../pyproject.toml;
  dependencies =
    with python3Packages;
    [
      fastapi
      uvicorn
      sse-starlette
      httpx
      pydantic
      pydantic-settings
      prometheus-client
      psutil
      apprise
      # The `postgres` and `memory` extras: PostgreSQL store and ChromaDB memory.
      psycopg
      chromadb
    ]
    ++ uvicorn.optional-dependencies.standard;
in
python3Packages.buildPythonApplication {
  pname = "ai-sysadmin";
  inherit (pyproject.project) version;
  pyproject = true;

  # Only what the wheel is built from, so editing tests or docs does not rebuild it.
  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ../pyproject.toml
      ../README.md
      ../gateway
      ../layers
    ];
  };

  build-system = [ python3Packages.setuptools ];

  inherit dependencies;

  pythonImportsCheck = [
    "gateway.cli"
    "gateway.app"
    "layers.config"
  ];

  # The suite needs real llama-server processes on a model; the NixOS VM test
  # (nix/vm-test.nix) runs the packaged application instead.
  doCheck = false;

  # For the flake's devShell, which adds the test tools to the same interpreter.
  passthru.pythonDependencies = dependencies;

  meta = {
    description = "An AI system administrator for NixOS built from local llama.cpp models";
    license = lib.licenses.mit;
    mainProgram = "ai-sysadmin";
    platforms = lib.platforms.linux;
  };
}
