"""The offline per-head search: recall scoring, the choice rule, and the CLI's output on a
tiny random-weight Llama (the real transformers path; the tokenizer is SmolLM2's)."""

import argparse
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from attention_backends.patterns.minference import AShapeHead, DenseHead, VerticalSlashHead
from attention_backends.patterns.minference.cli import run_search
from attention_backends.patterns.minference.policy import HeadPatternPolicy
from attention_backends.patterns.minference.search import (
    choose_patterns,
    default_candidates,
    head_recalls,
)
from attention_backends.policy import ModelFingerprint

SMOLLM2_DIR = Path(os.environ.get("TESSERA_DATA_DIR", "data")) / "models/smollm2-135m-instruct"


def test_recall_is_the_attention_mass_inside_the_mask():
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 48, 8, generator=generator)
    keys = torch.randn(1, 48, 8, generator=generator)
    recalls = head_recalls(query, keys, 0.4, [DenseHead(), AShapeHead(2, 5)], block_size=16,
                           recall_from_row=12)
    assert torch.allclose(recalls[0], torch.ones(2))
    probs = (torch.einsum("hqd,kd->hqk", query, keys[0]) * 0.4).masked_fill(
        ~torch.ones(48, 48, dtype=torch.bool).tril(), -torch.inf).softmax(-1)
    for head in range(2):
        kept = [sum(float(probs[head, q, k]) for k in range(q + 1) if k < 2 or q - k < 5)
                for q in range(12, 48)]
        assert recalls[1, head] == pytest.approx(sum(kept) / len(kept), rel=1e-5)


def test_choice_takes_the_best_candidate_and_keeps_weak_heads_dense():
    candidates = [AShapeHead(1, 4), VerticalSlashHead(2, 4, sink_tokens=1, local_tokens=1)]
    recalls = torch.tensor([[0.95, 0.5, 0.92], [0.90, 0.6, 0.92]])  # [candidate, head]
    result = choose_patterns([recalls], candidates, min_recall=0.8, block_size=16)
    assert result.layers[0].heads == (candidates[0], DenseHead(), candidates[0])  # tie: first
    assert result.best_recall[0] == pytest.approx([0.95, 1.0, 0.92])


def test_default_candidates_cost_about_the_same():
    keys_per_row = set()
    for candidate in default_candidates(4096):
        params = candidate.params()
        if candidate.name == "a_shape":
            keys_per_row.add(params["sink_tokens"] + params["window_tokens"])
        elif candidate.name == "vertical_slash":
            keys_per_row.add(params["vertical_size"] + params["slash_size"])
        else:
            keys_per_row.add(params["top_k_blocks"] * 64)
    assert keys_per_row == {409, 384}  # 10% of 4096; block-sparse in whole 64-key blocks


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    if not (SMOLLM2_DIR / "tokenizer.json").exists():
        pytest.fail(f"SmolLM2 tokenizer missing under {SMOLLM2_DIR} (tessera prepare-model)")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, architectures=["LlamaForCausalLM"])
    model_dir = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(SMOLLM2_DIR / name, model_dir / name)
    return model_dir


def search_args(model_dir: Path, out: Path) -> argparse.Namespace:
    return argparse.Namespace(model=model_dir, out=out, tokens=256, min_recall=0.5,
                              block_size=16, seed=3, threads=1)


def test_search_writes_a_loadable_config_with_every_recall(tiny_model, tmp_path):
    values = run_search(search_args(tiny_model, tmp_path / "a.json"))
    fingerprint = ModelFingerprint.from_config_json(tiny_model / "config.json")
    policy = HeadPatternPolicy.load(tmp_path / "a.json", fingerprint)
    assert len(policy.layers) == 2 and all(len(layer.heads) == 4 for layer in policy.layers)
    table = values["source"]["candidate_recalls"]
    assert [len(layer) for layer in table] == [4, 4]
    num_candidates = len(values["source"]["candidates"])
    assert all(len(head) == num_candidates for layer in table for head in layer)
    assert all(0 <= r <= 1.00001 for layer in table for head in layer for r in head)
    for layer, heads in zip(table, values["layers"], strict=True):
        for recalls, head in zip(layer, heads, strict=True):
            assert head["pattern"] == "dense" or head["recall"] == pytest.approx(max(recalls),
                                                                                 abs=1e-5)


def test_search_is_seeded(tiny_model, tmp_path):
    first = run_search(search_args(tiny_model, tmp_path / "a.json"))
    second = run_search(search_args(tiny_model, tmp_path / "b.json"))
    for values in (first, second):
        values["source"].pop("seconds")
    assert json.dumps(first) == json.dumps(second)


def test_dense_policy_inside_hf_reproduces_the_models_own_logits(tiny_model):
    from transformers import AutoModelForCausalLM

    from attention_backends.patterns.minference.hf_model import load_model, logits_with_policy
    from attention_backends.patterns.minference.policy import uniform_policy

    model, _ = load_model(tiny_model)
    ids = list(range(5, 205))
    own = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = own(torch.tensor([ids])).logits[0]
    fingerprint = ModelFingerprint.from_config_json(tiny_model / "config.json")
    dense = logits_with_policy(model, ids, uniform_policy(fingerprint, lambda layer: DenseHead()))
    torch.testing.assert_close(dense, expected, rtol=1e-4, atol=1e-4)
    # and a pattern that drops keys changes them (the glue really runs the policy)
    sparse = logits_with_policy(model, ids, uniform_policy(fingerprint,
                                                           lambda layer: AShapeHead(2, 8)))
    assert (sparse - expected).abs().max() > 1e-3
