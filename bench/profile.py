"""Where a proxy spends its CPU: ``python -m bench.profile [--target gateway] [--stream]``.

Starts the zero-latency stub and the target, drives it at concurrency 16 with the load
generator, samples the target with py-spy (installed into the bench's ``tools`` venv)
and prints the functions with the most samples, by own time and inclusive time.
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import tempfile
import threading
from pathlib import Path

from bench import stack
from bench.measure import chat_body, measure
from bench.suites import running, say
from bench.venvs import ensure_venv


def summarize(collapsed: Path, top: int) -> str:
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack_s, _, n_s = line.rpartition(" ")
        if not n_s.isdigit():
            continue
        n = int(n_s)
        total += n
        frames = stack_s.split(";")
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    lines = [f"{total} samples", "", "own time:"]
    lines += [f"  {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    lines += ["", "inclusive time (below the event loop):"]
    # Frames every sample shares (runpy, cli, asyncio's loop) say nothing; skip them.
    shared = {f for f, n in incl.items() if n >= 0.7 * total}
    lines += [f"  {100 * n / total:5.1f}%  {f}" for f, n in incl.most_common(top + len(shared))
              if f not in shared][:top]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--target", default="gateway", choices=["gateway", "passthrough"])
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--out", type=Path, default=None, help="keep the collapsed stacks here")
    args = parser.parse_args()
    tools = ensure_venv("tools")
    with tempfile.TemporaryDirectory(prefix="ai-sysadmin-profile-") as tmp:
        work = Path(tmp)
        upstream = stack.stub_server(work)
        target = (stack.gateway_server(work, upstream, slots=64, max_queue=256)
                  if args.target == "gateway" else stack.passthrough_server(work, upstream))
        with running([upstream, target]):
            path = stack.paths_for(upstream, {args.target: target})[args.target]
            body = chat_body(args.stream)
            measure(path, concurrency=4, body=body, duration=0.5, warmup=0.2)
            out = args.out or work / "stacks.txt"
            assert target.popen is not None
            spy = subprocess.Popen(
                [str(tools.parent / "py-spy"), "record", "-p", str(target.popen.pid), "-d",
                 str(int(args.seconds)), "-r", "200", "-f", "raw", "-o", str(out), "--nonblocking"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            result: dict[str, object] = {}

            def load() -> None:
                result["run"] = measure(path, concurrency=args.concurrency, body=body,
                                        duration=args.seconds, warmup=0.3)

            t = threading.Thread(target=load)
            t.start()
            t.join()
            spy.wait(args.seconds + 60)
            run = result["run"]
            say(f"{args.target}: {run}".split(" latencies_ms")[0][:400])
            print(summarize(out, args.top))


if __name__ == "__main__":
    main()
