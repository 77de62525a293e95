# What goes out and what comes in: notification channels (docs/notifications.md), whose
# apprise URLs reach the gateway as credentials, and Prometheus Alertmanager's webhook
# (docs/alertmanager.md). Both are the gateway's, so a fleet agent has neither (nix/assertions.nix
# warns when they are set there). A part of module.nix (nix/common.nix).
{
  lib,
  config,
  cfg,
  alertmanagerReceiver,
  isAgent,
  ...
}:

let
  inherit (lib) mkIf mkMerge;

  # Where systemd puts a notification channel's URL for the gateway (LoadCredential).
  notifyCredential = name: "/run/credentials/ai-sysadmin-api.service/notify-${name}";
in
mkMerge [
  (mkIf (!isAgent && (cfg.notify.channels != [ ] || cfg.notify.dashboardUrl != null)) (
    let
      channels = cfg.notify.channels;
      names = map (c: c.name) channels;
    in
    {
      assertions = [
        {
          assertion = lib.length names == lib.length (lib.unique names);
          message = "services.ai-sysadmin.notify.channels: names must be unique (${lib.concatStringsSep ", " names}).";
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
      // lib.optionalAttrs (cfg.notify.dashboardUrl != null) {
        dashboard_url = cfg.notify.dashboardUrl;
      };
      # Only the gateway delivers notifications: only its unit gets the URLs.
      systemd.services.ai-sysadmin-api.serviceConfig.LoadCredential = map (
        c: "notify-${c.name}:${c.urlFile}"
      ) channels;
    }
  ))

  (mkIf (!isAgent && cfg.alertmanager.enable) (mkMerge [
    {
      assertions = [
        {
          assertion = cfg.alertmanager.keyFile != null || cfg.gateway.apiKeysFile == null;
          message = "services.ai-sysadmin.alertmanager.enable: the gateway has keys (gateway.apiKeysFile), so Alertmanager needs one too; set services.ai-sysadmin.alertmanager.keyFile.";
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
]
