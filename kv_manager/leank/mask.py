"""The LeanK mask: which post-RoPE K channels each (layer, KV head) keeps, and its file format.

File: one ``.safetensors`` holding ``keep`` (uint8 [layers, kv_heads, head_dim], 1 = kept) and
``importance`` (float32, same shape, the learned stage-2 scores, kept for analysis), with the
JSON metadata under the safetensors header key ``"leank"``: model fingerprint, target sparsity,
alignment, head_dim, kept channel indices per layer and KV head, fully pruned heads, and how
it was trained. The JSON repeats what ``keep`` says so a reader can inspect a mask without
torch; ``load_mask`` refuses a file where the two disagree.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from attention_backends.policy import ModelFingerprint

FORMAT_VERSION = 1


class MaskMismatchError(ValueError):
    """A mask file does not belong to the model it is being applied to, or is inconsistent."""


@dataclass(frozen=True)
class LeanKMask:
    """A static channel mask. ``keep`` is bool [layers, kv_heads, head_dim]; channel indices
    are post-RoPE positions in the model's own (HF / vLLM neox) head layout."""

    fingerprint: ModelFingerprint
    keep: torch.Tensor
    sparsity: float
    align: int
    importance: torch.Tensor | None = None
    training: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.keep.dtype != torch.bool or self.keep.dim() != 3:
            raise MaskMismatchError("keep must be a bool tensor [layers, kv_heads, head_dim]")
        layers, heads, _ = self.keep.shape
        if (layers, heads) != (self.fingerprint.num_layers, self.fingerprint.num_kv_heads):
            raise MaskMismatchError(
                f"mask shape {tuple(self.keep.shape)} does not match the fingerprint's "
                f"{self.fingerprint.num_layers} layers x {self.fingerprint.num_kv_heads} KV heads")
        bad = self.kept_counts % self.align
        if bool(bad.any()):
            raise MaskMismatchError(f"kept channel counts are not multiples of align={self.align}")

    @property
    def head_dim(self) -> int:
        return int(self.keep.shape[2])

    @property
    def kept_counts(self) -> torch.Tensor:
        """int64 [layers, kv_heads]: channels kept per head."""
        return self.keep.sum(dim=2)

    @property
    def achieved_sparsity(self) -> float:
        """Fraction of K channels dropped over the whole model."""
        return 1.0 - float(self.keep.float().mean())

    def kept_channels(self, layer: int) -> list[torch.Tensor]:
        """Per KV head, the sorted int64 indices of the kept channels of ``layer``."""
        return [torch.nonzero(row).flatten() for row in self.keep[layer]]

    def fully_pruned_heads(self) -> list[tuple[int, int]]:
        """(layer, kv_head) pairs that keep no channel: their scores are all zero, so their
        attention is uniform and their output is the running mean of V (no V pages needed)."""
        return [(int(layer), int(head)) for layer, head in
                torch.nonzero(self.kept_counts == 0).tolist()]

    def check_model(self, fingerprint: ModelFingerprint, head_dim: int) -> None:
        """Refuse a mask trained for another model (raises MaskMismatchError)."""
        if fingerprint != self.fingerprint or head_dim != self.head_dim:
            raise MaskMismatchError(
                f"LeanK mask was trained for {self.fingerprint} (head_dim {self.head_dim}); "
                f"the model is {fingerprint} (head_dim {head_dim})")

    def metadata(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "method": "LeanK (arXiv 2508.02215)",
            "fingerprint": asdict(self.fingerprint),
            "head_dim": self.head_dim,
            "target_sparsity": self.sparsity,
            "achieved_sparsity": round(self.achieved_sparsity, 6),
            "align": self.align,
            "rope_layout": "post-RoPE channels, rotate-half (neox) layout: c pairs c + d/2",
            "kept_channels": [[idx.tolist() for idx in self.kept_channels(layer)]
                              for layer in range(self.keep.shape[0])],
            "fully_pruned_heads": [list(pair) for pair in self.fully_pruned_heads()],
            "training": self.training,
        }


def save_mask(mask: LeanKMask, path: Path) -> None:
    tensors = {"keep": mask.keep.to(torch.uint8).contiguous()}
    if mask.importance is not None:
        tensors["importance"] = mask.importance.detach().float().contiguous()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"leank": json.dumps(mask.metadata())})


def load_mask(path: Path, expect: ModelFingerprint | None = None,
              head_dim: int | None = None) -> LeanKMask:
    """Read a mask; with ``expect`` (and ``head_dim``) refuse one made for another model."""
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata() or {}
        if "leank" not in header:
            raise MaskMismatchError(f"{path} is not a LeanK mask (no 'leank' metadata)")
        meta = json.loads(header["leank"])
        keep = handle.get_tensor("keep").bool()
        importance = (handle.get_tensor("importance")
                      if "importance" in handle.keys() else None)
    if meta.get("format_version") != FORMAT_VERSION:
        raise MaskMismatchError(f"{path}: unknown format_version {meta.get('format_version')}")
    listed = [[sorted(idx) for idx in heads] for heads in meta["kept_channels"]]
    stored = [[idx.tolist() for idx in (torch.nonzero(row).flatten() for row in layer)]
              for layer in keep]
    if listed != stored:
        raise MaskMismatchError(f"{path}: JSON kept_channels disagree with the keep tensor")
    mask = LeanKMask(fingerprint=ModelFingerprint(**meta["fingerprint"]), keep=keep,
                     sparsity=float(meta["target_sparsity"]), align=int(meta["align"]),
                     importance=importance, training=meta.get("training", {}))
    if expect is not None:
        mask.check_model(expect, mask.head_dim if head_dim is None else head_dim)
    return mask
