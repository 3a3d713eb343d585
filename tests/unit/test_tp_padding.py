"""server/tp_padding.py: a model whose heads do not split under tensor parallelism, padded
with zero query heads and repeated KV heads, computes the same logits (tiny random Llama in
fp32, built in seconds; the real SmolLM2 check is benchmarks/gpu_NOTES.md's)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.tp_padding import HeadPadding, pad_model_dir, plan_padding, splits

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Per row of logits: |padded - original| <= REL_BOUND * max(1, max |original row|). fp32
# sums of the same terms in another order (the GEMMs are wider) differ by ~1e-6 relative.
REL_BOUND = 1e-4


@pytest.mark.parametrize(
    "heads, kv, tp, expected",
    [
        (9, 3, 2, (12, 6, 2)),  # SmolLM2-135M at TP=2: one zero head per group, KV heads doubled
        (9, 3, 3, (9, 3, 1)),  # already splits three ways: unchanged
        (32, 8, 2, (32, 8, 1)),  # Llama-3.1-8B: unchanged
        (3, 1, 2, (4, 1, 1)),  # MQA: vLLM replicates the one KV head itself
        (9, 3, 4, (12, 12, 4)),  # 3 KV heads reach a multiple of 4 only as 12
    ],
)
def test_plan_is_the_smallest_padding_that_vllm_accepts(heads, kv, tp, expected):
    padding = plan_padding(heads, kv, tp)
    assert (padding.padded_heads, padding.padded_kv_heads, padding.kv_repeat) == expected
    assert splits(padding.padded_heads, padding.padded_kv_heads, tp)
    assert not splits(9, 3, 2) and splits(32, 8, 2) and splits(4, 1, 2)


def test_real_heads_keep_their_groups():
    padding = plan_padding(9, 3, 2)
    assert padding.real_heads() == [0, 1, 2, 4, 5, 6, 8, 9, 10]
    # HF/vLLM map query head h to KV head h // (H'/K'); each real head must land on a copy
    # of its original KV head (original head i belongs to group i // 3).
    per_kv = padding.padded_heads // padding.padded_kv_heads
    for original, padded in enumerate(padding.real_heads()):
        assert (padded // per_kv) // padding.kv_repeat == original // 3


def _tiny_llama(path: Path, attention_bias: bool) -> None:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=72,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=8,
        max_position_embeddings=256,
        attention_bias=attention_bias,
        tie_word_embeddings=True,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # random, non-zero biases so their padding is exercised
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.5)
    model.save_pretrained(path, safe_serialization=True)


def _logits(path: Path, tokens: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits[0]


def _row_excess(padded: torch.Tensor, original: torch.Tensor) -> float:
    """Largest |error| / allowed over rows (> 1 fails)."""
    allowed = REL_BOUND * original.abs().amax(dim=-1).clamp(min=1.0)
    return float(((padded - original).abs().amax(dim=-1) / allowed).max())


@pytest.mark.parametrize("attention_bias", [False, True])
def test_padded_model_computes_the_same_logits(tmp_path: Path, attention_bias: bool):
    torch.set_num_threads(2)
    _tiny_llama(tmp_path / "src", attention_bias)
    padding = pad_model_dir(tmp_path / "src", tmp_path / "dst", 2)
    config = json.loads((tmp_path / "dst" / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (
        12,
        6,
        8,
    )
    assert HeadPadding(**config["tessera_tp_padding"]) == padding
    tokens = torch.randint(0, 128, (1, 200), generator=torch.Generator().manual_seed(1))
    original = _logits(tmp_path / "src", tokens)
    assert _row_excess(_logits(tmp_path / "dst", tokens), original) <= 1.0


def test_a_wrong_kv_mapping_is_caught(tmp_path: Path, monkeypatch):
    """Negative control: KV heads tiled (0,1,2,0,1,2) instead of repeated in a row puts
    query heads on the wrong KV head; the same check must then fail by far."""
    import server.tp_padding as tp_padding

    torch.set_num_threads(2)
    _tiny_llama(tmp_path / "src", False)
    original_pad = tp_padding.pad_tensor

    def tiled(name, tensor, padding, head_dim):
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            return tensor.repeat(padding.kv_repeat, 1)
        return original_pad(name, tensor, padding, head_dim)

    monkeypatch.setattr(tp_padding, "pad_tensor", tiled)
    pad_model_dir(tmp_path / "src", tmp_path / "dst", 2)
    tokens = torch.randint(0, 128, (1, 200), generator=torch.Generator().manual_seed(1))
    assert _row_excess(_logits(tmp_path / "dst", tokens), _logits(tmp_path / "src", tokens)) > 10
