"""Gateway metrics appear on /metrics after traffic, with the names the dashboards use."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import MODEL


def _samples(client: httpx.Client) -> dict[tuple[str, frozenset], float]:
    text = client.get("/metrics").text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_requests_and_latency_are_counted(client: httpx.Client) -> None:
    before = _samples(client).get(
        ("tessera_requests_total", frozenset({("route", "chat"), ("status", "200")})), 0.0)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    samples = _samples(client)
    key = ("tessera_requests_total", frozenset({("route", "chat"), ("status", "200")}))
    assert samples[key] == before + 1
    count = ("tessera_request_duration_seconds_count", frozenset({("route", "chat")}))
    assert samples[count] >= 1


def test_time_to_first_token_is_observed_for_streams(client: httpx.Client) -> None:
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 3, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as response:
        list(response.iter_lines())
    ttft = ("tessera_time_to_first_token_seconds_count", frozenset({("route", "completions")}))
    assert _samples(client)[ttft] >= 1


def test_error_statuses_are_labelled(client: httpx.Client) -> None:
    client.post("/v1/chat/completions", json={"model": MODEL})
    key = ("tessera_requests_total", frozenset({("route", "chat"), ("status", "400")}))
    assert _samples(client)[key] >= 1


def test_worker_health_gauges_exist(client: httpx.Client) -> None:
    names = {name for name, _ in _samples(client)}
    assert {"tessera_worker_healthy", "tessera_worker_outstanding_requests"} <= names
