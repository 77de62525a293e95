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


def excerpt(data: bytes, limit: int) -> str:
    text = data.decode("utf-8", "replace")
    if len(text) <= limit:
        return text
    head = limit // 4
    tail = limit - head
    skipped = len(text) - limit
    return f"{text[:head]}\n[... {skipped} characters omitted ...]\n{text[-tail:]}"


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
    limit = settings.actions.output_excerpt_chars
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=timeout)
    except (TimeoutError, asyncio.CancelledError) as exc:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out = b""
        if proc.stdout is not None:
            with contextlib.suppress(Exception):
                out = await asyncio.wait_for(proc.stdout.read(), timeout=2)
        await proc.wait()
        if isinstance(exc, asyncio.CancelledError):
            raise
        return ExecResult(
            exit_code=proc.returncode,
            output=excerpt(out, limit),
            duration=time.monotonic() - started,
            timed_out=True,
            error=f"timed out after {timeout:g}s",
        )
    return ExecResult(
        exit_code=proc.returncode, output=excerpt(out, limit), duration=time.monotonic() - started
    )


async def execute(planned: PlannedAction, settings: Settings) -> ExecResult:
    """Run a planned action here, or through the root helper for changes."""
    socket_path = settings.actions.helper_socket
    if planned.spec.is_change and socket_path is not None:
        from layers.actions.helper import call_helper

        return await call_helper(socket_path, planned.name, planned.params_dict(),
                                 timeout=planned.spec.timeout + 15)  # fmt: skip
    return await run_argv(planned.argv, planned.spec.timeout, settings)
