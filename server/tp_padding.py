"""A function-preserving copy of a Llama-style model whose heads split under tensor parallelism.

vLLM shards attention by heads: at ``--tensor-parallel-size T`` each rank holds H/T query heads
and K/T KV heads (or one replicated KV head when T > K), and it refuses a model whose H is not
a multiple of T (SmolLM2-135M: H=9, K=3 cannot run at T=2). This tool rewrites such a model
with the same function and a head layout that splits:

- each GQA group of g query heads gets zero query heads appended until it has g' heads: a
  zero q_proj row block makes that head's query 0 (so its attention is a plain average of
  V), and the matching zero o_proj column block multiplies that average by 0, so the head
  adds nothing to the layer's output;
- each KV head is repeated r times in a row, so the K' = K*r KV heads serve g'/r query heads
  each. HF and vLLM map query head h to KV head h // (H'/K') (contiguous groups): head
  j of group G, new index G*g' + j, reads KV head G*r + j // (g'/r), a copy of G's.

For SmolLM2 at T=2 that is 12 query heads (3 of them zero) and 6 KV heads (each original
twice): each rank gets 6 query and 3 KV heads. ``head_dim`` is written into config.json
because the hidden size no longer equals heads x head_dim. The attention work per token grows
by H'/H (12/9) and the KV cache by K'/K (2x): a correctness vehicle for TP, not a speed-up.

    python3 -m server.tp_padding --src DIR --dst DIR [--tensor-parallel-size 2]

Needs torch and safetensors (the GPU host has both); imports them only when converting.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

ATTENTION_TENSOR = re.compile(r"\.self_attn\.(q_proj|k_proj|v_proj|o_proj)\.(weight|bias)$")
MARKER_KEY = "tessera_tp_padding"


@dataclass(frozen=True)
class HeadPadding:
    """Original and padded head counts; ``group`` / ``padded_group``: query heads per original
    KV head before and after; ``kv_repeat``: copies of each original KV head."""

    num_heads: int
    num_kv_heads: int
    padded_heads: int
    padded_kv_heads: int
    kv_repeat: int
    tensor_parallel_size: int

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def padded_group(self) -> int:
        return self.padded_heads // self.num_kv_heads

    @property
    def is_identity(self) -> bool:
        return self.padded_heads == self.num_heads and self.kv_repeat == 1

    def real_heads(self) -> list[int]:
        """Padded indices of the original query heads, in original order."""
        return [
            group * self.padded_group + j
            for group in range(self.num_kv_heads)
            for j in range(self.group)
        ]


def splits(num_heads: int, num_kv_heads: int, tensor_parallel_size: int) -> bool:
    """vLLM's rule (0.26 and 0.32, LlamaAttention): H divisible by T, and K divisible by T
    or T divisible by K (then each rank holds one replicated KV head)."""
    t = tensor_parallel_size
    return num_heads % t == 0 and (num_kv_heads % t == 0 or t % num_kv_heads == 0)


def plan_padding(num_heads: int, num_kv_heads: int, tensor_parallel_size: int) -> HeadPadding:
    """The smallest padding (fewest query heads, then fewest KV heads) that splits."""
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads do not form groups over {num_kv_heads} KV heads")
    group = num_heads // num_kv_heads
    for padded_group in range(group, group + 4 * tensor_parallel_size + 1):
        for repeat in range(1, padded_group + 1):
            if padded_group % repeat:
                continue
            heads, kv_heads = num_kv_heads * padded_group, num_kv_heads * repeat
            if splits(heads, kv_heads, tensor_parallel_size):
                return HeadPadding(
                    num_heads, num_kv_heads, heads, kv_heads, repeat, tensor_parallel_size
                )
    raise ValueError(
        f"no padding of {num_heads}/{num_kv_heads} heads splits {tensor_parallel_size} ways"
    )


def pad_tensor(name: str, tensor, padding: HeadPadding, head_dim: int):
    """One attention tensor of the padded model (other tensors are unchanged)."""
    import torch

    match = ATTENTION_TENSOR.search(name)
    if match is None:
        return tensor
    proj, kind = match.groups()
    if proj in ("k_proj", "v_proj"):
        # [K*D, ...] -> [K*r*D, ...]: each KV head's D rows repeated r times in a row.
        blocks = tensor.reshape(padding.num_kv_heads, head_dim, *tensor.shape[1:])
        blocks = blocks.repeat_interleave(padding.kv_repeat, dim=0)
        return blocks.reshape(padding.padded_kv_heads * head_dim, *tensor.shape[1:]).contiguous()
    if proj == "o_proj" and kind == "bias":
        return tensor  # the output bias is per hidden unit, not per head
    # q_proj rows [H*D, hidden] and o_proj columns [hidden, H*D]: zero heads inserted.
    real = torch.tensor(padding.real_heads())
    if proj == "q_proj":
        out = tensor.new_zeros(padding.padded_heads, head_dim, *tensor.shape[1:])
        out[real] = tensor.reshape(padding.num_heads, head_dim, *tensor.shape[1:])
        return out.reshape(padding.padded_heads * head_dim, *tensor.shape[1:]).contiguous()
    rows = tensor.shape[0]
    out = tensor.new_zeros(rows, padding.padded_heads, head_dim)
    out[:, real] = tensor.reshape(rows, padding.num_heads, head_dim)
    return out.reshape(rows, padding.padded_heads * head_dim).contiguous()


def padded_config(config: dict, padding: HeadPadding) -> dict:
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return {
        **config,
        "num_attention_heads": padding.padded_heads,
        "num_key_value_heads": padding.padded_kv_heads,
        "head_dim": head_dim,
        MARKER_KEY: asdict(padding),
    }


def pad_model_dir(src: Path, dst: Path, tensor_parallel_size: int = 2) -> HeadPadding:
    """Write the padded copy of the safetensors model directory ``src`` to ``dst`` (every
    non-weight file copied as is). A model that already splits is copied unchanged."""
    from safetensors.torch import load_file, save_file

    config = json.loads((src / "config.json").read_text())
    heads = int(config["num_attention_heads"])
    padding = plan_padding(
        heads, int(config.get("num_key_value_heads") or heads), tensor_parallel_size
    )
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    staging = dst.with_name(dst.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    weight_files = sorted(src.glob("*.safetensors"))
    if not weight_files:
        raise FileNotFoundError(f"no *.safetensors in {src}")
    total_bytes = 0
    for path in weight_files:
        tensors = {
            name: pad_tensor(name, tensor, padding, head_dim)
            for name, tensor in load_file(str(path)).items()
        }
        total_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, str(staging / path.name), metadata={"format": "pt"})
    for path in src.iterdir():
        if path.is_file() and path.suffix != ".safetensors" and path.name != "config.json":
            shutil.copy2(path, staging / path.name)
    index = staging / "model.safetensors.index.json"
    if index.exists():  # the weight map is unchanged; the total size is not
        values = json.loads(index.read_text())
        values.setdefault("metadata", {})["total_size"] = total_bytes
        index.write_text(json.dumps(values, indent=2))
    (staging / "config.json").write_text(json.dumps(padded_config(config, padding), indent=2))
    shutil.rmtree(dst, ignore_errors=True)
    staging.rename(dst)
    return padding


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--src", type=Path, required=True, help="safetensors model directory")
    parser.add_argument("--dst", type=Path, required=True)
    parser.add_argument("--tensor-parallel-size", type=int, default=2)
    args = parser.parse_args(argv)
    padding = pad_model_dir(args.src, args.dst, args.tensor_parallel_size)
    print(
        f"[tp-padding] {args.src} -> {args.dst}: {padding.num_heads}/{padding.num_kv_heads} "
        f"-> {padding.padded_heads}/{padding.padded_kv_heads} query/KV heads "
        f"(KV heads x{padding.kv_repeat}), splits {padding.tensor_parallel_size} ways",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
