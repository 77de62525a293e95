"""Thread split: the three layers busy at once, for several CPU thread splits.

Each split is a real stack: the supervisor (``ai-sysadmin layers serve``) running the
three layers on the default model, with ``layers.<name>.threads`` set for every layer
(1, or 2: llama-server's own default on two cores) or left unset (the supervisor's
rule). Next to them, one layer alone at its default. Every layer gets one stream at a
time of 128 tokens (``ignore_eos``, so each request generates all of them), re-sent as
soon as it ends, all layers at once for a fixed window; a layer's tok/s is the tokens
that arrived in the window over its length. Splits take turns within a round, so a
shared machine's drift spreads over all of them.

The rule the supervisor applies when ``threads`` is unset: each managed layer gets
``max(1, usable_cores // managed_layers)`` threads. Whether it does is read from the
engines' command lines; where it does not (yet), the split passes that value explicitly
and the report says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from dataclasses import dataclass
from typing import Any

import httpx

from bench import stack
from bench.suites import Options, SuiteResult, say

TOKENS = 128
PROMPT = "Write a short report on the health of a Linux server: disks, memory, services."
LAYERS = ("trigger", "review", "meta")


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def rule_threads(cores: int, managed: int = 3) -> int:
    """The supervisor's documented split for ``managed`` local layers."""
    return max(1, cores // managed)


@dataclass(frozen=True)
class Split:
    key: str
    label: str
    managed: tuple[str, ...]
    threads: int | None  # None: layers.<name>.threads unset


def splits() -> list[Split]:
    return [
        Split("alone", "one layer alone, threads unset", ("trigger",), None),
        Split("t1", "1 thread each", LAYERS, 1),
        Split("t2", "2 threads each (llama-server's default on 2 cores)", LAYERS, 2),
        Split("rule", "threads unset: the supervisor's rule", LAYERS, None),
    ]


def count_tokens(line: str) -> int:
    """1 for an SSE chunk that carries generated text (one token per chunk), else 0."""
    if not line.startswith("data:"):
        return 0
    data = line[5:].strip()
    if not data or data == "[DONE]":
        return 0
    try:
        chunk = json.loads(data)
    except json.JSONDecodeError:
        return 0
    for choice in chunk.get("choices") or []:
        if (choice.get("delta") or {}).get("content"):
            return 1
    return 0


async def _busy(client: httpx.AsyncClient, url: str, model: str, start: float, end: float,
                errors: list[str]) -> int:
    """Streams of TOKENS tokens back to back until ``end``; tokens that arrived in
    ``[start, end]``."""
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": TOKENS, "stream": True, "ignore_eos": True, "temperature": 0}
    counted = 0
    while time.monotonic() < end:
        try:
            async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    errors.append(f"{model}: HTTP {r.status_code}")
                    await asyncio.sleep(0.5)
                    continue
                async for line in r.aiter_lines():
                    now = time.monotonic()
                    if now > end:
                        return counted
                    if now >= start:
                        counted += count_tokens(line)
        except httpx.HTTPError as exc:
            errors.append(f"{model}: {type(exc).__name__}: {exc}"[:200])
            await asyncio.sleep(0.5)
    return counted


async def measure_window(urls: dict[str, str], warmup: float, window: float
                         ) -> tuple[dict[str, float], list[str]]:
    """Every layer busy at once; tok/s of each over the window after ``warmup``."""
    errors: list[str] = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(None)) as client:
        # One short answer each first: the model is paged in, the prompt cached.
        for name, url in urls.items():
            with contextlib.suppress(httpx.HTTPError):
                await client.post(url + "/v1/chat/completions", timeout=120, json={
                    "model": name, "max_tokens": 4,
                    "messages": [{"role": "user", "content": PROMPT}]})
        t0 = time.monotonic()
        start, end = t0 + warmup, t0 + warmup + window
        counts = await asyncio.gather(*(_busy(client, url, name, start, end, errors)
                                        for name, url in urls.items()))
    return {name: n / window for name, n in zip(urls, counts, strict=True)}, errors


def _threads_flag(argv: list[str]) -> int | None:
    for flag in ("--threads", "--n_threads"):
        if flag in argv[:-1]:
            return int(argv[argv.index(flag) + 1])
    return None


@contextlib.contextmanager
def _started(layers: stack.Layers) -> Any:
    say(f"starting {layers.server.name}: layers {', '.join(layers.managed)}")
    layers.server.start()
    try:
        layers.wait_ready()
        yield layers
    finally:
        layers.server.stop()


def suite_threads(opts: Options) -> SuiteResult:
    out = SuiteResult()
    cores = usable_cores()
    rounds = 1 if opts.quick else 3
    window, warmup = (15.0, 3.0) if opts.quick else (30.0, 5.0)
    ex = out.extra
    ex.update({"threads.cores": cores, "threads.rounds": rounds, "threads.window_s": window,
               "threads.tokens": TOKENS, "threads.rule_value": rule_threads(cores)})
    rule_landed: bool | None = None
    order = splits()
    for rep in range(rounds):
        for split in order[rep % len(order):] + order[: rep % len(order)]:
            threads = split.threads
            if split.key == "rule" and rule_landed is False:
                threads = rule_threads(cores)
            layers = stack.layers_server(opts.work, tag=f"threads-{split.key}-{rep}",
                                         threads=threads, managed=split.managed)
            with _started(layers):
                flags = {n: _threads_flag(a) for n, a in layers.engine_processes().items()}
                unset = split.key == "rule" and threads is None
                if unset:
                    rule_landed = all(flags.get(n) is not None for n in split.managed)
                    ex["threads.rule_landed"] = rule_landed
                if not unset or rule_landed:
                    _measure(out, split, layers, flags, rep, rounds, warmup, window)
                    continue
            say("  the supervisor passes no --threads when threads is unset: the rule's "
                f"value {rule_threads(cores)} is passed explicitly instead")
            layers = stack.layers_server(opts.work, tag=f"threads-{split.key}-{rep}-explicit",
                                         threads=rule_threads(cores), managed=split.managed)
            with _started(layers):
                flags = {n: _threads_flag(a) for n, a in layers.engine_processes().items()}
                _measure(out, split, layers, flags, rep, rounds, warmup, window)
    if rule_landed is False:
        out.notes.append(
            "The supervisor did not pass `--threads` when `layers.<name>.threads` was unset, "
            f"so the rule's split was measured with `threads = {rule_threads(cores)}` set "
            f"explicitly (max(1, {cores} cores // 3 layers)).")
    return out


def _measure(out: SuiteResult, split: Split, layers: stack.Layers,
             flags: dict[str, int | None], rep: int, rounds: int, warmup: float,
             window: float) -> None:
    urls = {n: layers.url(n) for n in split.managed}
    say(f"threads round {rep + 1}/{rounds}: {split.label}, {window:.0f} s")
    tps, errors = asyncio.run(measure_window(urls, warmup, window))
    _record(out, split, tps, errors, flags, layers.effective_threads())


def _record(out: SuiteResult, split: Split, tps: dict[str, float], errors: list[str],
            flags: dict[str, int | None], effective: dict[str, int | None]) -> None:
    ex = out.extra
    for name, v in tps.items():
        ex.setdefault(f"threads.{split.key}.tps.{name}", []).append(v)
    total = sum(tps.values())
    ex.setdefault(f"threads.{split.key}.total", []).append(total)
    ex[f"threads.{split.key}.flag"] = flags
    ex[f"threads.{split.key}.effective"] = effective
    ex.setdefault(f"threads.{split.key}.errors", []).extend(errors[:5])
    shown = ", ".join(f"{n} {v:.1f}" for n, v in tps.items())
    say(f"  tok/s {shown}; total {total:.1f} (threads {effective}, --threads {flags})"
        + (f"; {len(errors)} errors: {errors[:1]}" if errors else ""))
