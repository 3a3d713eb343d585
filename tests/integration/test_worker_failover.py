"""Kill a worker mid-test: it is taken out, and later requests are served by the other one.

Requests the victim was already generating are not re-run elsewhere (that would duplicate
work the worker may have done): they end in an OpenAI-shaped 502. Runs last (file order):
it leaves the stack with one generative worker.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx

from tests.integration.conftest import MODEL, Stack

# Long enough (~1-2 s on this CPU) that the kill lands while requests are in flight.
BODY = {"model": MODEL, "prompt": "Count: one, two,", "max_tokens": 48, "ignore_eos": True}


def test_killed_worker_is_taken_out_and_later_requests_served(stack: Stack) -> None:
    victim = stack.workers[0]
    statuses: list[int] = []
    error_codes: list[str] = []

    def send() -> None:
        with httpx.Client(base_url=stack.gateway_url, timeout=120) as http:
            response = http.post("/v1/completions", json=BODY)
            statuses.append(response.status_code)
            if response.status_code != 200:
                error_codes.append(response.json()["error"]["code"])

    senders = [threading.Thread(target=send) for _ in range(6)]
    for thread in senders:
        thread.start()
    time.sleep(0.8)  # requests are now spread over both workers (least outstanding)
    os.killpg(victim.process.pid, signal.SIGKILL)
    for thread in senders:
        thread.join(timeout=180)

    assert len(statuses) == 6 and set(statuses) <= {200, 502}
    assert set(error_codes) <= {"upstream_error"}  # the victim's in-flight ones, shaped
    assert statuses.count(200) >= 1  # the survivor's
    with httpx.Client(base_url=stack.gateway_url, timeout=120) as http:
        for _ in range(3):
            assert http.post("/v1/completions", json=BODY | {"max_tokens": 4}).status_code == 200
        health = http.get("/health").json()
        assert health["workers_healthy"] == 2  # the survivor and the embedding worker
        metrics = http.get("/metrics").text
    assert f'tessera_worker_healthy{{worker="{victim.url}"}} 0.0' in metrics
    assert 'tessera_upstream_errors_total{kind=' in metrics
