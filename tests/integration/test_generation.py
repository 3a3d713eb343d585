"""Chat and text completions through the gateway with the official openai client."""

from __future__ import annotations

import httpx
import openai

from tests.integration.conftest import EMBED_MODEL, MODEL, Stack

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_chat_completion_answers_sensibly(stack: Stack) -> None:
    client = openai.OpenAI(base_url=stack.base_url, api_key="unused")
    reply = client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=24, temperature=0
    )
    assert "Paris" in reply.choices[0].message.content
    assert reply.usage.completion_tokens > 0


def test_chat_completion_streams_chunk_by_chunk(stack: Stack) -> None:
    client = openai.OpenAI(base_url=stack.base_url, api_key="unused")
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=24, temperature=0, stream=True
    ))
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert len(chunks) > 3  # many chunks: not buffered into one
    assert "Paris" in text


def test_stream_keeps_done_sentinel(client: httpx.Client) -> None:
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 4, "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)


def test_text_completion_continues_prompt(stack: Stack) -> None:
    client = openai.OpenAI(base_url=stack.base_url, api_key="unused")
    reply = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0
    )
    assert "Paris" in reply.choices[0].text


def test_text_completion_streams(stack: Stack) -> None:
    client = openai.OpenAI(base_url=stack.base_url, api_key="unused")
    chunks = list(client.completions.create(
        model=MODEL, prompt="One, two, three,", max_tokens=8, temperature=0, stream=True
    ))
    assert len(chunks) >= 4
    assert "".join(chunk.choices[0].text for chunk in chunks if chunk.choices).strip()


def test_unknown_fields_reach_the_worker(client: httpx.Client) -> None:
    # ignore_eos is vLLM-only: exactly max_tokens tokens come back only if it was forwarded.
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 12, "ignore_eos": True, "top_k": 3}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 12


def test_models_lists_the_served_models(stack: Stack) -> None:
    client = openai.OpenAI(base_url=stack.base_url, api_key="unused")
    assert [model.id for model in client.models.list()] == sorted([EMBED_MODEL, MODEL])


def test_request_id_is_echoed_and_forwarded(client: httpx.Client) -> None:
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 2}
    response = client.post("/v1/chat/completions", json=body,
                           headers={"x-request-id": "req-it-42"})
    assert response.headers["x-request-id"] == "req-it-42"
    # vLLM names the completion after the request id it was given.
    assert response.json()["id"] == "chatcmpl-req-it-42"


def test_health_reports_workers(client: httpx.Client) -> None:
    body = client.get("/health").json()
    assert body["status"] == "ok" and body["workers_healthy"] >= 1
