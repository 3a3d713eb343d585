"""`tessera serve` with TriangleMix: answers through the gateway, and the sparse path ran.

A worker of its own (the shared stack stays dense) with a small window so a ~900-token
prompt is long enough for the triangle pattern to drop keys in layers 24-29. The split is
not configured: the worker takes the one measured for the served model (SmolLM2: 24).
Prefill runs in 256-token chunks, so a long prompt takes several steps and the last-q rows
must be the prompt's, not each chunk's.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from attention_backends.policy import MEASURED_DENSE_FIRST_LAYERS, SMOLLM2_135M
from tests.integration.attention_worker import (
    assert_answers_a_short_prompt,
    attention_gateway,
    usage_after,
)
from tests.integration.conftest import MODEL

DENSE_FIRST_LAYERS = MEASURED_DENSE_FIRST_LAYERS[SMOLLM2_135M]  # 24
NUM_LAYERS = 30
CHUNK_TOKENS = 256
LAST_Q_TOKENS = 16
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. " * 40


@pytest.fixture(scope="module")
def trianglemix_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    env = {
        "TESSERA_ATTENTION_METHOD": "trianglemix",
        "TESSERA_ATTENTION_SINK_TOKENS": "4",
        "TESSERA_ATTENTION_WINDOW_TOKENS": "64",
        "TESSERA_ATTENTION_LAST_Q_TOKENS": str(LAST_Q_TOKENS),
    }
    with attention_gateway(tmp_path_factory.mktemp("trianglemix"), env, CHUNK_TOKENS) as served:
        yield served


def test_short_prompt_is_answered_correctly(trianglemix_gateway: tuple[str, Path]) -> None:
    assert_answers_a_short_prompt(trianglemix_gateway[0])


def test_long_prompt_runs_the_triangle_path_in_deep_layers(
    trianglemix_gateway: tuple[str, Path],
) -> None:
    url, stats_dir = trianglemix_gateway
    body = {"model": MODEL, "prompt": FILLER + "The pass key is 68341. The pass key is",
            "max_tokens": 3, "temperature": 0}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
    assert response.status_code == 200, response.text
    prompt_tokens = response.json()["usage"]["prompt_tokens"]
    assert prompt_tokens > 600
    usage = usage_after(stats_dir, min_steps=3)
    for layer in range(DENSE_FIRST_LAYERS):
        assert "triangle" not in usage[layer], f"layer {layer} should stay dense"
    for layer in range(DENSE_FIRST_LAYERS, NUM_LAYERS):
        # The whole long prefill went through the sparse kernel, not vLLM's dense one.
        assert usage[layer].get("triangle", 0) >= prompt_tokens, f"layer {layer}: {usage[layer]}"


def test_chunked_prefill_runs_only_the_prompts_own_last_rows_dense(
    trianglemix_gateway: tuple[str, Path],
) -> None:
    url, stats_dir = trianglemix_gateway
    before = usage_after(stats_dir, min_steps=1)
    # A new first sentence: no prefix-cache hit on the earlier tests' filler.
    prompt = "Chapter seven begins here. " + FILLER + "The pass key is 12345. The pass key is"
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 1, "temperature": 0}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
    assert response.status_code == 200, response.text
    prompt_tokens = response.json()["usage"]["prompt_tokens"]
    assert prompt_tokens > 3 * CHUNK_TOKENS  # at least 4 prefill chunks

    def grown(usage: dict[int, dict[str, int]], layer: int, path: str) -> int:
        return usage[layer].get(path, 0) - before.get(layer, {}).get(path, 0)

    deadline = time.monotonic() + 10
    usage = usage_after(stats_dir, min_steps=1)
    while grown(usage, NUM_LAYERS - 1, "triangle") < prompt_tokens and time.monotonic() < deadline:
        time.sleep(0.2)
        usage = usage_after(stats_dir, min_steps=1)
    for layer in range(DENSE_FIRST_LAYERS, NUM_LAYERS):
        assert grown(usage, layer, "triangle") == prompt_tokens, usage[layer]
        # Only the prompt's last 16 rows ran as full rows; when each chunk's end was taken
        # for the prompt's end, every one of the >= 4 chunks added 16.
        assert grown(usage, layer, "triangle_last_rows") == LAST_Q_TOKENS, usage[layer]
