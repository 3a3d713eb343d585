"""LeanK mask file: round trip, refusal of another model's mask, alignment invariants."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from attention_backends.policy import SMOLLM2_135M
from kv_manager.leank.budget import aligned_head_budgets, topk_keep
from kv_manager.leank.mask import LeanKMask, MaskMismatchError, load_mask, save_mask


def _random_mask(seed: int = 0, sparsity: float = 0.7, align: int = 16) -> LeanKMask:
    generator = torch.Generator().manual_seed(seed)
    # Heavy-tailed scores so some heads lose every group (fully pruned heads appear).
    importance = torch.rand(30, 3, 64, generator=generator) ** 6
    importance[5, 1] = 0.0
    budgets = aligned_head_budgets(importance, sparsity, align)
    return LeanKMask(SMOLLM2_135M, topk_keep(importance, budgets), sparsity, align,
                     importance=importance, training={"seed": seed})


def test_round_trip_keeps_mask_metadata_and_importance(tmp_path):
    mask = _random_mask()
    save_mask(mask, tmp_path / "m.safetensors")
    loaded = load_mask(tmp_path / "m.safetensors", expect=SMOLLM2_135M, head_dim=64)
    assert torch.equal(loaded.keep, mask.keep)
    assert torch.equal(loaded.importance, mask.importance)
    assert (loaded.fingerprint, loaded.sparsity, loaded.align) == (SMOLLM2_135M, 0.7, 16)
    assert loaded.training == {"seed": 0}
    assert loaded.fully_pruned_heads() == mask.fully_pruned_heads()


def test_json_metadata_lists_kept_channels_and_pruned_heads(tmp_path):
    mask = _random_mask()
    save_mask(mask, tmp_path / "m.safetensors")
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as handle:
        meta = json.loads(handle.metadata()["leank"])
    assert meta["kept_channels"][7][2] == torch.nonzero(mask.keep[7, 2]).flatten().tolist()
    assert [5, 1] in meta["fully_pruned_heads"]
    assert meta["fingerprint"]["num_kv_heads"] == 3


def test_mask_for_another_model_is_refused(tmp_path):
    save_mask(_random_mask(), tmp_path / "m.safetensors")
    other = replace(SMOLLM2_135M, hidden_size=960)
    with pytest.raises(MaskMismatchError, match="trained for"):
        load_mask(tmp_path / "m.safetensors", expect=other)
    with pytest.raises(MaskMismatchError, match="head_dim"):
        load_mask(tmp_path / "m.safetensors", expect=SMOLLM2_135M, head_dim=128)


def test_file_whose_json_disagrees_with_tensor_is_refused(tmp_path):
    mask = _random_mask()
    meta = mask.metadata()
    meta["kept_channels"][0][0] = [0, 1, 2]
    save_file({"keep": mask.keep.to(torch.uint8)}, str(tmp_path / "bad.safetensors"),
              metadata={"leank": json.dumps(meta)})
    with pytest.raises(MaskMismatchError, match="disagree"):
        load_mask(tmp_path / "bad.safetensors")


def test_unaligned_mask_is_rejected():
    keep = torch.zeros(30, 3, 64, dtype=torch.bool)
    keep[0, 0, :5] = True
    with pytest.raises(MaskMismatchError, match="multiples"):
        LeanKMask(SMOLLM2_135M, keep, 0.7, 16)


@pytest.mark.parametrize("sparsity", [0.5, 0.7, 0.9])
@pytest.mark.parametrize("align", [8, 16, 32])
def test_budgets_are_aligned_and_meet_target(sparsity, align):
    importance = torch.rand(30, 3, 64, generator=torch.Generator().manual_seed(1)) ** 4
    budgets = aligned_head_budgets(importance, sparsity, align)
    assert bool((budgets % align == 0).all())
    assert bool((budgets >= 0).all() and (budgets <= 64).all())
    assert int(budgets.sum()) == round((1 - sparsity) * importance.numel() / align) * align
    keep = topk_keep(importance, budgets)
    assert torch.equal(keep.sum(dim=2), budgets)


def test_budgets_maximise_kept_importance_against_uniform_split():
    # A head whose channels all matter more than another head's must get the budget.
    importance = torch.ones(1, 2, 64)
    importance[0, 0] *= 10.0
    budgets = aligned_head_budgets(importance, 0.5, 16)
    assert budgets.tolist() == [[64, 0]]


def test_topk_keeps_highest_scoring_channels():
    importance = torch.arange(64, dtype=torch.float32).view(1, 1, 64)
    keep = topk_keep(importance, torch.tensor([[16]]))
    assert torch.nonzero(keep[0, 0]).flatten().tolist() == list(range(48, 64))


def test_cli_show_prints_metadata(tmp_path, capsys):
    from server.cli import main

    save_mask(_random_mask(), tmp_path / "m.safetensors")
    assert main(["leank", "show", str(tmp_path / "m.safetensors")]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["fingerprint"]["architecture"] == "LlamaForCausalLM"
    assert shown["align"] == 16 and "kept_channels" not in shown


def test_layer_uniform_budgets_give_every_layer_one_width():
    from kv_manager.leank.budget import layer_uniform_head_budgets

    importance = torch.rand(30, 3, 64, generator=torch.Generator().manual_seed(4)) ** 4
    importance[3] *= 100.0  # a layer the global ranking would favour
    budgets = layer_uniform_head_budgets(importance, 0.7, 16)
    assert set(budgets.sum(dim=1).tolist()) == {round(0.3 * 192 / 16) * 16}
    assert bool((budgets % 16 == 0).all())
    assert aligned_head_budgets(importance, 0.7, 16)[3].sum() > budgets[3].sum()
