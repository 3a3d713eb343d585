"""`tessera serve` with the committed MInference search result for SmolLM2: answers through
the gateway, and the per-head path ran in exactly the config's sparse layers.

A worker of its own (the shared stack stays dense). No config file is named: the worker finds
the committed one by the served model's fingerprint. Prefill runs in 256-token chunks, so
dynamic heads estimate chunk by chunk (README of patterns/minference, "Chunked prefill").
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from attention_backends.patterns.minference.policy import HeadPatternPolicy, committed_config
from attention_backends.policy import SMOLLM2_135M
from tests.integration.attention_worker import (
    assert_answers_a_short_prompt,
    attention_gateway,
    usage_after,
)
from tests.integration.conftest import MODEL

NUM_LAYERS = 30
CHUNK_TOKENS = 256
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. " * 40
POLICY = HeadPatternPolicy.load(committed_config(SMOLLM2_135M), SMOLLM2_135M)
SPARSE_LAYERS = POLICY.sparse_layers(NUM_LAYERS)


@pytest.fixture(scope="module")
def minference_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    env = {"TESSERA_ATTENTION_METHOD": "minference"}
    with attention_gateway(tmp_path_factory.mktemp("minference"), env, CHUNK_TOKENS) as served:
        yield served


def test_the_committed_config_has_sparse_and_dense_layers() -> None:
    # otherwise the usage test below could not tell the paths apart
    assert 0 < len(SPARSE_LAYERS) < NUM_LAYERS


def test_short_prompt_is_answered_correctly(minference_gateway: tuple[str, Path]) -> None:
    assert_answers_a_short_prompt(minference_gateway[0])


def test_long_chunked_prompt_runs_the_per_head_path_and_recalls_the_key(
    minference_gateway: tuple[str, Path],
) -> None:
    url, stats_dir = minference_gateway
    prompt = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
              "memorize it.\n\n" + FILLER[: len(FILLER) // 3]
              + "\nThe pass key is 68341. Remember it. 68341 is the pass key.\n"
              + FILLER + "\nWhat is the pass key? The pass key is")
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0}  # a digit a token
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=600)
    assert response.status_code == 200, response.text
    prompt_tokens = response.json()["usage"]["prompt_tokens"]
    assert prompt_tokens > 3 * CHUNK_TOKENS
    assert "68341" in response.json()["choices"][0]["text"]
    usage = usage_after(stats_dir, min_steps=4)
    for layer in range(NUM_LAYERS):
        if layer in SPARSE_LAYERS:
            assert usage[layer].get("per_head", 0) >= prompt_tokens, (layer, usage[layer])
        else:
            assert "per_head" not in usage[layer], (layer, usage[layer])
