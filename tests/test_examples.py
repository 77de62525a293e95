"""Labelled examples (layers/pipeline/examples.py): a candidate that only an ``info`` rule
let through and whose nearest labelled example is harmless is judged like it, with the
real meta layer's embeddings; warning/critical rules are never overruled; without
embeddings the stage goes on as before."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from layers.client import LayerClients
from layers.config import Settings
from layers.events import Event, StoredEvent
from layers.pipeline import examples
from layers.pipeline.examples import ExamplesError, load_examples
from layers.pipeline.trigger import TriggerStage, VerdictBus
from layers.prefilter import Prefilter, load_rules
from layers.store import Store
from tests.conftest import Stack, free_port

HARMLESS = ("refused connection: IN=eth0 OUT= MAC=52:54:00:12:34:56 SRC=198.51.100.7 "
            "DST=192.168.1.10 LEN=44 TOS=0x00 PREC=0x00 TTL=243 ID=54321 PROTO=TCP SPT=41234 "
            "DPT=23 WINDOW=1024 RES=0x00 SYN URGP=0")
FAILURE = "error: builder for '/nix/store/abc-foo.drv' failed with exit code 1"
OOM = ("Out of memory: Killed process 31337 (postgres) total-vm:8123456kB, "
       "anon-rss:6012345kB, file-rss:0kB")


def examples_file(tmp: Path, *items: tuple[str, bool]) -> Path:
    path = tmp / "examples.toml"
    path.write_text("".join(
        f'[[example]]\nmessage = "{m}"\nanomaly = {"true" if a else "false"}\n\n'
        for m, a in items))
    return path


def line(message: str, unit: str | None = None, priority: int = 6) -> Event:
    return Event(host="h", source="journald", unit=unit, priority=priority, message=message)


# -- the file ----------------------------------------------------------------------------


def test_packaged_examples_load_and_include_harmless_ones() -> None:
    items = load_examples()
    assert len(items) >= 20
    assert any(not e.anomaly for e in items) and any(e.anomaly for e in items)


def test_bad_examples_file_is_one_readable_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[example]]\nmessage = "x"\n')
    with pytest.raises(ExamplesError, match=r"bad.toml: example\.0\.anomaly: Field required"):
        load_examples(bad)
    with pytest.raises(ExamplesError, match="No such file"):
        load_examples(tmp_path / "missing.toml")


# -- the stage, on real layers -------------------------------------------------------------


def stage_settings(tmp: Path, stack: Stack, file: Path, *, trigger_port: int | None = None,
                   embeddings_layer: str = "meta") -> Settings:
    ports = dict(stack.ports)
    if trigger_port is not None:
        ports["trigger"] = trigger_port
    return Settings.model_validate({
        "state_dir": str(tmp / "state"), "memory": {"enabled": False},
        "layers": {n: {"port": p, "managed": False} for n, p in ports.items()},
        "gateway": {"embeddings_layer": embeddings_layer},
        "pipeline": {"examples_file": str(file), "layer_retries": 0},
    })


@contextlib.asynccontextmanager
async def layer_clients(settings: Settings) -> AsyncIterator[LayerClients]:
    clients = LayerClients(settings)
    try:
        yield clients
    finally:
        await clients.aclose()


def trigger_stage(settings: Settings, store: Store, ex: examples.Examples | None,
                  clients: LayerClients) -> TriggerStage:
    return TriggerStage(settings, store, clients["trigger"], Prefilter(load_rules(), debounce=0),
                        VerdictBus(), ex)


async def candidates(stage: TriggerStage, store: Store, events: list[Event]) -> list[StoredEvent]:
    await store.events.add(events)
    await stage.prefilter_new()
    return await store.events.claim("candidate", 100)


@pytest.mark.slow
async def test_line_like_a_harmless_example_is_judged_without_the_trigger_layer(
    tmp_path: Path, stack: Stack, store: Store
) -> None:
    file = examples_file(tmp_path, (HARMLESS.replace("198.51.100.7", "203.0.113.9"), False),
                         (FAILURE.replace("abc-foo", "def-bar"), True))
    # The trigger layer is down (nothing listens there): a dismissed line needs none.
    settings = stage_settings(tmp_path, stack, file, trigger_port=free_port())
    async with layer_clients(settings) as clients:
        stage = trigger_stage(settings, store, examples.configured(settings, clients), clients)
        cands = await candidates(stage, store, [line(HARMLESS, "kernel"), line(FAILURE)])
        assert {c.rule for c in cands} == {"error_words"}  # both at the info floor
        left = await stage.judge_by_examples(cands)
        # The failure is nearest to the failure example: it waits for the trigger layer.
        assert [e.message for e in left] == [FAILURE]
        (v,) = await store.verdicts.after(0)
        assert v.message == HARMLESS and not v.anomaly and v.severity == "info"
        assert v.summary_by == "example" and v.example is not None and "203.0.113.9" in v.example
        assert v.summary.startswith('like the harmless example "refused connection')
        assert v.model_dump()["summary_by"] == "example"  # in the API and the stream
        assert await store.incidents.list() == []


@pytest.mark.slow
async def test_critical_rule_is_never_overruled_by_an_example(
    tmp_path: Path, stack: Stack, store: Store
) -> None:
    file = examples_file(tmp_path, (OOM, False))  # the very line, labelled harmless
    settings = stage_settings(tmp_path, stack, file)
    async with layer_clients(settings) as clients:
        stage = trigger_stage(settings, store, examples.configured(settings, clients), clients)
        cands = await candidates(stage, store, [line(OOM, "postgresql.service", 3)])
        assert [c.rule for c in cands] == ["oom_kill"]
        assert await stage.judge_by_examples(cands) == cands
        assert await store.verdicts.after(0) == []


@pytest.mark.slow
async def test_without_embeddings_every_candidate_goes_to_the_layer(
    tmp_path: Path, stack: Stack, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    file = examples_file(tmp_path, (HARMLESS, False))
    # The session stack's trigger layer runs without --embeddings: it answers 501.
    settings = stage_settings(tmp_path, stack, file, embeddings_layer="trigger")
    async with layer_clients(settings) as clients:
        stage = trigger_stage(settings, store, examples.configured(settings, clients), clients)
        cands = await candidates(stage, store, [line(HARMLESS, "kernel")])
        with caplog.at_level(logging.WARNING, "ai_sysadmin.pipeline.examples"):
            assert await stage.judge_by_examples(cands) == cands
            assert await stage.judge_by_examples(cands) == cands
        warnings = [r for r in caplog.records if "labelled examples unused" in r.message]
        assert len(warnings) == 1  # said once, not for every batch
        assert await store.verdicts.after(0) == []


@pytest.mark.slow
async def test_a_flood_of_one_message_is_embedded_once(
    tmp_path: Path, stack: Stack, store: Store
) -> None:
    file = examples_file(tmp_path, (HARMLESS, False), (FAILURE, True))
    settings = stage_settings(tmp_path, stack, file)
    embedded: list[int] = []
    async with layer_clients(settings) as clients:

        async def embed(texts: list[str]) -> list[list[float]]:
            embedded.append(len(texts))
            return await clients["meta"].embeddings(texts)

        stage = trigger_stage(settings, store, examples.Examples(load_examples(file), embed),
                              clients)
        flood = [line(HARMLESS.replace("SPT=41234", f"SPT={40000 + i}"), "kernel")
                 for i in range(6)]
        cands = await candidates(stage, store, flood[:3])
        assert await stage.judge_by_examples(cands) == []
        assert embedded == [2, 1]  # the examples once, then one text for three alike lines
        cands = await candidates(stage, store, flood[3:])
        assert await stage.judge_by_examples(cands) == []
        assert embedded == [2, 1]  # known fingerprint: no embeddings call at all
        assert len(await store.verdicts.after(0)) == 6
