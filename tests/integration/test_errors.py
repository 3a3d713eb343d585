"""Every bad request gets OpenAI's error JSON and the right 4xx, never a 500."""

from __future__ import annotations

import httpx

from tests.integration.conftest import MODEL, TEST_MAX_MODEL_LEN, assert_openai_error

CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "hello"}]


def test_malformed_json_is_400(client: httpx.Client) -> None:
    response = client.post(CHAT, content=b'{"model": ',
                           headers={"content-type": "application/json"})
    assert assert_openai_error(response, 400)["code"] == "invalid_json"


def test_body_that_is_not_an_object_is_400(client: httpx.Client) -> None:
    assert_openai_error(client.post(CHAT, json=[1, 2]), 400)


def test_missing_messages_names_the_field(client: httpx.Client) -> None:
    error = assert_openai_error(client.post(CHAT, json={"model": MODEL}), 400)
    assert error["param"] == "messages"
    assert error["type"] == "invalid_request_error"


def test_invalid_role_names_the_field(client: httpx.Client) -> None:
    body = {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}
    error = assert_openai_error(client.post(CHAT, json=body), 400)
    assert error["param"].startswith("messages.0.role")


def test_wrong_type_is_400(client: httpx.Client) -> None:
    body = {"model": MODEL, "messages": USER, "max_tokens": "many"}
    assert assert_openai_error(client.post(CHAT, json=body), 400)["param"] == "max_tokens"


def test_unknown_model_is_404(client: httpx.Client) -> None:
    body = {"model": "gpt-17", "messages": USER}
    error = assert_openai_error(client.post(CHAT, json=body), 404)
    assert (error["param"], error["code"]) == ("model", "model_not_found")


def test_too_long_prompt_is_400_context_length_exceeded(client: httpx.Client) -> None:
    body = {"model": MODEL, "prompt": "hello " * (TEST_MAX_MODEL_LEN + 100), "max_tokens": 1}
    error = assert_openai_error(client.post("/v1/completions", json=body), 400)
    assert error["code"] == "context_length_exceeded"


def test_oversize_body_is_413(client: httpx.Client) -> None:
    body = {"model": MODEL, "prompt": "x" * (5 * 1024 * 1024)}
    error = assert_openai_error(client.post("/v1/completions", json=body), 413)
    assert error["code"] == "request_too_large"


def test_unknown_route_is_404_in_openai_shape(client: httpx.Client) -> None:
    assert_openai_error(client.get("/v1/does-not-exist"), 404)


def test_worker_side_validation_error_is_relayed_as_400(client: httpx.Client) -> None:
    # n * best_of style checks live in vLLM; its 400 must come back shaped, not as a 502.
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 4, "logprobs": 10_000}
    error = assert_openai_error(client.post("/v1/completions", json=body), 400)
    assert error["type"] == "invalid_request_error"
