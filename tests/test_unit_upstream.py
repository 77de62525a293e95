"""layers/client.py's Upstream and layers/sse.py without a layer: a scripted response
stands in for the transport, so the framing, renaming and error translation a route
relies on are checked on their own (only LayerError subclasses come out)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import pytest

from layers import http
from layers.client import LayerBrokeOff, LayerClients, LayerError, LayerTimeout, Upstream
from layers.config import Settings
from layers.sse import Rename, error_event, events_end
from tests.test_unit_client import FakeHTTP, pool


class Scripted:
    """A response whose body arrives in ``pieces``; an exception among them is raised."""

    def __init__(self, pieces: Sequence[bytes | Exception], content_type: str = "text/event-stream"):
        self.status_code = 200
        self.headers = {"content-type": content_type}
        self.pieces = pieces
        self.closed = False

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        for piece in self.pieces:
            if isinstance(piece, Exception):
                raise piece
            yield piece

    async def aread(self) -> bytes:
        return b"".join([p async for p in self.aiter_raw()])

    async def aclose(self) -> None:
        self.closed = True


async def upstream(response: Scripted) -> Upstream:
    p = pool(FakeHTTP())
    up = await p.open("/chat/completions", {"model": "meta", "messages": []})
    await up.response.aclose()
    up.response = response  # type: ignore[assignment]
    return up


def test_events_end_is_the_last_blank_line_in_either_line_ending() -> None:
    assert events_end(b"data: 1\n\ndata: 2") == 9
    assert events_end(b"data: 1\r\n\r\n") == 11
    assert events_end(b"data: 1\n") == 0


def test_rename_replaces_every_event_and_only_an_answers_first_model() -> None:
    r = Rename.of(b"meta", "ai-sysadmin")
    assert r is not None and Rename.of(None, "x") is None
    two = b'{"model":"meta"}{"model":"meta"}'
    assert r.events(two) == b'{"model":"ai-sysadmin"}{"model":"ai-sysadmin"}'
    assert r.answer(two) == b'{"model":"ai-sysadmin"}{"model":"meta"}'
    assert error_event("m", "c").startswith(b'data: {"error": {"message": "m"')


async def test_events_come_whole_as_they_arrive_renamed_and_the_tail_closed() -> None:
    up = await upstream(Scripted([b'data: {"model":"meta"}\n', b'\ndata: {"a"', b":1}\n\n",
                                  b"data: [DONE]"]))
    got = [e async for e in up.events(Rename.of(b"meta", "ai-sysadmin"))]
    assert got == [b'data: {"model":"ai-sysadmin"}\n\n', b'data: {"a":1}\n\n',
                   b"data: [DONE]\n\n"]
    await up.aclose()


@pytest.mark.parametrize(("error", "raised"), [
    (http.ProtocolError("cut"), LayerBrokeOff),
    (http.ReadTimeout("slow"), LayerTimeout),
])
async def test_transport_errors_come_out_as_layer_errors(
    error: Exception, raised: type[LayerError]
) -> None:
    up = await upstream(Scripted([b"data: 1\n\n", error]))
    with pytest.raises(raised) as exc:
        _ = [e async for e in up.events()]
    if isinstance(exc.value, LayerBrokeOff):
        assert exc.value.cause == "ProtocolError" and exc.value.status == 502
    up2 = await upstream(Scripted([b"{}", error], "application/json"))
    with pytest.raises(raised):
        await up2.read()
    await up.aclose()
    await up2.aclose()


async def test_read_json_and_fail() -> None:
    up = await upstream(Scripted([b'{"ok"', b": 1}"], "application/json"))
    assert not up.streams
    assert await up.read_json() == {"ok": 1}
    up.fail("test")
    assert up.endpoint.breaker.failures == 1
    await up.aclose()
    bad = await upstream(Scripted([b"[1]"], "application/json"))
    with pytest.raises(LayerError, match="non-object"):
        await bad.read_json()
    await bad.aclose()


async def test_a_stream_past_its_deadline_times_out() -> None:
    up = await upstream(Scripted([b"data: 1\n\n", b"data: 2\n\n"]))
    with pytest.raises(LayerTimeout):
        _ = [e async for e in up.events(deadline=0.0)]
    await up.aclose()


async def test_the_layer_client_reads_at_most_gateway_max_answer_bytes() -> None:
    settings = Settings.model_validate({"gateway": {"max_answer_bytes": 65536}})
    clients = LayerClients(settings)
    assert clients.client.max_body == 65536
    await clients.aclose()
