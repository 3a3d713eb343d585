"""The gateway: OpenAI routes, auth, limits, the request pipeline, metrics, worker routing."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import aiohttp
import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.background import BackgroundTask
from starlette.types import Receive

from prompt_pipeline.config import PipelineSettings, build_stages
from prompt_pipeline.errors import PipelineError, PipelineResponse
from prompt_pipeline.stage import Pipeline, RequestContext, ResponseOutcome, Stage
from server.affinity import prefix_fingerprints, prompt_text
from server.body import parse_json_object
from server.config import ServerSettings
from server.errors import (
    OpenAIError,
    install_error_handlers,
    no_healthy_worker_error,
    validation_error,
)
from server.key_slots import KeySlots
from server.memory import (
    CONVERSATION_FIELD,
    find_memory,
    install_memory_routes,
    memory_notes,
    stage_model_client,
)
from server.metrics import GatewayMetrics
from server.middleware import RequestIdMiddleware
from server.outcome import StreamFollower, follow_stream, outcome_of_json
from server.proxy import ConnectionBudget, Forwarder, ForwardRequest
from server.response_owners import (
    ResponseOwners,
    check_id,
    id_from_json,
    key_digest,
    locate,
    not_found,
    watch_stream_for_id,
)
from server.router import WorkerPool
from server.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    GenerationRequest,
    ResponsesRequest,
    TokenizeRequest,
)

logger = logging.getLogger("tessera.gateway")

# A client that went away before its answer: nginx's convention, seen only in metrics/logs.
CLIENT_CLOSED_REQUEST = 499


@dataclass(frozen=True)
class RouteSpec:
    """One forwarded route: how its body is validated and what its limits apply to."""

    route: str  # metric label and pipeline context route
    path: str  # the same path on the worker
    model_cls: type[BaseModel]
    max_tokens_field: str | None = None  # where the max_tokens ceiling goes as a default
    runs_pipeline: bool = False  # stages rewrite chat/completions requests only


FORWARDED_ROUTES = (
    RouteSpec("chat", "/v1/chat/completions", ChatCompletionRequest, "max_tokens", True),
    RouteSpec("completions", "/v1/completions", CompletionRequest, "max_tokens", True),
    RouteSpec("responses", "/v1/responses", ResponsesRequest, "max_output_tokens"),
    RouteSpec("embeddings", "/v1/embeddings", EmbeddingRequest),
    RouteSpec("tokenize", "/tokenize", TokenizeRequest),
    RouteSpec("detokenize", "/detokenize", DetokenizeRequest),
)


class Gateway:
    """The gateway's shared state, built once per app (several apps may share a process)."""

    def __init__(self, settings: ServerSettings, stages: list[Stage] | None = None) -> None:
        self.settings = settings
        self.metrics = GatewayMetrics()
        urls = settings.local_worker_urls() + settings.worker_urls
        self.pool = WorkerPool(urls, self.metrics, settings.routing,
                               settings.prefix_affinity_load_factor)
        if stages is None:  # stages given in code win; otherwise tessera.yaml's `pipeline:`
            stages = build_stages(PipelineSettings(), self.metrics.registry,
                                  self.metrics.securitylingua_flagged)
        self.pipeline = Pipeline(stages, on_stage_done=self._observe_stage)
        memory = find_memory(stages)
        if memory is not None and hasattr(memory, "use_units_histogram"):
            memory.use_units_histogram(self.metrics.memory_units_retrieved)
        if memory is not None and hasattr(memory, "use_model"):  # segmentation by the model
            memory.use_model(stage_model_client(self.pool, lambda: self.client))
        self.key_slots = KeySlots(settings.max_concurrent_per_key)
        self.response_owners = ResponseOwners()
        self._api_keys = [key.encode() for key in settings.api_keys]
        self.client: httpx.AsyncClient | None = None
        self.forwarder: Forwarder | None = None
        # After-response hooks (memory writes) run detached from the request: held here so
        # they are not garbage-collected mid-run, and awaited at shutdown.
        self._after_tasks: set[asyncio.Task] = set()

    def _observe_stage(self, stage: str, seconds: float) -> None:
        self.metrics.stage_duration.labels(stage).observe(seconds)

    @contextlib.asynccontextmanager
    async def lifespan(self, _: FastAPI) -> AsyncIterator[None]:
        settings = self.settings
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=settings.upstream_connect_timeout_s,
            sock_read=settings.upstream_read_timeout_s)
        # Idle upstream connections are dropped after 2 s, before vLLM's uvicorn closes them
        # (its keep-alive is 5 s): a request never goes out on a connection being closed.
        # The connection limit is ConnectionBudget's, so the connector itself has none.
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=2.0)
        budget = ConnectionBudget(settings.upstream_max_connections,
                                  settings.upstream_connect_timeout_s)
        # Health probes (a few per second) stay on httpx; requests go through aiohttp.
        async with (
            httpx.AsyncClient(timeout=5.0) as client,
            aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False,
                                  skip_auto_headers=("User-Agent",)) as session,
        ):
            self.client = client
            self.forwarder = Forwarder(session, self.pool, self.metrics, budget)
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
                if self._after_tasks:  # memory writes of answers already sent
                    await asyncio.wait(set(self._after_tasks),
                                       timeout=self.settings.shutdown_grace_s)

    # --- request checks, in the order a request meets them
    def authenticate(self, request: Request) -> str | None:
        if not self._api_keys:
            return None
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise OpenAIError(
                401, "You didn't provide an API key. Send it as 'Authorization: Bearer KEY'.",
                type="authentication_error", code="missing_api_key",
            )
        # Header values arrive latin-1 decoded; back to their bytes for a byte comparison.
        given = token.encode("latin-1")
        # Constant time, and every key compared: timing reveals neither a prefix nor which key.
        matched = False
        for key in self._api_keys:
            matched |= hmac.compare_digest(given, key)
        if not matched:
            raise OpenAIError(401, "Incorrect API key provided.", type="authentication_error",
                              code="invalid_api_key")
        return token

    async def read_body(self, request: Request) -> bytes:
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
        return b"".join(chunks)

    @staticmethod
    def _body_too_large(limit: int) -> OpenAIError:
        return OpenAIError(413, f"Request body exceeds the limit of {limit} bytes.",
                           param=None, code="request_too_large")

    def validate(self, payload: dict, spec: RouteSpec) -> BaseModel:
        try:
            parsed = spec.model_cls.model_validate(payload)
        except ValidationError as exc:
            raise validation_error(list(exc.errors()), payload) from exc
        self._check_limits(parsed, spec)
        return parsed

    def _check_limits(self, parsed: BaseModel, spec: RouteSpec) -> None:
        if isinstance(parsed, ChatCompletionRequest) and (
            len(parsed.messages) > self.settings.max_messages
        ):
            raise OpenAIError(
                400, f"Too many messages: {len(parsed.messages)} > {self.settings.max_messages}.",
                param="messages", code="too_many_messages",
            )
        ceiling = self.settings.max_tokens_ceiling
        if ceiling is not None and spec.max_tokens_field is not None:
            asked = parsed.requested_max_tokens()  # type: ignore[attr-defined]
            if asked is not None and asked > ceiling:
                raise OpenAIError(
                    400, f"{spec.max_tokens_field} {asked} exceeds this server's limit of "
                    f"{ceiling}.", param=spec.max_tokens_field, code="max_tokens_exceeded")
        if not self.pool.healthy():
            raise no_healthy_worker_error()
        model = getattr(parsed, "model", None)
        if model is not None and model not in self.pool.served_models():
            raise OpenAIError(404, f"The model `{model}` does not exist.", param="model",
                              type="not_found_error", code="model_not_found")

    def apply_ceiling_default(self, parsed: BaseModel, payload: dict, spec: RouteSpec) -> bool:
        """Set the max_tokens ceiling on a request that omitted its limit; True if set.

        Omitted means "as long as the context allows" to vLLM: the ceiling must bound that
        too (per choice, so a request for `n` choices stays bounded as well).
        """
        ceiling = self.settings.max_tokens_ceiling
        if ceiling is None or spec.max_tokens_field is None:
            return False
        if parsed.requested_max_tokens() is not None:  # type: ignore[attr-defined]
            return False
        payload[spec.max_tokens_field] = ceiling
        setattr(parsed, spec.max_tokens_field, ceiling)
        return True

    # --- every forwarded route goes through here
    async def forward(self, request: Request, spec: RouteSpec) -> Response:
        started = time.perf_counter()
        request_id = request.state.request_id
        api_key = self.authenticate(request)
        raw = await self.read_body(request)
        payload = parse_json_object(raw)
        # The conversation id field is the gateway's, not the worker's: taken off the body.
        stripped = spec.runs_pipeline and CONVERSATION_FIELD in payload
        notes = memory_notes(request, payload) if spec.runs_pipeline else {}
        parsed = self.validate(payload, spec)
        defaulted = self.apply_ceiling_default(parsed, payload, spec) or stripped
        with self.key_slots.hold(api_key) as slot:
            # The client's own bytes go upstream unless something changed the request: no
            # re-encoding of a large body, and unknown fields stay byte-for-byte as sent.
            body = json.dumps(payload).encode() if defaulted else raw
            context: RequestContext | None = None
            original = parsed
            if spec.runs_pipeline:
                context = RequestContext(request_id=request_id, route=spec.route,
                                         api_key=api_key, notes=dict(notes))
                parsed = await self.pipeline.run(parsed, context)
                if self.pipeline.stages:
                    assert isinstance(parsed, GenerationRequest)
                    payload = parsed.upstream_body()
                    body = json.dumps(payload).encode()
            pinned, served_by = None, []
            if spec.route == "responses":
                previous = getattr(parsed, "previous_response_id", None)
                if previous is not None:  # the worker that stored it must answer
                    pinned = await self.response_owner(previous, api_key, "previous_response_id")
            fingerprints: list[int] = []
            if self.pool.routing == "prefix_affinity":
                text = prompt_text(spec.route, payload)
                fingerprints = prefix_fingerprints(text) if text else []
            assert self.forwarder is not None, "lifespan not started"
            response = await _unless_client_leaves(request.receive, self.forwarder.forward(
                ForwardRequest(
                    route=spec.route, path=spec.path, body=body,
                    stream=bool(getattr(parsed, "stream", False)), request_id=request_id,
                    started=started, model=getattr(parsed, "model", None),
                    fingerprints=fingerprints, on_stream_end=slot.release,
                    pinned_worker=pinned,
                    on_worker=served_by.append if spec.route == "responses" else None,
                )))
            slot.follow(response)
        if served_by:
            self._remember_response(response, served_by[0], api_key)
        if context is not None and context.wants_outcome:
            self._after_response(response, original, context)
        return response

    # --- Responses-API state lives on the worker that stored it (server/response_owners.py)
    async def response_owner(self, response_id: str, api_key: str | None,
                             param: str | None) -> str:
        """The URL of the worker holding ``response_id``; a 404 if no worker has it or it
        belongs to another API key."""
        check_id(response_id, param)
        owner = self.response_owners.get(response_id)
        if owner is not None:
            if owner.key_digest is not None and owner.key_digest != key_digest(api_key):
                raise not_found(response_id, param)
            return owner.worker_url
        assert self.client is not None, "lifespan not started"
        url = await locate(self.client, [w.url for w in self.pool.healthy()], response_id)
        if url is None:
            raise not_found(response_id, param)
        self.response_owners.record(response_id, url, None)
        return url

    def _remember_response(self, response: Response, worker_url: str,
                           api_key: str | None) -> None:
        digest = key_digest(api_key)

        def remember(response_id: str) -> None:
            self.response_owners.record(response_id, worker_url, digest)

        if isinstance(response, StreamingResponse):
            response.body_iterator = watch_stream_for_id(response.body_iterator, remember)
        elif response.status_code == 200:
            response_id = id_from_json(response.body)
            if response_id is not None:
                remember(response_id)

    async def forward_by_id(self, request: Request, response_id: str, method: str,
                            suffix: str = "") -> Response:
        """`GET /v1/responses/{id}` and `POST /v1/responses/{id}/cancel`, sent to the worker
        holding the response; its query string (`stream`, `starting_after`) goes along."""
        started = time.perf_counter()
        api_key = self.authenticate(request)
        owner = await self.response_owner(response_id, api_key, None)
        query = request.url.query
        path = f"/v1/responses/{response_id}{suffix}" + (f"?{query}" if query else "")
        stream = request.query_params.get("stream", "").lower() == "true"
        assert self.forwarder is not None, "lifespan not started"
        with self.key_slots.hold(api_key) as slot:
            response = await _unless_client_leaves(request.receive, self.forwarder.forward(
                ForwardRequest(route="responses_by_id", path=path, body=b"", stream=stream,
                               request_id=request.state.request_id, started=started,
                               on_stream_end=slot.release, method=method,
                               pinned_worker=owner)))
            return slot.follow(response)

    def _after_response(self, response: Response, request: BaseModel,
                        context: RequestContext) -> None:
        """Arrange for the pipeline's after-response hooks to run once the client has the
        whole answer: a plain answer after its body is sent, a stream after its last event.
        The hooks run as a detached task, so they delay neither this answer nor the next
        request on the same connection."""
        def schedule(outcome: ResponseOutcome) -> None:
            task = asyncio.create_task(self.pipeline.after_response(request, context, outcome))
            self._after_tasks.add(task)
            task.add_done_callback(self._after_tasks.discard)

        if isinstance(response, StreamingResponse):
            response.body_iterator = follow_stream(
                response.body_iterator, StreamFollower(context.route), schedule)
        elif response.status_code != CLIENT_CLOSED_REQUEST:
            outcome = outcome_of_json(context.route, response.status_code, response.body)
            response.background = BackgroundTask(_call_async, schedule, outcome)


async def _call_async(function: Callable[..., None], *args: object) -> None:
    # A BackgroundTask runs a plain function in a thread pool; scheduling a task needs the
    # event loop's thread.
    function(*args)


async def _unless_client_leaves(receive: Receive, forwarding: object) -> Response:
    """Await the forward, but cancel it when the client disconnects first.

    Cancelling closes the upstream connection, which makes vLLM abort the generation and
    frees the worker and the key's concurrency slot at once instead of at the read timeout.
    """
    forward_task = asyncio.ensure_future(forwarding)  # type: ignore[arg-type]
    watch_task = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait((forward_task, watch_task), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this handler itself cancelled (shutdown): take the forward along
        forward_task.cancel()
        raise
    finally:
        watch_task.cancel()
    if forward_task.done():
        return forward_task.result()
    forward_task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        response = await forward_task
        if isinstance(response, Response) and hasattr(response, "body_iterator"):
            await response.body_iterator.aclose()  # type: ignore[attr-defined]
    return Response(status_code=CLIENT_CLOSED_REQUEST)


async def _disconnected(receive: Receive) -> None:
    # The body has been read, so the next message is the disconnect (or nothing, until the
    # response is complete, when this task is cancelled).
    while (await receive())["type"] != "http.disconnect":
        pass


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

    for spec in FORWARDED_ROUTES:
        app.add_api_route(spec.path, _forwarding_endpoint(gateway, spec), methods=["POST"],
                          name=spec.route)

    @app.get("/v1/models")
    async def list_models(request: Request) -> JSONResponse:
        gateway.authenticate(request)
        created = int(time.time())
        data = [_model_card(model, created) for model in sorted(gateway.pool.served_models())]
        return JSONResponse({"object": "list", "data": data})

    @app.get("/v1/models/{model_id:path}")
    async def get_model(request: Request, model_id: str) -> JSONResponse:
        gateway.authenticate(request)
        if model_id not in gateway.pool.served_models():
            raise OpenAIError(404, f"The model `{model_id}` does not exist.", param="model",
                              type="not_found_error", code="model_not_found")
        return JSONResponse(_model_card(model_id, int(time.time())))

    @app.get("/v1/responses/{response_id}")
    async def get_response(request: Request, response_id: str) -> Response:
        return await gateway.forward_by_id(request, response_id, "GET")

    @app.post("/v1/responses/{response_id}/cancel")
    async def cancel_response(request: Request, response_id: str) -> Response:
        return await gateway.forward_by_id(request, response_id, "POST", "/cancel")

    install_memory_routes(app, gateway.authenticate, gateway.pipeline.stages)

    @app.get("/health")
    async def health() -> JSONResponse:
        healthy = len(gateway.pool.healthy())
        body = {"status": "ok" if healthy else "unavailable", "workers_healthy": healthy,
                "workers_total": len(gateway.pool.workers)}
        return JSONResponse(body, status_code=200 if healthy else 503)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        if gateway.settings.metrics_require_key:
            gateway.authenticate(request)
        return Response(generate_latest(gateway.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _forwarding_endpoint(gateway: Gateway, spec: RouteSpec) -> Callable:
    async def endpoint(request: Request) -> Response:
        return await gateway.forward(request, spec)

    endpoint.__name__ = f"forward_{spec.route}"
    return endpoint


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


def _model_card(model: str, created: int) -> dict:
    return {"id": model, "object": "model", "created": created, "owned_by": "tessera-serve"}
