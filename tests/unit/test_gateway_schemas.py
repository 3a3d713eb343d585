"""Strict request validation, as OpenAI's API does it: no coercion, per-role message rules."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ValidationError

from server.errors import OpenAIError, validation_error
from server.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    ResponsesRequest,
    TokenizeRequest,
)

USER = [{"role": "user", "content": "hi"}]


def _error(model: type[BaseModel], body: dict) -> OpenAIError:
    with pytest.raises(ValidationError) as caught:
        model.model_validate(body)
    return validation_error(list(caught.value.errors()), body)


def _chat(**fields: object) -> dict:
    return {"model": "m", "messages": USER} | fields


@pytest.mark.parametrize(("field", "value"), [
    ("stream", "true"), ("stream", 1), ("max_tokens", "5"), ("max_tokens", 5.0),
    ("max_tokens", True), ("temperature", "0.5"), ("n", "2"), ("logprobs", "yes"),
    ("model", 7), ("stop", 3), ("seed", "1"), ("top_p", True),
])
def test_declared_fields_are_not_coerced(field: str, value: object) -> None:
    assert _error(ChatCompletionRequest, _chat(**{field: value})).param == field


def test_an_int_is_accepted_where_a_float_is_declared() -> None:
    assert ChatCompletionRequest.model_validate(_chat(temperature=1)).temperature == 1


def test_unknown_fields_pass_through_untouched() -> None:
    parsed = ChatCompletionRequest.model_validate(_chat(top_k="anything", guided_json={"a": 1}))
    assert parsed.upstream_body()["top_k"] == "anything"
    assert parsed.upstream_body()["guided_json"] == {"a": 1}


@pytest.mark.parametrize(("message", "param"), [
    ({"role": "wizard", "content": "x"}, "messages.0.role"),
    ({"content": "x"}, "messages.0.role"),
    ({"role": "system"}, "messages.0.content"),
    ({"role": "user", "content": None}, "messages.0.content"),
    ({"role": "user", "content": 5}, "messages.0.content"),
    ({"role": "assistant"}, "messages.0"),
    ({"role": "user", "content": "x", "tool_calls": []}, "messages.0"),
    ({"role": "tool", "content": "x"}, "messages.0.tool_call_id"),
    ({"role": "function", "content": "x"}, "messages.0.name"),
    ({"role": "system", "content": [{"type": "image_url", "image_url": {"url": "u"}}]},
     "messages.0.content.0.type"),
    ({"role": "user", "content": [{"type": "text", "text": 1}]}, "messages.0.content.0.text"),
    ({"role": "user", "content": [{"text": "x"}]}, "messages.0.content.0.type"),
    ({"role": "user", "content": [{"type": "image_url", "image_url": {}}]},
     "messages.0.content.0.image_url.url"),
    ({"role": "user", "content": [{"type": "input_audio",
                                   "input_audio": {"data": "x", "format": "ogg"}}]},
     "messages.0.content.0.input_audio.format"),
    ({"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                           "function": {"name": "f", "arguments": {}}}]},
     "messages.0.tool_calls.0.function.arguments"),
], ids=lambda value: value if isinstance(value, str) else None)
def test_message_rules_per_role(message: dict, param: str) -> None:
    error = _error(ChatCompletionRequest, _chat(messages=[message]))
    assert (error.status_code, error.param, error.code) == (400, param, "invalid_value")


@pytest.mark.parametrize("message", [
    {"role": "assistant", "content": None,
     "tool_calls": [{"id": "c1", "type": "function",
                     "function": {"name": "f", "arguments": "{}"}}]},
    {"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]},
    {"role": "tool", "content": "42", "tool_call_id": "c1"},
    {"role": "developer", "content": [{"type": "text", "text": "be brief"}]},
    {"role": "user", "content": [{"type": "text", "text": "see"},
                                 {"type": "image_url",
                                  "image_url": {"url": "data:,", "detail": "low"}}]},
    {"role": "user", "content": [{"type": "video_url", "video_url": {"url": "v"}}]},
    {"role": "function", "content": None, "name": "f"},
    {"role": "user", "content": "x", "name": "ann", "custom_field": 1},
])
def test_messages_openai_accepts_are_accepted(message: dict) -> None:
    ChatCompletionRequest.model_validate(_chat(messages=[message]))


@pytest.mark.parametrize(("model", "body", "param"), [
    (CompletionRequest, {"model": "m", "prompt": []}, "prompt"),
    (CompletionRequest, {"model": "m", "prompt": [1, -2]}, "prompt.1"),
    (ResponsesRequest, {"model": "m", "input": ""}, "input"),
    (ResponsesRequest, {"model": "m", "input": "x", "max_output_tokens": "9"},
     "max_output_tokens"),
    (EmbeddingRequest, {"model": "m", "input": "x", "encoding_format": "hex"},
     "encoding_format"),
    (EmbeddingRequest, {"model": "m"}, "input"),
    (TokenizeRequest, {"prompt": "x", "messages": USER}, None),
    (DetokenizeRequest, {"tokens": ["1"]}, "tokens.0"),
])
def test_other_routes_validate_strictly(model: type[BaseModel], body: dict,
                                        param: str | None) -> None:
    assert _error(model, body).param == param


def test_stages_see_one_message_class_with_part_dicts() -> None:
    # What pipeline stages rely on (SecurityLingua reads parts with .get and adds a system
    # message built from the first message's class).
    body = _chat(messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    first = ChatCompletionRequest.model_validate(body).messages[0]
    assert first.content[0].get("text") == "hi"
    system = type(first)(role="system", content="note")
    assert system.role == "system"
    with pytest.raises(ValidationError):
        type(first)(role="tool", content="x")  # still the tool rules: no tool_call_id
