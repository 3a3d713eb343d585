"""Compile the LeanK decode kernel for Hopper (sm_90) on a machine with no GPU.

Like ``triton_resources.py`` (same report: registers, stack/spill bytes, shared memory, SASS
counts), for the v3 kernel (``kv_manager/leank/kernels/decode_triton_v3.py``) at
Llama-3.1-8B decode shapes (group 4, head_dim 128, fp16, page 16, the benchmark mask's
widest head: 64 kept channels).
It also counts what decides this kernel's bandwidth: 16-byte async copies
(``LDGSTS.E.BYPASS.128``) vs 2-byte register loads (``LDG.E.U16``), and how many shared
memory buffers the pipeliner gave the K and V tiles (tiles in flight per program + 1).
Use the device's Triton (3.6):

    PYTHONPATH=/tmp/t36 .venv/bin/python benchmarks/leank_triton_resources.py
    PYTHONPATH=/tmp/t36 .venv/bin/python benchmarks/leank_triton_resources.py --v2 c91202b

``--v2 COMMIT`` compiles the kernel as it was at COMMIT (v2) instead, for comparison.
Writes ``results/leank_triton_resources[_v2].json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from triton_resources import resource_report, sass_of  # noqa: E402

KERNEL = "kv_manager/leank/kernels/decode_triton.py"
# The benchmark's launch configs (SWEEP in leank_decode_kernel.py) at its shapes.
CONFIGS = [
    {"block_n": 64, "num_stages": 3, "num_warps": 4},
    {"block_n": 64, "num_stages": 4, "num_warps": 4},
    {"block_n": 32, "num_stages": 4, "num_warps": 4},
    {"block_n": 128, "num_stages": 3, "num_warps": 4},
    {"block_n": 64, "num_stages": 3, "num_warps": 8},
    {"block_n": 64, "num_stages": 3, "num_warps": 4, "block_k": 128},  # a head keeps all
]
HALF = {"query", "k_cache", "v_cache"}
FLOAT = {"value_sum", "part_out", "part_max", "part_sum"}
INT_TABLES = {"block_table", "seq_lens", "k_counts", "k_offsets", "kept_index", "v_slot"}
# Integer arguments the launcher sees divisible by 16 at these shapes (Triton specializes
# them so): strides, table width, split sizes, query heads.
DIV16 = {
    "k_block_stride", "k_token_stride", "v_block_stride", "v_token_stride", "v_head_stride",
    "max_blocks", "tokens_per_split", "num_splits", "q_heads", "block_size",
}  # fmt: skip


def load_kernel_module(commit: str | None):
    if commit is None:
        # v3 (the two-launch kernel) lives on beside v4, whose report comes from
        # ``leank_decode_kernel.py --compile-sm90``; ``--v2 COMMIT`` reads older commits'
        # ``decode_triton.py``.
        from kv_manager.leank.kernels import decode_triton_v3

        return decode_triton_v3
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{commit}:{KERNEL}"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    path = Path(tempfile.mkdtemp()) / "decode_triton_old.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("decode_triton_old", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def compile_decode(module, config: dict):
    fn = module._pruned_decode_kernel
    values = {
        "HEAD_DIM": 128, "BLOCK_K": config.get("block_k", 64), "BLOCK_N": config["block_n"],
        "BLOCK_G": 16, "PAGE": 16, "KEPT_ALIGN": 16, "PRECISION": "tf32",
    }  # fmt: skip
    constexprs = {name: values[name] for name in fn.arg_names if name in values}
    signature, hints = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in HALF:
            signature[name] = "*fp16"
        elif name in FLOAT:
            signature[name] = "*fp32"
        elif name in INT_TABLES or name == "sum_slot":
            signature[name] = "*i32"
        elif name.startswith("scale"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
        if signature[name].startswith("*") or name in DIV16:
            hints[(index,)] = [["tt.divisibility", 16]]
    return triton.compile(
        ASTSource(fn, signature, constexprs, hints),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": config["num_warps"], "num_stages": config["num_stages"]},
    )


def compile_merge(module):
    fn = module._merge_splits_kernel
    values = {"HEAD_DIM": 128, "BLOCK_D": 32, "BLOCK_S": 64}
    constexprs = {name: values[name] for name in fn.arg_names if name in values}
    signature = {
        name: "constexpr" if name in constexprs else "i32" if name == "num_splits" else "*fp32"
        for name in fn.arg_names
    }
    hints = {
        (i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if n != "num_splits"
    }
    return triton.compile(
        ASTSource(fn, signature, constexprs, hints),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": 4, "num_stages": 3},
    )


def pipeline_report(compiled) -> dict:
    sass = sass_of(compiled)
    # Multi-buffered tiles: ttg.local_alloc of <N x BLOCK_N x width x f16> (N buffers).
    buffers = re.findall(r"local_alloc : \(\) -> !ttg\.memdesc<(\d+)x(\d+)x(\d+)xf16",
                         compiled.asm["ttgir"])  # fmt: skip
    return {
        "async_16B_copies": sass.count("LDGSTS.E.BYPASS.128"),
        "loads_2B": sass.count("LDG.E.U16"),
        "hmma": sass.count("HMMA"),
        "tile_buffers": [f"{n} x [{rows}, {cols}]" for n, rows, cols in buffers],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--v2", metavar="COMMIT", help="compile the kernel at COMMIT instead")
    args = parser.parse_args()
    module = load_kernel_module(args.v2)
    configs = CONFIGS[:1] if args.v2 else CONFIGS
    if args.v2:  # v2's own defaults: 32-token tiles, 64 channels padded as the benchmark ran
        configs = [{"block_n": 32, "num_stages": 3, "num_warps": 4}]
    rows = []
    for config in configs:
        compiled = compile_decode(module, config)
        rows.append({"config": config, **resource_report(compiled),
                     **pipeline_report(compiled)})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    merge = None if args.v2 else {"config": "BLOCK_D 32, BLOCK_S 64, 4 warps",
                                  **resource_report(compile_merge(module))}  # fmt: skip
    print(json.dumps({"merge": merge}))
    result = {
        "script": "benchmarks/leank_triton_resources.py",
        "date": time.strftime("%Y-%m-%d"),
        "triton": triton.__version__,
        "target": "sm_90 (compiled here, not run)",
        "kernel": f"{KERNEL} at {args.v2}" if args.v2 else KERNEL,
        "rows": rows,
        "merge": merge,
    }
    name = "leank_triton_resources_v2" if args.v2 else "leank_triton_resources"
    (ROOT / "benchmarks" / "results" / f"{name}.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
