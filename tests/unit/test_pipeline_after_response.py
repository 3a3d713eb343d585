"""The pipeline's after-response step: hooks see the outcome, and a failing one is contained."""

from __future__ import annotations

from prompt_pipeline.stage import Pipeline, RequestContext, ResponseOutcome


class Recorder:
    name = "recorder"

    def __init__(self) -> None:
        self.seen: list[ResponseOutcome] = []

    async def __call__(self, request, context):
        return request

    async def after_response(self, request, context, outcome: ResponseOutcome) -> None:
        self.seen.append(outcome)


class Broken:
    name = "broken"

    async def __call__(self, request, context):
        return request

    async def after_response(self, request, context, outcome) -> None:
        raise RuntimeError("disk full")


class NoHook:
    name = "plain"

    async def __call__(self, request, context):
        return request


async def test_hooks_run_in_order_and_a_failure_does_not_stop_the_rest() -> None:
    recorder = Recorder()
    timings: list[str] = []
    pipeline = Pipeline([Broken(), NoHook(), recorder],
                        on_stage_done=lambda stage, _seconds: timings.append(stage))
    outcome = ResponseOutcome(text="Paris.", completed=True, finish_reason="stop")
    await pipeline.after_response({}, RequestContext("r1", "chat"), outcome)
    assert recorder.seen == [outcome]
    assert timings == ["after:broken", "after:recorder"]
