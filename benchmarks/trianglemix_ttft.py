"""TriangleMix time-to-first-token on the GPU: prefill of a 32-layer Llama-3.1-8B-shaped
model (random weights, bf16, plain torch, no vLLM) at 32K/64K/128K tokens.

Two runs of the same model on the same prompt: all layers dense (SDPA, cuDNN backend, the
fastest dense kernel here) vs the paper's split (first 16 layers dense, the other 16 with
the triangle pattern through our Triton kernel). TTFT = the whole prefill forward up to the
last token's logits. K/V are read from cache-shaped views of the projected K/V (block
size 256, identity block table) with no copy, and no KV-cache write happens in either run,
so the two differ only in the attention kernel. Writes ``trianglemix_ttft.json`` and ``.png``.

    python benchmarks/trianglemix_ttft.py --out-dir benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attention_backends.kernels import sparse_prefill  # noqa: E402
from attention_backends.patterns import DensePattern, TrianglePattern  # noqa: E402
from attention_backends.policy import LayerPatternPolicy  # noqa: E402


@dataclass(frozen=True)
class LlamaShape:
    """Llama-3.1-8B dimensions."""

    hidden: int = 4096
    layers: int = 32
    q_heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    intermediate: int = 14336
    vocab: int = 128256
    rope_theta: float = 500000.0


class RandomLlama:
    """Llama forward for prefill with random bf16 weights (speed does not depend on values)."""

    def __init__(self, shape: LlamaShape, seed: int = 0) -> None:
        self.shape = shape
        generator = torch.Generator(device="cuda").manual_seed(seed)

        def weight(rows: int, cols: int) -> torch.Tensor:
            w = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16, generator=generator)
            return w.mul_(1 / math.sqrt(cols))

        qkv_rows = (shape.q_heads + 2 * shape.kv_heads) * shape.head_dim
        self.embedding = weight(shape.vocab, shape.hidden)
        self.layers = [
            {
                "qkv": weight(qkv_rows, shape.hidden),
                "o": weight(shape.hidden, shape.q_heads * shape.head_dim),
                "gate_up": weight(2 * shape.intermediate, shape.hidden),
                "down": weight(shape.hidden, shape.intermediate),
                "attn_norm": torch.ones(shape.hidden, device="cuda", dtype=torch.bfloat16),
                "mlp_norm": torch.ones(shape.hidden, device="cuda", dtype=torch.bfloat16),
            }
            for _ in range(shape.layers)
        ]
        self.final_norm = torch.ones(shape.hidden, device="cuda", dtype=torch.bfloat16)
        self.lm_head = weight(shape.vocab, shape.hidden)

    def rope_tables(self, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        dim = self.shape.head_dim
        inv_freq = 1.0 / self.shape.rope_theta ** (
            torch.arange(0, dim, 2, device="cuda").float() / dim
        )
        angles = torch.outer(torch.arange(num_tokens, device="cuda").float(), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)[:, None, :]
        return angles.cos().to(torch.bfloat16), angles.sin().to(torch.bfloat16)

    @staticmethod
    def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    def attention(self, q, k, v, pattern, num_tokens: int, cache_block: int = 256) -> torch.Tensor:
        """q ``[S, Hq, D]``, k/v ``[S, Hkv, D]`` -> ``[S, Hq * D]``."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        if pattern.is_dense:
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]):
                out = F.scaled_dot_product_attention(
                    q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
                    v.transpose(0, 1).unsqueeze(0), is_causal=True, enable_gqa=True,
                )  # fmt: skip
            return out[0].transpose(0, 1).reshape(num_tokens, -1)
        num_blocks = num_tokens // cache_block
        key_cache = k.unflatten(0, (num_blocks, cache_block)).transpose(1, 2)  # a view
        value_cache = v.unflatten(0, (num_blocks, cache_block)).transpose(1, 2)
        block_table = torch.arange(num_blocks, dtype=torch.int32, device="cuda").view(1, -1)
        lengths = torch.tensor([num_tokens], dtype=torch.int32, device="cuda")
        query_start_loc = torch.tensor([0, num_tokens], dtype=torch.int32, device="cuda")
        out = sparse_prefill(
            q, key_cache, value_cache, block_table, query_start_loc, lengths, lengths,
            pattern, 1 / math.sqrt(self.shape.head_dim),
        )  # fmt: skip
        return out.view(num_tokens, -1)

    @torch.inference_mode()
    def prefill(self, token_ids: torch.Tensor, policy: LayerPatternPolicy) -> torch.Tensor:
        """Logits of the last token, ``[vocab]`` fp32."""
        shape = self.shape
        num_tokens = token_ids.shape[0]
        cos, sin = self.rope_tables(num_tokens)
        x = self.embedding[token_ids]
        q_size, kv_size = shape.q_heads * shape.head_dim, shape.kv_heads * shape.head_dim
        for index, layer in enumerate(self.layers):
            h = F.rms_norm(x, (shape.hidden,), layer["attn_norm"], 1e-5)
            qkv = h @ layer["qkv"].T
            q = self.apply_rope(
                qkv[:, :q_size].view(num_tokens, shape.q_heads, shape.head_dim), cos, sin
            )
            k = self.apply_rope(
                qkv[:, q_size : q_size + kv_size].view(num_tokens, shape.kv_heads, -1), cos, sin
            )
            v = qkv[:, q_size + kv_size :].view(num_tokens, shape.kv_heads, shape.head_dim)
            del qkv, h
            attended = self.attention(q, k, v, policy.pattern_for_layer(index), num_tokens)
            del q, k, v
            x = x + attended @ layer["o"].T
            del attended
            h = F.rms_norm(x, (shape.hidden,), layer["mlp_norm"], 1e-5)
            gate, up = (h @ layer["gate_up"].T).chunk(2, dim=-1)
            del h
            x = x + (F.silu(gate) * up) @ layer["down"].T
            del gate, up
        last = F.rms_norm(x[-1:], (shape.hidden,), self.final_norm, 1e-5)
        return (last @ self.lm_head.T).float()[0]


def time_prefill_ms(model: RandomLlama, token_ids, policy, repeats: int) -> list[float]:
    model.prefill(token_ids, policy)  # warm-up: kernel compilation, cuDNN plans
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        logits = model.prefill(token_ids, policy)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
        assert torch.isfinite(logits).all(), "non-finite logits"
    return times


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["lengths"]
    labels = [f"{row['num_tokens'] // 1024}K" for row in rows]
    dense = [row["dense_ttft_s"] for row in rows]
    mixed = [row["trianglemix_ttft_s"] for row in rows]
    figure, axis = plt.subplots(figsize=(7, 4.5))
    positions = range(len(rows))
    axis.bar([p - 0.2 for p in positions], dense, 0.4, label="all layers dense (cuDNN)")
    axis.bar([p + 0.2 for p in positions], mixed, 0.4, label="TriangleMix (16 dense + 16 triangle)")
    for p, row in zip(positions, rows, strict=True):
        axis.annotate(
            f"-{row['ttft_reduction_pct']:.0f}%",
            (p + 0.2, row["trianglemix_ttft_s"]),
            ha="center",
            va="bottom",
        )
    axis.set_xticks(list(positions), labels)
    axis.set_ylabel("TTFT, seconds")
    axis.set_title("Prefill TTFT, Llama-3.1-8B shape (random weights), bf16, H200")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536, 131072])
    parser.add_argument("--repeats", type=int, nargs="+", default=[3, 3, 2])
    parser.add_argument("--out-dir", default=os.environ.get("OUT", "benchmarks/results"))
    args = parser.parse_args()

    shape = LlamaShape()
    model = RandomLlama(shape)
    dense_policy = LayerPatternPolicy(dense_pattern=DensePattern(), dense_first_layers=shape.layers)
    mixed_policy = LayerPatternPolicy(sparse_pattern=TrianglePattern(), dense_first_layers=16)
    results: dict = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "model": "Llama-3.1-8B shape, random bf16 weights, batch 1",
        "split": "first 16 layers dense, layers 16-31 triangle (sink 8, window 512, last 128)",
        "dense_kernel": "SDPA cuDNN (flash if cuDNN refuses)",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "lengths": [],
    }
    for num_tokens, repeats in zip(
        args.lengths, args.repeats + [args.repeats[-1]] * len(args.lengths), strict=False
    ):
        token_ids = torch.randint(0, shape.vocab, (num_tokens,), device="cuda")
        torch.cuda.reset_peak_memory_stats()
        dense_ms = time_prefill_ms(model, token_ids, dense_policy, repeats)
        mixed_ms = time_prefill_ms(model, token_ids, mixed_policy, repeats)
        dense_s, mixed_s = (
            sorted(dense_ms)[len(dense_ms) // 2] / 1e3,
            sorted(mixed_ms)[len(mixed_ms) // 2] / 1e3,
        )
        row = {
            "num_tokens": num_tokens,
            "dense_runs_ms": dense_ms,
            "trianglemix_runs_ms": mixed_ms,
            "dense_ttft_s": dense_s,
            "trianglemix_ttft_s": mixed_s,
            "ttft_reduction_pct": 100 * (1 - mixed_s / dense_s),
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        }
        results["lengths"].append(row)
        print(json.dumps(row), flush=True)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "trianglemix_ttft.json").write_text(json.dumps(results, indent=1))
    plot(results, out_dir / "trianglemix_ttft.png")
    print("\nlen   dense_s  trianglemix_s  reduction")
    for row in results["lengths"]:
        print(
            f"{row['num_tokens'] // 1024:>3}K  {row['dense_ttft_s']:7.2f}  {row['trianglemix_ttft_s']:13.2f}"  # noqa: E501
            f"  {row['ttft_reduction_pct']:8.1f}%"
        )


if __name__ == "__main__":
    main()
