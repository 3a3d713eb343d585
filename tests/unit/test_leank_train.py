"""LeanK training on a tiny random Llama: the mask meets the constraints, the run is
seeded, and an interrupted run resumes to the same mask as an uninterrupted one."""

from __future__ import annotations

import pytest
import torch

from kv_manager.leank import train as leank_train
from kv_manager.leank.mask import load_mask
from kv_manager.leank.train import TrainConfig, load_frozen_model


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, architectures=["LlamaForCausalLM"])
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def _config(model_dir, out, **overrides) -> TrainConfig:
    values = dict(model_dir=model_dir, out=out, sparsity=0.5, align=4, seq_len=24, loss_from=4,
                  stage1_steps=3, stage2_steps=2, stage1_lr=0.2, l1_weight=0.5,
                  checkpoint_every=1, threads=1)
    values.update(overrides)
    return TrainConfig(**values)


TOKENS = torch.randint(0, 97, (500,), generator=torch.Generator().manual_seed(1))


def test_trained_mask_meets_sparsity_and_alignment(tiny_model_dir, tmp_path):
    mask = leank_train.train(_config(tiny_model_dir, tmp_path / "m.safetensors"), TOKENS)
    assert mask.keep.shape == (2, 2, 16)
    assert bool((mask.kept_counts % 4 == 0).all())
    assert int(mask.keep.sum()) == 32  # half of 2 * 2 * 16
    assert len(mask.training["stage1_distill"]) == 3
    assert len(mask.training["stage2_distill"]) == 2
    assert torch.equal(load_mask(tmp_path / "m.safetensors").keep, mask.keep)


def test_stage1_moves_importance_away_from_uniform(tiny_model_dir, tmp_path):
    mask = leank_train.train(_config(tiny_model_dir, tmp_path / "m.safetensors"), TOKENS)
    assert float(mask.importance.std()) > 0.01


def test_interrupted_run_resumes_to_the_same_mask(tiny_model_dir, tmp_path, monkeypatch):
    reference = leank_train.train(_config(tiny_model_dir, tmp_path / "a.safetensors"), TOKENS)

    real_loss, calls = leank_train._distill_loss, {"n": 0}

    def crash_on_fourth_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # first step of stage 2
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    config = _config(tiny_model_dir, tmp_path / "b.safetensors")
    monkeypatch.setattr(leank_train, "_distill_loss", crash_on_fourth_step)
    with pytest.raises(KeyboardInterrupt):
        leank_train.train(config, TOKENS)
    monkeypatch.setattr(leank_train, "_distill_loss", real_loss)
    resumed = leank_train.train(config, TOKENS)
    assert torch.equal(resumed.keep, reference.keep)
    assert torch.allclose(resumed.importance, reference.importance, atol=1e-6)


def test_checkpoint_from_other_settings_is_refused(tiny_model_dir, tmp_path):
    leank_train.train(_config(tiny_model_dir, tmp_path / "m.safetensors"), TOKENS)
    with pytest.raises(ValueError, match="different config"):
        leank_train.train(_config(tiny_model_dir, tmp_path / "m.safetensors", seed=7), TOKENS)


@pytest.mark.parametrize("mode", ["decode", "all"])
def test_factor_one_is_the_dense_model(tiny_model_dir, mode):
    model = load_frozen_model(tiny_model_dir)
    ids = TOKENS[:20].unsqueeze(0)
    loss = leank_train._distill_loss(model, ids, torch.ones(2, 2, 16), 0, mode)
    assert float(loss) < 1e-10
    assert float(leank_train._distill_loss(model, ids, torch.zeros(2, 2, 16), 0, mode)) > 1e-4


def test_decode_mode_is_milder_than_masking_every_position(tiny_model_dir):
    # Decode after a dense prefill perturbs only the decoded token's own path.
    model = load_frozen_model(tiny_model_dir)
    ids = TOKENS[:40].unsqueeze(0)
    keep = (torch.rand(2, 2, 16, generator=torch.Generator().manual_seed(3)) > 0.5).float()
    decode = leank_train._distill_loss(model, ids, keep, 4, "decode")
    everywhere = leank_train._distill_loss(model, ids, keep, 4, "all")
    assert 0 < float(decode) < float(everywhere)
