"""Message templates of the labelled line corpus, written from what these failures look
like in a NixOS journal (not copied from any dataset).

Each template is one message shape with its label: anomaly or not, the categories that
count as right (the first is the canonical one), the severity an admin would give it,
and the syslog priority and identifier the emitting program really uses — many real
errors arrive at priority 6 through a service's stdout, and some harmless noise at
priority 3, which is what the priority floor gets wrong.

``split``: ``scored`` templates are what the harness measures; ``reference`` templates
are the only ones a prompt, a few-shot example or a memory seed may use. No message
template is in both (tests/test_quality.py checks it, by id and by matching text).

Placeholders (``{name}``) are filled per line from ``corpus.FILLERS``; names in a
template's ``fixed`` stay the same for all its lines (one attacker, one host, one unit).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from layers.events import Severity

Split = Literal["scored", "reference"]
Transport = Literal["kernel", "journal", "stdout", "syslog"]

# What a line is about. Failure classes first (the list), then the non-faults.
FAILURE_CLASSES = (
    "oom", "disk_full", "crash_loop", "segfault", "io_error", "fs_error", "ssh_bruteforce",
    "nixos_activation", "timer_failed", "cert_expiry", "clock", "dns", "mount", "lockup",
)
NON_FAULT_CLASSES = ("benign", "decoy", "control")


@dataclass(frozen=True)
class Template:
    id: str
    klass: str
    text: str
    anomaly: bool
    categories: tuple[str, ...] = ()
    severity: Severity | None = None
    priority: int = 6
    ident: str = "systemd"
    # Unit the line is about (placeholders allowed): systemd's own messages carry it in
    # UNIT, a service's output in _SYSTEMD_UNIT (``ident != "systemd"``).
    unit: str | None = None
    transport: Transport = "journal"
    count: int = 4
    split: Split = "scored"
    # Lines of a burst come seconds apart on one host (brute force, crash loops).
    burst: bool = False
    fixed: tuple[str, ...] = field(default=())
    # Template-specific values for ``{svc}`` (unit names without their suffix).
    services: tuple[str, ...] = ()


def _a(id: str, klass: str, text: str, cats: tuple[str, ...], sev: Severity,
       **kw: object) -> Template:
    return Template(id, klass, text, True, cats, sev, **kw)  # type: ignore[arg-type]


def _n(id: str, klass: str, text: str, **kw: object) -> Template:
    return Template(id, klass, text, False, **kw)  # type: ignore[arg-type]


K = {"ident": "kernel", "transport": "kernel"}
APPS = ("myapp", "api-worker", "grafana", "paperless-consumer", "vaultwarden", "gitea")
JOBS = ("restic-backups-daily", "borgbackup-job-home", "pg-dump-nightly", "rsync-offsite")

TEMPLATES: tuple[Template, ...] = (
    # -- OOM kills ---------------------------------------------------------------------
    _a("oom.kernel_killed", "oom",
       "Out of memory: Killed process {pid} ({comm}) total-vm:{kb}kB, anon-rss:{kb2}kB, "
       "file-rss:0kB, shmem-rss:{kb3}kB, UID:{uid} pgtables:{kb4}kB oom_score_adj:0",
       ("memory",), "critical", priority=3, count=6, **K),
    _a("oom.invoked", "oom",
       "{comm} invoked oom-killer: gfp_mask=0x140cca(GFP_HIGHUSER_MOVABLE|__GFP_COMP), "
       "order=0, oom_score_adj=0", ("memory",), "critical", priority=4, count=5, **K),
    _a("oom.unit_killed", "oom",
       "{svc}.service: A process of this unit has been killed by the OOM killer.",
       ("memory", "service"), "critical", priority=4, unit="{svc}.service", count=5,
       services=("postgresql", "nextcloud-cron", "jellyfin", "clickhouse")),
    _a("oom.systemd_oomd", "oom",
       "Killed {cgroup} due to memory pressure for /system.slice being {pct}.{n2}% > 80.00% "
       "for > 20s with reclaim activity", ("memory",), "warning", priority=6,
       ident="systemd-oomd", unit="systemd-oomd.service", count=4),
    _a("oom.result_oomkill", "oom", "{svc}.service: Failed with result 'oom-kill'.",
       ("memory", "service"), "critical", priority=4, unit="{svc}.service", count=3,
       services=("redis-cache", "minecraft-server", "postgresql")),
    _a("oom.reaper", "oom",
       "oom_reaper: reaped process {pid} ({comm}), now anon-rss:0kB, file-rss:0kB, "
       "shmem-rss:0kB", ("memory",), "critical", priority=6, count=3, split="reference",
       **K),
    # -- disk full ---------------------------------------------------------------------
    _a("disk.pg_nospace", "disk_full",
       'PANIC:  could not write to file "pg_wal/xlogtemp.{pid}": No space left on device',
       ("disk",), "critical", priority=6, ident="postgres", unit="postgresql.service",
       count=5),
    _a("disk.nix_nospace", "disk_full", "error: writing to file: No space left on device",
       ("disk",), "critical", priority=3, ident="nix-daemon", unit="nix-daemon.service",
       count=4),
    _a("disk.docker_nospace", "disk_full",
       'level=error msg="failed to write layer" error="write /var/lib/docker/overlay2/'
       '{hex}/diff/tmp/{word}: no space left on device"', ("disk",), "critical",
       priority=6, ident="dockerd", unit="docker.service", count=4),
    _a("disk.nginx_nospace", "disk_full",
       '{date} [crit] {pid}#{pid}: *{n} pwrite() "/var/cache/nginx/client_body/00000{n}" '
       "failed (28: No space left on device)", ("disk",), "critical", priority=3,
       ident="nginx", unit="nginx.service", count=3),
    _a("disk.quota", "disk_full",
       "cp: error writing '/home/{user}/{word}.tar': Disk quota exceeded", ("disk",),
       "warning", priority=6, ident="cp", unit="user@1000.service", count=3,
       split="reference"),
    # -- crash loops -------------------------------------------------------------------
    _a("crash.restart_counter", "crash_loop",
       "{svc}.service: Scheduled restart job, restart counter is at {restarts}.",
       ("service",), "warning", priority=6, unit="{svc}.service", count=6, burst=True,
       fixed=("svc",), services=APPS),
    _a("crash.repeated", "crash_loop", "{svc}.service: Start request repeated too quickly.",
       ("service",), "warning", priority=3, unit="{svc}.service", count=4, services=APPS),
    _a("crash.exit_status", "crash_loop",
       "{svc}.service: Main process exited, code=exited, status={code}/{codename}",
       ("service", "crash"), "warning", priority=5, unit="{svc}.service", count=6,
       services=APPS),
    _a("crash.failed_result", "crash_loop", "{svc}.service: Failed with result 'exit-code'.",
       ("service",), "warning", priority=4, unit="{svc}.service", count=5, services=APPS),
    _a("crash.timeout_result", "crash_loop", "{svc}.service: Failed with result 'timeout'.",
       ("service",), "warning", priority=4, unit="{svc}.service", count=3,
       split="reference", services=("mosquitto", "home-assistant")),
    # -- segfaults ---------------------------------------------------------------------
    _a("segv.kernel", "segfault",
       "{comm}[{pid}]: segfault at {addr} ip {ip64} sp {sp64} error 4 in {lib}[{base}+{size}] "
       "likely on CPU {cpu} (core {cpu}, socket 0)", ("crash",), "warning", priority=6,
       count=5, **K),
    _a("segv.coredump", "segfault", "Process {pid} ({comm}) of user {uid} dumped core.",
       ("crash",), "warning", priority=2, ident="systemd-coredump",
       unit="systemd-coredump@0-{pid}-0.service", count=4),
    _a("segv.gpf", "segfault",
       "traps: {comm}[{pid}] general protection fault ip:{ip64} sp:{sp64} error:0 in "
       "{lib}[{base}+{size}]", ("crash",), "warning", priority=6, count=3, **K),
    _a("segv.phpfpm", "segfault",
       "WARNING: [pool www] child {pid} exited on signal 11 (SIGSEGV - core dumped) after "
       "{secs}.{n2} seconds from start", ("crash",), "warning", priority=6, ident="php-fpm",
       unit="phpfpm-www.service", count=3),
    _a("segv.dumped_status", "segfault",
       "{svc}.service: Main process exited, code=dumped, status=11/SEGV", ("crash",),
       "warning", priority=5, unit="{svc}.service", count=3,
       services=("transmission", "calibre-server", "imgproxy")),
    _a("segv.abort", "segfault",
       "Process {pid} ({comm}) of user {uid} terminated abnormally with signal 6/ABRT, "
       "processing...", ("crash",), "warning", priority=6, ident="systemd-coredump",
       unit="systemd-coredump@1-{pid}-0.service", count=3, split="reference"),
    # -- I/O errors --------------------------------------------------------------------
    _a("io.blk", "io_error",
       "I/O error, dev {dev}, sector {sector} op 0x0:(READ) flags 0x0 phys_seg 1 prio class 0",
       ("hardware", "disk"), "critical", priority=3, count=5, **K),
    _a("io.buffer", "io_error",
       "Buffer I/O error on dev {part}, logical block {n}, async page read",
       ("hardware", "disk"), "critical", priority=3, count=4, **K),
    _a("io.ata", "io_error", "ata{n1}.00: failed command: READ FPDMA QUEUED",
       ("hardware", "disk"), "critical", priority=3, count=4, **K),
    _a("io.nvme_timeout", "io_error", "nvme nvme0: I/O {n} QID {n1} timeout, aborting",
       ("hardware", "disk"), "critical", priority=4, count=3, **K),
    _a("io.smart_pending", "io_error",
       "Device: /dev/{dev} [SAT], {n1} Currently unreadable (pending) sectors",
       ("hardware", "disk"), "critical", priority=2, ident="smartd", unit="smartd.service",
       count=3, split="reference"),
    # -- filesystem errors -------------------------------------------------------------
    _a("fs.ext4_error", "fs_error",
       "EXT4-fs error (device {part}): ext4_find_entry:1463: inode #{n}: comm {comm}: "
       "reading directory lblock 0", ("hardware", "disk"), "critical", priority=2, count=4,
       **K),
    _a("fs.ext4_readonly", "fs_error", "EXT4-fs ({part}): Remounting filesystem read-only",
       ("hardware", "disk"), "critical", priority=2, count=3, **K),
    _a("fs.btrfs_errs", "fs_error",
       "BTRFS error (device {part}): bdev /dev/{part} errs: wr 0, rd {n1}, flush 0, "
       "corrupt {n2}, gen 0", ("hardware", "disk"), "critical", priority=3, count=4, **K),
    _a("fs.xfs_corrupt", "fs_error",
       "XFS ({part}): Metadata corruption detected at xfs_buf_ioend+0x{hex4}/0x{hex4}, "
       "xfs_inode block 0x{hex4}", ("hardware", "disk"), "critical", priority=1, count=3,
       split="reference", **K),
    # -- SSH brute force ---------------------------------------------------------------
    _a("ssh.failed_invalid", "ssh_bruteforce",
       "Failed password for invalid user {baduser} from {attacker} port {port} ssh2",
       ("security",), "warning", priority=6, ident="sshd", unit="sshd.service", count=10,
       burst=True, fixed=("attacker", "host")),
    _a("ssh.invalid_user", "ssh_bruteforce", "Invalid user {baduser} from {attacker} port {port}",
       ("security",), "warning", priority=6, ident="sshd", unit="sshd.service", count=8,
       burst=True, fixed=("attacker", "host")),
    _a("ssh.max_auth", "ssh_bruteforce",
       "error: maximum authentication attempts exceeded for root from {attacker} port {port} "
       "ssh2 [preauth]", ("security",), "warning", priority=3, ident="sshd",
       unit="sshd.service", count=3),
    _a("ssh.pam_failure", "ssh_bruteforce",
       "pam_unix(sshd:auth): authentication failure; logname= uid=0 euid=0 tty=ssh ruser= "
       "rhost={attacker}  user=root", ("security",), "warning", priority=5, ident="sshd",
       unit="sshd.service", count=6, burst=True, fixed=("attacker", "host")),
    _a("ssh.too_many", "ssh_bruteforce",
       "Disconnecting authenticating user root {attacker} port {port}: Too many "
       "authentication failures [preauth]", ("security",), "warning", priority=6,
       ident="sshd", unit="sshd.service", count=4, split="reference", burst=True,
       fixed=("attacker", "host")),
    # -- failed nixos-rebuild switch / activation --------------------------------------
    _a("nixos.units_failed", "nixos_activation",
       "warning: the following units failed: {svc}.service", ("service", "error"), "warning",
       priority=6, ident="nixos-upgrade-start", unit="nixos-upgrade.service", count=4,
       services=APPS + ("nginx", "postgresql")),
    _a("nixos.builder_failed", "nixos_activation",
       "error: builder for '/nix/store/{store}-nixos-system-{host}-24.11.{date8}.drv' failed "
       "with exit code 1", ("service", "error"), "warning", priority=6,
       ident="nixos-upgrade-start", unit="nixos-upgrade.service", count=3),
    _a("nixos.activation_snippet", "nixos_activation",
       "Activation script snippet '{snippet}' failed (1)", ("service", "error"), "warning",
       priority=6, ident="nixos-upgrade-start", unit="nixos-upgrade.service", count=3),
    _a("nixos.upgrade_unit", "nixos_activation",
       "Failed to start nixos-upgrade.service - NixOS Upgrade.", ("service", "error"),
       "warning", priority=3, unit="nixos-upgrade.service", count=3),
    _a("nixos.eval_error", "nixos_activation", "error: attribute '{word}' missing",
       ("service", "error"), "warning", priority=6, ident="nixos-upgrade-start",
       unit="nixos-upgrade.service", count=3, split="reference"),
    # -- failing timers (backups, dumps) -----------------------------------------------
    _a("timer.start_failed", "timer_failed", "Failed to start {job}.service - {jobdesc}.",
       ("service",), "warning", priority=3, unit="{job}.service", count=4),
    _a("timer.restic_locked", "timer_failed",
       "Fatal: unable to create lock in backend: repository is already locked exclusively by "
       "PID {pid} on {host2} by root (UID 0, GID 0)", ("service", "error"), "warning",
       priority=6, ident="restic", unit="restic-backups-daily.service", count=3),
    _a("timer.borg_repo", "timer_failed",
       "Failed to create/acquire the lock /mnt/backup/borg/lock.exclusive (timeout).",
       ("service", "error"), "warning", priority=6, ident="borg",
       unit="borgbackup-job-home.service", count=3),
    _a("timer.resources", "timer_failed", "{job}.timer: Failed with result 'resources'.",
       ("service",), "warning", priority=4, unit="{job}.timer", count=2, split="reference"),
    # -- certificate expiry ------------------------------------------------------------
    _a("cert.curl_expired", "cert_expiry",
       "curl: (60) SSL certificate problem: certificate has expired", ("security", "network"),
       "critical", priority=6, ident="uptime-check", unit="uptime-check.service", count=4),
    _a("cert.acme_unauthorized", "cert_expiry",
       "[{domain}] acme: error: 403 :: urn:ietf:params:acme:error:unauthorized :: Invalid "
       "response from http://{domain}/.well-known/acme-challenge/{token}: 404",
       ("security", "service", "network"), "warning", priority=6, ident="lego",
       unit="acme-{domain}.service", count=3, fixed=("domain",)),
    _a("cert.expires_soon", "cert_expiry",
       "certificate for {domain} expires in {days} days ({date8}); last renewal attempt "
       "failed", ("security", "service"), "warning", priority=4, ident="cert-check",
       unit="cert-check.service", count=3),
    _a("cert.nginx_load", "cert_expiry",
       '{date} [emerg] {pid}#{pid}: cannot load certificate "/var/lib/acme/{domain}/'
       'fullchain.pem": BIO_new_file() failed (SSL: error:80000002:system library::No such '
       "file or directory)", ("security", "service"), "critical", priority=3, ident="nginx",
       unit="nginx.service", count=2),
    _a("cert.postfix_verify", "cert_expiry",
       "warning: TLS library problem: error:0A000086:SSL routines::certificate verify "
       "failed:ssl/statem/statem_clnt.c:2091:", ("security", "network"), "warning",
       priority=4, ident="postfix/smtp", unit="postfix.service", count=3, split="reference"),
    # -- clock / NTP -------------------------------------------------------------------
    _a("clock.wrong_by", "clock", "System clock wrong by {secs}.{n3} seconds",
       ("network", "other", "kernel"), "warning", priority=4, ident="chronyd",
       unit="chronyd.service", count=3),
    _a("clock.no_sources", "clock", "Can't synchronise: no selectable sources",
       ("network", "other"), "warning", priority=4, ident="chronyd", unit="chronyd.service",
       count=3),
    _a("clock.tsc_unstable", "clock",
       "clocksource: timekeeping watchdog on CPU{cpu}: Marking clocksource 'tsc' as unstable "
       "because the skew is too large:", ("kernel", "hardware", "other"), "warning",
       priority=4, count=2, **K),
    _a("clock.not_yet_valid", "clock",
       "x509: certificate has expired or is not yet valid: current time {date8} is before "
       "{date8b}", ("network", "security", "other"), "warning", priority=3,
       ident="prometheus", unit="prometheus.service", count=2, split="reference"),
    # -- DNS resolution ----------------------------------------------------------------
    _a("dns.nix_resolve", "dns",
       "warning: error: unable to download 'https://cache.nixos.org/{store}.narinfo': "
       "Couldn't resolve host name (6); retrying in {ms} ms", ("network",), "warning",
       priority=4, ident="nix-daemon", unit="nix-daemon.service", count=4),
    _a("dns.getaddrinfo", "dns",
       "getaddrinfo({domain}) failed: Temporary failure in name resolution", ("network",),
       "warning", priority=3, ident="{svc}", unit="{svc}.service", count=3,
       services=("vaultwarden", "gitea", "miniflux")),
    _a("dns.curl_resolve", "dns", "curl: (6) Could not resolve host: {domain}", ("network",),
       "warning", priority=6, ident="uptime-check", unit="uptime-check.service", count=3),
    _a("dns.servfail", "dns", "SERVFAIL while resolving {domain} from {ip}", ("network",),
       "warning", priority=4, ident="unbound", unit="unbound.service", count=3,
       split="reference"),
    # -- mount failures ----------------------------------------------------------------
    _a("mount.process_exited", "mount",
       "{mntunit}: Mount process exited, code=exited, status=32/n/a", ("disk", "service"),
       "warning", priority=3, unit="{mntunit}", count=3),
    _a("mount.failed_to_mount", "mount", "Failed to mount {mntunit} - {mntpath}.",
       ("disk", "service"), "warning", priority=3, unit="{mntunit}", count=3),
    _a("mount.wrong_fs", "mount",
       "mount: {mntpath}: wrong fs type, bad option, bad superblock on /dev/{part}, missing "
       "codepage or helper program, or other error.", ("disk", "service"), "warning",
       priority=3, ident="mount", unit="{mntunit}", count=3),
    _a("mount.dependency", "mount", "Dependency failed for Local File Systems.",
       ("disk", "service"), "warning", priority=3, unit="local-fs.target", count=3),
    _a("mount.cifs", "mount", "CIFS: VFS: cifs_mount failed w/return code = -{errno}",
       ("disk", "network"), "warning", priority=3, count=2, **K),
    _a("mount.nfs_timeout", "mount", "mount.nfs: Connection timed out", ("disk", "network"),
       "warning", priority=3, ident="mount.nfs", unit="{mntunit}", count=2,
       split="reference"),
    # -- kernel soft lockups -----------------------------------------------------------
    _a("lockup.soft", "lockup", "watchdog: BUG: soft lockup - CPU#{cpu} stuck for {secs}s! "
       "[{comm}:{pid}]", ("kernel",), "critical", priority=0, count=4, **K),
    _a("lockup.hung_task", "lockup", "INFO: task {comm}:{pid} blocked for more than {hung} "
       "seconds.", ("kernel", "performance"), "critical", priority=3, count=4, **K),
    _a("lockup.rcu_stall", "lockup",
       "rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:", ("kernel",), "critical",
       priority=3, count=3, **K),
    _a("lockup.hard", "lockup", "watchdog: Watchdog detected hard LOCKUP on cpu {cpu}",
       ("kernel", "hardware"), "critical", priority=0, count=2, split="reference", **K),
    # -- benign floods -----------------------------------------------------------------
    _n("benign.session_opened", "benign",
       "pam_unix(sshd:session): session opened for user {okuser}(uid={uid}) by {okuser}(uid=0)",
       ident="sshd", unit="sshd.service", count=40),
    _n("benign.session_closed", "benign", "pam_unix(sshd:session): session closed for user "
       "{okuser}", ident="sshd", unit="sshd.service", count=18),
    _n("benign.cron", "benign", "({okuser}) CMD (/run/current-system/sw/bin/{cronjob})",
       ident="crond", unit="cron.service", count=18),
    _n("benign.refused_connection", "benign",
       "refused connection: IN=eth0 OUT= MAC={mac} SRC={ip} DST={lanip} LEN=44 TOS=0x00 "
       "PREC=0x00 TTL={ttl} ID={n} PROTO=TCP SPT={port} DPT={dport} WINDOW=1024 RES=0x00 SYN "
       "URGP=0", count=30, **K),
    _n("benign.started", "benign", "Started {svcdesc}.", count=14),
    _n("benign.deactivated", "benign", "{svc}.service: Deactivated successfully.",
       unit="{svc}.service", count=14, services=APPS + JOBS),
    _n("benign.pg_checkpoint", "benign",
       "LOG:  checkpoint complete: wrote {n} buffers ({n1}.{n2}%); 0 WAL file(s) added, 0 "
       "removed, 1 recycled; write={secs}.{n3} s, sync=0.0{n2} s, total={secs}.{n3} s",
       ident="postgres", unit="postgresql.service", count=14),
    _n("benign.dhcp_lease", "benign", "{iface}: leased {lanip} for 86400 seconds",
       ident="dhcpcd", unit="dhcpcd.service", count=8),
    _n("benign.nix_connection", "benign", "accepted connection from pid {pid}, user {okuser}",
       ident="nix-daemon", unit="nix-daemon.service", count=10),
    _n("benign.publickey", "benign",
       "Accepted publickey for {okuser} from {lanip} port {port} ssh2: ED25519 SHA256:{b64}",
       ident="sshd", unit="sshd.service", count=10),
    _n("benign.preauth_closed", "benign", "Connection closed by {ip} port {port} [preauth]",
       ident="sshd", unit="sshd.service", count=10),
    _n("benign.stopping", "benign", "Stopping {svcdesc}...", count=6, split="reference"),
    # -- decoys: alarming words, nothing wrong -----------------------------------------
    _n("decoy.acpi_ae_not_found", "decoy",
       "ACPI Error: AE_NOT_FOUND, While resolving a named reference package element - "
       "LNXTHERM (20230628/dspkginit-438)", priority=3, count=5, **K),
    _n("decoy.bluetooth_rfkill", "decoy", "Failed to set mode: Blocked through rfkill (0x12)",
       priority=3, ident="bluetoothd", unit="bluetooth.service", count=4),
    _n("decoy.dbus_activation", "decoy",
       "[system] Activation via systemd failed for unit 'dbus-org.freedesktop.{dbusname}"
       ".service': Unit dbus-org.freedesktop.{dbusname}.service not found.", priority=5,
       ident="dbus-daemon", unit="dbus.service", count=4),
    _n("decoy.grafana_alert_normal", "decoy",
       'logger=ngalert.state.manager rule_uid={hex4} org_id=1 msg="State changed" '
       'alert="OOM killed or disk full" previous=Alerting next=Normal', ident="grafana",
       unit="grafana.service", count=4),
    _n("decoy.smart_no_error", "decoy",
       "Device: /dev/{dev} [SAT], previous self-test completed without error", ident="smartd",
       unit="smartd.service", count=4),
    _n("decoy.timesyncd_timeout", "decoy",
       "Timed out waiting for reply from {ip}:123 ({n1}.nixos.pool.ntp.org).",
       ident="systemd-timesyncd", unit="systemd-timesyncd.service", count=4),
    _n("decoy.resolved_degraded", "decoy",
       "Using degraded feature set UDP instead of UDP+EDNS0 for DNS server {ip}.", priority=4,
       ident="systemd-resolved", unit="systemd-resolved.service", count=4),
    _n("decoy.perf_interrupt", "decoy",
       "perf: interrupt took too long ({n} > {n4}), lowering kernel.perf_event_max_sample_rate "
       "to {n5}", priority=4, count=3, **K),
    _n("decoy.sudo_typo", "decoy",
       "pam_unix(sudo:auth): authentication failure; logname={okuser} uid=1000 euid=0 "
       "tty=/dev/pts/{n1} ruser={okuser} rhost=  user={okuser}", priority=5, ident="sudo",
       count=3),
    _n("decoy.link_full_duplex", "decoy",
       "{iface}: NIC Link is Up 1000 Mbps Full Duplex, Flow Control: RX/TX", count=3, **K),
    _n("decoy.test_unit_failed_ok", "decoy",
       "{svc}.service: Main process exited, code=exited, status=0/SUCCESS",
       unit="{svc}.service", count=4, services=APPS),
    _n("decoy.nix_gc_deleting", "decoy", "deleting '/nix/store/{store}-{word}-1.{n1}.{n2}'",
       ident="nix-collect-garbage", unit="nix-gc.service", count=4),
    _n("decoy.acpi_bios_bug", "decoy",
       "ACPI BIOS Error (bug): Could not resolve symbol [\\_SB.PCI0.GPP0.SWUS], AE_NOT_FOUND "
       "(20230628/dswload2-162)", priority=3, count=3, split="reference", **K),
    # -- no-fault controls -------------------------------------------------------------
    _n("control.clock_synced", "control", "Initial clock synchronization to {date}.",
       ident="systemd-timesyncd", unit="systemd-timesyncd.service", count=3),
    _n("control.ext4_mounted", "control",
       "EXT4-fs ({part}): mounted filesystem {uuid} r/w with ordered data mode. Quota mode: "
       "none.", count=3, **K),
    _n("control.backup_finished", "control", "Finished {job}.service - {jobdesc}.",
       unit="{job}.service", count=4),
    _n("control.switching", "control",
       "switching to system configuration /nix/store/{store}-nixos-system-{host}-24.11."
       "{date8}", ident="nixos-upgrade-start", unit="nixos-upgrade.service", count=3),
    _n("control.cert_renewed", "control",
       "[{domain}] Server responded with a certificate.", ident="lego",
       unit="acme-{domain}.service", count=3),
    _n("control.consumed", "control",
       "{svc}.service: Consumed {secs}.{n3}s CPU time, {n}M memory peak, 0B memory swap peak.",
       unit="{svc}.service", count=4, services=APPS + JOBS),
    _n("control.scrub_done", "control",
       "BTRFS info (device {part}): scrub: finished on devid 1 with status: 0", count=3, **K),
    _n("control.reached_target", "control", "Reached target {target}.", count=3,
       split="reference"),
)

BY_ID: dict[str, Template] = {t.id: t for t in TEMPLATES}
assert len(BY_ID) == len(TEMPLATES), "template ids must be unique"
