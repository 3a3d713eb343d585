"""The request pipeline: ordered stages that may rewrite a request before it reaches a worker.

A stage is any object with a `name` and `async __call__(request, context) -> request`.
A stage may also define `async after_response(request, context, outcome)`, which the
gateway calls once the answer is complete (streamed answers once their last chunk has been
relayed), after the client has it: memory writes never delay an answer. A failed or
cancelled answer reaches the hook with `outcome.completed = False`.
Stages know nothing of HTTP (no FastAPI import): tests call them directly, and the gateway
runs them through `Pipeline.run` and `Pipeline.after_response`, timing each one.
"""

from __future__ import annotations

import logging
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
    # A stage sets this when it needs the answer: only then does the gateway collect the
    # answer's text (parsing a stream's events) and call the after-response hooks.
    wants_outcome: bool = False


@dataclass(frozen=True)
class ResponseOutcome:
    """What an after-response hook learns about the answer."""

    text: str  # the assistant's whole answer (first choice), as the client received it
    completed: bool  # False when the worker failed or the client went away
    finish_reason: str | None = None


class Stage(Protocol):
    name: str

    async def __call__(self, request: Any, context: RequestContext) -> Any: ...


StageTimer = Callable[[str, float], None]


logger = logging.getLogger("tessera.pipeline")

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

    async def after_response(self, request: Request, context: RequestContext,
                             outcome: ResponseOutcome) -> None:
        """Every stage's after-response hook, in order; a hook's failure is logged and
        counted under ``after:<stage>`` timing but never reaches the client (it has its
        answer already)."""
        for stage in self.stages:
            hook = getattr(stage, "after_response", None)
            if hook is None:
                continue
            started = time.perf_counter()
            try:
                await hook(request, context, outcome)
            except Exception:  # the answer is delivered; a lost memory write is logged
                logger.exception("after-response hook of stage %s failed (request %s)",
                                 stage.name, context.request_id)
            self._report(f"after:{stage.name}", started)

    def _report(self, stage: str, started: float) -> None:
        if self._on_stage_done is not None:
            self._on_stage_done(stage, time.perf_counter() - started)
