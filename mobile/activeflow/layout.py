"""The flash file: every projection weight stored channel-major, one extent per (layer, kind).

Digest §1.2-1.3: a *channel* is the slice of W that multiplies one input element x_j, across
all outputs; storing W transposed makes a channel one contiguous row, so reading the active
channels of an op is a few large sequential reads instead of a gather. Ops that read the
same input are interleaved into one row ("kind"):
    attn_in  row j = [W_q[:, j], W_k[:, j], W_v[:, j]]   (input: attention RMSNorm output)
    o_in     row j = W_o[:, j]                           (input: attention output)
    mlp_in   row j = [W_gate[:, j], W_up[:, j]]          (input: MLP RMSNorm output)
    down_in  row j = W_down[:, j]                        (input: silu(gate) * up)
so one active channel of the attention input is one read of q, k and v together.
Rows are fp32 (exact upcast of the bf16 checkpoint). Each (layer, kind) extent starts on a
4 KiB boundary (O_DIRECT). Resident tensors (embedding = tied lm_head, norms) follow,
embedding kept bf16. The index is JSON in `<file>.json`.

Deviation from the paper: the paper orders extents (channel, layer) inside a group of N
layers so that one predicted channel is one read of N layers; we keep (layer, channel)
because our predictor differs per layer (it applies each layer's own norm and threshold) and
adjacent active channels already merge into runs. Left for a measured comparison.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mobile.activeflow.config import LlamaConfig

KINDS = ("attn_in", "o_in", "mlp_in", "down_in")
ALIGN = 4096
ROW_DTYPE = np.float32


def kind_shape(cfg: LlamaConfig, kind: str) -> tuple[int, int]:
    """(channels, row_elems) of one kind's extent."""
    q_out, kv_out = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return {
        "attn_in": (cfg.hidden_size, q_out + 2 * kv_out),
        "o_in": (q_out, cfg.hidden_size),
        "mlp_in": (cfg.hidden_size, 2 * cfg.intermediate_size),
        "down_in": (cfg.intermediate_size, cfg.hidden_size),
    }[kind]


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass(frozen=True)
class Extent:
    offset: int
    channels: int
    row_elems: int

    @property
    def row_bytes(self) -> int:
        return self.row_elems * np.dtype(ROW_DTYPE).itemsize

    @property
    def nbytes(self) -> int:
        return self.channels * self.row_bytes


@dataclass(frozen=True)
class FlashIndex:
    path: Path
    config: LlamaConfig
    extents: dict[tuple[int, str], Extent]
    resident: dict[str, tuple[int, list[int], str]]  # name -> (offset, shape, dtype)

    @property
    def weight_bytes(self) -> int:
        """Bytes of all streamed projection weights."""
        return sum(e.nbytes for e in self.extents.values())

    @classmethod
    def load(cls, path: Path) -> FlashIndex:
        raw = json.loads(Path(f"{path}.json").read_text())
        cfg = LlamaConfig(**raw["config"])
        extents = {(e["layer"], e["kind"]): Extent(e["offset"], e["channels"], e["row_elems"])
                   for e in raw["extents"]}
        resident = {k: (v[0], v[1], v[2]) for k, v in raw["resident"].items()}
        return cls(Path(path), cfg, extents, resident)


def channel_rows(tensors: dict[str, np.ndarray], layer: int, kind: str) -> np.ndarray:
    """The [channels, row_elems] fp32 matrix of one kind, from HF [out, in] weights."""
    p = f"model.layers.{layer}."
    parts = {
        "attn_in": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "o_in": ("self_attn.o_proj",),
        "mlp_in": ("mlp.gate_proj", "mlp.up_proj"),
        "down_in": ("mlp.down_proj",),
    }[kind]
    return np.concatenate([tensors[f"{p}{name}.weight"].T for name in parts], axis=1)


def load_hf_tensors(model_dir: Path) -> dict[str, np.ndarray]:
    """All checkpoint tensors as fp32 numpy (bf16 -> fp32 is exact)."""
    from safetensors.torch import load_file  # numpy has no bf16

    tensors = load_file(str(Path(model_dir) / "model.safetensors"))
    return {k: v.float().numpy() for k, v in tensors.items()}


def write_flash_file(model_dir: Path, out_path: Path) -> FlashIndex:
    """Convert a HF Llama checkpoint to the flash layout; returns the index."""
    cfg = LlamaConfig.from_model_dir(model_dir)
    tensors = load_hf_tensors(model_dir)
    entries, resident, offset = [], {}, 0
    with open(out_path, "wb") as f:
        for layer in range(cfg.num_layers):
            for kind in KINDS:
                rows = np.ascontiguousarray(channel_rows(tensors, layer, kind), dtype=ROW_DTYPE)
                assert rows.shape == kind_shape(cfg, kind)
                f.seek(offset)
                f.write(rows.tobytes())
                entries.append({"layer": layer, "kind": kind, "offset": offset,
                                "channels": rows.shape[0], "row_elems": rows.shape[1]})
                offset = _align(offset + rows.nbytes)
        import torch

        names = ["model.embed_tokens.weight", "model.norm.weight"] + [
            f"model.layers.{i}.{n}.weight" for i in range(cfg.num_layers)
            for n in ("input_layernorm", "post_attention_layernorm")]
        for name in names:
            t = torch.from_numpy(tensors[name])
            if name == "model.embed_tokens.weight":
                data, dtype = t.to(torch.bfloat16).view(torch.int16).numpy(), "bfloat16"
            else:
                data, dtype = t.numpy().astype(np.float32), "float32"
            f.seek(offset)
            f.write(data.tobytes())
            resident[name] = (offset, list(data.shape), dtype)
            offset = _align(offset + data.nbytes)
        f.truncate(offset)
    Path(f"{out_path}.json").write_text(json.dumps(
        {"config": cfg.to_dict(), "extents": entries, "resident": resident}))
    return FlashIndex.load(out_path)
