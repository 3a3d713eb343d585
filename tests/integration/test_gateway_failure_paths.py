"""Failure paths from review that real workers can show: the max_tokens ceiling as a default,
a non-streamed request abandoned by its client, request ids, and /metrics behind the key."""

from __future__ import annotations

import json
import socket
import time

import httpx

from tests.integration.conftest import (
    API_KEY,
    KEYED_MAX_TOKENS_CEILING,
    MODEL,
    Stack,
    assert_openai_error,
)
from tests.integration.test_gateway_limits import _running_requests

KEY = {"authorization": f"Bearer {API_KEY}"}


def test_ceiling_bounds_a_request_that_omits_max_tokens(stack: Stack) -> None:
    body = {"model": MODEL, "prompt": "Count: one, two,", "ignore_eos": True, "n": 2,
            "temperature": 1.0}
    reply = httpx.post(f"{stack.keyed_gateway_url}/v1/completions", json=body, headers=KEY,
                       timeout=120).json()
    assert reply["usage"]["completion_tokens"] == 2 * KEYED_MAX_TOKENS_CEILING


def test_ceiling_still_refuses_a_larger_ask(stack: Stack) -> None:
    body = {"model": MODEL, "prompt": "x", "max_tokens": KEYED_MAX_TOKENS_CEILING + 1}
    response = httpx.post(f"{stack.keyed_gateway_url}/v1/completions", json=body, headers=KEY)
    assert assert_openai_error(response, 400)["code"] == "max_tokens_exceeded"


def test_client_leaving_a_non_streamed_request_aborts_the_generation(stack: Stack) -> None:
    deadline = time.monotonic() + 30
    while _running_requests(stack) and time.monotonic() < deadline:
        time.sleep(0.2)  # start from an idle stack
    body = json.dumps({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 1500,
                       "ignore_eos": True}).encode()
    host, port = stack.gateway_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as raw:
        raw.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: gw\r\n"
                    b"content-type: application/json\r\n"
                    + f"content-length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.monotonic() + 20
        while not _running_requests(stack) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _running_requests(stack) >= 1
    # 1,500 tokens take minutes on this CPU: the worker is free within seconds only if the
    # gateway closed the upstream request when its client left.
    deadline = time.monotonic() + 10
    while _running_requests(stack) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _running_requests(stack) == 0


def test_bad_request_id_is_replaced_and_a_good_one_reaches_the_worker(client: httpx.Client) -> None:
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 1}
    bad = client.post("/v1/completions", json=body, headers=[(b"x-request-id", b"\xff\xfe")])
    assert bad.status_code == 200 and len(bad.headers["x-request-id"]) == 32
    good = client.post("/v1/completions", json=body, headers={"x-request-id": "trace-42"})
    assert good.headers["x-request-id"] == "trace-42"
    assert good.json()["id"].endswith("trace-42")  # vLLM took it as its request id


def test_metrics_need_the_key_where_configured(stack: Stack) -> None:
    assert_openai_error(httpx.get(f"{stack.keyed_gateway_url}/metrics"), 401)
    keyed = httpx.get(f"{stack.keyed_gateway_url}/metrics", headers=KEY)
    assert keyed.status_code == 200 and "tessera_requests_total" in keyed.text
