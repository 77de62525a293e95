"""A fake llama-server for what a real build cannot be made to do on demand: die by
SIGILL on its first inference (as a GGML_NATIVE build does on CPUs that list
instructions they cannot run), or only once it serves as a layer.

    python fake_engine.py MODE STARTS_FILE -- <llama-server arguments>

MODE: ``ok`` (answers /health and /completion), ``sigill-on-inference`` (dies by SIGILL
on the first /completion), ``sigill-as-layer`` (answers a proof, which passes no
``--alias``, but dies by SIGILL two seconds after start when run as a layer).
Every start appends a line to STARTS_FILE, so tests can count them.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def _sigill() -> None:
    os.kill(os.getpid(), signal.SIGILL)  # default action (set in main): die, as a fault does
    # The signal may land on another thread: this one must not go on to answer meanwhile.
    time.sleep(60)


def main() -> None:
    signal.signal(signal.SIGILL, signal.SIG_DFL)
    mode, starts = sys.argv[1], Path(sys.argv[2])
    args = sys.argv[sys.argv.index("--") + 1:]
    with starts.open("a") as fh:
        fh.write(" ".join(args) + "\n")
    port = int(args[args.index("--port") + 1])
    # As a layer it is still "loading" (503) when it dies, as a real build dies in its
    # warm-up inference before /health answers 200.
    loading = mode == "sigill-as-layer" and "--alias" in args
    if loading:
        threading.Timer(1.0, _sigill).start()
    if mode == "sigill-after-ready" and "--alias" in args:
        threading.Timer(float(os.environ.get("FAKE_ENGINE_DELAY", "3")), _sigill).start()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *a: object) -> None:
            pass

        def _json(self, body: object) -> None:
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if loading:
                self.send_response(503)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self._json({"status": "ok"})

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if mode == "sigill-on-inference":
                _sigill()
            self._json({"content": " fake", "tokens_predicted": 1})

    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


def write_fake_engine(path: Path, mode: str, starts: Path) -> Path:
    """An executable at ``path`` that runs this fake in ``mode``."""
    path.write_text(
        f"#!/bin/sh\nexec {sys.executable} {Path(__file__).resolve()} {mode} {starts} -- \"$@\"\n"
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def start_count(starts: Path) -> int:
    try:
        return len(starts.read_text().splitlines())
    except OSError:
        return 0


if __name__ == "__main__":
    main()
