"""LeanK's two-stage mask training (paper section 3) on a local HF Llama/Qwen-style model.

Frozen model; only per-channel factors over post-RoPE keys are learned, shape
[layers, kv_heads, head_dim]. The loss is distillation: the relative squared error between
the masked model's and the dense model's final hidden states, over positions >= loss_from
(early positions see few keys and say little about long-range attention). With
mode="decode" (default, ours) the masked model is the serving situation, every position a
decode step after a dense prefill (simulate.py); mode="all" masks keys at every position of
the pass (harsher: errors compound through layers and positions).

- Stage 1 (importance): continuous factors alpha in [0, 1], initialised at 1, trained with
  the distillation loss plus an L1 penalty that pushes unneeded channels to 0 (projected
  gradient: clamp to [0, 1] after each step). alpha ranks channels across the whole model;
  ``budget.aligned_head_budgets`` turns it into per-head kept counts that meet the target
  sparsity and the alignment.
- Stage 2 (mask under the constraint): with the per-head budgets fixed, scores s (from
  alpha) are trained through the hard top-k mask itself (straight-through: forward uses the
  0/1 mask, backward treats it as s), so the loss is that of the mask that will be served.
  The final mask is each head's top-budget channels by s.

Seeded and resumable: the training window of step i is drawn from a generator seeded with
(seed, stage, i), and a checkpoint (factors, optimizer, budgets, losses) is written every
``checkpoint_every`` steps and at each stage end; a rerun with the same config continues.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from attention_backends.policy import ModelFingerprint
from kv_manager.leank.budget import aligned_head_budgets, topk_keep
from kv_manager.leank.mask import LeanKMask, save_mask
from kv_manager.leank.simulate import decode_after_prefill_attention

ATTENTION_NAME = "leank_channel_factors"
# Held out for benchmarks/leank_fidelity.py, so fidelity is measured on text not trained on.
HELD_OUT = ("GPL-3", "Apache-2.0")
# Symlinks (GPL -> GPL-3, ...) are skipped so no text is seen twice or leaks from HELD_OUT.
DEFAULT_CORPUS = tuple(sorted(str(p) for p in Path("/usr/share/common-licenses").glob("*")
                              if p.is_file() and not p.is_symlink() and p.name not in HELD_OUT))


@dataclass
class TrainConfig:
    model_dir: Path
    out: Path
    sparsity: float = 0.7
    align: int = 16
    seq_len: int = 256
    loss_from: int = 32
    stage1_steps: int = 100
    stage2_steps: int = 60
    stage1_lr: float = 0.05
    stage2_lr: float = 0.02
    l1_weight: float = 0.05
    mode: str = "decode"
    seed: int = 0
    threads: int = 2
    checkpoint_every: int = 5
    corpus: tuple[str, ...] = field(default_factory=lambda: DEFAULT_CORPUS)

    @property
    def checkpoint(self) -> Path:
        return Path(str(self.out) + ".ckpt.pt")

    def identity(self) -> dict[str, Any]:
        """What must match for a checkpoint to be resumed (everything but paths/threads)."""
        values = asdict(self)
        for key in ("out", "threads", "checkpoint_every"):
            values.pop(key)
        values["model_dir"] = str(values["model_dir"])
        return values


# Read by the attention function below. factors None = dense. mode "decode": batch rows are
# (dense stream, decode stream), see simulate.py; mode "all": keys masked everywhere.
_ACTIVE: dict[str, Any] = {"factors": None, "mode": "decode"}
MODES = ("decode", "all")


def _scaled_key_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                          value: torch.Tensor, attention_mask: torch.Tensor | None,
                          **kwargs: Any) -> tuple[torch.Tensor, None]:
    # key is post-RoPE [batch, kv_heads, tokens, head_dim]: scaling its channels is exactly
    # what a pruned cache does (zeroed key channels also remove the query's matching ones).
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    factors = _ACTIVE["factors"]
    if factors is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    layer_factors = factors[module.layer_idx].to(key.dtype)
    if _ACTIVE["mode"] == "decode":
        scaling = kwargs.get("scaling") or module.scaling
        return decode_after_prefill_attention(query, key, value, layer_factors, scaling), None
    key = key * layer_factors.unsqueeze(1)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


@contextmanager
def channel_factors(factors: torch.Tensor | None, mode: str = "decode") -> Iterator[None]:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    previous = dict(_ACTIVE)
    _ACTIVE.update(factors=factors, mode=mode)
    try:
        yield
    finally:
        _ACTIVE.update(previous)


def masked_hidden_states(model: torch.nn.Module, input_ids: torch.Tensor,
                         factors: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(dense, masked) final hidden states [tokens, hidden] for one sequence [1, tokens].
    "decode": both from one two-row pass; "all": a dense pass and a masked pass."""
    if mode == "decode":
        with channel_factors(factors, mode):
            hidden = model.model(input_ids=input_ids.repeat(2, 1)).last_hidden_state
        return hidden[0].detach(), hidden[1]
    with torch.no_grad(), channel_factors(None):
        dense = model.model(input_ids=input_ids).last_hidden_state[0]
    with channel_factors(factors, mode):
        return dense, model.model(input_ids=input_ids).last_hidden_state[0]


def load_frozen_model(model_dir: Path) -> torch.nn.Module:
    """fp32, eval, no grads, with the key-scaling attention function installed."""
    from transformers import AttentionInterface, AutoModelForCausalLM

    AttentionInterface.register(ATTENTION_NAME, _scaled_key_attention)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32,
                                                 attn_implementation="sdpa")
    model.config._attn_implementation = ATTENTION_NAME
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def corpus_tokens(model_dir: Path, paths: tuple[str, ...]) -> torch.Tensor:
    """All corpus files, in order, tokenised as one long int64 stream."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    text = "\n\n".join(Path(p).read_text(errors="replace") for p in paths)
    return torch.tensor(tokenizer(text)["input_ids"], dtype=torch.int64)


def _window(tokens: torch.Tensor, config: TrainConfig, stage: int, step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + stage * 10_007 + step)
    start = int(torch.randint(0, len(tokens) - config.seq_len, (1,), generator=generator))
    return tokens[start: start + config.seq_len].unsqueeze(0)


def _distill_loss(model: torch.nn.Module, input_ids: torch.Tensor, factors: torch.Tensor,
                  loss_from: int, mode: str = "decode") -> torch.Tensor:
    target, hidden = masked_hidden_states(model, input_ids, factors, mode)
    target, hidden = target[loss_from:], hidden[loss_from:]
    return (hidden - target).pow(2).sum() / target.pow(2).sum()


def _shape(model: torch.nn.Module) -> tuple[int, int, int]:
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return config.num_hidden_layers, kv_heads, head_dim


def _load_checkpoint(config: TrainConfig) -> dict[str, Any] | None:
    if not config.checkpoint.exists():
        return None
    state = torch.load(config.checkpoint, weights_only=False)
    if state["identity"] != config.identity():
        raise ValueError(f"{config.checkpoint} was written by a different config; delete it "
                         "or train with the same settings to resume")
    return state


def train(config: TrainConfig, tokens: torch.Tensor | None = None,
          model: torch.nn.Module | None = None) -> LeanKMask:
    """Run (or resume) both stages and write ``config.out``; returns the mask."""
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    model = model if model is not None else load_frozen_model(config.model_dir)
    tokens = tokens if tokens is not None else corpus_tokens(config.model_dir, config.corpus)
    if len(tokens) <= config.seq_len:
        raise ValueError(f"corpus has {len(tokens)} tokens, need more than {config.seq_len}")
    state = _load_checkpoint(config) or {
        "identity": config.identity(), "stage": 1, "step": 0,
        "factors": torch.ones(_shape(model)), "optimizer": None, "budgets": None,
        "losses": {"1": [], "2": []}, "elapsed_s": 0.0}

    for stage in (1, 2):
        if state["stage"] > stage:
            continue
        steps = config.stage1_steps if stage == 1 else config.stage2_steps
        lr = config.stage1_lr if stage == 1 else config.stage2_lr
        scores = state["factors"].clone().requires_grad_(True)
        optimizer = torch.optim.Adam([scores], lr=lr)
        if state["optimizer"] is not None:
            optimizer.load_state_dict(state["optimizer"])
        budgets = state["budgets"]
        bar = tqdm(range(state["step"], steps), initial=state["step"], total=steps,
                   desc=f"leank stage {stage}", unit="step")
        for step in bar:
            started = time.perf_counter()
            input_ids = _window(tokens, config, stage, step)
            if stage == 1:
                factors = scores.clamp(0.0, 1.0)
                distill = _distill_loss(model, input_ids, factors, config.loss_from, config.mode)
                loss = distill + config.l1_weight * factors.mean()
            else:
                hard = topk_keep(scores.detach(), budgets).float()
                factors = hard + scores - scores.detach()  # straight-through
                distill = _distill_loss(model, input_ids, factors, config.loss_from, config.mode)
                loss = distill
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if stage == 1:
                with torch.no_grad():
                    scores.clamp_(0.0, 1.0)
            state["losses"][str(stage)].append(round(float(distill.detach()), 6))
            state["elapsed_s"] += time.perf_counter() - started
            state.update(step=step + 1, factors=scores.detach().clone(),
                         optimizer=optimizer.state_dict())
            bar.set_postfix(distill=f"{float(distill.detach()):.4f}",
                            kept=f"{float((scores > 0.5).float().mean()):.2f}")
            if (step + 1) % config.checkpoint_every == 0:
                torch.save(state, config.checkpoint)
        if stage == 1:
            budgets = aligned_head_budgets(state["factors"], config.sparsity, config.align)
        state.update(stage=stage + 1, step=0, optimizer=None, budgets=budgets)
        torch.save(state, config.checkpoint)

    final = state["factors"]
    mask = LeanKMask(
        fingerprint=ModelFingerprint.from_hf_config(model.config),
        keep=topk_keep(final, state["budgets"]), sparsity=config.sparsity, align=config.align,
        importance=final,
        training={"config": config.identity(), "device": "cpu",
                  "train_seconds": round(state["elapsed_s"], 1),
                  "stage1_distill": state["losses"]["1"], "stage2_distill": state["losses"]["2"]})
    save_mask(mask, config.out)
    return mask


def summary(mask: LeanKMask) -> str:
    meta = mask.metadata()
    return json.dumps({key: meta[key] for key in
                       ("target_sparsity", "achieved_sparsity", "align", "fully_pruned_heads")}
                      | {"train_seconds": mask.training.get("train_seconds")})
