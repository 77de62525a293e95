"""Run a planned catalog action: argv list, no shell, clean environment, hard timeout.

Changes go through the root helper when ``actions.helper_socket`` is set (the helper
re-validates them); read-only actions and every action without a helper run here, as
the calling process's user.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time

from pydantic import BaseModel, Field

from layers.actions.catalog import PlannedAction
from layers.config import Settings


class ExecResult(BaseModel):
    """What happened when an action ran."""

    exit_code: int | None = Field(description="Exit status; None when it never started.")
    output: str = Field(description="Excerpt of stdout+stderr (head and tail when long).")
    duration: float = Field(description="Seconds from start to exit.")
    timed_out: bool = False
    error: str | None = Field(None, description="Why it could not run or finish.")

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out and self.error is None


def action_env(settings: Settings) -> dict[str, str]:
    """The whole environment an action sees: nothing inherited but PATH."""
    return {
        "PATH": settings.actions.search_path or os.environ.get("PATH", "/usr/bin:/bin"),
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "SYSTEMD_PAGER": "",
        "SYSTEMD_COLORS": "0",
        "PAGER": "cat",
    }


class _Collector:
    """Keeps the head and the tail of a stream, whatever its length."""

    def __init__(self, limit_chars: int) -> None:
        self.limit = limit_chars
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def feed(self, chunk: bytes) -> None:
        self.total += len(chunk)
        room = self.limit * 4 - len(self.head)  # bytes: up to 4 per character
        if room > 0:
            self.head += chunk[:room]
            chunk = chunk[room:]
        if chunk:
            self.tail += chunk
            del self.tail[: max(0, len(self.tail) - self.limit * 4)]

    def text(self) -> str:
        head = self.head.decode("utf-8", "replace")
        tail = self.tail.decode("utf-8", "replace")
        whole = head + tail
        if self.total <= len(self.head) + len(self.tail) and len(whole) <= self.limit:
            return whole
        keep_head = self.limit // 4
        keep_tail = self.limit - keep_head
        both = whole if not tail else head + tail
        return (f"{both[:keep_head]}\n[... output shortened to {self.limit} of "
                f"{self.total} bytes ...]\n{both[-keep_tail:]}")


async def _drain(stream: asyncio.StreamReader, sink: _Collector) -> None:
    while chunk := await stream.read(65536):
        sink.feed(chunk)


async def run_argv(argv: list[str], timeout: float, settings: Settings) -> ExecResult:
    """Run one argv in its own process group; kill the group on timeout."""
    started = time.monotonic()
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=action_env(settings),
            cwd="/",
            start_new_session=True,
        )
    except OSError as exc:
        return ExecResult(exit_code=None, output="", duration=0.0, error=f"cannot start: {exc}")
    sink = _Collector(settings.actions.output_excerpt_chars)
    assert proc.stdout is not None
    reader = asyncio.create_task(_drain(proc.stdout, sink))
    timed_out = False
    try:
        await asyncio.wait_for(proc.wait(), timeout=timeout)
    except TimeoutError:
        timed_out = True
    finally:
        if proc.returncode is None:  # timed out or cancelled: the whole group goes
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        # Children that inherited stdout may keep it open: read what is there, briefly.
        try:
            await asyncio.wait_for(reader, timeout=2)
        except TimeoutError:
            pass
    return ExecResult(
        exit_code=proc.returncode,
        output=sink.text(),
        duration=time.monotonic() - started,
        timed_out=timed_out,
        error=f"timed out after {timeout:g}s" if timed_out else None,
    )


async def execute(planned: PlannedAction, settings: Settings) -> ExecResult:
    """Run a planned action here, or through the root helper for changes."""
    socket_path = settings.actions.helper_socket
    if planned.spec.is_change and socket_path is not None:
        from layers.actions.helper import call_helper

        return await call_helper(socket_path, planned.name, planned.params_dict(),
                                 timeout=planned.spec.timeout + 15)
    return await run_argv(planned.argv, planned.spec.timeout, settings)
