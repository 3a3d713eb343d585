"""tessera's worker metrics: engine snapshots rendered on the API server's /metrics
(attention_backends/worker_metrics.py), against prometheus_client's own ASGI app."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter, make_asgi_app
from prometheus_client.parser import text_string_to_metric_families

from attention_backends.worker_metrics import (
    DensePoolBytes,
    TesseraWorkerMetrics,
    append_metrics,
    render,
    write_kv_bytes,
)

KV = {"k_dense": 100, "k_stored": 30, "v_dense": 100, "v_stored": 90, "capacity_tokens": 64}


def dead_pid() -> int:
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)
    return int(child.stdout)


def samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_kv_bytes_of_live_processes_are_summed_and_dead_ones_ignored(tmp_path: Path) -> None:
    write_kv_bytes(tmp_path, KV)
    rank_two = tmp_path / f"kv-bytes-{os.getppid()}.json"  # another live process: a TP rank
    rank_two.write_text(json.dumps(KV))
    (tmp_path / f"kv-bytes-{dead_pid()}.json").write_text(json.dumps(KV | {"k_stored": 10**9}))
    shown = samples(render(tmp_path))
    assert shown[("tessera_kv_bytes", (("kind", "k"), ("state", "stored")))] == 60
    assert shown[("tessera_kv_bytes", (("kind", "v"), ("state", "dense")))] == 200
    assert shown[("tessera_kv_capacity_tokens", ())] == 64


def test_attention_paths_are_summed_over_layers_not_over_ranks(tmp_path: Path) -> None:
    usage = {"layers": {"0": {"dense": 5, "trianglemix": 7}, "1": {"dense": 3}}}
    (tmp_path / f"attention-usage-{os.getpid()}.json").write_text(json.dumps(usage))
    # A second tensor-parallel rank ran the same tokens (one step behind): not added.
    behind = {"layers": {"0": {"dense": 4, "trianglemix": 7}, "1": {"dense": 3}}}
    (tmp_path / f"attention-usage-{os.getppid()}.json").write_text(json.dumps(behind))
    shown = samples(render(tmp_path))
    assert shown[("tessera_attention_query_tokens_total", (("path", "dense"),))] == 8
    assert shown[("tessera_attention_query_tokens_total", (("path", "trianglemix"),))] == 7


def test_nothing_is_rendered_before_the_first_snapshot(tmp_path: Path) -> None:
    assert render(tmp_path) == ""
    assert render(tmp_path / "missing") == ""
    assert append_metrics(b"vllm 1\n", "") == b"vllm 1\n"


def test_openmetrics_keeps_its_eof_last() -> None:
    body = append_metrics(b"a_total 1\n# EOF\n", "tessera_x 2\n")
    assert body == b"a_total 1\ntessera_x 2\n# EOF\n"


def test_dense_pool_keeps_nothing_without_a_stats_dir() -> None:
    import torch

    pool = DensePoolBytes(None)
    pool.note("layer", torch.zeros(4), 1, 1)  # no stats dir: nothing kept
    assert pool.totals["k_dense"] == 0


def test_dense_pool_bytes_sum_layers_once(tmp_path: Path) -> None:
    import torch

    pool = DensePoolBytes(tmp_path)
    cache = torch.zeros(10, 2, 16, 2 * 8, dtype=torch.float16)  # 10 blocks of 16, 2 heads
    first, second = object(), object()
    for layer in (first, second, first, second):
        pool.note(layer, cache, num_kv_heads=2, head_size=8)
    shown = samples(render(tmp_path))
    per_layer_half = cache.numel() * 2 // 2
    assert shown[("tessera_kv_bytes", (("kind", "k"), ("state", "dense")))] == 2 * per_layer_half
    assert shown[("tessera_kv_capacity_tokens", ())] == 10 * 16


@pytest.mark.parametrize("accept", ["text/plain", "application/openmetrics-text"])
async def test_metrics_route_shows_both_vllms_and_tesseras(tmp_path: Path, accept: str) -> None:
    registry = CollectorRegistry()
    Counter("vllm_requests", "requests", registry=registry).inc(3)
    write_kv_bytes(tmp_path, KV)
    app = TesseraWorkerMetrics(make_asgi_app(registry=registry), stats_dir=tmp_path)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://worker") as client:
        # A Prometheus server asks for gzip; the middleware must still extend the text.
        response = await client.get("/metrics", headers={"Accept": accept,
                                                         "Accept-Encoding": "gzip"})
    assert response.status_code == 200
    assert int(response.headers["content-length"]) == len(response.content)
    text = response.text
    assert "vllm_requests_total 3.0" in text
    assert 'tessera_kv_bytes{kind="k",state="stored"} 30' in text
    if accept.startswith("application/openmetrics"):
        assert text.endswith("# EOF\n")


async def test_other_routes_pass_through_untouched(tmp_path: Path) -> None:
    async def app(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"ok"})

    write_kv_bytes(tmp_path, KV)
    transport = httpx.ASGITransport(app=TesseraWorkerMetrics(app, stats_dir=tmp_path))
    async with httpx.AsyncClient(transport=transport, base_url="http://worker") as client:
        assert (await client.get("/health")).text == "ok"
