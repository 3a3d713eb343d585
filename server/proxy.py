"""Forwarding one generation request to a worker: retries, streaming relay, error mapping.

Non-streamed requests are retried once on another worker when the first one cannot be
reached or dies before answering. A streamed request is retried only if it failed before
any byte reached the client; after that, a worker failure ends the stream with an error
event, because a client cannot un-read tokens it already showed.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import httpx
from fastapi.responses import Response, StreamingResponse

from server.errors import OpenAIError, error_body, no_healthy_worker_error
from server.metrics import GatewayMetrics
from server.router import Worker, WorkerPool

logger = logging.getLogger("tessera.gateway")

# Failures that mean "this worker is gone": safe to retry elsewhere, since nothing was answered.
WORKER_GONE_ERRORS = (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError)
MAX_ATTEMPTS = 2


@dataclass
class ForwardRequest:
    route: str  # metric label: "chat" | "completions"
    path: str  # upstream path, e.g. "/v1/chat/completions"
    body: dict
    stream: bool
    request_id: str
    started: float  # perf_counter at arrival, for end-to-end and TTFT metrics
    on_stream_end: Callable[[], None] | None = None  # called once a relayed stream ends


def normalise_upstream_error(status_code: int, payload: bytes) -> OpenAIError:
    """Turn a worker's error response into OpenAI's shape and status classes.

    vLLM answers `{"error": {"message", "type": "BadRequestError", "param", "code": 400}}`;
    OpenAI clients expect string types such as `invalid_request_error`, and a too-long prompt
    is known to them as code `context_length_exceeded`.
    """
    try:
        detail = json.loads(payload).get("error", {})
        message = str(detail.get("message") or "")
        param = detail.get("param")
        upstream_code = detail.get("code")
    except (ValueError, AttributeError):
        message, param, upstream_code = payload.decode(errors="replace")[:500], None, None
    if 400 <= status_code < 500:
        code = upstream_code if isinstance(upstream_code, str) else None
        lowered = message.lower()
        if "context length" in lowered or "maximum context" in lowered or "too long" in lowered:
            code, param = "context_length_exceeded", param or "messages"
        kind = "not_found_error" if status_code == 404 else "invalid_request_error"
        return OpenAIError(status_code, message or "Invalid request.", type=kind, param=param,
                           code=code)
    return OpenAIError(502, f"The worker failed: {message or status_code}", type="server_error",
                       code="upstream_error")


class Forwarder:
    def __init__(
        self, client: httpx.AsyncClient, pool: WorkerPool, metrics: GatewayMetrics
    ) -> None:
        self._client = client
        self._pool = pool
        self._metrics = metrics

    async def forward(self, request: ForwardRequest) -> Response:
        tried: set[str] = set()
        for _attempt in range(MAX_ATTEMPTS):
            worker = self._pool.choose(exclude=tried)
            if worker is None:
                break
            tried.add(worker.url)
            outcome = await self._try_worker(worker, request)
            if outcome is not None:
                return outcome
        raise no_healthy_worker_error()

    async def _try_worker(self, worker: Worker, request: ForwardRequest) -> Response | None:
        """The response from this worker, or None when it is gone and another may be tried."""
        upstream = self._client.build_request(
            "POST", f"{worker.url}{request.path}", json=request.body,
            headers={"x-request-id": request.request_id},
        )
        self._pool.track_start(worker)
        handed_to_stream = False
        try:
            response = await self._client.send(upstream, stream=True)
            if response.status_code != 200:
                payload = await response.aread()
                await response.aclose()
                raise normalise_upstream_error(response.status_code, payload)
            if request.stream:
                handed_to_stream = True
                return StreamingResponse(
                    self._relay(worker, response, request),
                    media_type="text/event-stream",
                    headers={"x-request-id": request.request_id, "cache-control": "no-cache"},
                )
            payload = await response.aread()
            await response.aclose()
            return Response(payload, media_type="application/json",
                            headers={"x-request-id": request.request_id})
        except WORKER_GONE_ERRORS as exc:
            self._pool.mark_failed(worker, type(exc).__name__)
            logger.warning("request_id=%s worker %s failed (%s); retrying elsewhere",
                           request.request_id, worker.url, type(exc).__name__)
            return None
        except httpx.TimeoutException as exc:
            self._metrics.upstream_errors.labels(worker.url, "timeout").inc()
            raise OpenAIError(504, f"The worker did not answer in time ({type(exc).__name__}).",
                              type="server_error", code="upstream_timeout") from exc
        finally:
            if not handed_to_stream:
                self._pool.track_end(worker)

    async def _relay(
        self, worker: Worker, response: httpx.Response, request: ForwardRequest
    ) -> AsyncIterator[bytes]:
        """Pass SSE bytes through as they arrive; closing `response` aborts the generation."""
        first_chunk = True
        try:
            async for chunk in response.aiter_raw():
                if first_chunk:
                    self._metrics.time_to_first_token.labels(request.route).observe(
                        time.perf_counter() - request.started)
                    first_chunk = False
                yield chunk
        except (httpx.HTTPError, OSError) as exc:
            self._pool.mark_failed(worker, type(exc).__name__)
            body = error_body(f"The worker failed mid-stream ({type(exc).__name__}).",
                              "server_error", code="upstream_error")
            yield f"data: {json.dumps(body)}\n\ndata: [DONE]\n\n".encode()
        finally:
            # Runs on normal end, on error, and when the client disconnects (the task is
            # cancelled): closing the upstream connection makes vLLM abort the request.
            await response.aclose()
            self._pool.track_end(worker)
            if request.on_stream_end is not None:
                request.on_stream_end()

