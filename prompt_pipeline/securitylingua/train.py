"""`tessera securitylingua train`: fit a keep/drop classifier on generated pairs.

Seeded (data, initialisation, batch order), resumable (a checkpoint every
`checkpoint_every` steps and at each epoch's end; a rerun with the same output directory
continues where it stopped), with a progress bar. The official recipe (LLMLingua-2's
trainer: token cross-entropy, lr 1e-5 for XLM-R-large, 5 epochs, clip 10) is followed in
kind; rates and epochs are ours, sized for a 2-core CPU.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from prompt_pipeline.securitylingua.evaluate import extraction_metrics
from prompt_pipeline.securitylingua.features import IGNORE, Chunk, all_chunks
from prompt_pipeline.securitylingua.generator import Sample, eval_samples, train_samples
from prompt_pipeline.token_classifier import TokenClassifier
from prompt_pipeline.token_classifier.artifact import ArtifactConfig, save_artifact
from prompt_pipeline.token_classifier.classifier import load_tokenizer
from prompt_pipeline.token_classifier.encoders import EncoderConfig, build_encoder

CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainConfig:
    out_dir: Path
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    max_chunk_tokens: int = 512
    epochs: int = 4
    batch_tokens: int = 4096  # pieces per batch (chunks of similar length grouped)
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    clip_norm: float = 10.0  # the official trainer's value
    seed: int = 42
    checkpoint_every: int = 50
    threads: int = 2
    eval_limit: int | None = None  # held-out prompts scored at the end (None = all)
    train_limit: int | None = None  # use only the first N generated prompts (tests)
    stop_after_steps: int | None = None  # checkpoint and return early (tests, time boxes)


def _batches(chunks: list[Chunk], batch_tokens: int, rng: random.Random) -> list[list[int]]:
    """Indices grouped by similar length (less padding), in a seeded random order."""
    order = sorted(range(len(chunks)), key=lambda i: (len(chunks[i].input_ids), rng.random()))
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        width = len(chunks[index].input_ids)
        if current and (len(current) + 1) * width > batch_tokens:
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    rng.shuffle(batches)
    return batches


def _collate(chunks: list[Chunk], pad_id: int) -> tuple[torch.Tensor, ...]:
    width = max(len(chunk.input_ids) for chunk in chunks)
    input_ids = torch.full((len(chunks), width), pad_id, dtype=torch.long)
    labels = torch.full((len(chunks), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(chunks), width), dtype=torch.bool)
    for row, chunk in enumerate(chunks):
        length = len(chunk.input_ids)
        input_ids[row, :length] = torch.from_numpy(chunk.input_ids)
        labels[row, :length] = torch.from_numpy(chunk.labels)
        mask[row, :length] = True
    return input_ids, mask, labels


def run_fingerprint(config: TrainConfig, chunks: list[Chunk]) -> str:
    """What a checkpoint must match to be resumed: the data and every setting that shapes
    the run (not the thread count, which changes speed only)."""
    digest = hashlib.sha256()
    settings = {key: str(value) for key, value in vars(config).items()
                if key not in ("threads", "out_dir", "eval_limit", "stop_after_steps")}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for chunk in chunks:
        digest.update(chunk.input_ids.tobytes())
        digest.update(chunk.labels.tobytes())
    return digest.hexdigest()


def train(config: TrainConfig, samples: Sequence[Sample] | None = None,
          held_out: Sequence[Sample] | None = None) -> dict:
    """Trains, saves the artifact in `config.out_dir`, returns its metrics. Defaults to
    SecurityLingua's generated pairs; another task (SeCom) passes its own labelled samples."""
    torch.set_num_threads(config.threads)
    started = time.perf_counter()
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    tokenizer = load_tokenizer()
    pad_id = tokenizer.token_to_id("[PAD]")
    samples = list(samples if samples is not None else train_samples(config.seed))
    samples = samples[:config.train_limit]
    chunks = all_chunks(samples, tokenizer, config.max_chunk_tokens)
    fingerprint = run_fingerprint(config, chunks)
    model = build_encoder(config.encoder, from_base=True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate,
                                  weight_decay=config.weight_decay)
    steps_per_epoch = len(_batches(chunks, config.batch_tokens, random.Random(0)))
    total_steps = steps_per_epoch * config.epochs
    warmup = max(total_steps // 20, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(
        (step + 1) / warmup, max(0.0, (total_steps - step) / max(total_steps - warmup, 1))))

    config.out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = config.out_dir / CHECKPOINT
    epoch, step_in_epoch, done_seconds = 0, 0, 0.0
    if checkpoint_path.exists():
        state = torch.load(checkpoint_path, weights_only=False)
        if state.get("fingerprint") != fingerprint:
            raise RuntimeError(f"{checkpoint_path} is from a run with other data or settings; "
                               "delete it or choose another --out")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        epoch, step_in_epoch = state["epoch"], state["step_in_epoch"]
        done_seconds = state["seconds"]
        torch.set_rng_state(state["torch_rng"])
        print(f"resuming from epoch {epoch} step {step_in_epoch}")

    def save_checkpoint(next_epoch: int, next_step: int) -> None:
        tmp = checkpoint_path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "epoch": next_epoch,
                    "step_in_epoch": next_step, "torch_rng": torch.get_rng_state(),
                    "fingerprint": fingerprint,
                    "seconds": done_seconds + time.perf_counter() - started}, tmp)
        tmp.replace(checkpoint_path)  # atomic: a kill mid-save leaves the old checkpoint

    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=IGNORE)
    progress = tqdm(total=total_steps, initial=epoch * steps_per_epoch + step_in_epoch,
                    desc="train", unit="step")
    while epoch < config.epochs:
        # The epoch's order depends only on (seed, epoch): a resumed run sees the same batches.
        batches = _batches(chunks, config.batch_tokens, random.Random(config.seed * 1000 + epoch))
        model.train()
        for step in range(step_in_epoch, len(batches)):
            input_ids, mask, labels = _collate([chunks[i] for i in batches[step]], pad_id)
            logits = model(input_ids, mask)
            loss = loss_fn(logits.reshape(-1, 2), labels.reshape(-1))
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.clip_norm)
            optimizer.step()
            scheduler.step()
            progress.update(1)
            progress.set_postfix(epoch=epoch, loss=f"{loss.item():.4f}")
            if (step + 1) % config.checkpoint_every == 0:
                save_checkpoint(epoch, step + 1)
            if config.stop_after_steps is not None and progress.n >= config.stop_after_steps:
                save_checkpoint(epoch, step + 1)
                progress.close()
                return {"stopped_at_step": progress.n}
        epoch, step_in_epoch = epoch + 1, 0
        save_checkpoint(epoch, 0)
    progress.close()

    model.eval()
    train_seconds = done_seconds + time.perf_counter() - started
    artifact = ArtifactConfig(config.encoder, config.max_chunk_tokens)
    classifier = TokenClassifier(model, tokenizer, config.max_chunk_tokens)
    held_out = list(held_out if held_out is not None else eval_samples())
    if config.eval_limit is not None:
        held_out = held_out[:config.eval_limit]
    metrics = extraction_metrics(classifier, held_out)
    artifact.extra = {
        "train_seconds": round(train_seconds, 1), "train_chunks": len(chunks),
        "steps": total_steps, "seed": config.seed, "epochs": config.epochs,
        "learning_rate": config.learning_rate, "batch_tokens": config.batch_tokens,
        "held_out_f1": round(metrics["all"]["f1"], 4),
        "held_out_recoverable_share": metrics["all"]["recoverable_share"],
        "held_out_prompts": len(held_out),
        "trainable_parameters": sum(p.numel() for p in params),
    }
    save_artifact(config.out_dir, model, artifact)
    checkpoint_path.unlink(missing_ok=True)
    (config.out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    if not math.isfinite(metrics["all"]["f1"]):
        raise RuntimeError("training produced non-finite metrics")
    return {"artifact": str(config.out_dir), **artifact.extra}
