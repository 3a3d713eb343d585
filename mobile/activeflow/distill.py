"""Sparsity-aware self-distillation (digest §1.6), in torch on the CPU.

Student: the model with the engine's activation masks on every projection input (channel j
of a (layer, kind) input is kept iff |x_j| > tau, the same per-(layer, kind) thresholds as
`sparsity.py`); the mask's gradient is passed straight through (forward x*m, backward
identity), as the paper says. Teacher: the same checkpoint, dense and frozen. Loss:
KL(teacher || student) over the full vocabulary at every position of local text.

What trains: every projection weight (q/k/v/o/gate/up/down, the streamed part of the flash
file) and the RMSNorm gains; the tied embedding / lm_head stays frozen. Why: the masks act on
projection inputs, so those weights and the norms that scale the inputs are what can adapt
to them; the embedding is resident and unmasked, and being tied it would move the input and
the output distribution at once (and it is 28M of the 135M parameters: more Adam state for
no masked input). Not done: the paper's 4-bit QAT (BitDistiller) inside the same loop; the
engine streams fp32 rows, so there is nothing to quantize-aware train for.

Thresholds: calibrated (TEAL-style: the target-sparsity quantile of the *unmasked* |x| on
calibration text) from the student every `recalibrate_every` steps, so training keeps
seeing the target sparsity while the weights move; the final thresholds are calibrated the
same way from the final weights by `tessera mobile calibrate` on the converted flash file.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mobile.activeflow.sparsity import Thresholds, thresholds_for

# HF module name -> flash-file kind (ops sharing an input share a threshold, layout.py).
PROJ_KIND = {
    "self_attn.q_proj": "attn_in",
    "self_attn.k_proj": "attn_in",
    "self_attn.v_proj": "attn_in",
    "self_attn.o_proj": "o_in",
    "mlp.gate_proj": "mlp_in",
    "mlp.up_proj": "mlp_in",
    "mlp.down_proj": "down_in",
}
# One module per kind, where realized sparsity and calibration inputs are counted.
KIND_PROBE = {
    "attn_in": "self_attn.q_proj",
    "o_in": "self_attn.o_proj",
    "mlp_in": "mlp.gate_proj",
    "down_in": "mlp.down_proj",
}


def load_model(model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def projections(model: torch.nn.Module) -> Iterator[tuple[int, str, torch.nn.Module]]:
    for layer, block in enumerate(model.model.layers):
        for name in PROJ_KIND:
            yield layer, name, block.get_submodule(name)


def ste_mask(x: torch.Tensor, tau: float) -> torch.Tensor:
    """x * (|x| > tau) forward; identity gradient (straight-through, digest §1.6)."""
    return x + (x * (x.abs() > tau) - x).detach()


class MaskStats:
    """Active / total channels per kind while masks are on (the realized sparsity)."""

    def __init__(self) -> None:
        self.active: dict[str, int] = defaultdict(int)
        self.total: dict[str, int] = defaultdict(int)

    def sparsity(self) -> float:
        total = sum(self.total.values())
        return 1.0 - sum(self.active.values()) / total if total else 0.0


@contextmanager
def masked(model: torch.nn.Module, thresholds: Thresholds | None, stats: MaskStats | None = None):
    """Every projection input masked by its (layer, kind) threshold while inside."""
    handles = []
    if thresholds is not None:
        for layer, name, proj in projections(model):
            kind = PROJ_KIND[name]
            tau = thresholds[(layer, kind)]
            count = stats is not None and KIND_PROBE[kind] == name

            def hook(_m, args, tau=tau, kind=kind, count=count):
                x = args[0]
                if count:
                    stats.active[kind] += int((x.abs() > tau).sum())
                    stats.total[kind] += x.numel()
                return (ste_mask(x, tau),) + tuple(args[1:])

            handles.append(proj.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def calibrate(model: torch.nn.Module, ids: list[int], sparsity: float) -> Thresholds:
    """TEAL thresholds from the unmasked |x| of `model` on `ids` (same rule as the engine)."""
    seen: dict[tuple[int, str], list[np.ndarray]] = defaultdict(list)
    handles = []
    for layer, name, proj in projections(model):
        kind = PROJ_KIND[name]
        if KIND_PROBE[kind] != name:
            continue
        handles.append(
            proj.register_forward_pre_hook(
                lambda _m, a, key=(layer, kind): seen[key].append(
                    a[0].abs().reshape(-1, a[0].shape[-1]).numpy()
                )
            )
        )
    try:
        model(torch.tensor([ids]))
    finally:
        for h in handles:
            h.remove()
    return thresholds_for({k: np.concatenate(v) for k, v in seen.items()}, sparsity)


def kl_teacher_student(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(p_teacher || p_student), full vocabulary, fp32."""
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    s = F.log_softmax(student_logits.float(), dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean()


@dataclass
class DistillConfig:
    sparsity: float = 0.5
    steps: int = 400
    seq_len: int = 256
    lr: float = 2e-5
    warmup: int = 10
    seed: int = 0
    recalibrate_every: int = 50
    checkpoint_every: int = 10
    max_minutes: float = 30.0
    threads: int = 2


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Projection weights and RMSNorm gains; the tied embedding stays frozen (see module doc)."""
    params = []
    for name, p in model.named_parameters():
        keep = "embed_tokens" not in name and "lm_head" not in name
        p.requires_grad_(keep)
        if keep:
            params.append(p)
    return params


def windows(ids: list[int], seq_len: int, seed: int) -> Callable[[int], list[int]]:
    """Step -> a training window; the order depends only on (seed, step): resumable."""
    n = len(ids) - seq_len

    def at(step: int) -> list[int]:
        start = random.Random(seed * 1_000_003 + step).randrange(n)
        return [int(i) for i in ids[start : start + seq_len]]

    return at


def _lr(cfg: DistillConfig, step: int) -> float:
    """Linear warm-up, cosine decay to 10%."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def distill(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    train_ids: list[int],
    calib_ids: list[int],
    cfg: DistillConfig,
    out_dir: Path,
    progress: bool = True,
) -> dict:
    """Train `student` in place; checkpoints to `out_dir/checkpoint.pt` and resumes from it.

    Stops at cfg.steps or after cfg.max_minutes (the checkpoint then holds the progress, and
    running again with the same arguments continues). Returns the log.
    """
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    teacher.eval().requires_grad_(False)
    student.train()
    params = trainable(student)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = out_dir / "checkpoint.pt"
    log: dict = {"config": asdict(cfg), "losses": [], "sparsity": [], "elapsed_s": 0.0}
    step = 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        student.load_state_dict(state["model"], strict=False)
        opt.load_state_dict(state["opt"])
        step, log = state["step"], state["log"]
        del state  # 1.3 GB at SmolLM2 scale: the OOM killer took a run that kept it
        # Operational settings may change on resume; the ones that shape training may not.
        free = ("max_minutes", "checkpoint_every", "threads")
        if {k: v for k, v in log["config"].items() if k not in free} != {
            k: v for k, v in asdict(cfg).items() if k not in free
        }:
            raise ValueError(f"{ckpt} was written with another config: {log['config']}")
        log["config"] = asdict(cfg)
    window = windows(train_ids, cfg.seq_len, cfg.seed)
    thresholds = calibrate(student, calib_ids, cfg.sparsity)
    t_start, t_prev = time.monotonic(), log["elapsed_s"]
    bar = _bar(cfg.steps, step, progress)

    def save() -> None:
        log["elapsed_s"] = t_prev + time.monotonic() - t_start
        trained = {n: p.detach() for n, p in student.named_parameters() if p.requires_grad}
        torch.save(
            {"model": trained, "opt": opt.state_dict(), "step": step, "log": log}, f"{ckpt}.tmp"
        )
        Path(f"{ckpt}.tmp").replace(ckpt)  # atomic: a kill never leaves half a checkpoint

    while step < cfg.steps:
        if (time.monotonic() - t_start) / 60 > cfg.max_minutes:
            break
        if step and step % cfg.recalibrate_every == 0:
            thresholds = calibrate(student, calib_ids, cfg.sparsity)
        batch = torch.tensor([window(step)])
        with torch.no_grad():
            target = teacher(batch).logits
        stats = MaskStats()
        with masked(student, thresholds, stats):
            loss = kl_teacher_student(target, student(batch).logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for g in opt.param_groups:
            g["lr"] = _lr(cfg, step)
        opt.step()
        step += 1
        log["losses"].append(float(loss.detach()))
        log["sparsity"].append(stats.sparsity())
        bar(step, float(loss.detach()), stats.sparsity())
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            save()
    save()
    log["finished"] = step >= cfg.steps
    return log


def _bar(total: int, start: int, enabled: bool) -> Callable[[int, float, float], None]:
    if not enabled:
        return lambda *_: None
    from tqdm import tqdm

    bar = tqdm(total=total, initial=start, desc="distill", file=sys.stderr, mininterval=5)

    def update(step: int, loss: float, sp: float) -> None:
        bar.update(step - bar.n)
        bar.set_postfix(kl=f"{loss:.4f}", sparsity=f"{sp:.2f}", refresh=False)

    return update


def save_student(student: torch.nn.Module, model_dir: Path, out_dir: Path, meta: dict) -> None:
    """An HF checkpoint dir (fp32 safetensors + config + tokenizer) `write_flash_file` reads."""
    import shutil

    out_dir.mkdir(parents=True, exist_ok=True)
    student.save_pretrained(out_dir, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (Path(model_dir) / name).exists():
            shutil.copy(Path(model_dir) / name, out_dir / name)
    (out_dir / "distill.json").write_text(json.dumps(meta, indent=1))


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    seqs: list[list[int]],
    thresholds: Thresholds | None,
    reference_top1: list[np.ndarray] | None = None,
) -> dict:
    """Perplexity, top-1 per position, agreement with `reference_top1`, realized sparsity."""
    model.eval()
    nll, n, top1, stats = 0.0, 0, [], MaskStats()
    with masked(model, thresholds, stats):
        for ids in seqs:
            logits = model(torch.tensor([ids])).logits[0]  # fp32: [1024, 49k] doubles = 400 MB
            lp = torch.log_softmax(logits[:-1], -1)
            nll -= float(lp.gather(1, torch.tensor(ids[1:])[:, None]).sum())
            n += len(ids) - 1
            top1.append(logits.argmax(-1).numpy())
    out = {
        "perplexity": math.exp(nll / n),
        "predictions": n,
        "realized_sparsity": stats.sparsity() if thresholds else 0.0,
        "top1": top1,
    }
    if reference_top1 is not None:
        out["top1_agreement_with_dense"] = float(
            np.mean(np.concatenate([a == b for a, b in zip(top1, reference_top1, strict=True)]))
        )
    return out
