# NixOS VM test (`nix flake check`, or `nix build .#checks.x86_64-linux.vm-test`):
# the module on a fresh machine with the small default model in every layer. Waits for
# all units, talks to the API on 8083 like a client would, and checks that the units run
# with the sandbox the module promises.
{ self }:

{
  name = "ai-sysadmin";

  nodes.machine =
    { pkgs, ... }:
    {
      imports = [ self.nixosModules.default ];

      virtualisation.memorySize = 4096;
      virtualisation.cores = 2;

      # A test secret; on a real machine this file comes from sops-nix, agenix or by hand.
      environment.etc."ai-sysadmin-test/api-keys".text = "test-key\n";
      environment.etc."ai-sysadmin-test/admin-key".text = "admin-key\n";

      services.ai-sysadmin = {
        enable = true;
        layers =
          let
            small = {
              model = pkgs.ai-sysadmin-default-model;
              contextSize = 2048;
              parallel = 1;
            };
          in
          {
            trigger = small;
            review = small;
            meta = small;
          };
        gateway.apiKeysFile = "/etc/ai-sysadmin-test/api-keys";
        gateway.adminKeyFile = "/etc/ai-sysadmin-test/admin-key";
        actions.allowlist = [
          "unit_status"
          "journal_tail"
          "restart_unit"
        ];
      };

      environment.systemPackages = [ pkgs.jq ];
    };

  testScript = ''
    import json

    units = [
        "llama-trigger.service",
        "llama-review.service",
        "llama-meta.service",
        "ai-sysadmin-api.service",
        "ai-sysadmin-daemon.service",
        "ai-sysadmin-helper.service",
    ]

    machine.start()
    for unit in units:
        machine.wait_for_unit(unit)
    for port in (8080, 8081, 8082):
        machine.wait_until_succeeds(f"curl -sf http://127.0.0.1:{port}/health", timeout=300)
    machine.wait_for_open_port(8083)

    auth = "-H 'Authorization: Bearer test-key'"

    with subtest("the API refuses requests without a key"):
        code = machine.succeed(
            "curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:8083/v1/models"
        )
        assert code.strip() == "401", f"expected 401 without a key, got {code}"

    with subtest("/v1/models lists the sysadmin and the layers"):
        models = json.loads(machine.succeed(f"curl -sf {auth} http://127.0.0.1:8083/v1/models"))
        ids = {m["id"] for m in models["data"]}
        assert {"ai-sysadmin", "trigger", "review", "meta"} <= ids, ids

    with subtest("a chat completion through the gateway"):
        body = json.dumps({
            "model": "trigger",
            "messages": [{"role": "user", "content": "Say OK."}],
            "max_tokens": 8,
        })
        machine.succeed(f"echo '{body}' > /tmp/chat.json")
        reply = json.loads(machine.succeed(
            f"curl -sf {auth} -H 'Content-Type: application/json' "
            "--data @/tmp/chat.json http://127.0.0.1:8083/v1/chat/completions"
        ))
        assert reply["object"] == "chat.completion", reply
        assert reply["choices"][0]["message"]["role"] == "assistant", reply

    def prop(unit, name):
        return machine.succeed(f"systemctl show -p {name} --value {unit}").strip()

    with subtest("layers run sandboxed as dynamic users"):
        for layer in ("trigger", "review", "meta"):
            unit = f"llama-{layer}.service"
            assert prop(unit, "DynamicUser") == "yes", unit
            assert prop(unit, "ProtectSystem") == "strict", unit
            assert prop(unit, "NoNewPrivileges") == "yes", unit
            assert prop(unit, "PrivateDevices") == "yes", unit
            assert prop(unit, "CapabilityBoundingSet") == "", unit
            assert "AF_PACKET" not in prop(unit, "RestrictAddressFamilies"), unit
            assert prop(unit, "SystemCallFilter") != "", unit
        argv = machine.succeed("cat /proc/$(systemctl show -p MainPID --value llama-meta.service)/cmdline | tr '\\0' ' '")
        assert "--port 8082" in argv and "--embeddings" in argv, argv

    with subtest("gateway and daemon: own user, no capabilities, journal for the daemon only"):
        for unit in ("ai-sysadmin-api.service", "ai-sysadmin-daemon.service"):
            assert prop(unit, "User") == "ai-sysadmin", unit
            assert prop(unit, "ProtectSystem") == "strict", unit
            assert prop(unit, "CapabilityBoundingSet") == "", unit
        assert prop("ai-sysadmin-daemon.service", "SupplementaryGroups") == "systemd-journal"
        assert prop("ai-sysadmin-api.service", "SupplementaryGroups") == ""
        # The keys reach the gateway as credentials, not through the store.
        creds = prop("ai-sysadmin-api.service", "LoadCredential")
        assert "api-keys" in creds and "admin-key" in creds, creds

    with subtest("the helper's socket is reachable by the ai-sysadmin group only"):
        machine.wait_for_file("/run/ai-sysadmin/helper.sock")
        owner = machine.succeed("stat -c '%U:%G %a' /run/ai-sysadmin").strip()
        assert owner == "root:ai-sysadmin 750", owner
        machine.fail("sudo -u nobody test -r /run/ai-sysadmin/helper.sock")
        assert prop("ai-sysadmin-helper.service", "ProtectSystem") == "strict"

    with subtest("state lives in /var/lib/ai-sysadmin"):
        machine.succeed("test -d /var/lib/ai-sysadmin")
        owner = machine.succeed("stat -c '%U' /var/lib/ai-sysadmin").strip()
        assert owner == "ai-sysadmin", owner
  '';
}
