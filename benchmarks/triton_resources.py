"""Compile the sparse-prefill streaming kernels for Hopper (sm_90) on a machine with no GPU.

Triton ships ptxas and cuobjdump, so the kernels compile here; this prints, per launch
config, the registers, stack (spill) bytes and shared memory, whether ptxas serializes the
wgmma instructions (warning C7515), and counts of telling SASS instructions (HGMMA
tensor-core ops, UTMALDG TMA loads, LDGSTS async copies, LDL/STL local-memory spills). It
costs no device time. ``"kernel": "gluon"`` compiles the Gluon kernel instead of the Triton
one; ``"kernel": "head_sparse"`` the per-head (MInference) kernel (``"head_sparse_rows"``:
its full-rows pass; ``"head_sparse_plan"``: its plan kernel; ``"vs_estimate"``: the
vertical-slash estimate), with ``HEAD_SPARSE_DEFAULTS`` overridden by the object's other
keys.
Compile with the device's Triton for numbers that hold there (3.6 in 2026-11):

    .venv/bin/pip download --no-deps triton==3.6.0 -d /tmp/w
    .venv/bin/pip install --no-deps --target /tmp/t36 /tmp/w/*.whl
    PYTHONPATH=/tmp/t36 .venv/bin/python benchmarks/triton_resources.py \
        '[{}, {"kv_tma": false}, {"kernel": "gluon", "block_m": 64, "num_stages": 2}]'

Each JSON object overrides ``STREAMING_DEFAULTS`` below. Arguments carry the alignment hints
the launcher gives at run time (without them ptxas reports spills and serializations that
the device never sees).
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


def _alignment_hints(fn, signature: dict) -> dict:
    """What the launcher specializes at run time: 16-byte aligned pointers and integer
    arguments divisible by 16 (the strides; the counts are do_not_specialize) carry
    tt.divisibility=16, which lets the compiler vectorize loads and stores."""
    return {
        (index,): [["tt.divisibility", 16]]
        for index, name in enumerate(fn.arg_names)
        if signature[name].startswith("*") or name.startswith("stride_")
    }


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
    return triton.compile(
        ASTSource(fn, signature, constexprs, _alignment_hints(fn, signature)),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": variant["num_warps"], "num_stages": variant["num_stages"]},
    )


def compile_gluon_streaming_kernel(variant: dict):
    import torch
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    from attention_backends.kernels import sparse_prefill_gluon as gluon_kernels

    fn = gluon_kernels._streaming_rows_gluon_kernel
    group, head_dim, block_m = variant["group"], variant["head_dim"], variant["block_m"]
    cache = torch.zeros(4, 8, 2 * variant["cache_block"], head_dim, dtype=torch.bfloat16)
    cache = cache[:, :, : variant["cache_block"]]  # a strided K view, as the paged cache
    query = torch.zeros(256, 8 * group, head_dim, dtype=torch.bfloat16)
    descriptor_types = {
        "q_desc": mangle_type(gluon_kernels._query_descriptor(query, group, block_m // group)),
        "key_desc": mangle_type(gluon_kernels._box_descriptor(cache, variant["block_n"])),
        "sink_key_desc": mangle_type(gluon_kernels._box_descriptor(cache, 16)),
    }
    descriptor_types["value_desc"] = descriptor_types["key_desc"]
    descriptor_types["sink_value_desc"] = descriptor_types["sink_key_desc"]
    constexprs = {
        "HAS_LAST_ROWS": True, "GROUP": group, "ROWS": block_m // group,
        "BLOCK_N": variant["block_n"], "SINK_N": 16, "HEAD_DIM": head_dim,
        "KV_BLOCK_SIZE": variant["cache_block"], "NUM_STAGES": variant["num_stages"],
        "num_warps": variant["num_warps"],
    }  # fmt: skip
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in descriptor_types:
            signature[name] = descriptor_types[name]
        elif name.endswith("_ptr"):
            signature[name] = "*bf16" if name == "out_ptr" else "*i32"
        else:
            signature[name] = "fp32" if name == "qk_scale" else "i32"
    return triton.compile(
        GluonASTSource(fn, signature, constexprs, _alignment_hints(fn, signature)),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": variant["num_warps"], "num_stages": variant["num_stages"]},
    )


HEAD_SPARSE_DEFAULTS = {  # issue 24's per-head kernel at Llama-3.1-8B shapes
    "group": 4, "head_dim": 128, "cache_block": 64, "tile": 64, "num_warps": 4,
    "num_stages": 2, "dtype": "bf16",
}  # fmt: skip
HEAD_SPARSE_DATA = {"q_ptr", "out_ptr", "k_cache_ptr", "v_cache_ptr"}  # of the variant's dtype
HEAD_SPARSE_FLAGS = {"full_rows_ptr", "blocks_ptr", "columns_ptr", "diagonals_ptr"}  # int8
HEAD_SPARSE_WORDS = {"col_words_ptr", "diag_words_ptr"}  # packed flags, int64 words


def compile_head_sparse_kernel(variant: dict):
    """``head_sparse_triton._head_sparse_kernel`` with the launcher's constexprs."""
    from attention_backends.kernels import head_sparse_triton

    fn = (head_sparse_triton._full_rows_kernel if variant.get("kernel") == "head_sparse_rows"
          else head_sparse_triton._head_sparse_kernel)
    variant = {**HEAD_SPARSE_DEFAULTS, **variant}
    constexprs = {
        "GROUP": variant["group"], "KV_BLOCK_SIZE": variant["cache_block"],
        "TILE": variant["tile"], "HEAD_DIM": variant["head_dim"],
        "PRECISION": "ieee" if variant["dtype"] == "fp32" else "tf32",
    }  # fmt: skip
    if fn is head_sparse_triton._head_sparse_kernel:
        constexprs["BYTE_MASK"] = variant.get("byte_mask", False)
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in HEAD_SPARSE_DATA:
            signature[name] = f"*{variant['dtype']}"
        elif name in HEAD_SPARSE_FLAGS:
            signature[name] = "*i8"
        elif name in HEAD_SPARSE_WORDS:
            signature[name] = "*i64"
        elif name.endswith("_ptr"):
            signature[name] = "*i32"
        else:
            signature[name] = "fp32" if name == "scale_log2" else "i32"
    return triton.compile(
        ASTSource(fn, signature, constexprs, _alignment_hints(fn, signature)),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": variant["num_warps"], "num_stages": variant["num_stages"]},
    )


def compile_head_sparse_plan_kernel(variant: dict):
    """``head_sparse_plan_triton._plan_kernel`` (the write pass), 64-token tiles."""
    from attention_backends.kernels import head_sparse_plan_triton

    fn = head_sparse_plan_triton._plan_kernel
    constexprs = {"TILE": 64, "WRITE": True, "BLOCK": head_sparse_plan_triton.BLOCK_K}
    flags = {"by_distance_ptr", "row_any_ptr", "blocks_ptr", "column_tiles_ptr"}  # int8
    signature = {
        name: "constexpr" if name in constexprs
        else ("*i8" if name in flags else "*i32") if name.endswith("_ptr") else "i32"
        for name in fn.arg_names
    }
    return triton.compile(
        ASTSource(fn, signature, constexprs, _alignment_hints(fn, signature)),
        target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 2},
    )


def compile_vertical_slash_estimate_kernel(variant: dict):
    """``vertical_slash_estimate_triton._estimate_kernel``: 64 rows, d=128, GQA 4, bf16;
    ``"accumulate"``: the second pass (default) or the statistics pass."""
    from attention_backends.kernels import vertical_slash_estimate_triton as estimate

    fn = estimate._estimate_kernel
    constexprs = {"GROUP": 4, "ROWS": 64, "BLOCK": estimate.BLOCK_N, "HEAD_DIM": 128,
                  "PRECISION": "tf32", "ACCUMULATE": variant.get("accumulate", True)}
    floats = {"row_max_ptr", "row_sum_ptr", "vertical_ptr", "slash_ptr"}
    signature = {
        name: "constexpr" if name in constexprs
        else "*bf16" if name in ("q_ptr", "k_ptr") else "*fp32" if name in floats
        else "*i32" if name.endswith("_ptr") else "fp32" if name == "scale" else "i32"
        for name in fn.arg_names
    }
    return triton.compile(
        ASTSource(fn, signature, constexprs, _alignment_hints(fn, signature)),
        target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 2},
    )


def sass_of(compiled) -> str:
    """The compiled kernel's SASS (cuobjdump of its cubin)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        return subprocess.run(
            [TOOLS / "cuobjdump", "--dump-sass", cubin.name],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip


def resource_report(compiled) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".ptx", mode="w") as ptx:
        ptx.write(compiled.asm["ptx"])
        ptx.flush()
        ptxas = subprocess.run(
            [TOOLS / "ptxas", "-arch=sm_90a", "-v", ptx.name, "-o", "/dev/null"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run(
            [TOOLS / "cuobjdump", "--dump-resource-usage", cubin.name],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    sass = sass_of(compiled)
    usage_line = next((line.strip() for line in usage.splitlines() if "REG:" in line), "")
    fields = dict(item.split(":") for item in usage_line.split() if ":" in item)
    return {
        "registers": int(fields.get("REG", -1)),
        "stack_bytes": int(fields.get("STACK", -1)),
        "shared_bytes": compiled.metadata.shared,
        "wgmma_serialized": "C7515" in ptxas.stdout + ptxas.stderr,
        "sass": {op: sass.count(op) for op in SASS_OPS},
    }


def main() -> None:
    variants = json.loads(sys.argv[1]) if len(sys.argv) > 1 else [{}]
    for overrides in variants:
        # the per-head kernels take HEAD_SPARSE_DEFAULTS (their compile functions merge
        # them); STREAMING_DEFAULTS' 3 stages must not leak into them
        per_head = str(overrides.get("kernel", "")).startswith(("head_sparse", "vs_"))
        variant = dict(overrides) if per_head else {**STREAMING_DEFAULTS, **overrides}
        compile_kernel = {
            "gluon": compile_gluon_streaming_kernel,
            "head_sparse": compile_head_sparse_kernel,
            "head_sparse_rows": compile_head_sparse_kernel,
            "head_sparse_plan": compile_head_sparse_plan_kernel,
            "vs_estimate": compile_vertical_slash_estimate_kernel,
        }.get(variant.get("kernel"), compile_streaming_kernel)
        print(json.dumps({"variant": overrides, **resource_report(compile_kernel(variant))}))


if __name__ == "__main__":
    main()
