"""Upstream timeouts, per-key concurrency, and client disconnects that abort generation."""

from __future__ import annotations

import threading
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
    body = LONG | {"stream": True, "max_tokens": 60}
    first_chunk = threading.Event()
    done = threading.Event()

    def hold_slot() -> None:
        with httpx.stream("POST", f"{stack.limits_gateway_url}/v1/completions", json=body,
                          timeout=60) as response:
            for _ in response.iter_lines():
                first_chunk.set()
        done.set()

    holder = threading.Thread(target=hold_slot)
    holder.start()
    assert first_chunk.wait(30)
    second = httpx.post(f"{stack.limits_gateway_url}/v1/completions",
                        json=LONG | {"max_tokens": 1}, timeout=60)
    assert assert_openai_error(second, 429)["code"] == "concurrency_limit_exceeded"
    holder.join(timeout=60)
    assert done.is_set()
    # The slot is free again once the stream ended.
    after = httpx.post(f"{stack.limits_gateway_url}/v1/completions",
                       json=LONG | {"max_tokens": 1}, timeout=60)
    assert after.status_code == 200


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
