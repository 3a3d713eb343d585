"""What a stage raises to answer the client itself, without FastAPI (the gateway renders it).

`PipelineError` becomes an OpenAI-shaped error; `PipelineResponse` a complete, successful
response (e.g. a refusal message) sent instead of forwarding. Any other exception from a
stage is a stage failure, handled by `guard.GuardedStage` as the config decides.
"""

from __future__ import annotations

from typing import Any


class PipelineError(Exception):
    def __init__(self, status_code: int, message: str, *, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.code = code
        self.param = param


class PipelineResponse(Exception):  # noqa: N818 - it is a control-flow signal, not an error
    """Answer with `body` (JSON) or, for a streamed request, with `stream_chunks` as SSE."""

    def __init__(self, body: dict[str, Any], stream_chunks: list[dict[str, Any]] | None) -> None:
        super().__init__("answered by the pipeline")
        self.body = body
        self.stream_chunks = stream_chunks
