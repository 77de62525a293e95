"""Prometheus metrics of the gateway, in a registry of its own (one per app)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
OVERHEAD_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "ai_sysadmin_requests", "HTTP requests by route, model and status",
            ["route", "model", "status"], registry=r,
        )
        self.latency = Histogram(
            "ai_sysadmin_request_seconds", "Request latency until the last byte",
            ["route", "model"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.ttft = Histogram(
            "ai_sysadmin_time_to_first_token_seconds", "Time to the first streamed chunk",
            ["model"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.overhead = Histogram(
            "ai_sysadmin_gateway_overhead_seconds",
            "Time the gateway itself spends on a request (parse, route, forward)",
            ["route"], buckets=OVERHEAD_BUCKETS, registry=r,
        )
        self.layer_up = Gauge(
            "ai_sysadmin_layer_up", "1 when the endpoint answers /health with 200",
            ["layer", "endpoint"], registry=r,
        )
        self.breaker_open = Gauge(
            "ai_sysadmin_layer_breaker_state", "Circuit breaker: 0 closed, 1 half-open, 2 open",
            ["layer", "endpoint"], registry=r,
        )
        self.inflight = Gauge(
            "ai_sysadmin_layer_inflight_requests", "Requests being served by a layer",
            ["layer"], registry=r,
        )
        self.queued = Gauge(
            "ai_sysadmin_layer_queued_requests", "Requests waiting for a layer slot",
            ["layer"], registry=r,
        )
        # Leaks show as growth here under steady load: open fds and resident memory of the
        # process (process_open_fds, process_resident_memory_bytes, Linux /proc) and the
        # asyncio tasks alive (a request that leaves a task behind raises it for good).
        ProcessCollector(registry=r)
        self.tasks = Gauge(
            "ai_sysadmin_asyncio_tasks", "asyncio tasks alive in the gateway's event loop",
            registry=r,
        )
        self.stream_errors = Counter(
            "ai_sysadmin_stream_errors", "Streams that ended with an error event",
            ["model"], registry=r,
        )
