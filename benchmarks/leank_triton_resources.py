"""Compile the LeanK decode kernel for Hopper (sm_90) on a machine with no GPU.

Like ``triton_resources.py`` (same report: registers, stack/spill bytes, shared memory, SASS
counts), at Llama-3.1-8B decode shapes (group 4, head_dim 128, fp16, page 16, the benchmark
mask's widest head: 64 kept channels). It also counts what decides this kernel's
bandwidth: 16-byte async copies (``LDGSTS.E.BYPASS.128``) vs 2-byte register loads
(``LDG.E.U16``), and how many shared memory buffers the pipeliner gave the K and V tiles
(tiles in flight per program + 1). Use the device's Triton (3.6):

    PYTHONPATH=/tmp/t36 .venv/bin/python benchmarks/leank_triton_resources.py
    PYTHONPATH=/tmp/t36 .venv/bin/python benchmarks/leank_triton_resources.py --v3
    PYTHONPATH=/tmp/t36 .venv/bin/python benchmarks/leank_triton_resources.py --v2 c91202b

With no option: the current kernel, v4 (``decode_triton.py``), through
``leank_decode_kernel.py --compile-sm90`` (this report plus the folded merge's ordering;
``results/leank_triton_resources_v4.json``). The retired two-launch kernels come from git
history, as ``decode_triton.py`` held them at a commit: ``--v3 [COMMIT]`` (default
ec6f3f4, v3's last commit there; decode and merge kernels, every config;
``results/leank_triton_resources.json``) and ``--v2 COMMIT`` (v2's own 32-token tiles;
``results/leank_triton_resources_v2.json``).
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
V3_COMMIT = "ec6f3f4"  # the last commit where KERNEL was v3 (then moved, later retired)
# --v3's launch configs, as the benchmark swept them (v4's are leank_decode_kernel.py's
# SM90_CONFIGS).
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


def load_kernel_module(commit: str):
    """``decode_triton.py`` as it was at ``commit``, imported from a temporary file."""
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
    old = parser.add_mutually_exclusive_group()
    old.add_argument("--v2", metavar="COMMIT", help="compile v2 as KERNEL was at COMMIT")
    old.add_argument("--v3", metavar="COMMIT", nargs="?", const=V3_COMMIT,
                     help=f"compile v3 as KERNEL was at COMMIT (default {V3_COMMIT})")  # fmt: skip
    args = parser.parse_args()
    if not (args.v2 or args.v3):
        from leank_decode_kernel import compile_sm90

        compile_sm90()  # v4
        return
    commit = args.v2 or args.v3
    module = load_kernel_module(commit)
    configs = CONFIGS
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
        "kernel": f"{KERNEL} at {commit} ({'v2' if args.v2 else 'v3'})",
        "rows": rows,
        "merge": merge,
    }
    name = "leank_triton_resources_v2" if args.v2 else "leank_triton_resources"
    (ROOT / "benchmarks" / "results" / f"{name}.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
