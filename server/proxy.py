"""Forwarding one request to a worker: which failures are retried, streaming relay, errors.

A request is retried on another worker only when it provably never reached the first one
(the connection could not be made). Once the request was sent, a failure is not retried: the
worker may already be generating, and a second run elsewhere would duplicate the work (and
for a stream, tokens the client already showed). Those failures become OpenAI-shaped
502/504s. The gateway's own connection pool running dry is a 503 of the gateway, not a
worker failure.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import aiohttp
from fastapi.responses import Response, StreamingResponse

from server.errors import OpenAIError, error_body, no_healthy_worker_error
from server.metrics import GatewayMetrics
from server.router import Worker, WorkerPool
from server.sse import EventSplitter
from server.upstream_errors import normalise_upstream_error

logger = logging.getLogger("tessera.gateway")

# The connection was never established: nothing reached the worker, so another may try.
NEVER_SENT_ERRORS = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)
MAX_ATTEMPTS = 2


@dataclass
class ForwardRequest:
    route: str  # metric label: "chat" | "completions" | "responses" | ...
    path: str  # upstream path, e.g. "/v1/chat/completions"
    body: bytes  # the JSON body, already encoded
    stream: bool
    request_id: str
    started: float  # perf_counter at arrival, for end-to-end and TTFT metrics
    model: str | None = None  # only workers serving it are chosen
    fingerprints: list[int] = field(default_factory=list)  # prompt prefixes, for affinity
    on_stream_end: Callable[[], None] | None = None  # called once a relayed stream ends
    method: str = "POST"
    # Only this worker may answer (it holds the state the request refers to): no other is
    # tried, and its being down is the client's 503, not a retry elsewhere.
    pinned_worker: str | None = None
    on_worker: Callable[[str], None] | None = None  # told which worker's answer is returned


def _gateway_busy() -> OpenAIError:
    return OpenAIError(503, "The gateway has no free upstream connection; try again shortly.",
                       type="server_error", code="gateway_overloaded")


class ConnectionBudget:
    """The gateway's own limit on upstream connections in use, with a bounded wait.

    Kept apart from the HTTP client so that running out of it is told apart from a worker
    that does not answer: the first is the gateway's 503, the second a 504.
    """

    def __init__(self, limit: int, wait_s: float) -> None:
        self._free = asyncio.Semaphore(limit)
        self._wait_s = wait_s

    async def take(self) -> None:
        if not self._free.locked():
            await self._free.acquire()  # returns at once: no timer needed
            return
        try:
            await asyncio.wait_for(self._free.acquire(), self._wait_s)
        except TimeoutError as exc:
            raise _gateway_busy() from exc

    def give_back(self) -> None:
        self._free.release()


class Forwarder:
    """Sends requests to workers over aiohttp (chosen by profile: httpx's pool cost more CPU
    per request than the whole rest of the gateway; see benchmarks/gateway_NOTES.md)."""

    def __init__(
        self, session: aiohttp.ClientSession, pool: WorkerPool, metrics: GatewayMetrics,
        budget: ConnectionBudget,
    ) -> None:
        self._session = session
        self._pool = pool
        self._metrics = metrics
        self._budget = budget

    async def forward(self, request: ForwardRequest) -> Response:
        if request.pinned_worker is not None:
            return await self._forward_pinned(request)
        tried: set[str] = set()
        for _attempt in range(MAX_ATTEMPTS):
            worker = self._pool.choose(exclude=tried, model=request.model,
                                       fingerprints=request.fingerprints)
            if worker is None:
                break
            tried.add(worker.url)
            outcome = await self._try_worker(worker, request)
            if outcome is not None:
                return outcome
        raise no_healthy_worker_error()

    async def _forward_pinned(self, request: ForwardRequest) -> Response:
        worker = self._pool.find(request.pinned_worker)
        outcome = None
        if worker is not None and worker.healthy:
            outcome = await self._try_worker(worker, request)
        if outcome is None:
            raise OpenAIError(503, "The worker holding this response is unavailable; try again "
                              "shortly.", type="server_error", code="response_owner_unavailable")
        return outcome

    async def _try_worker(self, worker: Worker, request: ForwardRequest) -> Response | None:
        """The response from this worker, or None when it could not be reached at all."""
        await self._budget.take()
        self._pool.track_start(worker)
        handed_to_stream = False
        response: aiohttp.ClientResponse | None = None
        try:
            response = await self._session.request(
                request.method, f"{worker.url}{request.path}", data=request.body or None,
                headers={"x-request-id": request.request_id,
                         "content-type": "application/json"},
            )
            if not 200 <= response.status < 300:
                payload = await response.read()
                raise normalise_upstream_error(response.status, payload, request.route,
                                               f"{request.method} {request.path}")
            content_type = response.headers.get("content-type", "application/json")
            if request.on_worker is not None:
                request.on_worker(worker.url)
            if request.stream and content_type.startswith("text/event-stream"):
                handed_to_stream = True
                relay = self._relay(worker, response, request)
                # Start the relay before handing it over: a started generator's `finally`
                # (which frees the worker, the connection and the key's slot) runs however
                # the response ends, even if the client leaves before the first byte; an
                # unstarted one would just be dropped. It also keeps the disconnect watch
                # of the caller in force during prefill.
                first = await anext(relay, b"")
                return StreamingResponse(
                    _prepend(first, relay), media_type="text/event-stream",
                    headers={"x-request-id": request.request_id, "cache-control": "no-cache"},
                )
            payload = await response.read()
            return Response(payload, status_code=response.status, media_type=content_type,
                            headers={"x-request-id": request.request_id})
        except NEVER_SENT_ERRORS as exc:
            self._pool.mark_failed(worker, type(exc).__name__)
            logger.warning("request_id=%s worker %s unreachable (%s); trying another",
                           request.request_id, worker.url, type(exc).__name__)
            return None
        except TimeoutError as exc:  # sent, no answer within the read timeout
            self._metrics.upstream_errors.labels(worker.url, "timeout").inc()
            raise OpenAIError(504, "The worker did not answer in time.",
                              type="server_error", code="upstream_timeout") from exc
        except aiohttp.ClientError as exc:
            # Sent, then the connection broke (the worker died or spoke garbage): not retried.
            self._pool.mark_failed(worker, type(exc).__name__)
            raise OpenAIError(502, f"The worker failed while answering ({type(exc).__name__}).",
                              type="server_error", code="upstream_error") from exc
        finally:
            if not handed_to_stream:
                if response is not None:
                    _finish(response)
                self._pool.track_end(worker)
                self._budget.give_back()

    async def _relay(
        self, worker: Worker, response: aiohttp.ClientResponse, request: ForwardRequest
    ) -> AsyncIterator[bytes]:
        """Pass whole SSE events through as they arrive; closing `response` aborts upstream.

        Only complete events are relayed, so a worker dying mid-event leaves no torn line
        for the client to misparse; the error event then starts on a line of its own.
        """
        first_event = True
        events = EventSplitter()
        try:
            async for chunk in response.content.iter_any():
                complete = events.feed(chunk)
                if not complete:
                    continue
                if first_event:
                    self._metrics.time_to_first_token.labels(request.route).observe(
                        time.perf_counter() - request.started)
                    first_event = False
                yield complete
            tail = events.rest()
            if tail.strip():
                yield tail + b"\n\n"  # a last event without its blank line: still whole
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            if not isinstance(exc, TimeoutError):  # slow is not dead
                self._pool.mark_failed(worker, type(exc).__name__)
            logger.warning("request_id=%s worker %s failed mid-stream (%s)",
                           request.request_id, worker.url, type(exc).__name__)
            yield _stream_error_event(request.route, type(exc).__name__)
        finally:
            # Runs on normal end, on error, and when the client disconnects (the task is
            # cancelled): closing an unfinished upstream response makes vLLM abort it.
            _finish(response)
            self._pool.track_end(worker)
            self._budget.give_back()
            if request.on_stream_end is not None:
                request.on_stream_end()


async def _prepend(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    if first:
        yield first
    async for chunk in rest:
        yield chunk


def _finish(response: aiohttp.ClientResponse) -> None:
    """Read to the end: the connection goes back to the pool. Otherwise (a client went away,
    a worker broke) it is closed, which makes vLLM abort the generation."""
    if response.content.at_eof():
        response.release()
    else:
        response.close()


def _stream_error_event(route: str, failure: str) -> bytes:
    message = f"The worker failed mid-stream ({failure})."
    if route == "responses":
        # The Responses API streams typed events; its error event carries the fields flat.
        event = {"type": "error", "code": "upstream_error", "message": message, "param": None}
        return f"event: error\ndata: {json.dumps(event)}\n\n".encode()
    body = error_body(message, "server_error", code="upstream_error")
    return f"data: {json.dumps(body)}\n\ndata: [DONE]\n\n".encode()
