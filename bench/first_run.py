"""First run, as a new user has it: ``make run`` in a fresh clone with an empty cache, until
the gateway says where it listens, then the README's first request.

The clone is of this checkout's committed ``HEAD`` (uncommitted changes are not in it),
into a temporary directory. ``XDG_CACHE_HOME`` and ``XDG_STATE_HOME`` point at empty
directories there, so the model is assembled and llama-server built and proven again;
pip's own cache is reused (``PIP_CACHE_DIR``: the machine's), so downloads are not
measured, builds are. The stack binds free loopback ports (``AI_SYSADMIN_*__PORT``).
Every line ``make run`` prints is kept with the time it appeared.

Opt-in (``python -m bench --first-run``): it takes 10–20 minutes on two cores.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.procs import REPO, free_port
from bench.suites import Options, SuiteResult, say

GATEWAY_LINE = re.compile(r"gateway listening on (http://\S+)")
# Lines that name a step: the bootstrap's, the provisioning's, the engine's, the CLI's.
STEP_LINE = re.compile(r"^(?:(?:bootstrap|provision|ai-sysadmin|engine|model):|\[engine\])")
README_REQUEST = {"model": "ai-sysadmin",
                  "messages": [{"role": "user", "content": "How is the machine?"}]}
MAX_KEPT_LINES = 3000


@dataclass
class Output:
    """Lines of a child's output with the seconds (since ``t0``) each appeared."""

    t0: float
    lines: list[tuple[float, str]] = field(default_factory=list)
    total: int = 0
    gateway_at: float | None = None
    gateway_url: str | None = None
    seen: threading.Event = field(default_factory=threading.Event)

    def add(self, text: str) -> None:
        now = time.monotonic() - self.t0
        self.total += 1
        if len(self.lines) < MAX_KEPT_LINES:
            self.lines.append((now, text))
        m = GATEWAY_LINE.search(text)
        if m and self.gateway_at is None:
            self.gateway_at, self.gateway_url = now, m.group(1).rstrip(").,")
            self.seen.set()

    def read(self, stream: object) -> None:
        """Split on newlines and carriage returns (progress lines rewrite themselves)."""
        buf = b""
        read = stream.read1 if hasattr(stream, "read1") else stream.read  # type: ignore[attr-defined]
        while chunk := read(65536):
            buf += chunk
            *done, buf = re.split(rb"\r\n|\n|\r", buf)
            for raw in done:
                if raw.strip():
                    self.add(raw.decode(errors="replace").rstrip())
        if buf.strip():
            self.add(buf.decode(errors="replace").rstrip())

    def steps(self) -> list[tuple[float, str]]:
        return [(t, line) for t, line in self.lines if STEP_LINE.match(line)]

    def before_gateway(self) -> int:
        if self.gateway_at is None:
            return self.total
        return sum(1 for t, _ in self.lines if t <= self.gateway_at)


def user_env(root: Path, ports: dict[str, int]) -> dict[str, str]:
    """The environment of a user's shell on this machine, with empty caches and this
    run's ports: no project venv on PATH, no AI_SYSADMIN_* of ours."""
    pip_cache = os.environ.get("PIP_CACHE_DIR") or str(
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pip")
    venv = os.environ.get("VIRTUAL_ENV")
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep)
            if not p.startswith(str(REPO)) and not (venv and p.startswith(venv))]
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("AI_SYSADMIN_") and k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env.update({
        "PATH": os.pathsep.join(path),
        "XDG_CACHE_HOME": str(root / "cache"),
        "XDG_STATE_HOME": str(root / "state"),
        "PIP_CACHE_DIR": pip_cache,
        "AI_SYSADMIN_GATEWAY__PORT": str(ports["gateway"]),
        **{f"AI_SYSADMIN_LAYERS__{n.upper()}__PORT": str(ports[n])
           for n in ("trigger", "review", "meta")},
    })
    return env


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Ctrl-C as a user would press it (the whole process group), then harder."""
    for sig, wait in ((signal.SIGINT, 60), (signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(wait)


def suite_first_run(opts: Options, *, command: tuple[str, ...] = ("make", "run"),
                    limit: float = 3600.0, answer_timeout: float = 900.0) -> SuiteResult:
    out = SuiteResult()
    ex = out.extra
    root = opts.work / "first-run"
    clone = root / "clone"
    (root / "cache").mkdir(parents=True)
    (root / "state").mkdir()
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True, timeout=300)
    ex["first_run.commit"] = subprocess.run(
        ["git", "-C", str(clone), "rev-parse", "--short", "HEAD"], capture_output=True,
        text=True, check=False).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, check=False).stdout.strip()
    if dirty:
        out.notes.append(f"First run: the clone is of commit {ex['first_run.commit']}; "
                         "this checkout had uncommitted changes that it does not include.")
    ports = {n: free_port() for n in ("trigger", "review", "meta", "gateway")}
    env = user_env(root, ports)
    ex["first_run.llama_server_on_path"] = bool(
        subprocess.run(["which", "llama-server"], env=env, capture_output=True,
                       check=False).stdout.strip())
    say(f"first run: `{' '.join(command)}` in a fresh clone ({ex['first_run.commit']}), empty "
        f"cache {root / 'cache'}, pip cache {env['PIP_CACHE_DIR']}")
    t0 = time.monotonic()
    output = Output(t0)
    proc = subprocess.Popen(list(command), cwd=clone, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    reader = threading.Thread(target=output.read, args=(proc.stdout,), daemon=True)
    reader.start()
    next_note = t0 + 60
    try:
        while not output.seen.wait(1.0):
            if proc.poll() is not None or time.monotonic() - t0 > limit:
                break
            if time.monotonic() >= next_note:
                next_note += 60
                last = output.lines[-1][1][:100] if output.lines else ""
                say(f"  {time.monotonic() - t0:.0f} s: {last}")
        if output.gateway_at is None:
            code = proc.poll()
            reason = (f"exited with code {code}" if code is not None
                      else f"still not listening after {limit:.0f} s")
            ex["first_run.failed"] = reason
            say(f"  first run failed: {reason}")
        else:
            say(f"  gateway line after {output.gateway_at:.0f} s; the README's request")
            ex["first_run.gateway_s"] = output.gateway_at
            url = f"http://127.0.0.1:{ports['gateway']}/v1/chat/completions"
            t1 = time.monotonic()
            try:
                r = httpx.post(url, json=README_REQUEST, timeout=answer_timeout)
                ex["first_run.answer_status"] = r.status_code
                body = r.json() if r.headers.get("content-type", "").startswith(
                    "application/json") else {}
                choice = (body.get("choices") or [{}])[0]
                text = (choice.get("message") or {}).get("content") or ""
                ex["first_run.answer_chars"] = len(text)
                ex["first_run.answer_tokens"] = (body.get("usage") or {}).get("completion_tokens")
                ex["first_run.answer_finish"] = choice.get("finish_reason")
                ex["first_run.answer_excerpt"] = text[:160]
            except httpx.HTTPError as exc:
                ex["first_run.answer_error"] = f"{type(exc).__name__}: {exc}"[:200]
            ex["first_run.answer_s"] = time.monotonic() - t1
            ex["first_run.first_answer_s"] = time.monotonic() - t0
            say(f"  answered in {ex['first_run.answer_s']:.1f} s "
                f"(status {ex.get('first_run.answer_status')}, "
                f"{ex.get('first_run.answer_tokens')} tokens)")
    finally:
        _stop(proc)
        reader.join(10)
    ex["first_run.lines_total"] = output.total
    ex["first_run.lines_before_gateway"] = output.before_gateway()
    ex["first_run.steps"] = output.steps()
    ex["first_run.tail"] = output.lines[-15:]
    (root / "make-run.log").write_text("".join(f"{t:8.1f}  {line}\n" for t, line in output.lines))
    return out
