"""mobile.activeflow.distill: masks, straight-through gradient, KL, a few steps lower the loss."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mobile.activeflow.distill import (
    DistillConfig,
    MaskStats,
    calibrate,
    distill,
    evaluate,
    kl_teacher_student,
    load_model,
    masked,
    ste_mask,
)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Llama (GQA, tied embeddings), saved like SmolLM2."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        tie_word_embeddings=True,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(cfg)
    for p in model.parameters():
        p.data.mul_(3.0)
    out = tmp_path_factory.mktemp("tiny_distill")
    model.save_pretrained(out)
    return out


def test_ste_mask_forward_masks_backward_is_identity() -> None:
    x = torch.tensor([-2.0, -0.1, 0.05, 0.5, 3.0], requires_grad=True)
    y = ste_mask(x, 0.3)
    assert y.tolist() == [-2.0, 0.0, 0.0, 0.5, 3.0]
    (y * torch.arange(5.0)).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]  # masked channels get gradient too


def test_kl_is_zero_for_equal_logits_and_positive_otherwise() -> None:
    a = torch.randn(1, 7, 11)
    assert float(kl_teacher_student(a, a)) == pytest.approx(0.0, abs=1e-6)
    assert float(kl_teacher_student(a, a + torch.randn(1, 7, 11))) > 1e-3


def test_calibrated_masks_hit_target_sparsity_and_change_logits(tiny_model: Path) -> None:
    model = load_model(tiny_model).eval()
    ids = torch.randint(0, 96, (48,), generator=torch.Generator().manual_seed(1)).tolist()
    th = calibrate(model, ids, 0.5)
    assert set(k for _, k in th) == {"attn_in", "o_in", "mlp_in", "down_in"}
    stats = MaskStats()
    with torch.no_grad():
        dense = model(torch.tensor([ids])).logits
        with masked(model, th, stats):
            sparse = model(torch.tensor([ids])).logits
        again = model(torch.tensor([ids])).logits  # hooks removed on exit
    # Thresholds come from unmasked inputs; masks upstream shift later layers' inputs a bit.
    assert stats.sparsity() == pytest.approx(0.5, abs=0.05)
    assert (dense - sparse).abs().max() > 1e-2
    assert torch.equal(dense, again)


def test_a_few_distillation_steps_lower_the_kl_and_resume(tiny_model: Path, tmp_path: Path):
    teacher, student = load_model(tiny_model), load_model(tiny_model)
    ids = torch.randint(0, 96, (200,), generator=torch.Generator().manual_seed(2)).tolist()
    cfg = DistillConfig(
        sparsity=0.6,
        steps=30,
        seq_len=32,
        lr=3e-3,
        warmup=2,
        seed=0,
        recalibrate_every=10,
        checkpoint_every=10,
        threads=1,
    )
    seqs = [ids[i : i + 32] for i in range(0, 128, 32)]
    th = calibrate(student, ids[:64], 0.6)
    ref = evaluate(teacher, seqs, None)["top1"]
    before = evaluate(student, seqs, th, ref)
    train = ids[:33]  # one window, seen every step: the loss must fall
    log = distill(student, teacher, train, ids[:64], cfg, tmp_path, progress=False)
    assert log["finished"] and len(log["losses"]) == 30
    assert np.mean(log["losses"][-5:]) < 0.7 * np.mean(log["losses"][:5])
    after = evaluate(student, seqs, calibrate(student, ids[:64], 0.6), ref)
    assert after["top1_agreement_with_dense"] >= before["top1_agreement_with_dense"]
    assert abs(after["realized_sparsity"] - 0.6) < 0.1
    # Resume: a longer run picks the checkpoint up at step 30 instead of starting over.
    student2 = load_model(tiny_model)
    cfg2 = DistillConfig(**{**cfg.__dict__, "steps": 30})
    log2 = distill(student2, teacher, train, ids[:64], cfg2, tmp_path, progress=False)
    assert len(log2["losses"]) == 30  # nothing retrained
    for (n, p), (_, q) in zip(student.named_parameters(), student2.named_parameters(), strict=True):
        assert torch.equal(p, q), n


def test_distill_modules_import_nothing_else_of_ours() -> None:
    import subprocess
    import sys

    code = (
        "import sys, mobile.activeflow.distill, mobile.activeflow.corpus\n"
        "ours = {'server', 'prompt_pipeline', 'attention_backends', 'kv_manager', "
        "'tessera_config'}\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ours)\n"
        "assert not bad, bad"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)


def test_corpus_split_keeps_eval_text_out_of_training(tmp_path: Path) -> None:
    from mobile.activeflow.corpus import split_texts

    lic, docs = tmp_path / "lic", tmp_path / "docs"
    lic.mkdir()
    docs.mkdir()
    (lic / "Apache-2.0").write_text("Apache License text " * 10)
    (lic / "GPL-3").write_text("GPL three " * 10)
    (lic / "GPL").write_text("GPL three " * 10)  # a copy: kept once
    for i in range(40):
        (docs / f"d{i}.md").write_text(f"doc {i} " * 400)
    (docs / "quotes.md").write_text("Licensed under the Apache License " * 100)
    split = split_texts(lic, docs)
    train, held = split["train"], split["eval_docs"]
    assert sum(t.startswith("GPL three") for t in train) == 1
    assert not any("Apache License" in t for t in train + held)
    assert held and not set(held) & set(train) and len(train) + len(held) == 41


def test_teacher_forced_scores_give_perplexity_and_argmax_per_position() -> None:
    import numpy as np

    from mobile.activeflow.engine import teacher_forced_scores

    class FixedLogits:  # a stand-in with the engine's one method this function calls
        def __init__(self) -> None:
            self.position = 0

        def forward_token(self, token_id: int) -> np.ndarray:
            logits = np.zeros(4, dtype=np.float32)
            logits[self.position % 4] = np.log(3.0)  # p = 3/6 for the argmax, 1/6 others
            self.position += 1
            return logits

    ids = [0, 1, 3, 3]
    perplexity, top1 = teacher_forced_scores(FixedLogits(), ids)
    assert top1 == [0, 1, 2, 3]
    # Position 0 predicts id 1 (p 1/6), 1 predicts 3 (1/6), 2 predicts 3 (1/6).
    assert perplexity == pytest.approx(6.0, rel=1e-6)
