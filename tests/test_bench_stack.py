"""The bench's stack suites, in what can be checked without a model: the counting relay
that counts trigger requests from the layer's side (against the bench's zero-latency
stub, a fake upstream that says so), the analysis that finds resends of identical work,
the burst's candidates (each must pass the default prefilter and its debounce), the
first-run harness's output handling, the report's targets and the pinned anchor."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from bench.counting_relay import Framer, Head, Message, read_log
from bench.detection import candidates, max_gap
from bench.procs import REPO, Server, free_port
from bench.suites import SuiteResult
from bench.threads import count_tokens, rule_threads
from bench.trigger_traffic import traffic, work_key
from layers.events import Event
from layers.pipeline import prompts
from layers.prefilter import Prefilter, fingerprint, load_rules

# -- the relay's framing ----------------------------------------------------------------


def test_framer_splits_keepalive_requests_fed_byte_by_byte() -> None:
    body = b'{"a": 1}'
    raw = (b"POST /v1/chat/completions HTTP/1.1\r\ncontent-length: 8\r\n\r\n" + body
           + b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
    framer = Framer("request", keep_body=True)
    items = [item for i in range(len(raw)) for item in framer.feed(raw[i:i + 1])]
    messages = [m for m in items if isinstance(m, Message)]
    assert [m.head.start_line.split()[1] for m in messages] == ["/v1/chat/completions", "/health"]
    assert messages[0].body == body and messages[1].body == b""
    assert not framer.in_message


def test_framer_ends_chunked_and_close_delimited_responses() -> None:
    chunked = (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
               b"5\r\nhello\r\n6;x=y\r\n world\r\n0\r\n\r\n")
    framer = Framer("response")
    items = framer.feed(chunked[:30]) + framer.feed(chunked[30:])
    assert isinstance(items[0], Head) and isinstance(items[-1], Message)
    fixed = b"HTTP/1.1 503 Busy\r\ncontent-length: 2\r\n\r\nno"
    assert isinstance(framer.feed(fixed)[-1], Message)  # keep-alive: the next answer frames too
    close = Framer("response")
    assert not any(isinstance(i, Message) for i in close.feed(b"HTTP/1.1 200 OK\r\n\r\nabc"))
    assert isinstance(close.eof()[0], Message)


def _send(port: int, payload: bytes, wait_for: bytes | None, timeout: float = 10) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        got = b""
        while wait_for is not None and got.count(wait_for) < 1:
            data = s.recv(65536)
            if not data:
                break
            got += data
        return got


def _post(body: dict[str, object]) -> bytes:
    raw = json.dumps(body).encode()
    return (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json"
            b"\r\ncontent-length: " + str(len(raw)).encode() + b"\r\n\r\n" + raw)


def test_counting_relay_records_answers_and_requests_given_up(tmp_path: Path) -> None:
    """Through the relay to the bench's slow stub (a fake upstream): two requests on one
    keep-alive connection are recorded as answered with their status, bodies intact; a
    stream the client abandons before its end is recorded as abandoned."""
    port, relay_port = free_port(), free_port()
    stub = Server("stub", [sys.executable, "-m", "bench.stub_upstream", "--port", str(port),
                           "--chunks", "20", "--chunk-delay", "0.2"],
                  port, "/health", tmp_path / "stub.log", ready_timeout=30)
    log = tmp_path / "relay.jsonl"
    relay = Server("relay", [sys.executable, "-m", "bench.counting_relay", str(relay_port),
                             str(port), str(log)],
                   relay_port, "/health", tmp_path / "relay.log", ready_timeout=30)
    try:
        stub.start().wait_ready()
        relay.start().wait_ready()
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        with httpx.Client(base_url=relay.base, timeout=10) as client:
            assert client.post("/v1/chat/completions", json=body).status_code == 200
            assert client.post("/v1/chat/completions", json=body).status_code == 200
        # A stream (20 chunks, 0.2 s apart) the client leaves after its head.
        _send(relay_port, _post({**body, "stream": True}), wait_for=b"\r\n\r\n")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(
                [r for r in read_log(log) if r["path"] == "/v1/chat/completions"]) < 3:
            time.sleep(0.1)
    finally:
        relay.stop()
        stub.stop()
    chats = [r for r in read_log(log) if r["path"] == "/v1/chat/completions"]
    assert [(r["outcome"], r["status"]) for r in chats] == [
        ("answered", 200), ("answered", 200), ("abandoned", 200)]
    assert json.loads(chats[0]["body"]) == body
    assert chats[0]["conn"] == chats[1]["conn"] != chats[2]["conn"]
    t = traffic(read_log(log))
    assert (t.requests, t.identical_resends, t.abandoned) == (3, 1, 1)


# -- resends of identical work -----------------------------------------------------------


def _trigger_request(events: list[Event]) -> str:
    messages = prompts.trigger_messages(events, ["oom_kill"] * len(events), prompts.new_nonce())
    return json.dumps({"model": "trigger", "messages": messages, "max_tokens": 300})


def _record(body: str, t: float, outcome: str = "answered", status: int | None = 200) -> dict:
    return {"method": "POST", "path": "/v1/chat/completions", "body": body, "t_sent": t,
            "outcome": outcome, "status": status}


def test_a_retry_with_a_new_nonce_is_identical_work_a_split_is_not() -> None:
    evs = [Event(host="h", unit=f"u{i}.service", message=f"Out of memory: Killed process {i}")
           for i in range(4)]
    first, retry = _trigger_request(evs), _trigger_request(evs)
    assert first != retry and work_key(first) == work_key(retry)  # only the nonce differs
    records = [
        _record(first, 1.0, "abandoned", None),  # timed out
        _record(retry, 2.0),                     # the same batch again
        _record(_trigger_request(evs[:2]), 3.0),  # split in halves
        _record(_trigger_request(evs[2:]), 4.0),
        {"method": "GET", "path": "/health", "body": "", "t_sent": 4.5, "outcome": "answered",
         "status": 200},
        _record(_trigger_request([evs[0]]), 9.0),  # outside the window
    ]
    t = traffic(records, since=0.5, until=5.0)
    assert t.requests == 4 and t.identical_resends == 1
    assert dict(t.resend_after) == {"abandoned": 1}
    assert (t.event_sends, t.unique_events, t.events_resent) == (12, 4, 8)
    assert t.abandoned == 1 and dict(t.batch_sizes) == {4: 2, 2: 2}


# -- the burst's candidates ------------------------------------------------------------------


def test_burst_candidates_all_pass_the_default_prefilter_and_its_debounce() -> None:
    """Posted at once, every candidate must reach the trigger stage: none is dropped by
    the default rules or folded by the default debounce (300 s), and they group into a
    few incidents (one per unit) as a real log's would."""
    evs = [Event(**e) for e in candidates(340, "t")]
    pf = Prefilter(load_rules())
    assert pf.debounce == 300.0
    matches = [pf.check(e) for e in evs]
    assert all(m is not None for m in matches)
    assert len({fingerprint(e) for e in evs}) == len(evs)
    assert len({e.id for e in evs}) == len(evs)
    rules = {m.rule.name for m in matches if m is not None}
    assert {"oom_kill", "io_error", "unit_failed", "segfault", "disk_full",
            "priority_error"} <= rules
    assert "auth_failure_burst" not in rules  # a burst rule would hold events back
    assert len({e.unit for e in evs}) <= 8
    other = [Event(**e) for e in candidates(5, "t", start=1000)]
    assert all(pf.check(e) is not None for e in other)  # later phases: new fingerprints


def test_longest_wait_counts_from_the_post_and_between_verdicts() -> None:
    assert max_gap(0.0, [5.0, 6.0, 70.0, 71.0]) == 64.0
    assert max_gap(10.0, [80.0]) == 70.0
    assert max_gap(0.0, []) == 0.0


# -- thread split --------------------------------------------------------------------------


def test_rule_threads_split_cores_over_three_layers() -> None:
    assert [rule_threads(c) for c in (1, 2, 3, 8, 16)] == [1, 1, 1, 2, 5]


def test_token_count_of_stream_lines() -> None:
    chunk = {"choices": [{"delta": {"content": "ok"}}]}
    assert count_tokens("data: " + json.dumps(chunk)) == 1
    assert count_tokens('data: {"choices":[{"delta":{"role":"assistant"}}]}') == 0
    assert count_tokens("data: [DONE]") == 0
    assert count_tokens(": ping") == 0


# -- first run ---------------------------------------------------------------------------


def test_first_run_output_keeps_progress_lines_and_finds_the_gateway_line() -> None:
    import io

    from bench.first_run import Output

    out = Output(time.monotonic())
    out.read(io.BytesIO(
        b"bootstrap: creating .venv\nbuilding 10%\rbuilding 50%\r\n"
        b"[engine] built in 300 s\n\n"
        b"ai-sysadmin: gateway listening on http://127.0.0.1:9999 (OpenAI base URL x)\n"
        b"later"))
    assert [line for _, line in out.lines] == [
        "bootstrap: creating .venv", "building 10%", "building 50%", "[engine] built in 300 s",
        "ai-sysadmin: gateway listening on http://127.0.0.1:9999 (OpenAI base URL x)", "later"]
    assert out.gateway_url == "http://127.0.0.1:9999" and out.seen.is_set()
    assert [line.split(":")[0] for _, line in out.steps()] == [
        "bootstrap", "[engine] built in 300 s", "ai-sysadmin"]
    assert out.before_gateway() == 5


FAKE_MAKE_RUN = '''
import http.server, json, os, sys, time
port = int(os.environ["AI_SYSADMIN_GATEWAY__PORT"])
assert os.environ["XDG_CACHE_HOME"].endswith("cache") and not os.listdir(os.environ["XDG_CACHE_HOME"])
print("bootstrap: creating .venv", flush=True)
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        n = int(self.headers["content-length"])
        req = json.loads(self.rfile.read(n))
        body = json.dumps({"choices": [{"message": {"content": "fake answer to "
               + req["messages"][0]["content"]}, "finish_reason": "length"}],
               "usage": {"completion_tokens": 7}}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
srv = http.server.HTTPServer(("127.0.0.1", port), H)
print(f"ai-sysadmin: gateway listening on http://127.0.0.1:{port} (OpenAI base URL x)",
      flush=True)
srv.serve_forever()
'''


def test_first_run_harness_times_a_fake_make_run_and_the_readme_request(tmp_path: Path) -> None:
    """A fake ``make run`` (a script that prints a step and the gateway line, then serves
    a canned answer): the harness clones, gives it empty caches and the ports, times the
    gateway line and the README's request, and stops it."""
    from bench.first_run import suite_first_run
    from bench.suites import Options

    script = tmp_path / "fake_make_run.py"
    script.write_text(FAKE_MAKE_RUN)
    res = suite_first_run(Options(work=tmp_path / "work"),
                          command=(sys.executable, str(script)), limit=60, answer_timeout=30)
    ex = res.extra
    assert "first_run.failed" not in ex
    assert ex["first_run.answer_status"] == 200
    assert ex["first_run.answer_excerpt"] == "fake answer to How is the machine?"
    assert ex["first_run.answer_tokens"] == 7 and ex["first_run.answer_finish"] == "length"
    assert 0 <= ex["first_run.gateway_s"] <= ex["first_run.first_answer_s"] < 60
    assert [line for _, line in ex["first_run.steps"]][0] == "bootstrap: creating .venv"
    assert re.fullmatch(r"[0-9a-f]{4,40}", ex["first_run.commit"])


def test_first_run_environment_is_a_users_with_empty_caches(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    from bench.first_run import user_env

    monkeypatch.setenv("AI_SYSADMIN_GATEWAY__LOG_LEVEL", "debug")
    monkeypatch.setenv("PATH", f"{REPO}/.venv/bin:/usr/bin")
    monkeypatch.delenv("PIP_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    env = user_env(tmp_path, {"trigger": 1, "review": 2, "meta": 3, "gateway": 4})
    assert env["PATH"] == "/usr/bin"
    assert "AI_SYSADMIN_GATEWAY__LOG_LEVEL" not in env
    assert env["AI_SYSADMIN_GATEWAY__PORT"] == "4" and env["AI_SYSADMIN_LAYERS__META__PORT"] == "3"
    assert env["XDG_CACHE_HOME"] == str(tmp_path / "cache")
    assert env["PIP_CACHE_DIR"] == str(Path.home() / ".cache" / "pip")  # reused, not emptied


# -- report ------------------------------------------------------------------------------


def _stack_results() -> dict[str, SuiteResult]:
    threads = SuiteResult(extra={
        "threads.cores": 2, "threads.rule_value": 1, "threads.window_s": 30, "threads.rounds": 1,
        "threads.alone.total": [37.6], "threads.alone.tps.trigger": [37.6],
        "threads.t1.total": [42.9], "threads.t2.total": [6.3], "threads.rule.total": [40.0],
        **{f"threads.{k}.tps.{n}": [v] for k, v in (("t1", 14.3), ("t2", 2.1), ("rule", 13.3))
           for n in ("trigger", "review", "meta")},
        "threads.rule.effective": {"trigger": 1, "review": 1, "meta": 1},
        "threads.rule.flag": {"trigger": 1, "review": 1, "meta": 1},
    })
    detection = SuiteResult(extra={
        "detect.idle_p50_ms": [1000.0], "detect.chat_p50_ms": [3000.0],
        "burst.events": 320, "burst.verdicts": 320, "burst.total_s": [300.0],
        "burst.max_gap_s": [20.0], "burst.vps": [1.07],
        "burst.traffic": {"requests": 40, "identical_resends": 0, "resend_after": {}},
    })
    return {"threads": threads, "detection": detection}


def test_report_targets_for_the_stack_suites() -> None:
    from bench import report

    rows = {t.name.split(":")[0]: t for t in report.targets(_stack_results())}
    split = rows["three layers busy, total tok/s"]
    assert split.ok is True and "0.932×" in split.measured and "1 thread each" in split.name
    assert rows["event → verdict p50"].ok is False  # 3 s with chats against 1 s idle: 3×
    assert rows["trigger burst of 320 candidates"].ok is True
    assert rows["trigger burst"].ok is True  # no identical resends
    page = report.render(_stack_results(), {}, [], "python -m bench", 60.0, date="then")
    assert "| 3 | threads unset: the supervisor's rule | 1, 1, 1 | 1, 1, 1 |" in page
    assert "### Detection under load" in page
    assert "- Date: then" in page


def test_anchor_is_pinned_by_version_and_wheel_hashes() -> None:
    from bench.venvs import LITELLM_REQUIREMENTS, LITELLM_VERSION, VENVS, install_commands

    text = LITELLM_REQUIREMENTS.read_text()
    assert LITELLM_VERSION != "1.107.0"  # the compromised release
    assert len(re.findall(r"--hash=sha256:[0-9a-f]{64}", text)) >= 2
    cmds = install_commands(Path("/venv/bin/python"), VENVS["litellm"])
    assert "--require-hashes" in cmds[0] and str(LITELLM_REQUIREMENTS) in cmds[0]
    assert cmds[1][-1] == f"litellm[proxy]=={LITELLM_VERSION}"


def test_bench_help_lists_the_new_suites() -> None:
    out = subprocess.run([sys.executable, "-m", "bench", "--help"], capture_output=True,
                         text=True, check=True, cwd=REPO, timeout=60).stdout
    assert "threads" in out and "detection" in out and "--first-run" in out


def test_first_run_alone_adds_its_figures_to_the_last_full_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--first-run`` on its own keeps the page's other figures (from the saved figures of
    the last full run) and adds its section; without a saved full run the page is left
    alone; a later full run keeps the first-run figures."""
    import bench.first_run
    from bench.__main__ import _save, main

    def fake_first_run(opts: object) -> SuiteResult:
        return SuiteResult(extra={"first_run.gateway_s": 600.0, "first_run.answer_s": 2.5,
                                  "first_run.answer_status": 200, "first_run.first_answer_s": 603,
                                  "first_run.steps": [[1.0, "bootstrap: creating .venv"]]})

    monkeypatch.setattr(bench.first_run, "suite_first_run", fake_first_run)
    figures, page = tmp_path / "figures.json", tmp_path / "benchmarks.md"
    args = ["--first-run", "--figures", str(figures), "--out", str(page),
            "--plots", str(tmp_path)]
    assert main(args) == 0
    assert not page.exists() and "first_run" in json.loads(figures.read_text())

    _save(figures, _stack_results(), {"litellm": "1.106.2"}, [], "python -m bench", 1200.0,
          "2026-01-01 00:00 UTC")
    assert main(args) == 0
    text = page.read_text()
    assert "### CPU thread split" in text and "### First run" in text
    assert "- Date: 2026-01-01 00:00 UTC" in text and "litellm 1.106.2" in text
    assert "| 10.0 |" in text  # minutes until the gateway line
    saved = json.loads(figures.read_text())
    assert {"threads", "detection", "first_run"} <= set(saved)
