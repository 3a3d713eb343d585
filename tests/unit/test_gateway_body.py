"""Strict JSON bodies: every way a body can be hostile is a shaped 400, never an exception."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.body import MAX_DEPTH, parse_json_object
from server.errors import OpenAIError


def _code(raw: bytes) -> str | None:
    with pytest.raises(OpenAIError) as caught:
        parse_json_object(raw)
    assert caught.value.status_code == 400
    return caught.value.code


def test_a_plain_object_parses() -> None:
    assert parse_json_object(b'{"model": "m", "n": 1, "t": 0.5}') == {"model": "m", "n": 1,
                                                                     "t": 0.5}


@pytest.mark.parametrize("raw", [
    b'{"model": ', b"[1, 2]", b'"text"', b"", b"\xff\xfe{}", b'{"a": "\xc3\x28"}',
    b'{"a": NaN}', b'{"a": Infinity}', b'{"a": -Infinity}', b'{"a": 1e400}',
    b'{"a": 9223372036854775808}', b'{"a": ' + b"9" * 5000 + b"}",
    b'{"a": 1, "a": 2}', b'{"a": {"b": 1, "b": 1}}', b'{"a": "\\ud800"}',
    b'{"a": "\x00"}', b'{"a": "line\nbreak"}',
], ids=["truncated", "array", "string", "empty", "utf16-bom", "bad-utf8", "nan", "inf",
        "neg-inf", "float-overflow", "int64-overflow", "huge-int", "duplicate-key",
        "nested-duplicate-key", "lone-surrogate", "raw-nul-in-string", "raw-newline-in-string"])
def test_hostile_body_is_400_invalid_json(raw: bytes) -> None:
    assert _code(raw) == "invalid_json"


def test_nesting_up_to_the_limit_parses_and_one_more_level_does_not() -> None:
    def nested(levels: int) -> bytes:  # the outer object is level 1
        return b'{"a": ' + b"[" * (levels - 1) + b"]" * (levels - 1) + b"}"

    parse_json_object(nested(MAX_DEPTH))
    assert _code(nested(MAX_DEPTH + 1)) == "invalid_json"


def test_nesting_deep_enough_to_overflow_the_parser_is_400() -> None:
    assert _code(b'{"a": ' + b"[" * 200_000 + b"]" * 200_000 + b"}") == "invalid_json"


def test_escaped_nul_and_paired_surrogates_are_text() -> None:
    assert parse_json_object(b'{"a": "x\\u0000y", "e": "\\ud83d\\ude00"}') == {
        "a": "x\x00y", "e": "\U0001F600"}


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_give_an_object_or_a_400(raw: bytes) -> None:
    try:
        assert isinstance(parse_json_object(raw), dict)
    except OpenAIError as error:
        assert error.status_code == 400


@settings(max_examples=200, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                    lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
                    max_leaves=30))
def test_any_json_value_gives_an_object_or_a_400(value: object) -> None:
    raw = json.dumps({"v": value}).encode()  # NaN/inf/bigints included: json.dumps writes them
    try:
        assert isinstance(parse_json_object(raw), dict)
    except OpenAIError as error:
        assert error.status_code == 400
