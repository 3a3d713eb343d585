"""SeCom through the gateway app over stub workers on real sockets: the conversation id,
the after-response write (plain and streamed, never for a failed stream, never delaying the
answer), idempotency by request id, and the /v1/memory routes' contract. The real-vLLM path
is tests/integration/test_secom.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
from prometheus_client import CollectorRegistry, Counter

from prompt_pipeline.config import SecomSettings
from prompt_pipeline.guard import GuardedStage
from prompt_pipeline.secom.memory import ConversationMemory, RecallSettings
from prompt_pipeline.secom.segmenter import TailSegmenter
from prompt_pipeline.secom.stage import SecomStage
from prompt_pipeline.secom.store import ConversationKey, SQLiteMemoryStore
from server.app import create_app
from server.config import ServerSettings
from tests.unit.gateway_stubs import MODEL, StubWorker, die_mid_event, respond
from tests.unit.test_secom_memory import topic_embed

ANSWER = "Noted, your dog Biscuit."


class ChatWorker:
    """Answers every chat request with ANSWER (as JSON or as SSE) and keeps the bodies."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []

    async def __call__(self, body: bytes, writer: asyncio.StreamWriter) -> None:
        request = json.loads(body)
        self.bodies.append(request)
        if not request.get("stream"):
            answer = {"choices": [{"index": 0, "message": {"role": "assistant",
                                                           "content": ANSWER},
                                   "finish_reason": "stop"}]}
            writer.write(respond(200, json.dumps(answer).encode()))
            return
        events = b""
        for piece in ("Noted, ", "your dog ", "Biscuit."):
            chunk = {"choices": [{"index": 0, "delta": {"content": piece},
                                  "finish_reason": None}]}
            events += f"data: {json.dumps(chunk)}\n\n".encode()
        end = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        events += f"data: {json.dumps(end)}\n\ndata: [DONE]\n\n".encode()
        writer.write(respond(200, events, "text/event-stream"))


def slow_embed(seconds: float):
    def embed(texts: list[str]) -> np.ndarray:
        if any(text.startswith("[user]") for text in texts):  # a write, not a query
            time.sleep(seconds)
        return topic_embed(texts)
    return embed


def memory_stage(path: Path, embed=topic_embed, **settings: object) -> SecomStage:
    store = SQLiteMemoryStore(path)
    memory = ConversationMemory(store, embed, settings=RecallSettings(top_k=1))
    return SecomStage(memory, SecomSettings(**settings))


@contextlib.asynccontextmanager
async def gateway(url: str, stage: SecomStage | None, **overrides: object,
                  ) -> AsyncIterator[httpx.AsyncClient]:
    settings = ServerSettings(workers=0, worker_urls=[url], health_interval_s=3600,
                              **overrides)
    failures = Counter("f", "f", ["stage", "decision"], registry=CollectorRegistry())
    stages = [GuardedStage(stage, "closed", failures)] if stage else []
    app = create_app(settings, stages)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw",
                                     timeout=30) as client:
            client.gateway = app.state.gateway  # type: ignore[attr-defined]
            yield client


async def settled(client: httpx.AsyncClient) -> None:
    """Wait for the detached after-response tasks (memory writes) to finish."""
    tasks = set(client.gateway._after_tasks)  # type: ignore[attr-defined]
    if tasks:
        await asyncio.wait(tasks, timeout=30)


def chat(content: str, **extra: object) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}


def stored(stage: SecomStage, user: str = "alice", conversation: str = "c1",
           api_key: str | None = None) -> list[tuple[str, str]]:
    key = ConversationKey.for_request(api_key, user, conversation)
    return [(e.user_text, e.assistant_text) for e in stage.memory.store.exchanges(key)]


async def test_an_answer_is_stored_and_recalled_into_the_next_request(tmp_path: Path) -> None:
    worker = ChatWorker()
    stage = memory_stage(tmp_path / "m.sqlite3")
    async with StubWorker(worker) as stub, gateway(stub.url, stage) as client:
        first = await client.post("/v1/chat/completions", json=chat(
            "The dog is called Biscuit.", user="alice", conversation_id="c1"))
        assert first.status_code == 200
        assert "conversation_id" not in worker.bodies[0]  # the gateway's field, not vLLM's
        await settled(client)
        assert stored(stage) == [("The dog is called Biscuit.", ANSWER)]
        second = await client.post("/v1/chat/completions", json=chat(
            "What is my dog called?", user="alice"),
            headers={"x-tessera-conversation": "c1"})
        assert second.status_code == 200
        system = worker.bodies[1]["messages"][0]
        assert system["role"] == "system" and "Biscuit" in system["content"]
        await settled(client)
        assert len(stored(stage)) == 2  # the question was stored too
        await client.post("/v1/chat/completions", json=chat(
            "And what is my dog called?", user="alice", conversation_id="c1"),
            headers={"x-tessera-memory": "recall"})
        await settled(client)
        assert "Biscuit" in worker.bodies[2]["messages"][0]["content"]
        assert len(stored(stage)) == 2  # recall only: nothing stored
        # Another user, and the same user without a conversation id: nothing injected.
        await client.post("/v1/chat/completions", json=chat("What is my dog called?",
                                                            user="bob", conversation_id="c1"))
        await client.post("/v1/chat/completions", json=chat("dog?", user="alice"))
        assert [b["messages"][0]["role"] for b in worker.bodies[3:]] == ["user", "user"]
        metrics = (await client.get("/metrics")).text
        assert "tessera_memory_units_retrieved_count 4.0" in metrics  # 4 opted-in requests


async def test_a_streamed_answer_is_stored_once_complete(tmp_path: Path) -> None:
    stage = memory_stage(tmp_path / "m.sqlite3")
    async with StubWorker(ChatWorker()) as stub, gateway(stub.url, stage) as client:
        response = await client.post("/v1/chat/completions", json=chat(
            "The dog is called Biscuit.", user="alice", conversation_id="c1", stream=True))
        assert response.status_code == 200 and "[DONE]" in response.text
        await settled(client)
    assert stored(stage) == [("The dog is called Biscuit.", ANSWER)]


async def test_a_stream_that_fails_midway_stores_nothing(tmp_path: Path) -> None:
    stage = memory_stage(tmp_path / "m.sqlite3")
    chunk = {"choices": [{"index": 0, "delta": {"content": "Noted"}, "finish_reason": None}]}
    events = f"data: {json.dumps(chunk)}\n\n".encode()
    async with StubWorker(die_mid_event(events, b"data: {\"cho")) as stub, \
            gateway(stub.url, stage) as client:
        response = await client.post("/v1/chat/completions", json=chat(
            "The dog is called Biscuit.", user="alice", conversation_id="c1", stream=True))
        assert "upstream_error" in response.text
        await settled(client)
    assert stored(stage) == []
    assert stage.metrics.writes.labels("not_completed")._value.get() == 1


async def test_a_slow_memory_write_does_not_delay_the_answer(tmp_path: Path) -> None:
    stage = memory_stage(tmp_path / "m.sqlite3", embed=slow_embed(1.5))
    async with StubWorker(ChatWorker()) as stub, gateway(stub.url, stage) as client:
        started = time.perf_counter()
        response = await client.post("/v1/chat/completions", json=chat(
            "The dog is called Biscuit.", user="alice", conversation_id="c1"))
        answered = time.perf_counter() - started
        assert response.status_code == 200 and answered < 1.0, answered
        assert stored(stage) == []  # still being written
        await settled(client)
    assert len(stored(stage)) == 1


async def test_a_retried_request_id_is_stored_once(tmp_path: Path) -> None:
    stage = memory_stage(tmp_path / "m.sqlite3")
    async with StubWorker(ChatWorker()) as stub, gateway(stub.url, stage) as client:
        for _ in range(3):
            await client.post("/v1/chat/completions", json=chat(
                "The dog is called Biscuit.", user="alice", conversation_id="c1"),
                headers={"x-request-id": "retry-1"})
            await settled(client)
    assert len(stored(stage)) == 1
    assert stage.metrics.writes.labels("duplicate")._value.get() == 2


async def test_a_key_default_opts_in_and_the_header_opts_out(tmp_path: Path) -> None:
    stage = memory_stage(tmp_path / "m.sqlite3", opt_in_per_key={"sk-a": True})
    async with StubWorker(ChatWorker()) as stub, \
            gateway(stub.url, stage, api_keys=["sk-a", "sk-b"]) as client:
        for key, switch in (("sk-a", "on"), ("sk-b", "on"), ("sk-a", "off")):
            await client.post("/v1/chat/completions", json=chat(f"hi from {key} {switch}",
                                                                user="alice"),
                              headers={"authorization": f"Bearer {key}",
                                       "x-tessera-memory": switch})
            await settled(client)
    assert stored(stage, conversation="default", api_key="sk-a") == [("hi from sk-a on", ANSWER)]
    assert stored(stage, conversation="default", api_key="sk-b") == []


async def test_bad_memory_ids_are_a_400(tmp_path: Path) -> None:
    stage = memory_stage(tmp_path / "m.sqlite3")
    async with StubWorker(ChatWorker()) as stub, gateway(stub.url, stage) as client:
        for body, headers in ((chat("x", user="a", conversation_id=7), {}),
                              (chat("x", user="a", conversation_id="a/b"), {}),
                              (chat("x", user="a", conversation_id="x" * 300), {}),
                              (chat("x", user="a"), {"x-tessera-conversation": ""}),
                              (chat("x", user="a"), {"x-tessera-memory": "maybe"}),
                              (chat("x", user="a/b", conversation_id="c"), {})):
            response = await client.post("/v1/chat/completions", json=body, headers=headers)
            assert response.status_code == 400, response.text
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}


async def test_memory_routes_list_and_erase_per_tenant(tmp_path: Path) -> None:
    path = tmp_path / "m.sqlite3"
    stage = memory_stage(path)
    marker = "passport-QX81773"
    async with StubWorker(ChatWorker()) as stub, \
            gateway(stub.url, stage, api_keys=["sk-a", "sk-b"]) as client:
        a, b = ({"authorization": f"Bearer {key}"} for key in ("sk-a", "sk-b"))
        for conversation in ("c1", "c2"):
            await client.post("/v1/chat/completions", headers=a, json=chat(
                f"My {marker} in {conversation}", user="alice", conversation_id=conversation))
            await settled(client)
        listing = (await client.get("/v1/memory/alice", headers=a)).json()
        assert [(c["conversation_id"], c["exchanges"]) for c in listing["data"]] == [
            ("c1", 1), ("c2", 1)]
        exchanges = (await client.get("/v1/memory/alice/c1", headers=a)).json()["data"]
        assert exchanges[0]["user"] == f"My {marker} in c1"
        # Another key sees and erases nothing of alice's, whatever ids it guesses.
        assert (await client.get("/v1/memory/alice", headers=b)).json()["data"] == []
        assert (await client.get("/v1/memory/alice/c1", headers=b)).json()["data"] == []
        gone = (await client.delete("/v1/memory/alice", headers=b)).json()
        assert gone["exchanges_deleted"] == 0
        assert (await client.get("/v1/memory/alice")).status_code == 401
        erased = await client.delete("/v1/memory/alice/c1", headers=a)
        assert erased.json()["exchanges_deleted"] == 1
        assert [c["conversation_id"] for c in
                (await client.get("/v1/memory/alice", headers=a)).json()["data"]] == ["c2"]
        await client.delete("/v1/memory/alice", headers=a)
        assert (await client.get("/v1/memory/alice", headers=a)).json()["data"] == []
        # Erasure is on disk: neither the database file nor its WAL holds the text.
        on_disk = b"".join(p.read_bytes() for p in path.parent.iterdir() if p.is_file())
        assert marker.encode() not in on_disk
        bad = await client.get("/v1/memory/%00x", headers=a)
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_memory_id"


async def test_memory_routes_without_the_stage_are_a_404() -> None:
    async with StubWorker(ChatWorker()) as stub, gateway(stub.url, None) as client:
        for method in ("GET", "DELETE"):
            response = await client.request(method, "/v1/memory/alice")
            assert response.status_code == 404
            assert response.json()["error"]["code"] == "memory_not_enabled"


async def test_segmentation_asks_the_served_model_over_http_and_counts_the_fallback(
    tmp_path: Path,
) -> None:
    worker = ChatWorker()  # answers every prompt with ANSWER: no segmentation parses
    memory = ConversationMemory(SQLiteMemoryStore(tmp_path / "m.sqlite3"), topic_embed,
                                settings=RecallSettings(top_k=1), segmenter=TailSegmenter())
    stage = SecomStage(memory, SecomSettings())
    async with StubWorker(worker) as stub, gateway(stub.url, stage) as client:
        for text in ("We adopted a puppy.", "The dog is called Biscuit."):
            response = await client.post("/v1/chat/completions", json=chat(
                text, user="alice", conversation_id="c1"))
            assert response.status_code == 200
            await settled(client)
    asked = [body["messages"][0]["content"] for body in worker.bodies[2:]]
    assert len(worker.bodies) == 4 and all(b["model"] == MODEL for b in worker.bodies)
    assert "Group the exchanges" in asked[0] and "Answer Yes or No" in asked[1]
    metrics = stage.metrics
    assert metrics.segmentation_fallbacks.labels("batch", "unparsed")._value.get() == 1
    assert metrics.segmentation_fallbacks.labels("incremental", "unparsed")._value.get() == 1
    assert metrics.segmentations.labels("texttiling")._value.get() == 1
    assert metrics.segmentations.labels("trivial")._value.get() == 1  # the first exchange
    assert len(stored(stage)) == 2


async def test_an_erase_during_a_slow_write_wins(tmp_path: Path) -> None:
    stage = memory_stage(tmp_path / "m.sqlite3", embed=slow_embed(1.0))
    async with StubWorker(ChatWorker()) as stub, gateway(stub.url, stage) as client:
        response = await client.post("/v1/chat/completions", json=chat(
            "The dog is called Biscuit.", user="alice", conversation_id="c1"))
        assert response.status_code == 200  # answered; its write is still embedding
        erased = await client.delete("/v1/memory/alice/c1")
        assert erased.status_code == 200
        await settled(client)
        assert (await client.get("/v1/memory/alice/c1")).json()["data"] == []
    assert stored(stage) == []
    assert stage.metrics.writes.labels("erased")._value.get() == 1
