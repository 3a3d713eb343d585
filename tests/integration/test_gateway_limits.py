"""Upstream timeouts, per-key concurrency, and client disconnects that abort generation."""

from __future__ import annotations

import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import MODEL, Stack, assert_openai_error

# Far longer than the limits gateway's 2 s read timeout: ~500 tokens of CPU decoding.
LONG = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 500, "ignore_eos": True}


def _running_requests(stack: Stack) -> float:
    total = 0.0
    for worker in stack.workers:
        if worker.process.poll() is not None:
            continue
        text = httpx.get(f"{worker.url}/metrics", timeout=5).text
        for family in text_string_to_metric_families(text):
            if family.name == "vllm:num_requests_running":
                total += sum(sample.value for sample in family.samples)
    return total


def test_slow_worker_answer_is_504_not_a_hang(stack: Stack) -> None:
    started = time.monotonic()
    response = httpx.post(f"{stack.limits_gateway_url}/v1/completions", json=LONG, timeout=60)
    assert time.monotonic() - started < 20
    assert assert_openai_error(response, 504)["code"] == "upstream_timeout"


def test_second_concurrent_request_of_a_key_is_429(stack: Stack) -> None:
    # The first request holds its key's one slot for as long as this test keeps its stream
    # open (500 tokens would take far longer than the test), so the second cannot race a
    # stream that already ended, however fast the machine decodes.
    body = LONG | {"stream": True}
    with httpx.stream("POST", f"{stack.limits_gateway_url}/v1/completions", json=body,
                      timeout=60) as holder:
        assert holder.status_code == 200
        # Keep the line iterator referenced: a dropped one is closed, and closing it closes
        # the connection, which the gateway rightly takes as the client leaving.
        lines = holder.iter_lines()
        assert next(lines).startswith("data: ")
        second = httpx.post(f"{stack.limits_gateway_url}/v1/completions",
                            json=LONG | {"max_tokens": 1}, timeout=60)
        assert assert_openai_error(second, 429)["code"] == "concurrency_limit_exceeded"
        assert next(lines) is not None  # the first stream is still going
    # Closing the stream frees the slot (the gateway sees the disconnect and releases it).
    deadline = time.monotonic() + 20
    while True:
        after = httpx.post(f"{stack.limits_gateway_url}/v1/completions",
                           json=LONG | {"max_tokens": 1}, timeout=60)
        if after.status_code != 429 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert after.status_code == 200, after.text


def test_client_disconnect_aborts_the_generation(stack: Stack) -> None:
    deadline = time.monotonic() + 30
    while _running_requests(stack) and time.monotonic() < deadline:
        time.sleep(0.2)  # start from an idle stack
    body = LONG | {"stream": True, "max_tokens": 2000}
    with httpx.stream("POST", f"{stack.gateway_url}/v1/completions", json=body,
                      timeout=60) as response:
        lines = response.iter_lines()
        for _ in range(3):
            next(lines)
        assert _running_requests(stack) >= 1
    # Closed after 3 chunks; 2000 tokens would take minutes: vLLM must have aborted it.
    deadline = time.monotonic() + 10
    while _running_requests(stack) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _running_requests(stack) == 0
