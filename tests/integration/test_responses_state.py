"""Responses-API state across the two real vLLM workers (their store on: `responses_store`).

A stored response lives in one worker's memory. Through the gateway, retrieving it and
continuing from it (`previous_response_id`) must work every time, whichever worker the
gateway would otherwise pick; straight to the workers, exactly one of them knows the id
(the control: without routing by owner, about half of these calls would fail).
"""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.integration.conftest import API_KEY, MODEL, Stack, assert_openai_error


@pytest.fixture
def sdk(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url, api_key="unused", max_retries=0)


def test_a_stored_response_is_retrieved_and_continued_through_the_gateway(
    sdk: openai.OpenAI, stack: Stack
) -> None:
    first = sdk.responses.create(model=MODEL, input="My name is Ada. Say hello to me.",
                                 max_output_tokens=8, temperature=0)
    holders = [w.url for w in stack.workers
               if httpx.get(f"{w.url}/v1/responses/{first.id}", timeout=10).status_code == 200]
    assert len(holders) == 1  # vLLM's store is per worker
    for _ in range(6):
        again = sdk.responses.retrieve(first.id)
        assert again.id == first.id and again.output_text == first.output_text
    follow = sdk.responses.create(model=MODEL, input="What is my name?",
                                  previous_response_id=first.id, max_output_tokens=8,
                                  temperature=0)
    alone = sdk.responses.create(model=MODEL, input="What is my name?", max_output_tokens=8,
                                 temperature=0)
    # the follow-up's prompt carried the first turn: more input tokens than the turn alone
    assert follow.usage.input_tokens > alone.usage.input_tokens + 10


def test_a_streamed_response_is_retrievable_by_the_id_its_first_event_gave(
    sdk: openai.OpenAI,
) -> None:
    with sdk.responses.stream(model=MODEL, input="Count to three.", max_output_tokens=8,
                              temperature=0) as stream:
        final = stream.get_final_response()
    for _ in range(4):
        assert sdk.responses.retrieve(final.id).output_text == final.output_text


def test_another_gateway_locates_a_response_it_never_saw(sdk: openai.OpenAI,
                                                         stack: Stack) -> None:
    created = sdk.responses.create(model=MODEL, input="Say yes.", max_output_tokens=4,
                                   temperature=0)
    other = httpx.get(f"{stack.keyed_gateway_url}/v1/responses/{created.id}",
                      headers={"authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert other.status_code == 200 and other.json()["id"] == created.id


def test_unknown_and_malformed_ids(stack: Stack) -> None:
    missing = httpx.get(f"{stack.gateway_url}/v1/responses/resp_0000", timeout=30)
    assert assert_openai_error(missing, 404)["code"] == "response_not_found"
    follow = httpx.post(f"{stack.gateway_url}/v1/responses", timeout=30, json={
        "model": MODEL, "input": "x", "previous_response_id": "resp_0000"})
    assert assert_openai_error(follow, 404)["param"] == "previous_response_id"
    malformed = httpx.get(f"{stack.gateway_url}/v1/responses/resp%20x", timeout=30)
    assert assert_openai_error(malformed, 400)["code"] == "invalid_response_id"
