"""`tessera serve` with a LeanK mask: the real vLLM CPU worker's KV cache holds more tokens,
generation still answers through the gateway, and with the mask off the capacity is dense.

Two workers of their own (the shared stack stays dense), one after the other, with the same
KV budget: dense, then the committed s=0.7 SmolLM2 mask with layer-uniform budgets (10 of
90 KV heads fully pruned, so the V-sum path serves too). vLLM logs the capacity it sized
from our page spec ("KV cache size: N tokens"); that is the number read here, not ours.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from attention_backends.policy import SMOLLM2_135M, default_dense_first_layers
from attention_backends.usage import total_usage
from kv_manager.leank.layout import LayerLayout
from kv_manager.leank.mask import load_mask
from server.config import ServerSettings
from server.launcher import resolve_model_path
from tests.integration.attention_worker import assert_answers_a_short_prompt, gateway_over_worker

MASK = Path("kv_manager/leank/masks/smollm2-135m-instruct_s0.7_a16_layeruniform.safetensors")
CAPACITY_LINE = re.compile(r"KV cache size: ([\d,]+) tokens")


def expected_capacity_ratio(mask_path: Path) -> float:
    """Dense row / LeanK page row: every layer's page is the widest layer's packed row."""
    mask = load_mask(mask_path)
    heads, head_dim = mask.keep.shape[1], mask.keep.shape[2]
    rows = []
    for layer in range(mask.keep.shape[0]):
        layout = LayerLayout(mask.keep[layer])
        rows.append(layout.k_width + len(layout.live_heads) * head_dim)
    return 2 * heads * head_dim / max(rows)


def capacity_tokens(log_path: Path) -> int:
    found = CAPACITY_LINE.findall(log_path.read_text(errors="replace"))
    assert found, f"no 'KV cache size' line in {log_path}"
    return int(found[-1].replace(",", ""))


@contextmanager
def gateway_over_worker_with_own_log(run_dir: Path,
                                     env: dict[str, str]) -> Iterator[tuple[str, Path, str]]:
    """(gateway URL, worker log, worker URL) for one worker with its own data dir (so its
    own log)."""
    settings = ServerSettings(workers=1, kv_cache_space_gib=1, max_model_len=2048,
                              data_dir=run_dir)
    with gateway_over_worker(run_dir, env, settings,
                             resolve_model_path(ServerSettings())) as (url, worker):
        yield url, worker.log_path, worker.url


def worker_kv_metrics(worker_url: str) -> dict[str, float]:
    """tessera's KV gauges as the worker's own /metrics shows them (a Prometheus scrape)."""
    text = httpx.get(f"{worker_url}/metrics", timeout=30).text
    shown = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "tessera_kv_bytes":
                shown[f"{sample.labels['kind']}_{sample.labels['state']}"] = sample.value
            elif sample.name == "tessera_kv_capacity_tokens":
                shown["capacity_tokens"] = sample.value
    return shown


@pytest.fixture(scope="module")
def dense_capacity(tmp_path_factory: pytest.TempPathFactory) -> int:
    """The negative control: the same worker settings, mask off."""
    run_dir = tmp_path_factory.mktemp("leank_dense")
    env = {"TESSERA_ATTENTION_METHOD": "dense",
           "TESSERA_ATTENTION_STATS_DIR": str(run_dir / "stats")}
    with gateway_over_worker_with_own_log(run_dir, env) as (url, log, worker_url):
        assert_answers_a_short_prompt(url)
        # The dense worker's own /metrics: stored == dense, and vLLM's logged capacity.
        shown = worker_kv_metrics(worker_url)
        assert shown["k_stored"] == shown["k_dense"] > 0, shown
        assert shown["v_stored"] == shown["v_dense"] == shown["k_dense"], shown
        assert shown["capacity_tokens"] == capacity_tokens(log), shown
        return capacity_tokens(log)


@pytest.fixture(scope="module")
def leank_worker(tmp_path_factory: pytest.TempPathFactory,
                 ) -> Iterator[tuple[str, Path, Path, str]]:
    run_dir = tmp_path_factory.mktemp("leank")
    stats_dir = run_dir / "stats"
    env = {"TESSERA_ATTENTION_LEANK_MASK": str(MASK.resolve()),
           "TESSERA_ATTENTION_STATS_DIR": str(stats_dir)}
    with gateway_over_worker_with_own_log(run_dir, env) as (url, log, worker_url):
        yield url, log, stats_dir, worker_url


def test_capacity_grows_by_the_saved_bytes(dense_capacity: int, leank_worker) -> None:
    _, log, _, _ = leank_worker
    ratio = capacity_tokens(log) / dense_capacity
    # Whole blocks only: the pool rounds down to a block of 128 tokens per side.
    assert ratio == pytest.approx(expected_capacity_ratio(MASK), rel=0.01)
    assert ratio > 1.3


def test_generation_answers_through_the_gateway(leank_worker) -> None:
    url, _, stats_dir, _ = leank_worker
    assert_answers_a_short_prompt(url)
    usage = total_usage(stats_dir)
    assert all(paths.get("leank_decode", 0) > 0 for paths in usage.values())
    assert all(paths.get("dense", 0) == 0 for paths in usage.values())


def test_kv_bytes_metric_reports_stored_below_dense(dense_capacity: int, leank_worker) -> None:
    """Read from the running worker's /metrics, as Prometheus scrapes it."""
    _, log, _, worker_url = leank_worker
    shown = worker_kv_metrics(worker_url)
    assert shown["k_stored"] < shown["k_dense"], shown
    assert shown["v_stored"] <= shown["v_dense"], shown
    assert shown["capacity_tokens"] == capacity_tokens(log) > dense_capacity, shown


def test_mask_for_another_model_stops_the_worker(tmp_path: Path) -> None:
    # A mask whose fingerprint names another model: vLLM must not start serving with it.
    mask = load_mask(MASK)
    from dataclasses import replace

    from kv_manager.leank.mask import LeanKMask, save_mask

    other = LeanKMask(fingerprint=replace(mask.fingerprint, vocab_size=32000), keep=mask.keep,
                      sparsity=mask.sparsity, align=mask.align)
    save_mask(other, tmp_path / "other.safetensors")
    env = {"TESSERA_ATTENTION_LEANK_MASK": str(tmp_path / "other.safetensors")}
    with (pytest.raises(RuntimeError, match="exited"),
          gateway_over_worker_with_own_log(tmp_path, env)):
        pass
    assert "LeanK mask was trained for" in (tmp_path / "logs" / "worker-0.log").read_text()


def test_trianglemix_prefill_and_leank_decode_in_one_worker(tmp_path: Path) -> None:
    """Issue 22: "Prefill (dense or TriangleMix) and LeanK decode work together". The LeanK
    worker with TriangleMix prefill answers through the gateway; its counters show the
    deep (sparse) layers' prefill rows under the triangle over the pruned pages, the dense
    layers' prefill without it, and every layer's decode on the kept channels."""
    stats_dir = tmp_path / "stats"
    env = {"TESSERA_ATTENTION_LEANK_MASK": str(MASK.resolve()),
           "TESSERA_ATTENTION_METHOD": "trianglemix",
           "TESSERA_ATTENTION_STATS_DIR": str(stats_dir)}
    with gateway_over_worker_with_own_log(tmp_path, env) as (url, _, _):
        assert_answers_a_short_prompt(url)
    usage = total_usage(stats_dir)
    sparse = [int(layer) for layer, paths in usage.items()
              if paths.get("leank_prefill_triangle", 0) > 0]
    dense_first = default_dense_first_layers(SMOLLM2_135M)
    assert sparse == list(range(dense_first, len(usage))), usage
    assert all(paths.get("leank_decode", 0) > 0 and paths.get("leank_prefill", 0) > 0
               for paths in usage.values())
    assert all(paths.get("dense", 0) == 0 and paths.get("triangle", 0) == 0
               for paths in usage.values())
