"""Failure paths from review, against misbehaving stub workers on real sockets (a real vLLM
cannot be made to die mid-event or drop a connection on cue; see gateway_stubs.py)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from server.app import create_app
from server.config import ServerSettings
from server.launcher import free_port
from server.schemas import ChatMessage
from server.upstream_errors import normalise_upstream_error
from tests.unit.gateway_stubs import (
    MODEL,
    SlowFirstEvent,
    StubWorker,
    answer_ok,
    close_after_reading,
    die_mid_event,
    echo_body,
    gateway_over,
    slow,
    unaccepting_listener,
)

COMPLETION = {"model": MODEL, "prompt": "hi", "max_tokens": 4}


def _error(response) -> dict:  # noqa: ANN001 - httpx.Response
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


async def test_worker_dying_mid_event_ends_the_stream_with_whole_events() -> None:
    whole = b'data: {"choices": [{"text": "Hel"}]}\n\n'
    torn = b'data: {"choices": [{"text": "lo wor'
    async with StubWorker(die_mid_event(whole, torn)) as worker, \
            gateway_over([worker.url]) as client:
        response = await client.post("/v1/completions", json=COMPLETION | {"stream": True})
    events = response.text.split("\n\n")
    assert response.text.startswith(whole.decode())
    assert "lo wor" not in response.text  # the torn event is dropped, not glued to the error
    error_event = events[1]
    assert error_event.startswith("data: ")
    assert json.loads(error_event[6:])["error"]["code"] == "upstream_error"
    assert events[2] == "data: [DONE]" and response.text.endswith("\n\n")


async def test_responses_stream_ends_with_a_typed_error_event() -> None:
    whole = b'event: response.created\ndata: {"type": "response.created"}\n\n'
    async with StubWorker(die_mid_event(whole, b"event: response.output_text.de")) as worker, \
            gateway_over([worker.url]) as client:
        body = {"model": MODEL, "input": "hi", "stream": True}
        response = await client.post("/v1/responses", json=body)
    assert response.text.startswith(whole.decode() + "event: error\ndata: ")
    assert json.loads(response.text.split("data: ")[-1])["type"] == "error"


async def test_a_request_that_reached_a_worker_is_not_retried() -> None:
    async with StubWorker(close_after_reading) as dying, StubWorker(answer_ok) as healthy, \
            gateway_over([dying.url, healthy.url]) as client:
        response = await client.post("/v1/completions", json=COMPLETION)
        pool = client.gateway.pool  # type: ignore[attr-defined]
        assert response.status_code == 502 and _error(response)["code"] == "upstream_error"
        assert (dying.posts, healthy.posts) == (1, 0)  # no duplicate generation elsewhere
        assert not pool.workers[0].healthy


async def test_refused_connection_is_retried_elsewhere_and_marks_the_worker_down() -> None:
    async with StubWorker(answer_ok) as healthy, \
            gateway_over([f"http://127.0.0.1:{free_port()}", healthy.url]) as client:
        pool = client.gateway.pool  # type: ignore[attr-defined]
        pool.workers[0].healthy, pool.workers[0].models = True, [MODEL]  # as if it just died
        response = await client.post("/v1/completions", json=COMPLETION)
        assert response.status_code == 200 and healthy.posts == 1
        assert not pool.workers[0].healthy


async def test_connect_timeout_is_retried_elsewhere_and_marks_the_worker_down() -> None:
    with unaccepting_listener() as hanging_url:
        async with StubWorker(answer_ok) as healthy, \
                gateway_over([hanging_url, healthy.url]) as client:
            pool = client.gateway.pool  # type: ignore[attr-defined]
            pool.workers[0].healthy, pool.workers[0].models = True, [MODEL]
            response = await client.post("/v1/completions", json=COMPLETION)
            assert response.status_code == 200 and healthy.posts == 1
            assert not pool.workers[0].healthy


async def test_slow_worker_is_504_and_stays_in_rotation() -> None:
    async with StubWorker(slow(3.0)) as worker, \
            gateway_over([worker.url], upstream_read_timeout_s=0.3) as client:
        response = await client.post("/v1/completions", json=COMPLETION)
        assert response.status_code == 504 and _error(response)["code"] == "upstream_timeout"
        assert client.gateway.pool.workers[0].healthy  # type: ignore[attr-defined]


async def test_exhausted_connection_budget_is_the_gateways_503_not_a_worker_failure() -> None:
    async with StubWorker(slow(1.5)) as worker, \
            gateway_over([worker.url], upstream_max_connections=1) as client:
        first = asyncio.create_task(client.post("/v1/completions", json=COMPLETION))
        await asyncio.sleep(0.2)
        second = await client.post("/v1/completions", json=COMPLETION)
        assert second.status_code == 503 and _error(second)["code"] == "gateway_overloaded"
        assert (await first).status_code == 200
        assert client.gateway.pool.workers[0].healthy  # type: ignore[attr-defined]


@pytest.mark.parametrize(("path", "body", "field"), [
    ("/v1/completions", {"model": MODEL, "prompt": "hi"}, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "n": 4}, "max_tokens"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}]},
     "max_tokens"),
    ("/v1/responses", {"model": MODEL, "input": "hi"}, "max_output_tokens"),
])
async def test_max_tokens_ceiling_is_the_default_when_omitted(path: str, body: dict,
                                                               field: str) -> None:
    async with StubWorker(echo_body) as worker, \
            gateway_over([worker.url], max_tokens_ceiling=16) as client:
        forwarded = (await client.post(path, json=body | {"extra": [1, "x"]})).json()
    assert forwarded[field] == 16 and forwarded["extra"] == [1, "x"]


async def test_body_within_the_ceiling_is_forwarded_byte_for_byte() -> None:
    raw = b'{"model":"m","prompt":"hi","max_tokens":3,  "top_k": 5}'
    async with StubWorker(echo_body) as worker, \
            gateway_over([worker.url], max_tokens_ceiling=16) as client:
        response = await client.post("/v1/completions", content=raw)
    assert response.content == raw


@pytest.mark.parametrize(("given", "kept"), [
    (b"abc-123.X:y_z", True), (b"\xff\xfe\xfd", False), (b"has space", False),
    (b"x" * 129, False), (b"", False), (b"line\r", False),
])
async def test_request_id_is_kept_only_when_short_and_printable(given: bytes,
                                                                kept: bool) -> None:
    async with StubWorker(answer_ok) as worker, gateway_over([worker.url]) as client:
        response = await client.get("/health", headers=[(b"x-request-id", given)])
    assert response.status_code == 200
    echoed = response.headers["x-request-id"].encode()
    assert (echoed == given) is kept
    if not kept:
        assert len(echoed) == 32


@pytest.mark.parametrize("header", [b"Bearer sk-\xe9\xff", b"Bearer sk-righ", b"Basic sk-right"])
async def test_wrong_keys_of_any_bytes_are_401(header: bytes) -> None:
    async with StubWorker(answer_ok) as worker, \
            gateway_over([worker.url], api_keys=["sk-right"]) as client:
        response = await client.get("/v1/models", headers=[(b"authorization", header)])
    assert response.status_code == 401 and _error(response)["type"] == "authentication_error"


@pytest.mark.parametrize(("require", "status"), [(False, 200), (True, 401)])
async def test_metrics_key_is_a_setting(require: bool, status: int) -> None:
    async with StubWorker(answer_ok) as worker, gateway_over(
            [worker.url], api_keys=["sk-right"], metrics_require_key=require) as client:
        assert (await client.get("/metrics")).status_code == status
        keyed = await client.get("/metrics", headers={"authorization": "Bearer sk-right"})
        assert keyed.status_code == 200


def _vllm_error(message: str, kind: str, status: int) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "param": None,
                                 "code": status}}).encode()


@pytest.mark.parametrize(("status", "payload", "route", "expected"), [
    (400, _vllm_error("This model's maximum context length is 2048 tokens. However...",
                      "BadRequestError", 400), "completions",
     (400, "invalid_request_error", "context_length_exceeded", "prompt")),
    (400, _vllm_error("This model's maximum context length is 2048 tokens.",
                      "BadRequestError", 400), "chat",
     (400, "invalid_request_error", "context_length_exceeded", "messages")),
    (400, _vllm_error("stop sequence too long", "BadRequestError", 400), "chat",
     (400, "invalid_request_error", None, None)),
    (404, _vllm_error("The model `x` does not exist.", "NotFoundError", 404), "chat",
     (404, "not_found_error", None, None)),
    (404, b'{"detail": "Not Found"}', "embeddings",
     (404, "not_found_error", "route_not_served", None)),
    (429, _vllm_error("slow down", "RateLimitError", 429), "chat",
     (429, "rate_limit_error", None, None)),
    (503, _vllm_error("engine overloaded", "ServiceUnavailableError", 503), "chat",
     (503, "server_error", "upstream_unavailable", None)),
    (500, b"Internal Server Error", "chat", (502, "server_error", "upstream_error", None)),
])
def test_worker_errors_map_by_status_and_vllm_type(status: int, payload: bytes, route: str,
                                                   expected: tuple) -> None:
    error = normalise_upstream_error(status, payload, route)
    assert (error.status_code, error.type, error.code, error.param) == expected


class _SystemNote:
    """A stage that rewrites the request, as SecurityLingua's will."""

    name = "system-note"

    async def __call__(self, request, context):  # noqa: ANN001, ANN204 - Stage protocol
        note = ChatMessage(role="system", content=f"note for {context.request_id}")
        return request.model_copy(update={"messages": [note, *request.messages]})


async def test_pipeline_stages_rewrite_what_the_worker_receives() -> None:
    async with StubWorker(echo_body) as worker:
        app = create_app(ServerSettings(workers=0, worker_urls=[worker.url],
                                        health_interval_s=3600), stages=[_SystemNote()])
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                         base_url="http://gw") as client:
                body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                        "top_k": 3}
                forwarded = (await client.post("/v1/chat/completions", json=body,
                                               headers={"x-request-id": "r-1"})).json()
    assert forwarded["messages"][0] == {"role": "system", "content": "note for r-1"}
    assert forwarded["messages"][1] == {"role": "user", "content": "hi"}
    assert forwarded["top_k"] == 3


async def test_stream_left_during_prefill_frees_worker_slot_and_upstream() -> None:
    """Drives the ASGI app directly: the client's disconnect arrives while the worker is
    still before its first event."""
    prefill = SlowFirstEvent(seconds=3.0)
    async with StubWorker(prefill) as worker, \
            gateway_over([worker.url], max_concurrent_per_key=1) as client:
        body = json.dumps(COMPLETION | {"stream": True}).encode()
        pending = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict:
            if pending:
                return pending.pop()
            await asyncio.sleep(0.3)
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            pass

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                 "method": "POST", "scheme": "http", "path": "/v1/completions",
                 "raw_path": b"/v1/completions", "query_string": b"", "root_path": "",
                 "headers": [(b"content-type", b"application/json")],
                 "client": ("127.0.0.1", 1), "server": ("gw", 80)}
        await asyncio.wait_for(client.app(scope, receive, send), 2.0)  # type: ignore[attr-defined]
        await asyncio.wait_for(prefill.closed_by_gateway.wait(), 2.0)
        gateway = client.gateway  # type: ignore[attr-defined]
        assert gateway.pool.workers[0].outstanding == 0
        assert gateway.key_slots.in_flight["-"] == 0
