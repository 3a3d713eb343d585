"""Gateway behaviour that needs no worker: routing choice, error mapping, pipeline, limits."""

from __future__ import annotations

import httpx
import pytest

from prompt_pipeline.stage import Pipeline, RequestContext
from server.app import create_app
from server.config import ServerSettings
from server.metrics import GatewayMetrics
from server.router import WorkerPool
from server.upstream_errors import normalise_upstream_error


def test_router_picks_the_least_outstanding_healthy_worker() -> None:
    pool = WorkerPool(["http://a", "http://b", "http://c"], GatewayMetrics())
    a, b, c = pool.workers
    for worker in pool.workers:
        worker.healthy = True
    a.outstanding, b.outstanding, c.outstanding = 3, 1, 2
    assert pool.choose() is b
    b.healthy = False
    assert pool.choose() is c
    assert pool.choose(exclude={"http://c"}) is a


def test_router_has_no_choice_without_healthy_workers() -> None:
    pool = WorkerPool(["http://a"], GatewayMetrics())
    assert pool.choose() is None


def test_vllm_context_error_maps_to_openai_code() -> None:
    payload = (b'{"error": {"message": "This model\'s maximum context length is 2048 tokens.",'
               b' "type": "BadRequestError", "param": null, "code": 400}}')
    error = normalise_upstream_error(400, payload)
    assert (error.status_code, error.type, error.code) == (400, "invalid_request_error",
                                                           "context_length_exceeded")


def test_worker_5xx_becomes_502_server_error() -> None:
    error = normalise_upstream_error(500, b"Internal Server Error")
    assert (error.status_code, error.type, error.code) == (502, "server_error", "upstream_error")


class _AppendSystem:
    name = "append-system"

    async def __call__(self, request: dict, context: RequestContext) -> dict:
        return request | {"stages": [*request.get("stages", []), context.request_id]}


async def test_pipeline_runs_stages_in_order_and_times_them() -> None:
    timings: list[str] = []
    pipeline = Pipeline([_AppendSystem(), _AppendSystem()],
                        on_stage_done=lambda name, seconds: timings.append(name))
    out = await pipeline.run({}, RequestContext(request_id="r1", route="chat"))
    assert out["stages"] == ["r1", "r1"]
    assert timings == ["append-system", "append-system", "total"]


async def test_empty_pipeline_still_reports_its_total_time() -> None:
    timings: list[str] = []
    pipeline = Pipeline([], on_stage_done=lambda name, seconds: timings.append(name))
    assert await pipeline.run({"x": 1}, RequestContext(request_id="r", route="chat")) == {"x": 1}
    assert timings == ["total"]


@pytest.fixture
def offline_client() -> httpx.AsyncClient:
    # A worker URL nothing listens on: every request must get a shaped 503, never a 500.
    settings = ServerSettings(workers=0, worker_urls=["http://127.0.0.1:9"], api_keys=[],
                              max_messages=2, max_tokens_ceiling=16)
    app = create_app(settings)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw")


async def test_no_healthy_worker_is_503(offline_client: httpx.AsyncClient) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    response = await offline_client.post("/v1/chat/completions", json=body)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "no_healthy_worker"


async def test_message_count_limit_is_400(offline_client: httpx.AsyncClient) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}] * 3}
    response = await offline_client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages"


async def test_max_tokens_ceiling_is_400(offline_client: httpx.AsyncClient) -> None:
    body = {"model": "m", "prompt": "x", "max_tokens": 17}
    response = await offline_client.post("/v1/completions", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "max_tokens_exceeded"


async def test_request_id_is_generated_when_absent(offline_client: httpx.AsyncClient) -> None:
    response = await offline_client.get("/health")
    assert response.status_code == 503 and len(response.headers["x-request-id"]) == 32
