"""A stage's failure is a decision made in config, never an accident.

`closed`: the request fails with a 503 in OpenAI's shape (a guardrail that cannot run does
not let traffic through unseen). `open`: the request goes on unchanged, and the failure is
logged and counted in `tessera_pipeline_stage_failures_total{stage, decision}`. A stage that
could not even be built (model file missing) is replaced by `UnavailableStage`, so the same
decision applies to every request and the gateway still starts.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from prometheus_client import Counter

from prompt_pipeline.errors import PipelineError, PipelineResponse
from prompt_pipeline.stage import RequestContext, Stage

logger = logging.getLogger("tessera.pipeline")
FailureDecision = Literal["closed", "open"]


class UnavailableStage:
    """Stands in for a stage whose construction failed; fails on every call."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason

    async def __call__(self, request: Any, context: RequestContext) -> Any:
        raise RuntimeError(f"stage {self.name} is unavailable: {self.reason}")


class GuardedStage:
    def __init__(self, stage: Stage, decision: FailureDecision, failures: Counter) -> None:
        self.stage = stage
        self.name = stage.name
        self.decision = decision
        self.failures = failures
        # The after-response hook passes through unguarded: Pipeline.after_response already
        # contains its failures (the client has its answer by then).
        hook = getattr(stage, "after_response", None)
        if hook is not None:
            self.after_response = hook

    async def __call__(self, request: Any, context: RequestContext) -> Any:
        try:
            return await self.stage(request, context)
        except (PipelineError, PipelineResponse):
            raise  # the stage's own answer (e.g. a block), not a failure
        except Exception as exc:
            self.failures.labels(self.name, self.decision).inc()
            logger.error("stage %s failed (fail-%s) request_id=%s: %r", self.name,
                         self.decision, context.request_id, exc)
            if self.decision == "open":
                return request
            raise PipelineError(
                503, f"The request pipeline stage '{self.name}' is unavailable; the request "
                "was not forwarded.", type="server_error", code="pipeline_stage_unavailable",
            ) from exc
