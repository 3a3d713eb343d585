"""Choosing a worker: least outstanding requests among the healthy ones.

Health comes from two signals: a periodic `GET /health` on every worker, and failures seen
while forwarding (a refused connection takes a worker out at once, before the next probe).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import httpx

from server.affinity import PrefixRecord, choose_with_affinity
from server.metrics import GatewayMetrics

RoutingPolicy = Literal["least_outstanding", "prefix_affinity"]

logger = logging.getLogger("tessera.gateway")


@dataclass
class Worker:
    url: str
    healthy: bool = False
    outstanding: int = 0
    models: list[str] = field(default_factory=list)
    consecutive_failures: int = 0


class WorkerPool:
    def __init__(
        self, urls: list[str], metrics: GatewayMetrics,
        routing: RoutingPolicy = "least_outstanding", load_factor: float = 1.0,
    ) -> None:
        self.workers = [Worker(url.rstrip("/")) for url in urls]
        self._metrics = metrics
        self.routing = routing
        self.load_factor = load_factor
        # What each worker was sent, for prefix affinity (see server/affinity.py).
        self._prefixes: dict[str, PrefixRecord] = {}
        for worker in self.workers:
            metrics.worker_healthy.labels(worker.url).set(0)
            metrics.worker_outstanding.labels(worker.url).set(0)

    def add(self, url: str) -> bool:
        """Add a worker discovered at run time (e.g. a Ray actor); False if already known.

        It joins unhealthy and enters rotation after its first passing health check.
        """
        url = url.rstrip("/")
        if any(worker.url == url for worker in self.workers):
            return False
        self.workers.append(Worker(url))
        self._metrics.worker_healthy.labels(url).set(0)
        self._metrics.worker_outstanding.labels(url).set(0)
        return True

    # --- selection
    def find(self, url: str) -> Worker | None:
        return next((worker for worker in self.workers if worker.url == url), None)

    def healthy(self) -> list[Worker]:
        return [worker for worker in self.workers if worker.healthy]

    def choose(
        self, exclude: set[str] = frozenset(), model: str | None = None,
        fingerprints: Sequence[int] = (),
    ) -> Worker | None:
        """A healthy worker serving `model`, not in `exclude`; None if there is none.

        least_outstanding: the one with the fewest requests in flight (first listed on ties).
        prefix_affinity: the one holding the longest prefix of the prompt, within a load bound.
        """
        candidates = [w for w in self.healthy() if w.url not in exclude
                      and (model is None or model in w.models)]
        if not candidates:
            return None
        if self.routing == "prefix_affinity" and fingerprints:
            chosen = choose_with_affinity(candidates, fingerprints, self._prefixes,
                                          self.load_factor)
            self._prefixes.setdefault(chosen.url, PrefixRecord()).add(fingerprints)
            return chosen
        return min(candidates, key=lambda worker: worker.outstanding)

    def served_models(self) -> set[str]:
        return {model for worker in self.healthy() for model in worker.models}

    def track_start(self, worker: Worker) -> None:
        worker.outstanding += 1
        self._metrics.worker_outstanding.labels(worker.url).set(worker.outstanding)

    def track_end(self, worker: Worker) -> None:
        worker.outstanding -= 1
        self._metrics.worker_outstanding.labels(worker.url).set(worker.outstanding)

    # --- health
    def mark_failed(self, worker: Worker, kind: str) -> None:
        self._metrics.upstream_errors.labels(worker.url, kind).inc()
        if worker.healthy:
            logger.warning("worker %s taken out of rotation (%s)", worker.url, kind)
        worker.healthy = False
        worker.consecutive_failures += 1
        self._metrics.worker_healthy.labels(worker.url).set(0)
        # A worker that failed may come back restarted, with an empty prefix cache.
        self._prefixes.pop(worker.url, None)

    def _mark_healthy(self, worker: Worker, models: list[str]) -> None:
        if not worker.healthy:
            logger.info("worker %s healthy, serving %s", worker.url, models)
        worker.healthy = True
        worker.consecutive_failures = 0
        worker.models = models
        self._metrics.worker_healthy.labels(worker.url).set(1)

    async def probe(self, client: httpx.AsyncClient, worker: Worker) -> bool:
        """One health check: `/health` answers 200 and `/v1/models` lists the models."""
        try:
            health = await client.get(f"{worker.url}/health", timeout=2.0)
            if health.status_code != 200:
                raise httpx.HTTPStatusError("unhealthy", request=health.request, response=health)
            listing = await client.get(f"{worker.url}/v1/models", timeout=2.0)
            listing.raise_for_status()
            models = [entry["id"] for entry in listing.json().get("data", [])]
        except (httpx.HTTPError, ValueError, KeyError):
            if worker.healthy:
                self.mark_failed(worker, "health_check")
            else:
                worker.consecutive_failures += 1
            return False
        self._mark_healthy(worker, models)
        return True

    async def probe_all(self, client: httpx.AsyncClient) -> None:
        await asyncio.gather(*(self.probe(client, worker) for worker in self.workers))

    async def run_health_checks(self, client: httpx.AsyncClient, interval_s: float) -> None:
        while True:
            await self.probe_all(client)
            await asyncio.sleep(interval_s)
