"""API keys on the keyed gateway: 401 in OpenAI's shape without the right one."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.integration.conftest import API_KEY, MODEL, Stack, assert_openai_error

BODY = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


def test_missing_key_is_401(stack: Stack) -> None:
    response = httpx.post(f"{stack.keyed_gateway_url}/v1/chat/completions", json=BODY)
    assert assert_openai_error(response, 401)["code"] == "missing_api_key"


def test_wrong_key_is_401(stack: Stack) -> None:
    response = httpx.post(f"{stack.keyed_gateway_url}/v1/chat/completions", json=BODY,
                          headers={"authorization": "Bearer sk-wrong"})
    assert assert_openai_error(response, 401)["code"] == "invalid_api_key"


def test_right_key_is_served(stack: Stack) -> None:
    client = openai.OpenAI(base_url=f"{stack.keyed_gateway_url}/v1", api_key=API_KEY)
    reply = client.chat.completions.create(**BODY)
    assert reply.choices[0].message.content is not None


def test_openai_client_raises_authentication_error(stack: Stack) -> None:
    client = openai.OpenAI(base_url=f"{stack.keyed_gateway_url}/v1", api_key="sk-nope")
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
