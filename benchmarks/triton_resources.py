"""Compile the sparse-prefill streaming kernel for Hopper (sm_90) on a machine with no GPU.

Triton ships ptxas and cuobjdump, so the kernel compiles here; this prints, per launch
config, the registers, stack (spill) bytes and shared memory, and counts of telling SASS
instructions (HGMMA tensor-core ops, UTMALDG TMA loads, LDGSTS async copies, LDL/STL local
memory spills). It costs no device time and explained, for example, why the per-key gather
needs 16 warps (its loads go through registers) while TMA tiles run best on one warpgroup.
The local Triton version may differ from the device's: read the numbers as leads.

    .venv/bin/python benchmarks/triton_resources.py '[{"kv_tma": true}, {"kv_tma": false}]'

Each JSON object overrides ``STREAMING_DEFAULTS`` below.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attention_backends.kernels import sparse_prefill_triton as kernels  # noqa: E402

STREAMING_DEFAULTS = {  # Llama-3.1-8B shapes, the TMA launch config
    "kv_tma": True, "block_m": 128, "block_n": 64, "num_warps": 4, "num_stages": 3,
    "group": 4, "head_dim": 128, "cache_block": 64, "single_loop": True,
}  # fmt: skip
TENSOR_POINTERS = {"query_ptr", "key_cache_ptr", "value_cache_ptr", "out_ptr"}  # the rest: int32
SASS_OPS = ("HGMMA", "UTMALDG", "LDGSTS", "MUFU.EX2", "LDL", "STL", "BAR.SYNC")
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def compile_streaming_kernel(variant: dict):
    fn = kernels._streaming_rows_kernel
    rows = variant["block_m"] // variant["group"]
    tile = f"[1, 1, {variant['block_n']}, {variant['head_dim']}]"
    constexprs = {
        "HAS_LAST_ROWS": True, "SINGLE_LOOP": variant["single_loop"], "LAZY_RESCALE": False,
        "KV_TMA": variant["kv_tma"], "GROUP": variant["group"], "GROUP_PAD": variant["group"],
        "ROWS": rows, "BLOCK_N": variant["block_n"], "SINK_BLOCK_N": 16,
        "HEAD_DIM": variant["head_dim"], "HEAD_DIM_PAD": variant["head_dim"],
        "KV_BLOCK_SIZE": variant["cache_block"],
    }  # fmt: skip
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in ("key_desc", "value_desc"):
            signature[name] = f"tensordesc<bf16{tile}>" if variant["kv_tma"] else "*bf16"
        elif name.endswith("_ptr"):
            signature[name] = "*bf16" if name in TENSOR_POINTERS else "*i32"
        elif name == "qk_scale":
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    # What the launcher specializes at run time: 16-byte aligned pointers and integer
    # arguments divisible by 16 (the strides; the counts are do_not_specialize) carry
    # tt.divisibility=16, which lets the compiler vectorize loads and stores.
    aligned = {
        (index,): [["tt.divisibility", 16]]
        for index, name in enumerate(fn.arg_names)
        if signature[name].startswith("*") or name.startswith("stride_")
    }
    return triton.compile(
        ASTSource(fn, signature, constexprs, aligned),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": variant["num_warps"], "num_stages": variant["num_stages"]},
    )


def resource_report(compiled) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run(
            [TOOLS / "cuobjdump", "--dump-resource-usage", cubin.name],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        sass = subprocess.run(
            [TOOLS / "cuobjdump", "--dump-sass", cubin.name],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    usage_line = next((line.strip() for line in usage.splitlines() if "REG:" in line), "")
    fields = dict(item.split(":") for item in usage_line.split() if ":" in item)
    return {
        "registers": int(fields.get("REG", -1)),
        "stack_bytes": int(fields.get("STACK", -1)),
        "shared_bytes": compiled.metadata.shared,
        "sass": {op: sass.count(op) for op in SASS_OPS},
    }


def main() -> None:
    variants = json.loads(sys.argv[1]) if len(sys.argv) > 1 else [{}]
    for overrides in variants:
        variant = {**STREAMING_DEFAULTS, **overrides}
        print(
            json.dumps({"variant": overrides, **resource_report(compile_streaming_kernel(variant))})
        )


if __name__ == "__main__":
    main()
