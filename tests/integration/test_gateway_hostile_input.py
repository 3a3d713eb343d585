"""Hostile bodies against the real gateway, on ONE kept-alive connection: every one gets a
4xx in OpenAI's error shape, the connection survives it, and a valid request sent right
after on the same connection is answered by a real worker.

Property-based (hypothesis), bounded so the file runs in about a minute on 2 cores.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from server.schemas import ChatCompletionRequest
from tests.integration.conftest import MODEL, Stack

CHAT = "/v1/chat/completions"
VALID = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
VALID_BYTES = json.dumps(VALID).encode()
MAX_BODY_BYTES = 4 * 1024 * 1024  # the gateway's default limit
EXAMPLES = settings(max_examples=100, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class KeptAlive:
    """One HTTP/1.1 connection; notices if the server closed it (http.client would reopen)."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.http = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
        self.http.connect()
        self.socket = self.http.sock
        self.statuses: list[int] = []

    def post(self, body: bytes, path: str = CHAT) -> tuple[int, bytes, str | None]:
        self.http.request("POST", path, body=body,
                          headers={"content-type": "application/json"})
        response = self.http.getresponse()
        payload = response.read()
        self.statuses.append(response.status)
        return response.status, payload, response.getheader("connection")


@pytest.fixture(scope="module")
def connection(stack: Stack) -> Iterator[KeptAlive]:
    kept = KeptAlive(stack.gateway_url)
    yield kept
    kept.http.close()
    assert not [status for status in kept.statuses if status >= 500]


def check_refused_then_served(connection: KeptAlive, body: bytes, path: str = CHAT) -> None:
    status, payload, closing = connection.post(body, path)
    assert 400 <= status < 500, (status, payload[:300])
    error = json.loads(payload)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert closing != "close" and connection.http.sock is connection.socket
    status, payload, _ = connection.post(VALID_BYTES)
    assert status == 200, payload[:300]
    assert json.loads(payload)["choices"][0]["finish_reason"] == "length"
    assert connection.http.sock is connection.socket  # still the same connection


def _with(**fields: object) -> bytes:
    return json.dumps(VALID | fields).encode()


@EXAMPLES
@given(st.integers(min_value=0, max_value=len(VALID_BYTES) - 1))
def test_truncated_json(connection: KeptAlive, cut: int) -> None:
    check_refused_then_served(connection, VALID_BYTES[:cut])


@EXAMPLES
@given(st.binary(max_size=300))
def test_arbitrary_bytes(connection: KeptAlive, junk: bytes) -> None:
    check_refused_then_served(connection, junk)


@EXAMPLES
@given(st.integers(min_value=33, max_value=100_000), st.sampled_from("[{"),
       st.sampled_from(["max_tokens", "messages", "stop", "extra"]))
def test_deep_nesting(connection: KeptAlive, depth: int, opener: str, field: str) -> None:
    if opener == "[":
        nested = "[" * depth + "]" * depth
    else:
        nested = '{"a":' * depth + "1" + "}" * depth
    body = VALID_BYTES[:-1] + f', "{field}": {nested}}}'.encode()
    check_refused_then_served(connection, body)


@EXAMPLES
@given(st.sampled_from(["max_tokens", "n", "seed", "temperature", "top_p", "extra"]),
       st.one_of(st.integers(min_value=19, max_value=6000).map(lambda d: "9" * d),
                 st.sampled_from(["1e309", "-1e400", "NaN", "Infinity", "-Infinity"])))
def test_huge_numbers(connection: KeptAlive, field: str, number: str) -> None:
    body = VALID_BYTES[:-1] + f', "{field}": {number}}}'.encode()
    check_refused_then_served(connection, body)


_ANY = st.one_of(st.text(max_size=20), st.booleans(), st.none(),
                 st.integers(min_value=-10**6, max_value=10**6), st.floats(allow_nan=False),
                 st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5),
                                                                      st.integers(), max_size=2))
_NOT_STR = _ANY.filter(lambda v: not isinstance(v, str))
_NOT_BOOL = _ANY.filter(lambda v: not isinstance(v, bool))
_NOT_INT = _ANY.filter(lambda v: not isinstance(v, int) or isinstance(v, bool))
_NOT_NUMBER = _ANY.filter(lambda v: isinstance(v, bool) or not isinstance(v, int | float))
WRONG_TYPES = {
    "model": _NOT_STR.filter(lambda v: v is not None),
    "messages": _ANY,
    "stream": _NOT_BOOL,
    "max_tokens": _NOT_INT.filter(lambda v: v is not None) | st.integers(max_value=0),
    "temperature": _NOT_NUMBER.filter(lambda v: v is not None) | st.floats(min_value=2.01),
    "top_p": _NOT_NUMBER.filter(lambda v: v is not None),
    "n": _NOT_INT.filter(lambda v: v is not None),
    "seed": _NOT_INT.filter(lambda v: v is not None),
    "stop": _ANY.filter(lambda v: v is not None and not isinstance(v, str)
                        and not (isinstance(v, list) and not v)),
    "logprobs": _NOT_BOOL.filter(lambda v: v is not None),
    "tools": _NOT_STR.filter(lambda v: v is not None and v != []),
    "stream_options": _ANY.filter(lambda v: v is not None and not isinstance(v, dict)),
    "user": _NOT_STR.filter(lambda v: v is not None),
    "presence_penalty": _NOT_NUMBER.filter(lambda v: v is not None),
}


@EXAMPLES
@given(st.sampled_from(sorted(WRONG_TYPES)).flatmap(
    lambda field: st.tuples(st.just(field), WRONG_TYPES[field])))
def test_wrong_types_in_declared_fields(connection: KeptAlive, case: tuple[str, object]) -> None:
    field, value = case
    check_refused_then_served(connection, _with(**{field: value}))


_MESSAGE_FIELDS = st.dictionaries(
    st.sampled_from(["role", "content", "name", "tool_calls", "tool_call_id"]), _ANY,
    max_size=4)


def _schema_refuses(message: dict) -> bool:
    try:
        ChatCompletionRequest.model_validate(VALID | {"messages": [message]})
    except ValidationError:
        return True
    return False


@EXAMPLES
@given(_MESSAGE_FIELDS.filter(_schema_refuses))
def test_malformed_messages(connection: KeptAlive, message: dict) -> None:
    check_refused_then_served(connection, _with(messages=[message]))


@EXAMPLES
@given(st.binary(min_size=1, max_size=8).filter(lambda b: not _is_utf8(b)),
       st.sampled_from(["model", "content"]))
def test_invalid_utf8(connection: KeptAlive, junk: bytes, where: str) -> None:
    marker = b'"' + MODEL.encode() + b'"' if where == "model" else b'"Hi"'
    body = VALID_BYTES.replace(marker, marker[:-1] + junk + b'"')
    check_refused_then_served(connection, body)


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@EXAMPLES
@given(st.integers(min_value=0, max_value=len(VALID_BYTES)), st.integers(1, 4))
def test_raw_nul_bytes(connection: KeptAlive, where: int, count: int) -> None:
    check_refused_then_served(connection, VALID_BYTES[:where] + b"\x00" * count
                              + VALID_BYTES[where:])


@settings(max_examples=8, deadline=None, database=None)
@given(st.sampled_from(["model", "stop", "user"]), st.integers(1, 3))
def test_enormous_strings(connection: KeptAlive, field: str, megabytes: int) -> None:
    # Within the body limit: refused by validation (wrong type / unknown model), never sent on.
    value: object = "x" * (megabytes * 1024 * 1024)
    if field != "model":
        value = {"s": value}
    check_refused_then_served(connection, _with(**{field: value}))


@settings(max_examples=5, deadline=None, database=None)
@given(st.integers(0, 1024 * 1024))
def test_body_over_the_limit(connection: KeptAlive, extra: int) -> None:
    body = _with(prompt_padding="x" * (MAX_BODY_BYTES + extra))
    check_refused_then_served(connection, body)


@EXAMPLES
@given(st.sampled_from(["model", "messages", "max_tokens", "stream"]), _ANY)
def test_duplicate_keys(connection: KeptAlive, field: str, other: object) -> None:
    body = VALID_BYTES[:-1] + f', "{field}": {json.dumps(other)}}}'.encode()
    if field not in VALID:
        body = body[:-1] + f', "{field}": 1}}'.encode()
    check_refused_then_served(connection, body)


@EXAMPLES
@given(st.sampled_from(["/v1/completions", "/v1/responses", "/v1/embeddings", "/tokenize",
                        "/detokenize"]), st.binary(max_size=100))
def test_other_routes_refuse_junk_too(connection: KeptAlive, path: str, junk: bytes) -> None:
    check_refused_then_served(connection, b"{" + junk, path)
