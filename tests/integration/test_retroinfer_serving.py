"""`tessera serve` with RetroInfer decode on the CPU worker: answers through the gateway, and
the long sequence's decode steps ran through the wave index in every layer.

A worker of its own (the shared stack stays dense) with ``retroinfer_min_tokens`` 1100: a
~1,500-token prompt is indexed after its prefill (sink 4, recent 64, ~90 clusters of ~16
tokens, 1.8% retrieved, 23.2% estimated), a short one stays dense. The exact-tier floor is
off (0, the paper's budget): the served default (2048) would cover this whole index and make
the step exact. Caution (NOTES, 2026-12-01): with a covering floor (= dense attention) and with
a 256-token floor this prompt's answer is " 11111"; the paper's budget finds the key because it
drops most of the repetitive filler. So this test shows the sparse path serving, not fidelity
to dense (``benchmarks/retroinfer_tasks.py`` measures that). The pass key sits at
the start, inside the indexed middle, not in the steady zone.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.attention_worker import (
    assert_answers_a_short_prompt,
    attention_gateway,
    usage_after,
)
from tests.integration.conftest import MODEL

NUM_LAYERS = 30
MIN_TOKENS = 1100
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. " * 85


@pytest.fixture(scope="module")
def retroinfer_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    env = {"TESSERA_ATTENTION_RETROINFER_MIN_TOKENS": str(MIN_TOKENS),
           "TESSERA_ATTENTION_RETROINFER_MIN_EXACT_TOKENS": "0"}
    with attention_gateway(tmp_path_factory.mktemp("retroinfer"), env, 2048) as served:
        yield served


def test_short_prompt_stays_dense_and_is_answered(retroinfer_gateway: tuple[str, Path]) -> None:
    assert_answers_a_short_prompt(retroinfer_gateway[0])


def test_long_prompt_decodes_through_retroinfer_and_finds_the_pass_key(
    retroinfer_gateway: tuple[str, Path],
) -> None:
    url, stats_dir = retroinfer_gateway
    prompt = (
        "The pass key is 68341. Remember it. " + FILLER + "What is the pass key? The pass key is"
    )
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 6, "temperature": 0}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=600)
    assert response.status_code == 200, response.text
    payload = response.json()
    assert payload["usage"]["prompt_tokens"] > MIN_TOKENS + 1
    assert "68341" in payload["choices"][0]["text"]
    usage = usage_after(stats_dir, min_steps=3)
    for layer in range(NUM_LAYERS):
        # The first generated token comes from the prefill; the other 5 decode steps of the
        # one long sequence all went through RetroInfer in every layer.
        assert usage[layer].get("retroinfer_decode", 0) >= 5, f"layer {layer}: {usage[layer]}"
