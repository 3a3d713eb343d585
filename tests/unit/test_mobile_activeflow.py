"""mobile.activeflow: flash layout, DRAM budget, LFU cache, engine vs HF, thresholds."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from mobile.activeflow.arena import BudgetExceeded, DramArena
from mobile.activeflow.cache import ChannelCache
from mobile.activeflow.engine import ActiveFlowEngine, EngineOptions, min_budget_bytes
from mobile.activeflow.layout import (
    KINDS,
    FlashIndex,
    channel_rows,
    load_hf_tensors,
    write_flash_file,
)
from mobile.activeflow.reader import FlashReader, merge_runs
from mobile.activeflow.sparsity import collect_abs_inputs, realized_sparsity, thresholds_for

SMOLLM2 = Path(__file__).resolve().parents[2] / "data/models/smollm2-135m-instruct"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 3-layer Llama (GQA, tied embeddings) saved as bf16 like SmolLM2."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      tie_word_embeddings=True, rope_theta=10000.0, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    for p in model.parameters():  # larger weights than the init, so activations are not tiny
        p.data.mul_(3.0)
    out = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_flash(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> FlashIndex:
    return write_flash_file(tiny_model, tmp_path_factory.mktemp("flash") / "tiny.bin")


def hf_logits(model_dir: Path, ids: list[int]) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def run(engine: ActiveFlowEngine, ids: list[int]) -> np.ndarray:
    engine.reset()
    return np.stack([engine.forward_token(t) for t in ids])


def test_flash_layout_round_trips_byte_identical(tiny_model, tiny_flash) -> None:
    tensors = load_hf_tensors(tiny_model)
    arena = DramArena(4 << 20)
    reader = FlashReader(tiny_flash, arena, n_bounce=1)
    rng = np.random.default_rng(0)
    for (layer, kind), ext in tiny_flash.extents.items():
        expected = channel_rows(tensors, layer, kind).astype(np.float32)
        dest = arena.alloc(f"{layer}{kind}", (ext.channels, ext.row_elems))
        reader.read_channels(layer, kind, np.arange(ext.channels), dest)
        assert dest.tobytes() == expected.tobytes()
        subset = np.sort(rng.choice(ext.channels, size=ext.channels // 3, replace=False))
        stored = reader.read_channels(layer, kind, subset, dest)
        assert np.array_equal(stored, subset)
        assert dest[: subset.size].tobytes() == expected[subset].tobytes()
        # keep_gaps: the gap rows merging read anyway are kept too, still byte-identical.
        stored = reader.read_channels(layer, kind, subset, dest, keep_gaps=True)
        assert np.isin(subset, stored).all() and np.all(np.diff(stored) > 0)
        assert dest[: stored.size].tobytes() == expected[stored].tobytes()
        # ... but never at the cost of a requested row when the destination is tight.
        tight = dest[: subset.size]
        stored = reader.read_channels(layer, kind, subset, tight, keep_gaps=True)
        assert np.array_equal(stored, subset)
    reader.close()


def test_merge_runs_covers_every_channel_and_respects_gap() -> None:
    ch = np.array([0, 1, 2, 5, 6, 20, 40, 41])
    runs = merge_runs(ch, row_bytes=100, merge_gap_bytes=250)  # gaps of <= 2 rows read through
    assert runs == [(0, 7), (20, 21), (40, 42)]
    covered = np.concatenate([np.arange(a, b) for a, b in runs])
    assert np.isin(ch, covered).all()


def test_arena_refuses_allocations_past_the_budget() -> None:
    arena = DramArena(1 << 20)
    a = arena.alloc("a", (1000, 200))  # 800,000 B
    assert arena.contains(a) and arena.used_bytes <= arena.budget_bytes
    with pytest.raises(BudgetExceeded):
        arena.alloc("b", (100, 1000))
    assert not arena.contains(np.zeros(10, np.float32))


def test_reader_refuses_destinations_outside_the_arena(tiny_flash) -> None:
    reader = FlashReader(tiny_flash, DramArena(2 << 20), n_bounce=1)
    with pytest.raises(ValueError, match="outside the DRAM arena"):
        reader.read_channels(0, "o_in", np.arange(4), np.zeros((4, 64), np.float32))
    reader.close()


def test_lfu_cache_prefers_frequent_channels() -> None:
    rows = np.zeros((2, 3), np.float32)
    cache = ChannelCache(rows, channels=5)
    cache.counts[:] = [5, 1, 3, 0, 0]
    cache.admit(np.array([1, 2]), np.arange(6, dtype=np.float32).reshape(2, 3))
    assert set(cache.slot_channel) == {1, 2}
    cache.admit(np.array([0]), np.full((1, 3), 9, np.float32))  # count 5 evicts channel 1
    assert set(cache.slot_channel) == {0, 2}
    assert np.all(cache.rows[cache.channel_slot[0]] == 9)
    assert cache.channel_slot[1] == -1
    cache.admit(np.array([3]), np.zeros((1, 3), np.float32))  # count 0 evicts nothing
    assert set(cache.slot_channel) == {0, 2}


@pytest.mark.parametrize("budget_share", [1.2, 0.35])
def test_dense_engine_reproduces_hf_logits_per_position(tiny_model, tiny_flash, budget_share):
    ids = [3, 17, 250, 9, 42, 7, 100, 5]
    ref = hf_logits(tiny_model, ids)
    opt = EngineOptions(budget_bytes=0, direct=False, bounce_bytes=64 << 10)
    budget = int(tiny_flash.weight_bytes * budget_share) + min_budget_bytes(tiny_flash, opt) + 8192
    engine = ActiveFlowEngine(tiny_flash, replace(opt, budget_bytes=budget))
    got = run(engine, ids)
    summary = engine.summary()
    engine.close()
    scale = np.abs(ref).max(axis=1, keepdims=True)
    assert np.all(np.abs(got - ref).max(axis=1) <= 2e-5 * scale[:, 0] + 1e-5)
    assert summary["arena_used_bytes"] <= budget
    if budget_share < 1:
        assert summary["resident_share"] < 0.4
        assert summary["bytes_read_per_token"] > 0 and summary["preload_share_of_active"] > 0


def test_engine_refuses_a_budget_below_its_buffers(tiny_flash) -> None:
    with pytest.raises(BudgetExceeded):
        ActiveFlowEngine(tiny_flash, EngineOptions(budget_bytes=1 << 20))


def test_thresholds_reach_target_sparsity_on_held_out_tokens(tiny_flash) -> None:
    rng = np.random.default_rng(1)
    engine = ActiveFlowEngine(tiny_flash, EngineOptions(budget_bytes=8 << 20, direct=False))
    calib = collect_abs_inputs(engine, rng.integers(0, 320, 48).tolist())
    held_out = collect_abs_inputs(engine, rng.integers(0, 320, 24).tolist())
    for sp in (0.3, 0.5, 0.7):
        th = thresholds_for(calib, sp)
        realized = np.array(list(realized_sparsity(held_out, th).values()))
        assert abs(realized.mean() - sp) < 0.05, (sp, realized.mean())
    # The sparse engine skips those channels: fewer active channels than dense, same shape out.
    engine.thresholds = thresholds_for(calib, 0.5)
    engine.counters.active_channels = 0
    run(engine, [1, 2, 3, 4])
    total = sum(e.channels for e in tiny_flash.extents.values()) * 4
    assert 0.35 < engine.counters.active_channels / total < 0.65
    engine.close()


def test_zero_sparsity_thresholds_equal_dense(tiny_flash) -> None:
    ids = [5, 6, 7]
    engine = ActiveFlowEngine(tiny_flash, EngineOptions(budget_bytes=8 << 20, direct=False))
    dense = run(engine, ids)
    engine.thresholds = {(layer, kind): -1.0 for layer in range(3) for kind in KINDS}
    # Same channels; only the cache/flash split of the sums (hence fp32 rounding) differs.
    got = run(engine, ids)
    assert np.all(np.abs(got - dense).max(axis=1) <= 1e-5 * np.abs(dense).max(axis=1))
    engine.close()


@pytest.mark.skipif(not (SMOLLM2 / "model.safetensors").exists(), reason="SmolLM2 not present")
def test_dense_engine_reproduces_smollm2_hf_logits(tmp_path) -> None:
    index = write_flash_file(SMOLLM2, tmp_path / "smollm2.bin")
    ids = [1, 504, 3458, 5866, 314]
    ref = hf_logits(SMOLLM2, ids)
    engine = ActiveFlowEngine(index, EngineOptions(budget_bytes=64 << 20))
    try:
        got = run(engine, ids)
    finally:
        engine.close()
        index.path.unlink()  # 425 MB; pytest keeps the last three tmp dirs
    assert np.all(np.abs(got - ref).max(axis=1) <= 1e-3)
    assert np.array_equal(got.argmax(axis=1), ref.argmax(axis=1))


def test_mmap_baseline_computes_the_same_dense_logits(tiny_model, tiny_flash) -> None:
    from mobile.activeflow.mmap_baseline import MmapDenseModel

    ids = [11, 12, 13, 14]
    ref = hf_logits(tiny_model, ids)
    model = MmapDenseModel(tiny_flash)
    got = run(model, ids)
    model.close()
    assert np.all(np.abs(got - ref).max(axis=1) <= 2e-5 * np.abs(ref).max(axis=1) + 1e-5)


def test_sparse_engine_matches_hf_with_teal_masks(tiny_model, tiny_flash) -> None:
    """Reference: the HF model with every projection input masked (|x_j| <= tau -> 0)."""
    from transformers import AutoModelForCausalLM

    rng = np.random.default_rng(7)
    opt = EngineOptions(budget_bytes=0, direct=False, bounce_bytes=64 << 10)
    budget = int(tiny_flash.weight_bytes * 0.4) + min_budget_bytes(tiny_flash, opt) + 8192
    engine = ActiveFlowEngine(tiny_flash, replace(opt, budget_bytes=budget))
    th = thresholds_for(collect_abs_inputs(engine, rng.integers(0, 320, 32).tolist()), 0.5)
    engine.thresholds = th
    ids = [4, 8, 15, 16, 23, 42]
    got = run(engine, ids)
    preload_hits = engine.counters.preload_hits
    engine.close()

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    kinds = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "o_in",
             "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "down_in"}
    for layer, block in enumerate(model.model.layers):
        for name, kind in kinds.items():
            proj = getattr(block.self_attn if "proj" in name and name[0] in "qkvo" else block.mlp,
                           name)
            tau = th[(layer, kind)]
            proj.register_forward_pre_hook(lambda m, a, tau=tau: (a[0] * (a[0].abs() > tau),))
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    assert np.all(np.abs(got - ref).max(axis=1) <= 1e-4 * np.abs(ref).max(axis=1) + 1e-5)
    dense = hf_logits(tiny_model, ids)
    assert np.abs(dense - ref).max() > 1e-2  # the masks matter: not the dense logits
    assert preload_hits > 0  # some active channels came through the preload path
