"""The workers' attention ran through tessera's backend, layer by layer."""

from __future__ import annotations

import time

import httpx

from attention_backends.usage import read_usage
from tests.integration.conftest import MODEL, Stack

NUM_LAYERS = 30  # SmolLM2-135M


def test_worker_attention_went_through_tessera_backend(stack: Stack,
                                                       client: httpx.Client) -> None:
    response = client.post("/v1/completions",
                           json={"model": MODEL, "prompt": "Once upon a time", "max_tokens": 3})
    assert response.status_code == 200
    deadline = time.monotonic() + 10
    while not (snapshots := read_usage(stack.stats_dir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert snapshots, "no worker wrote attention usage: tessera's backend never ran"
    assert {snapshot["backend"] for snapshot in snapshots} == {"tessera-cpu"}
    layers = {int(layer) for snapshot in snapshots for layer in snapshot["layers"]}
    assert layers == set(range(NUM_LAYERS))  # per-layer dispatch saw every layer index
    dense_tokens = sum(paths.get("dense", 0) for snapshot in snapshots
                       for paths in snapshot["layers"].values())
    assert dense_tokens >= NUM_LAYERS * 4  # prompt + generated tokens, every layer
