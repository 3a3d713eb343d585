"""The request pipeline: ordered stages that may rewrite a request before it reaches a worker.

A stage is any object with a `name` and `async __call__(request, context) -> request`.
Stages know nothing of HTTP (no FastAPI import): tests call them directly, and the gateway
runs them through `Pipeline.run`, timing each one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

Request = TypeVar("Request")


@dataclass
class RequestContext:
    """What a stage may know about the request beyond its body."""

    request_id: str
    route: str  # "chat" or "completions"
    api_key: str | None = None
    # Stages leave notes for later stages and for after-response hooks (e.g. memory writes).
    notes: dict[str, Any] = field(default_factory=dict)


class Stage(Protocol):
    name: str

    async def __call__(self, request: Any, context: RequestContext) -> Any: ...


StageTimer = Callable[[str, float], None]


TOTAL_STAGE = "total"  # the label under which the whole pipeline's time is reported


class Pipeline:
    """Runs stages in order; an empty pipeline returns the request unchanged.

    Each stage's time is reported under its name and the whole run under "total", so the
    pipeline's cost is visible even while no stage is configured.
    """

    def __init__(self, stages: Sequence[Stage] = (), on_stage_done: StageTimer | None = None):
        self.stages = list(stages)
        self._on_stage_done = on_stage_done

    async def run(self, request: Request, context: RequestContext) -> Request:
        pipeline_started = time.perf_counter()
        for stage in self.stages:
            started = time.perf_counter()
            request = await stage(request, context)
            self._report(stage.name, started)
        self._report(TOTAL_STAGE, pipeline_started)
        return request

    def _report(self, stage: str, started: float) -> None:
        if self._on_stage_done is not None:
            self._on_stage_done(stage, time.perf_counter() - started)
