"""The routes beyond chat and completions, through the gateway to real vLLM workers, with the
official openai SDK where it has them: responses (plain and streamed), embeddings (from the
pooling-runner worker), tokenize/detokenize, models/{id}, and OpenAI-shaped 404s."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.integration.conftest import (
    API_KEY,
    EMBED_MODEL,
    MODEL,
    Stack,
    assert_openai_error,
)


@pytest.fixture
def sdk(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url, api_key="unused", max_retries=0)


def test_responses_answers(sdk: openai.OpenAI) -> None:
    reply = sdk.responses.create(model=MODEL, input="What is the capital of France?",
                                 max_output_tokens=16, temperature=0)
    assert reply.object == "response" and "Paris" in reply.output_text


def test_responses_streams_typed_events(sdk: openai.OpenAI) -> None:
    with sdk.responses.stream(model=MODEL, input="What is the capital of France?",
                              max_output_tokens=16, temperature=0) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert kinds.count("response.output_text.delta") > 1  # relayed event by event
    assert "Paris" in final.output_text


def test_embeddings_from_the_pooling_worker(sdk: openai.OpenAI) -> None:
    result = sdk.embeddings.create(model=EMBED_MODEL, input=["a cat", "a dog", "an invoice"])
    vectors = [item.embedding for item in result.data]
    assert len(vectors) == 3 and len(vectors[0]) == 576  # SmolLM2-135M hidden size

    def cosine(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True)) / (
            sum(x * x for x in a) ** 0.5 * sum(y * y for y in b) ** 0.5)

    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2])


def test_embeddings_of_a_generative_model_is_a_shaped_404(sdk: openai.OpenAI) -> None:
    # vLLM registers /v1/embeddings only for pooling models: the worker's bare 404 becomes
    # OpenAI's error, not a hang and not a 502.
    with pytest.raises(openai.NotFoundError) as caught:
        sdk.embeddings.create(model=MODEL, input="x")
    assert caught.value.body["code"] == "route_not_served"


def test_chat_on_the_embedding_model_is_a_shaped_404(client: httpx.Client) -> None:
    body = {"model": EMBED_MODEL, "messages": [{"role": "user", "content": "hi"}]}
    assert assert_openai_error(client.post("/v1/chat/completions", json=body), 404)


def test_tokenize_then_detokenize_round_trips(client: httpx.Client) -> None:
    tokens = client.post("/tokenize", json={"model": MODEL, "prompt": "Hello there"}).json()
    assert tokens["count"] == len(tokens["tokens"]) > 0
    text = client.post("/detokenize", json={"model": MODEL, "tokens": tokens["tokens"]}).json()
    assert text["prompt"] == "Hello there"


def test_tokenize_renders_chat_messages(client: httpx.Client) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}
    response = client.post("/tokenize", json=body)
    assert response.status_code == 200 and response.json()["count"] > 3


def test_model_by_id(sdk: openai.OpenAI, client: httpx.Client) -> None:
    assert sdk.models.retrieve(MODEL).id == MODEL
    error = assert_openai_error(client.get("/v1/models/gpt-17"), 404)
    assert (error["type"], error["code"]) == ("not_found_error", "model_not_found")


@pytest.mark.parametrize("path", ["/v1/audio/speech", "/v1/files", "/v2/anything"])
def test_unknown_routes_are_shaped_404s(client: httpx.Client, path: str) -> None:
    assert_openai_error(client.post(path, json={}), 404)


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/responses", {"model": MODEL, "input": "hi", "max_output_tokens": 1}),
    ("/tokenize", {"prompt": "hi"}),
    ("/detokenize", {"tokens": [1]}),
])
def test_new_routes_need_the_key_on_the_keyed_gateway(stack: Stack, path: str,
                                                      body: dict) -> None:
    url = f"{stack.keyed_gateway_url}{path}"
    assert_openai_error(httpx.post(url, json=body), 401)
    keyed = httpx.post(url, json=body, headers={"authorization": f"Bearer {API_KEY}"},
                       timeout=60)
    assert keyed.status_code == 200, keyed.text


def test_new_routes_are_counted_in_metrics(client: httpx.Client) -> None:
    client.post("/tokenize", json={"prompt": "hi"})
    assert 'tessera_requests_total{route="tokenize",status="200"}' in client.get("/metrics").text
