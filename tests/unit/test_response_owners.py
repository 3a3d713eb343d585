"""Responses-API state across workers: the gateway sends follow-ups, retrievals and cancels
to the worker that stored the response (server/response_owners.py).

Stub workers on real sockets keep responses in memory the way vLLM's store does (the real
vLLM path is tests/integration/test_responses_state.py); each records what it was asked.
"""

from __future__ import annotations

import asyncio
import itertools
import json

import pytest
from aiohttp import web

from server.response_owners import (
    ResponseOwners,
    id_from_event,
    id_from_json,
    key_digest,
    watch_stream_for_id,
)
from tests.unit.gateway_stubs import MODEL, gateway_over

_ids = itertools.count()


def not_stored() -> web.Response:
    error = {"message": "not found", "type": "invalid_request_error", "param": None,
             "code": None}
    return web.json_response({"error": error}, status=404)


class StoringWorker:
    """A worker with a Responses store: POST /v1/responses creates, GET/cancel read it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.store: dict[str, dict] = {}
        self.seen_previous: list[str | None] = []
        self.gets: list[str] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def create(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        previous = body.get("previous_response_id")
        self.seen_previous.append(previous)
        if previous is not None and previous not in self.store:
            return not_stored()
        response = {"id": f"resp_{self.name}{next(_ids):04d}", "object": "response",
                    "status": "completed", "output": [], "worker": self.name}
        self.store[response["id"]] = response
        if not body.get("stream"):
            return web.json_response(response)
        stream = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await stream.prepare(request)
        for kind in ("response.created", "response.completed"):
            event = {"type": kind, "response": response}
            await stream.write(f"event: {kind}\ndata: {json.dumps(event)}\n\n".encode())
        await stream.write_eof()
        return stream

    async def get(self, request: web.Request) -> web.Response:
        response_id = request.match_info["response_id"]
        self.gets.append(response_id)
        if response_id not in self.store:
            return not_stored()
        return web.json_response(self.store[response_id])

    async def cancel(self, request: web.Request) -> web.Response:
        return await self.get(request)

    async def __aenter__(self) -> StoringWorker:
        app = web.Application()
        async def health(_: web.Request) -> web.Response:
            return web.json_response({})

        async def models(_: web.Request) -> web.Response:
            return web.json_response({"data": [{"id": MODEL, "object": "model"}]})

        app.router.add_get("/health", health)
        app.router.add_get("/v1/models", models)
        app.router.add_post("/v1/responses", self.create)
        app.router.add_get("/v1/responses/{response_id}", self.get)
        app.router.add_post("/v1/responses/{response_id}/cancel", self.cancel)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


async def create_concurrently(gateway, count: int, **extra) -> list[dict]:  # noqa: ANN001
    """Requests in flight together spread over the workers (least outstanding)."""
    replies = await asyncio.gather(*(gateway.post("/v1/responses", json={
        "model": MODEL, "input": "hi", **extra}) for _ in range(count)))
    return [reply.json() for reply in replies]


def _error(response) -> dict:  # noqa: ANN001 - httpx.Response
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


async def test_follow_ups_and_retrievals_reach_the_worker_that_stored_the_response() -> None:
    async with StoringWorker("a") as a, StoringWorker("b") as b:
        async with gateway_over([a.url, b.url]) as gateway:
            created = await create_concurrently(gateway, 6)
            assert {c["worker"] for c in created} == {"a", "b"}  # both workers store some
            for response in created:
                worker = a if response["worker"] == "a" else b
                follow = await gateway.post("/v1/responses", json={
                    "model": MODEL, "input": "and?", "previous_response_id": response["id"]})
                assert follow.status_code == 200 and follow.json()["worker"] == response["worker"]
                assert response["id"] in worker.seen_previous
                got = await gateway.get(f"/v1/responses/{response['id']}")
                assert got.status_code == 200 and got.json()["id"] == response["id"]
                cancel = await gateway.post(f"/v1/responses/{response['id']}/cancel")
                assert cancel.status_code == 200
            # nothing was asked of a worker that does not hold the id (no probing needed)
            assert all(i in a.store for i in a.gets) and all(i in b.store for i in b.gets)


async def test_a_streamed_response_is_remembered_from_its_created_event() -> None:
    async with StoringWorker("a") as a, StoringWorker("b") as b:
        async with gateway_over([a.url, b.url]) as gateway:
            ids = []
            for _ in range(4):
                async with gateway.stream("POST", "/v1/responses", json={
                        "model": MODEL, "input": "hi", "stream": True}) as reply:
                    text = (await reply.aread()).decode()
                first_data = text.split("data: ", 1)[1].split("\n", 1)[0]
                ids.append(json.loads(first_data)["response"]["id"])
            owners = gateway.gateway.response_owners  # type: ignore[attr-defined]
            assert all(owners.get(i) is not None for i in ids)
            for response_id in ids:
                assert (await gateway.get(f"/v1/responses/{response_id}")).status_code == 200


async def test_an_id_this_gateway_never_saw_is_located_on_the_workers() -> None:
    # Another gateway replica (or this one before a restart) created it.
    async with StoringWorker("a") as a, StoringWorker("b") as b:
        async with gateway_over([a.url, b.url]) as first:
            created = await create_concurrently(first, 4)
            assert {c["worker"] for c in created} == {"a", "b"}
        async with gateway_over([a.url, b.url]) as second:
            for response in created:
                follow = await second.post("/v1/responses", json={
                    "model": MODEL, "input": "and?", "previous_response_id": response["id"]})
                assert follow.json()["worker"] == response["worker"]


async def test_unknown_bad_and_foreign_ids_are_shaped_4xx() -> None:
    async with StoringWorker("a") as a, StoringWorker("b") as b:
        async with gateway_over([a.url, b.url], api_keys=["key-1", "key-2"]) as gateway:
            one = {"authorization": "Bearer key-1"}
            two = {"authorization": "Bearer key-2"}
            missing = await gateway.get("/v1/responses/resp_nothere", headers=one)
            assert missing.status_code == 404 and _error(missing)["code"] == "response_not_found"
            follow = await gateway.post("/v1/responses", headers=one, json={
                "model": MODEL, "input": "x", "previous_response_id": "resp_nothere"})
            assert follow.status_code == 404
            assert _error(follow)["param"] == "previous_response_id"
            bad = await gateway.get("/v1/responses/..%2F..%2Fhealth", headers=one)
            assert bad.status_code in (400, 404) and "error" in bad.json()
            dotted = await gateway.get("/v1/responses/resp.x", headers=one)
            assert dotted.status_code == 400 and _error(dotted)["code"] == "invalid_response_id"
            created = (await gateway.post("/v1/responses", headers=one,
                                          json={"model": MODEL, "input": "hi"})).json()
            mine = await gateway.get(f"/v1/responses/{created['id']}", headers=one)
            theirs = await gateway.get(f"/v1/responses/{created['id']}", headers=two)
            assert mine.status_code == 200
            # another key cannot tell the id exists: the same 404 as an unknown id
            assert theirs.status_code == 404 and _error(theirs)["code"] == "response_not_found"
            unauthenticated = await gateway.get(f"/v1/responses/{created['id']}")
            assert unauthenticated.status_code == 401


async def test_the_owner_being_down_is_a_503_not_another_worker() -> None:
    async with StoringWorker("a") as a, StoringWorker("b") as b:
        async with gateway_over([a.url, b.url]) as gateway:
            created = await create_concurrently(gateway, 4)
            on_a = next(c for c in created if c["worker"] == "a")
            pool = gateway.gateway.pool  # type: ignore[attr-defined]
            pool.mark_failed(pool.find(a.url), "test")
            reply = await gateway.post("/v1/responses", json={
                "model": MODEL, "input": "and?", "previous_response_id": on_a["id"]})
            assert reply.status_code == 503
            assert _error(reply)["code"] == "response_owner_unavailable"
            assert on_a["id"] not in b.seen_previous


def test_owner_map_is_bounded_least_recently_used_first() -> None:
    owners = ResponseOwners(capacity=3)
    for index in range(3):
        owners.record(f"r{index}", "w", key_digest("k"))
    assert owners.get("r0") is not None  # r0 is now the most recently used
    owners.record("r3", "w", None)
    assert len(owners) == 3 and owners.get("r1") is None and owners.get("r0") is not None


@pytest.mark.parametrize("body,expected", [
    (b'{"id": "resp_1", "object": "response"}', "resp_1"),
    (b'{"id": "chatcmpl-1", "object": "chat.completion"}', None),
    (b"not json", None), (b'["list"]', None), (b'{"object": "response", "id": 3}', None),
])
def test_id_from_json(body: bytes, expected: str | None) -> None:
    assert id_from_json(body) == expected


async def test_stream_watch_relays_every_byte_and_reports_the_id_once() -> None:
    created = (b'event: response.created\ndata: {"type": "response.created", '
               b'"response": {"id": "resp_9"}}\n\n')
    other = (b'event: response.completed\ndata: {"type": "response.completed", '
             b'"response": {"id": "resp_9"}}\n\n')
    chunks = [b"event: x\ndata: {\"type\": \"x\"}\n\n" + created, other, other]
    seen: list[str] = []

    async def source():
        for chunk in chunks:
            yield chunk

    relayed = [chunk async for chunk in watch_stream_for_id(source(), seen.append)]
    assert relayed == chunks and seen == ["resp_9"]
    assert id_from_event(b"data: {broken") is None
