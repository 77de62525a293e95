"""The deterministic prefilter: rules as data, fingerprints, debounce and bursts."""

from __future__ import annotations

from pathlib import Path

import pytest

from layers.events import Event
from layers.prefilter import Prefilter, RuleError, fingerprint, load_rules, normalise


def e(msg: str, t: float = 0.0, **kw: object) -> Event:
    return Event.model_validate({"message": msg, "timestamp": t, "host": "h", **kw})


@pytest.fixture
def pf() -> Prefilter:
    return Prefilter(load_rules(), debounce=300)


def test_fingerprint_normalises_numbers_hex_ips_pids() -> None:
    a = normalise("Out of memory: Killed process 4242 (java) at 0x7ffd12 from 10.1.2.3 [991]")
    b = normalise("Out of memory: Killed process 17 (java) at 0xdeadbe from 192.168.0.1 [5]")
    assert a == b
    assert "<ip>" in a and "<hex>" in a and "<n>" in a and "[<pid>]" in a
    assert normalise("id 3f2a9c1b77e0 done") == "id <hex> done"
    assert normalise("from fe80::1:2 port 22") == "from <ip> port <n>"
    # Different shapes stay different.
    assert normalise("disk full on /var") != normalise("disk full on /home")


def test_named_rules_catch_the_classic_failures(pf: Prefilter) -> None:
    cases = {
        "oom_kill": e("Out of memory: Killed process 1234 (java) total-vm:1kB"),
        "kernel_panic": e("Kernel panic - not syncing: Fatal exception"),
        "disk_full": e("write failed: No space left on device"),
        "segfault": e("nginx[123]: segfault at 0 ip 00007f sp 00007f error 4"),
        "unit_failed": e("Failed to start PostgreSQL database server.", unit="postgresql.service"),
        "crash_loop": e("foo.service: Start request repeated too quickly.", unit="foo.service"),
        "failed_unit": e("x.service is failed (failed): X", source="units", unit="x.service"),
        "disk_usage_high": e("disk", source="metrics",
                             fields={"metric": "disk_used_percent", "value": 97.5}),
        "priority_error": e("something odd happened", priority=3),
    }
    for name, event in cases.items():
        m = pf.check(event)
        assert m is not None and m.rule.name == name, name


def test_benign_flood_is_dropped(pf: Prefilter) -> None:
    benign = [
        "Started Session 12 of user alice.",
        "Accepted publickey for alice from 10.0.0.5 port 50022 ssh2: ED25519 SHA256:abc",
        "(root) CMD (run-parts /etc/cron.hourly)",
        '10.0.0.9 - - "GET /index.html HTTP/1.1" 200 512',
        "pam_unix(sshd:session): session opened for user alice(uid=1000) by (uid=0)",
    ]
    for i in range(2000):
        assert pf.check(e(benign[i % len(benign)] + f" #{i}", t=i)) is None
    assert pf.check(e("disk", source="metrics",
                      fields={"metric": "disk_used_percent", "value": 40.0})) is None


def test_debounce_passes_one_candidate_per_fingerprint_window(pf: Prefilter) -> None:
    hits = [pf.check(e(f"Out of memory: Killed process {i} (java)", t=float(i)))
            for i in range(50)]
    assert sum(h is not None for h in hits) == 1
    # After the window the same shape passes again; a different shape passes at once.
    assert pf.check(e("Out of memory: Killed process 9 (java)", t=400.0)) is not None
    assert pf.check(e("Out of memory: Killed process 9 (postgres)", t=401.0)) is not None


def test_burst_rule_fires_at_count_within_window(pf: Prefilter) -> None:
    def fail(i: int, t: float) -> Event:
        return e(f"Failed password for root from 203.0.113.{i} port {4000 + i} ssh2", t=t,
                 unit="sshd.service")

    # Four failures spread beyond the 60 s window never fire the burst; each is still a
    # failure in an error's words, for the trigger layer to judge (an info floor).
    spread = [pf.check(fail(i, i * 100.0)) for i in range(4)]
    # (once per fingerprint within the debounce window, like any rule's candidates).
    assert spread[0] is not None and spread[0].rule.name == "error_words"
    assert spread[0].rule.severity == "info"
    assert {m.rule.name for m in spread if m} == {"error_words"}
    results = [pf.check(fail(i, 1000.0 + i)) for i in range(12)]
    fired = [r for r in results if r is not None and r.rule.name == "auth_failure_burst"]
    assert len(fired) == 1
    assert results.index(fired[0]) == 4  # the fifth failure inside the window


def test_rules_file_is_data_with_errors_in_one_line(tmp_path: Path) -> None:
    f = tmp_path / "rules.toml"
    f.write_text('[[rule]]\nname = "my_app"\npattern = "frobnicator jammed"\n'
                 'severity = "critical"\ncategory = "service"\n')
    pf = Prefilter(load_rules(f))
    m = pf.check(e("the Frobnicator jammed again"))
    assert m is not None and m.rule.name == "my_app" and m.rule.severity == "critical"
    assert pf.check(e("Out of memory: Killed process 1")) is None  # replaced the defaults
    f.write_text('[[rule]]\nname = "bad"\npattern = "(unclosed"\n')
    with pytest.raises(RuleError, match="invalid regex"):
        load_rules(f)
    f.write_text('[[rule]]\nname = "x"\n')
    with pytest.raises(RuleError, match="needs pattern"):
        load_rules(f)


def test_fingerprint_includes_unit() -> None:
    assert fingerprint(e("Failed with result 'exit-code'.", unit="a.service")).startswith(
        "a.service: ")


def test_fast_reject_keywords_never_hide_a_match(tmp_path: Path) -> None:
    from layers.prefilter import required_literals

    assert required_literals(r"segfault at|\(core dumped\)") == ["segfault at", "(core dumped)"]
    assert required_literals(r"foo.*barbaz|qux?z") is None  # "qu" is too short to require
    assert required_literals(r"\d+ errors? in (a|b) blocks") == [" blocks"]
    f = tmp_path / "rules.toml"
    f.write_text('[[rule]]\nname = "short"\npattern = "^E\\\\d+"\nignore_case = false\n'
                 '[[rule]]\nname = "word"\npattern = "Disk GONE"\nignore_case = false\n')
    pf = Prefilter(load_rules(f))
    assert pf.check(e("E42 in controller")).rule.name == "short"  # type: ignore[union-attr]
    assert pf.check(e("the Disk GONE")).rule.name == "word"  # type: ignore[union-attr]
    assert pf.check(e("the disk gone")) is None  # case-sensitive rule
