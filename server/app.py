"""The gateway: OpenAI routes, auth, limits, the request pipeline, metrics, worker routing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import Counter as Tally
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from prompt_pipeline.config import PipelineSettings, build_stages
from prompt_pipeline.errors import PipelineError, PipelineResponse
from prompt_pipeline.stage import Pipeline, RequestContext, Stage
from server.config import ServerSettings
from server.errors import (
    OpenAIError,
    install_error_handlers,
    no_healthy_worker_error,
    validation_error,
)
from server.metrics import GatewayMetrics
from server.proxy import Forwarder, ForwardRequest
from server.router import WorkerPool
from server.schemas import ChatCompletionRequest, CompletionRequest, GenerationRequest

logger = logging.getLogger("tessera.gateway")
GenerationModel = TypeVar("GenerationModel", bound=GenerationRequest)


class Gateway:
    """The gateway's shared state, built once per app (several apps may share a process)."""

    def __init__(self, settings: ServerSettings, stages: list[Stage] | None = None) -> None:
        self.settings = settings
        self.metrics = GatewayMetrics()
        urls = settings.local_worker_urls() + settings.worker_urls
        self.pool = WorkerPool(urls, self.metrics)
        if stages is None:  # stages given in code win; otherwise tessera.yaml's `pipeline:`
            stages = build_stages(PipelineSettings(), self.metrics.registry,
                                  self.metrics.securitylingua_flagged)
        self.pipeline = Pipeline(stages, on_stage_done=self._observe_stage)
        self.in_flight_per_key: Tally[str] = Tally()
        self.client: httpx.AsyncClient | None = None
        self.forwarder: Forwarder | None = None

    def _observe_stage(self, stage: str, seconds: float) -> None:
        self.metrics.stage_duration.labels(stage).observe(seconds)

    @contextlib.asynccontextmanager
    async def lifespan(self, _: FastAPI) -> AsyncIterator[None]:
        timeout = httpx.Timeout(
            connect=self.settings.upstream_connect_timeout_s,
            read=self.settings.upstream_read_timeout_s,
            write=30.0,
            pool=self.settings.upstream_connect_timeout_s,
        )
        limits = httpx.Limits(max_connections=1000, max_keepalive_connections=200)
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
            self.client = client
            self.forwarder = Forwarder(client, self.pool, self.metrics)
            await self.pool.probe_all(client)
            checker = asyncio.create_task(
                self.pool.run_health_checks(client, self.settings.health_interval_s)
            )
            try:
                yield
            finally:
                checker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await checker

    # --- request checks, in the order a request meets them
    def authenticate(self, request: Request) -> str | None:
        keys = self.settings.api_keys
        if not keys:
            return None
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise OpenAIError(
                401, "You didn't provide an API key. Send it as 'Authorization: Bearer KEY'.",
                code="missing_api_key",
            )
        if token.strip() not in keys:
            raise OpenAIError(401, "Incorrect API key provided.", code="invalid_api_key")
        return token.strip()

    async def read_json_body(self, request: Request) -> object:
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise self._body_too_large(limit)
        chunks: list[bytes] = []
        received = 0
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise self._body_too_large(limit)
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as exc:
            raise OpenAIError(
                400, "We could not parse the JSON body of your request.", code="invalid_json"
            ) from exc

    @staticmethod
    def _body_too_large(limit: int) -> OpenAIError:
        return OpenAIError(413, f"Request body exceeds the limit of {limit} bytes.",
                           param=None, code="request_too_large")

    def parse(self, payload: object, model_cls: type[GenerationModel]) -> GenerationModel:
        if not isinstance(payload, dict):
            raise OpenAIError(400, "The request body must be a JSON object.", code="invalid_json")
        try:
            parsed = model_cls.model_validate(payload)
        except ValidationError as exc:
            raise validation_error(list(exc.errors())) from exc
        self._check_limits(parsed)
        return parsed

    def _check_limits(self, parsed: GenerationRequest) -> None:
        if isinstance(parsed, ChatCompletionRequest) and (
            len(parsed.messages) > self.settings.max_messages
        ):
            raise OpenAIError(
                400, f"Too many messages: {len(parsed.messages)} > {self.settings.max_messages}.",
                param="messages", code="too_many_messages",
            )
        ceiling = self.settings.max_tokens_ceiling
        asked = parsed.requested_max_tokens()
        if ceiling is not None and asked is not None and asked > ceiling:
            raise OpenAIError(400, f"max_tokens {asked} exceeds this server's limit of {ceiling}.",
                              param="max_tokens", code="max_tokens_exceeded")
        if not self.pool.healthy():
            raise no_healthy_worker_error()
        if parsed.model not in self.pool.served_models():
            raise OpenAIError(404, f"The model `{parsed.model}` does not exist.", param="model",
                              code="model_not_found")

    def acquire_slot(self, api_key: str | None) -> Callable[[], None]:
        """Take one of the key's concurrent-request slots; returns an idempotent release.

        A streamed response outlives the route handler, so the slot is released by whoever
        finishes last: the handler for plain responses, the stream relay for streams.
        """
        limit = self.settings.max_concurrent_per_key
        key = api_key or "-"
        if limit and self.in_flight_per_key[key] >= limit:
            raise OpenAIError(429, f"Too many concurrent requests for this key (limit {limit}).",
                              type="rate_limit_error", code="concurrency_limit_exceeded")
        self.in_flight_per_key[key] += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.in_flight_per_key[key] -= 1

        return release

    # --- the two generation routes share this
    async def generate(
        self, request: Request, route: str, path: str, model_cls: type[GenerationModel]
    ) -> Response:
        started = time.perf_counter()
        request_id = request.state.request_id
        api_key = self.authenticate(request)
        parsed = self.parse(await self.read_json_body(request), model_cls)
        context = RequestContext(request_id=request_id, route=route, api_key=api_key)
        release_slot = self.acquire_slot(api_key)
        try:
            parsed = await self.pipeline.run(parsed, context)
            assert self.forwarder is not None, "lifespan not started"
            response = await self.forwarder.forward(ForwardRequest(
                route=route, path=path, body=parsed.upstream_body(), stream=parsed.stream,
                request_id=request_id, started=started, on_stream_end=release_slot,
            ))
        except BaseException:
            release_slot()
            raise
        if not isinstance(response, StreamingResponse):
            release_slot()
        return response


def create_app(
    settings: ServerSettings | None = None, stages: list[Stage] | None = None
) -> FastAPI:
    gateway = Gateway(settings or ServerSettings(), stages)
    app = FastAPI(title="tessera-serve gateway", lifespan=gateway.lifespan)
    app.state.gateway = gateway
    install_error_handlers(app)
    app.add_exception_handler(PipelineError, _on_pipeline_error)
    app.add_exception_handler(PipelineResponse, _on_pipeline_response)

    app.add_middleware(RequestIdMiddleware, metrics=gateway.metrics)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await gateway.generate(request, "chat", "/v1/chat/completions",
                                      ChatCompletionRequest)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await gateway.generate(request, "completions", "/v1/completions",
                                      CompletionRequest)

    @app.get("/v1/models")
    async def list_models(request: Request) -> JSONResponse:
        gateway.authenticate(request)
        created = int(time.time())
        data = [
            {"id": model, "object": "model", "created": created, "owned_by": "tessera-serve"}
            for model in sorted(gateway.pool.served_models())
        ]
        return JSONResponse({"object": "list", "data": data})

    @app.get("/health")
    async def health() -> JSONResponse:
        healthy = len(gateway.pool.healthy())
        body = {"status": "ok" if healthy else "unavailable", "workers_healthy": healthy,
                "workers_total": len(gateway.pool.workers)}
        return JSONResponse(body, status_code=200 if healthy else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(gateway.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


async def _on_pipeline_error(_: Request, exc: PipelineError) -> Response:
    return OpenAIError(exc.status_code, exc.message, type=exc.type, param=exc.param,
                       code=exc.code).response()


async def _on_pipeline_response(_: Request, exc: PipelineResponse) -> Response:
    # A stage answered itself (e.g. SecurityLingua's refusal message), as JSON or as SSE.
    if exc.stream_chunks is None:
        return JSONResponse(exc.body)
    events = [f"data: {json.dumps(chunk)}\n\n" for chunk in exc.stream_chunks]
    return StreamingResponse(iter([*events, "data: [DONE]\n\n"]),
                             media_type="text/event-stream")


_KNOWN_ROUTES = {
    "/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/models": "models",
    "/health": "health", "/metrics": "metrics",
}


def _route_label(path: str) -> str:
    # Bounded label values: unknown paths share one label instead of one series each.
    return _KNOWN_ROUTES.get(path, "other")



class RequestIdMiddleware:
    """Pure ASGI: gives every request an id (`x-request-id` in and out) and records its
    status and duration. Unlike BaseHTTPMiddleware it does not buffer or detach streaming
    bodies, so the duration of a stream is measured to its last byte and a client
    disconnect still reaches the route."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        request_id = headers.get(b"x-request-id", b"").decode() or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                extra = [(b"x-request-id", request_id.encode())]
                message["headers"] = [
                    (k, v) for k, v in message.get("headers", []) if k != b"x-request-id"
                ] + extra
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            route = _route_label(scope["path"])
            elapsed = time.perf_counter() - started
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.request_duration.labels(route).observe(elapsed)
            logger.info("request_id=%s %s %s -> %d in %.1f ms", request_id, scope["method"],
                        scope["path"], status, elapsed * 1e3)
