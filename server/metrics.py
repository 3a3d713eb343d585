"""The gateway's Prometheus metrics (names fixed by DESIGN.md, used by the dashboards).

Each app gets its own registry so several gateways can live in one test process.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)

# `_created` series double the output and no dashboard reads them.
disable_created_metrics()

# Latency buckets from 5 ms to 10 min: covers a proxied health probe and a long CPU prefill.
LATENCY_BUCKETS_S = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)


@dataclass
class GatewayMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter(
            "tessera_requests", "Requests answered by the gateway.", ["route", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            "tessera_request_duration_seconds", "Gateway request latency, end to end.",
            ["route"], buckets=LATENCY_BUCKETS_S, registry=r,
        )
        self.time_to_first_token = Histogram(
            "tessera_time_to_first_token_seconds",
            "From request arrival to the first streamed chunk leaving the gateway.",
            ["route"], buckets=LATENCY_BUCKETS_S, registry=r,
        )
        self.stage_duration = Histogram(
            "tessera_pipeline_stage_seconds", "Time spent in each request pipeline stage.",
            ["stage"], buckets=LATENCY_BUCKETS_S, registry=r,
        )
        self.upstream_errors = Counter(
            "tessera_upstream_errors", "Failed attempts to reach a worker.", ["worker", "kind"],
            registry=r,
        )
        self.worker_healthy = Gauge(
            "tessera_worker_healthy", "1 when the worker passes health checks.", ["worker"],
            registry=r,
        )
        self.worker_outstanding = Gauge(
            "tessera_worker_outstanding_requests", "Requests in flight per worker.", ["worker"],
            registry=r,
        )
        self.securitylingua_flagged = Counter(
            "tessera_securitylingua_flagged",
            "Requests whose extracted intention was added to the system prompt.", registry=r,
        )
        self.memory_units_retrieved = Histogram(
            "tessera_memory_units_retrieved", "SeCom memory units added to a request.",
            buckets=(0, 1, 2, 4, 8, 16, 32, 64), registry=r,
        )
