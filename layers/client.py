"""Clients of the layers: each layer is one or more OpenAI-compatible endpoints.

A :class:`LayerPool` owns a layer's endpoints (replicas first, balanced by free slots,
then fallbacks in order), a circuit breaker per endpoint, and a bounded admission queue
matched to the layer's slots. Requests that have not started streaming are retried on
the next endpoint; once bytes have reached a client nothing is retried.

Both the gateway (proxying) and the pipeline (structured calls) use this module.
Pipeline calls get a deadline from the endpoint's measured speed (layers/deadline.py);
the gateway's proxied requests keep the fixed ``gateway.timeouts``. A timeout counts as a
breaker failure only when the endpoint's ``/health`` does not answer either: a layer that
is up but slow (three layers sharing two cores) is not dead.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ValidationError

from layers import http
from layers.config import LAYER_NAMES, EndpointConfig, LayerConfig, LayerName, Settings
from layers.deadline import Deadline, DeadlineRule, Speed, Work
from layers.errors import Unavailable
from layers.sse import Rename, events_end

log = logging.getLogger("ai_sysadmin.client")

# Sampling temperature of a request asked again because its answer was unusable
# (truncated, invalid, or refused as degenerate by the stages): at temperature 0 the same
# prompt gives the same answer (a fresh nonce alone barely changes it).
RETRY_TEMPERATURE = 0.5
# Each try after the first also gets its own sampling seed: two retries at the same
# temperature and seed would be identical work (the bench counted 4 of 84 requests so
# before seeds: the second and third try of a truncated batch, both at 0.5).
SEEDS_PER_ATTEMPT = 100


def retry_sampling(attempt: int, temperature: float = 0.0, seed: int = 0) -> dict[str, Any]:
    """Sampling fields of try ``attempt`` (0: the first): the first as asked, each later
    one at least ``RETRY_TEMPERATURE`` with a seed of its own."""
    if attempt == 0:
        return {"temperature": temperature}
    return {"temperature": max(temperature, RETRY_TEMPERATURE), "seed": seed + attempt}

M = TypeVar("M", bound=BaseModel)
Flavor = Literal["llama-server", "llama-cpp-python", "openai"]
EndpointHealth = Literal["ready", "loading", "down", "unknown"]


class LayerError(Unavailable):
    """A layer could not answer. ``status`` is what the gateway returns to its client."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        retry_after: float | None = None,
        upstream_body: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.retry_after = retry_after
        self.upstream_body = upstream_body


class LayerTimeout(LayerError):
    """No answer within the deadline. ``alive``: the endpoint's ``/health`` answered
    after the timeout (slow, not dead); ``final``: the deadline was already the
    ceiling (``gateway.timeouts.total``), a later try of the same work gets no longer."""

    def __init__(self, message: str, *, deadline: float, alive: bool, final: bool) -> None:
        super().__init__(504, message, code="upstream_timeout")
        self.deadline = deadline
        self.alive = alive
        self.final = final


class StructuredOutputError(LayerError):
    """Layer output that was cut off or does not match the schema: never a default."""

    def __init__(self, message: str, *, raw: str = "", finish_reason: str | None = None) -> None:
        super().__init__(502, message, code="invalid_layer_output")
        self.raw = raw
        self.finish_reason = finish_reason


# -- circuit breaker -----------------------------------------------------------------


@dataclass
class Breaker:
    """closed → (N consecutive failures) → open → (after reset_after) → half-open: one
    trial request; its success closes, its failure re-opens."""

    failures_to_open: int
    reset_after: float
    failures: int = 0
    opened_at: float | None = None
    trial_in_flight: bool = False

    @property
    def state(self) -> Literal["closed", "open", "half-open"]:
        if self.opened_at is None:
            return "closed"
        if time.monotonic() - self.opened_at >= self.reset_after:
            return "half-open"
        return "open"

    def available(self) -> bool:
        """Whether a request may be sent now, as :meth:`allow` says, without taking a
        half-open breaker's one trial (an endpoint listed is not yet an endpoint tried)."""
        state = self.state
        return state == "closed" or (state == "half-open" and not self.trial_in_flight)

    def allow(self) -> bool:
        """Whether this request may be sent now; in half-open, it takes the one trial."""
        state = self.state
        if state == "closed":
            return True
        if state == "half-open" and not self.trial_in_flight:
            self.trial_in_flight = True
            return True
        return False

    def success(self) -> None:
        self.failures = 0
        self.opened_at = None
        self.trial_in_flight = False

    def abandon(self) -> None:
        """A request sent through this breaker ended without a verdict (cancelled): a
        trial it held decided nothing, and the next request may try again."""
        self.trial_in_flight = False

    def failure(self) -> None:
        self.failures += 1
        self.trial_in_flight = False
        if self.opened_at is not None or self.failures >= self.failures_to_open:
            self.opened_at = time.monotonic()

    def seconds_until_trial(self) -> float:
        if self.opened_at is None:
            return 0.0
        return max(0.0, self.reset_after - (time.monotonic() - self.opened_at))


# -- endpoints ---------------------------------------------------------------------


@dataclass
class Endpoint:
    url: str  # base URL including /v1
    role: Literal["replica", "fallback"]
    flavor: Flavor
    breaker: Breaker
    slots: int
    api_key: str | None = None
    model: str | None = None
    inflight: int = 0
    health: EndpointHealth = "unknown"
    checked_at: float = 0.0
    speed: Speed = field(default_factory=Speed)
    slow_timeouts: int = 0  # timeouts while /health answered: not breaker failures
    _probing: asyncio.Lock = field(default_factory=asyncio.Lock, init=False, repr=False)

    @property
    def root(self) -> str:
        return self.url[:-3] if self.url.endswith("/v1") else self.url

    @property
    def health_url(self) -> str:
        if self.flavor == "llama-server":
            return f"{self.root}/health"
        return f"{self.url}/models"

    def headers(self) -> dict[str, str]:
        h = {"content-type": "application/json"}
        if self.api_key:
            h["authorization"] = f"Bearer {self.api_key}"
        return h


class Limiter:
    """At most ``capacity`` requests in flight; at most ``max_queue`` waiting; beyond, 429."""

    def __init__(self, capacity: int, max_queue: int) -> None:
        self.capacity = capacity
        self.max_queue = max_queue
        self.inflight = 0
        self.waiting = 0
        self._cond = asyncio.Condition()

    async def acquire(self, layer: str) -> None:
        if self.inflight < self.capacity and self.waiting == 0:
            self.inflight += 1
            return
        if self.waiting >= self.max_queue:
            raise LayerError(
                429,
                f"layer {layer} is saturated ({self.inflight} running, {self.waiting} queued)",
                code="layer_saturated",
                retry_after=1.0,
            )
        self.waiting += 1
        try:
            async with self._cond:
                await self._cond.wait_for(lambda: self.inflight < self.capacity)
                self.inflight += 1
        finally:
            self.waiting -= 1

    async def release(self) -> None:
        self.inflight -= 1
        if self.waiting:
            # notify_all: a waiter cancelled after being notified must not swallow the
            # wake-up; each waiter re-checks the capacity under the lock.
            async with self._cond:
                self._cond.notify_all()


class LayerBrokeOff(LayerError):
    """The layer's answer broke off after its head (connection lost, bad framing, a
    stream that ended early). ``cause``: what the transport saw, for messages."""

    def __init__(self, message: str, *, cause: str) -> None:
        super().__init__(502, message, code="upstream_error")
        self.cause = cause


@dataclass
class Upstream:
    """One open answer of a layer (its head received, 2xx), as :meth:`LayerPool.open`
    returns it: read its body or its events, report it failed, close it.

    It raises only :class:`LayerError` (:class:`LayerTimeout`, :class:`LayerBrokeOff`):
    callers never see the transport (layers/http.py) behind it."""

    response: http.Response
    endpoint: Endpoint
    pool: LayerPool
    started: float
    deadline: Deadline | None = None  # pipeline calls: the deadline it was sent with
    _closed: bool = field(default=False, repr=False)

    @property
    def streams(self) -> bool:
        """The answer is server-sent events (an endpoint may ignore ``stream``)."""
        return self.response.headers.get("content-type", "").startswith("text/event-stream")

    async def read(self) -> bytes:
        """The whole body."""
        try:
            return await self.response.aread()
        except http.TimeoutException:
            raise self._timed_out() from None
        except http.HTTPError as exc:
            raise self.broke_off(type(exc).__name__) from None

    async def read_json(self) -> dict[str, Any]:
        """The whole body, a JSON object."""
        raw = await self.read()
        name = self.pool.name
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise LayerError(502, f"layer {name} answered with invalid JSON",
                             code="upstream_error") from exc
        if not isinstance(data, dict):
            raise LayerError(502, f"layer {name} answered with a non-object",
                             code="upstream_error")
        return data

    async def events(
        self, rename: Rename | None = None, *, deadline: float | None = None
    ) -> AsyncIterator[bytes]:
        """Whole server-sent events as they arrive: each item one or more events (all that
        one arrival completed, so they reach the client in one write), renamed with
        ``rename``. An unterminated last event is given a blank line. ``deadline``
        (``time.perf_counter()``): a stream still sending then is timed out."""
        pending = b""
        try:
            async for chunk in self.response.aiter_raw():
                if deadline is not None and time.perf_counter() > deadline:
                    raise self._timed_out()
                pending += chunk
                cut = events_end(pending)
                if not cut:
                    continue
                out, pending = pending[:cut], pending[cut:]
                yield out if rename is None else rename.events(out)
        except http.TimeoutException:
            raise self._timed_out() from None
        except http.HTTPError as exc:
            raise self.broke_off(type(exc).__name__) from None
        if pending.strip():
            yield pending + b"\n\n"

    def broke_off(self, cause: str) -> LayerBrokeOff:
        return LayerBrokeOff(f"layer {self.pool.name} broke off its answer", cause=cause)

    def _timed_out(self) -> LayerTimeout:
        # The head came, then the body stopped: the layer was answering, so it is alive.
        d = self.deadline
        if d is not None:
            self.endpoint.speed.timed_out(d)
        return LayerTimeout(f"layer {self.pool.name} timed out",
                            deadline=d.seconds if d else self.pool.timeout.read, alive=True,
                            final=d.final if d else True)

    def fail(self, reason: str) -> None:
        """The answer was unusable (broken, or not what the endpoint must send): a failure
        of its endpoint's circuit breaker."""
        log.debug("layer %s (%s) failed: %s", self.pool.name, self.endpoint.url, reason)
        self.endpoint.breaker.failure()

    async def aclose(self) -> None:
        """Free the endpoint's slot and the pool's admission place; an answer not read to
        its end closes the connection (llama-server then stops generating)."""
        if self._closed:
            return
        self._closed = True
        self.endpoint.inflight -= 1
        try:
            await self.response.aclose()
        finally:
            await self.pool.limiter.release()


# -- translation per engine ------------------------------------------------------------


def translate_chat_body(body: dict[str, Any], endpoint: Endpoint) -> dict[str, Any]:
    """Adapt an OpenAI chat body to what the endpoint's engine understands."""
    if "max_completion_tokens" in body:
        mct = body.pop("max_completion_tokens")
        if endpoint.flavor != "openai" and mct is not None and body.get("max_tokens") is None:
            body["max_tokens"] = mct
        elif endpoint.flavor == "openai":
            body["max_completion_tokens"] = mct
    if endpoint.model:
        body["model"] = endpoint.model
    rf = body.get("response_format")
    if endpoint.flavor == "llama-cpp-python" and isinstance(rf, dict):
        # llama-cpp-python takes {"type": "json_object", "schema": …} only.
        if rf.get("type") == "json_schema":
            schema = (rf.get("json_schema") or {}).get("schema")
            body["response_format"] = {"type": "json_object", "schema": schema}
        body.pop("stream_options", None)
    return body


# -- one layer -------------------------------------------------------------------------


class LayerPool:
    def __init__(
        self,
        name: LayerName,
        layer: LayerConfig,
        settings: Settings,
        client: http.HTTPClient,
    ) -> None:
        self.name = name
        self.layer = layer
        self.client = client
        g = settings.gateway
        self.retries = g.breaker.retries
        self.timeout = http.Timeouts(connect=g.timeouts.connect, read=g.timeouts.first_byte)
        p = settings.pipeline
        self.deadline_rule = DeadlineRule(factor=p.deadline_factor, floor=p.deadline_floor,
                                          ceiling=g.timeouts.total, fallback=g.timeouts.first_byte)
        # How long the /health check after a timeout may take: a layer whose HTTP thread
        # cannot answer that within a connect timeout is not merely slow.
        self.liveness_timeout = max(2.0, g.timeouts.connect)
        local_flavor: Flavor = (
            "llama-cpp-python" if settings.engine.kind == "llama-cpp-python" else "llama-server"
        )
        self.endpoints: list[Endpoint] = []
        for i, ep in enumerate(layer.endpoint_list()):
            is_local = i == 0 and (layer.managed or not layer.endpoints)
            self.endpoints.append(self._endpoint(ep, local_flavor if is_local else "llama-server",
                                                 g.breaker.failures, g.breaker.reset_after))
        replicas = [e for e in self.endpoints if e.role == "replica"] or self.endpoints[:1]
        capacity = sum(e.slots for e in replicas)
        self.limiter = Limiter(capacity, layer.max_queue)

    def _endpoint(self, ep: EndpointConfig, flavor: Flavor, failures: int, reset: float) -> Endpoint:
        url = ep.url.rstrip("/")
        # A remote URL that is not a llama-server is treated as plain OpenAI.
        if ep.model is not None or "api.openai.com" in url:
            flavor = "openai"
        return Endpoint(
            url=url,
            role=ep.role,
            flavor=flavor,
            breaker=Breaker(failures, reset),
            slots=self.layer.parallel,
            api_key=ep.api_key,
            model=ep.model,
        )

    # -- choosing endpoints --

    def candidates(self) -> list[Endpoint]:
        """Replicas with the most free slots first, then fallbacks in configured order;
        endpoints whose breaker is open are left out. A half-open one is listed; the
        request that tries it takes its one trial (``Breaker.allow`` in ``_open``)."""
        replicas = sorted(
            (e for e in self.endpoints if e.role == "replica"),
            key=lambda e: (e.health == "down", e.inflight - e.slots),
        )
        fallbacks = [e for e in self.endpoints if e.role == "fallback"]
        return [e for e in replicas + fallbacks if e.breaker.available()]

    def retry_after(self) -> float:
        waits = [e.breaker.seconds_until_trial() for e in self.endpoints]
        return max(1.0, min(waits) if waits else 1.0)

    # -- requests --

    async def open(
        self,
        path: str,
        body: dict[str, Any],
        *,
        extra_headers: Mapping[str, str] | None = None,
        work: Work | None = None,
    ) -> Upstream:
        """Send a POST and return once the upstream answered 2xx (headers only).

        Retries on the next endpoint for connect errors, timeouts, 5xx and 429 — all
        before any byte went to the client. 4xx from the layer is the client's error.
        With ``work`` (pipeline calls) the read deadline follows the endpoint's measured
        speed; without it, it is ``gateway.timeouts.first_byte``.
        """
        await self.limiter.acquire(self.name)
        try:
            return await self._open(path, body, extra_headers, work)
        except BaseException:
            await self.limiter.release()
            raise

    def deadline(self, endpoint: Endpoint, work: Work) -> Deadline:
        return endpoint.speed.deadline(work, self.deadline_rule)

    async def _open(
        self,
        path: str,
        body: dict[str, Any],
        extra_headers: Mapping[str, str] | None,
        work: Work | None,
    ) -> Upstream:
        candidates = self.candidates()
        if not candidates:
            raise LayerError(
                503, f"layer {self.name} is down (circuit open)", code="layer_unavailable",
                retry_after=self.retry_after(),
            )
        last: LayerError | None = None
        tries = 0
        for endpoint in candidates:
            if tries > self.retries:
                break
            trial = endpoint.breaker.state == "half-open"
            if not endpoint.breaker.allow():
                continue  # opened, or its trial taken, while earlier endpoints were tried
            tries += 1
            payload = translate_chat_body(dict(body), endpoint) if "chat" in path else dict(body)
            if endpoint.model and "chat" not in path:
                payload["model"] = endpoint.model
            headers = endpoint.headers()
            if extra_headers:
                headers.update(extra_headers)
            deadline = self.deadline(endpoint, work) if work is not None else None
            timeout = self.timeout if deadline is None else http.Timeouts(
                connect=self.timeout.connect, read=deadline.seconds)
            started = time.perf_counter()
            try:
                response = await self.client.request(
                    "POST", endpoint.url + path, content=json.dumps(payload).encode(),
                    headers=headers, timeout=timeout,
                )
            except (http.ConnectError, http.ProtocolError) as exc:
                endpoint.breaker.failure()
                endpoint.health = "down"
                last = LayerError(
                    503, f"layer {self.name} is unreachable ({type(exc).__name__})",
                    code="layer_unavailable", retry_after=self.retry_after(),
                )
                continue
            except http.TimeoutException:
                last = await self._timed_out(endpoint, timeout.read, deadline)
                continue
            except BaseException:
                if trial:  # cancelled: the trial decided nothing and must not stay taken
                    endpoint.breaker.abandon()
                raise
            if response.status_code < 400:
                endpoint.breaker.success()
                endpoint.health = "ready"
                endpoint.inflight += 1
                return Upstream(response, endpoint, self, started, deadline)
            error = await self._error_from(response)
            if response.status_code in (500, 502, 503, 504, 429):
                if response.status_code != 503:  # loading is not a fault of the endpoint
                    endpoint.breaker.failure()
                else:
                    endpoint.health = "loading"
                last = error
                continue
            raise error  # a 4xx: the request itself is wrong; retrying cannot help
        if last is None:  # every candidate was taken or opened by other requests meanwhile
            raise LayerError(
                503, f"layer {self.name} is down (circuit open)", code="layer_unavailable",
                retry_after=self.retry_after(),
            )
        raise last

    async def _timed_out(
        self, endpoint: Endpoint, seconds: float, deadline: Deadline | None
    ) -> LayerTimeout:
        """Account for a request that got no answer in time, and say whether the endpoint
        is alive: slow (``/health`` answers) is not a breaker failure, silent is."""
        if deadline is not None:
            endpoint.speed.timed_out(deadline)
        alive = await self.alive(endpoint)
        if alive:
            endpoint.slow_timeouts += 1
            how = "it is up (/health answers) but slow"
        else:
            endpoint.breaker.failure()
            how = "nor does its /health"
        log.warning("layer %s (%s) did not answer within %.0fs; %s", self.name, endpoint.url,
                    seconds, how)
        return LayerTimeout(
            f"layer {self.name} did not answer within {seconds:.0f}s", deadline=seconds,
            alive=alive, final=deadline.final if deadline is not None else True,
        )

    async def alive(self, endpoint: Endpoint) -> bool:
        """Whether the endpoint answers ``/health`` (ready or loading). Concurrent
        timeouts of one endpoint share one check; a check younger than a second is
        reused."""
        async with endpoint._probing:
            if time.monotonic() - endpoint.checked_at > 1.0:
                await self._probe_one(endpoint, self.liveness_timeout)
            return endpoint.health in ("ready", "loading")

    async def _error_from(self, response: http.Response) -> LayerError:
        try:
            raw = await response.aread()
        except http.HTTPError:
            raw = b""
        finally:
            await response.aclose()
        upstream: dict[str, Any] | None = None
        message = raw[:500].decode("utf-8", "replace").strip()
        try:
            data = json.loads(raw)
            if isinstance(data, dict):
                upstream = data
                err = data.get("error")
                if isinstance(err, dict) and err.get("message"):
                    message = str(err["message"])
                elif isinstance(err, str):
                    message = err
        except ValueError:
            pass
        status = response.status_code
        if status == 503:
            return LayerError(503, f"layer {self.name} is loading its model", code="layer_loading",
                              retry_after=2.0, upstream_body=upstream)
        if status == 429:
            return LayerError(429, f"layer {self.name} is busy", code="layer_saturated",
                              retry_after=1.0, upstream_body=upstream)
        if status >= 500:
            return LayerError(502, f"layer {self.name} failed: {message or status}",
                              code="upstream_error", upstream_body=upstream)
        if status in (404, 501):
            # A 404 from a layer means it lacks the route (e.g. embeddings not enabled).
            return LayerError(400, f"layer {self.name}: {message or 'not supported'}",
                              code="unsupported_by_layer", upstream_body=upstream)
        return LayerError(400, f"layer {self.name} rejected the request: {message}",
                          code="invalid_request", upstream_body=upstream)

    async def request_json(
        self, path: str, body: dict[str, Any], *, work: Work | None = None
    ) -> dict[str, Any]:
        """POST and read a JSON object. With ``work`` the answer's speed is measured for
        the endpoint's next deadlines."""
        upstream = await self.open(path, body, work=work)
        try:
            data = await upstream.read_json()
        finally:
            await upstream.aclose()
        if work is not None:
            upstream.endpoint.speed.observe(data, time.perf_counter() - upstream.started,
                                            work.prompt_chars)
        return data

    async def chat(self, body: dict[str, Any], *, work: Work | None = None) -> dict[str, Any]:
        body = {**body, "stream": False}
        body.setdefault("model", self.name)
        return await self.request_json("/chat/completions", body, work=work)

    async def chat_json(
        self,
        messages: list[dict[str, Any]],
        schema: type[M],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        retries: int = 1,
        seed: int | None = None,
    ) -> M:
        """A JSON-schema constrained completion, validated. Truncated output
        (``finish_reason: length``) or output that does not validate is retried — with
        at least ``RETRY_TEMPERATURE`` and a seed of its own (:func:`retry_sampling`): the
        same request gives the same answer, so an identical resend would be work repeated
        for nothing — then raised
        as :class:`StructuredOutputError` — the caller must never assume health."""
        body = {
            "model": self.name,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": schema.__name__, "schema": schema.model_json_schema(),
                                "strict": True},
            },
        }
        work = Work(prompt_chars=sum(len(str(m.get("content") or "")) for m in messages),
                    max_tokens=max_tokens)
        error: StructuredOutputError | None = None
        if seed is not None:
            body["seed"] = seed
        for attempt in range(retries + 1):
            if attempt:
                body.update(retry_sampling(attempt, temperature, seed or 0))
            data = await self.chat(body, work=work)
            try:
                choice = data["choices"][0]
                content = choice["message"]["content"] or ""
                finish = choice.get("finish_reason")
            except (KeyError, IndexError, TypeError):
                error = StructuredOutputError(f"layer {self.name}: answer has no message")
                continue
            if finish == "length":
                error = StructuredOutputError(
                    f"layer {self.name}: output truncated at max_tokens={max_tokens}",
                    raw=content, finish_reason=finish,
                )
                continue
            try:
                return schema.model_validate_json(content)
            except ValidationError as exc:
                error = StructuredOutputError(
                    f"layer {self.name}: output does not match {schema.__name__}: "
                    f"{exc.errors()[0]['msg']}", raw=content, finish_reason=finish,
                )
        assert error is not None
        raise error

    async def embeddings(self, inputs: list[str]) -> list[list[float]]:
        data = await self.request_json("/embeddings", {"model": self.name, "input": inputs})
        try:
            items = sorted(data["data"], key=lambda d: d.get("index", 0))
            return [list(map(float, d["embedding"])) for d in items]
        except (KeyError, TypeError, ValueError) as exc:
            raise LayerError(502, f"layer {self.name}: malformed embeddings answer",
                             code="upstream_error") from exc

    # -- health --

    async def probe(self, timeout: float = 2.0) -> EndpointHealth:
        """Check every endpoint's health; the layer's state is its best endpoint's."""
        results = await asyncio.gather(*(self._probe_one(e, timeout) for e in self.endpoints))
        for state in ("ready", "loading", "unknown"):
            if state in results:
                return state  # type: ignore[return-value]
        return "down"

    async def _probe_one(self, endpoint: Endpoint, timeout: float) -> EndpointHealth:
        try:
            r = await self.client.get(endpoint.health_url, headers=endpoint.headers(),
                                      timeout=timeout)
            if r.status_code == 200:
                endpoint.health = "ready"
            elif r.status_code == 503:
                endpoint.health = "loading"
            else:
                endpoint.health = "down"
        except http.HTTPError:
            endpoint.health = "down"
        endpoint.checked_at = time.monotonic()
        return endpoint.health

    @property
    def state(self) -> EndpointHealth:
        states = [e.health for e in self.endpoints]
        for s in ("ready", "loading", "unknown"):
            if s in states:
                return s  # type: ignore[return-value]
        return "down"


class LayerClients:
    """The three layers behind one pooled :class:`layers.http.HTTPClient`."""

    def __init__(self, settings: Settings, client: http.HTTPClient | None = None) -> None:
        g = settings.gateway
        self.client = client or http.HTTPClient(spare=g.spare_connections,
                                                max_body=g.max_answer_bytes)
        self.pools: dict[str, LayerPool] = {
            name: LayerPool(name, layer, settings, self.client)
            for name, layer in settings.layers.items()
        }

    def __getitem__(self, name: str) -> LayerPool:
        return self.pools[name]

    def __contains__(self, name: object) -> bool:
        return name in self.pools

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.pools.values())

    async def probe_all(self) -> dict[str, EndpointHealth]:
        states = await asyncio.gather(*(self.pools[n].probe() for n in LAYER_NAMES))
        return dict(zip(LAYER_NAMES, states, strict=True))

    async def aclose(self) -> None:
        await self.client.aclose()
