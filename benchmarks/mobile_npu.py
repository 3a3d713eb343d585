"""NPU tile quantization + LUT kernels (issue 25, arXiv 2509.23324) measured on this CPU.

1. Error vs fp32 per tile shape and bit width, on SmolLM2-135M's real projection weights
   (layer 10 q_proj and down_proj) with random activations: weight relative error, output
   relative error, max/mean abs output error, fp16 and int8 activations.
2. Tile GEMM (LUT dequant + untile + fp32 matmul) vs fp32 matmul at decode (M=1) and TTS
   batch (M=16) shapes; LUT dequant vs arithmetic dequant; LUT softmax vs exact fp32 softmax.
   Median of 7 after 2 warm-ups, baselines in the same run; a copy-bandwidth probe gives
   each time its fraction of the memory-bandwidth floor.
3. `--gemm-only`: the tile-order GEMM (`mobile.npu.direct`: dequant per strip chunk, no
   untile) vs the untiling tile GEMM vs fp32 matmul, per chunk size, in one run ->
   `results/mobile_npu_direct.{json,png}`.
No NPU here: the paper's 19x (GEMM) and 2.2x (softmax) are HVX/HMX/TCM effects; this run
reports numerical parity and what the same algorithms cost on a 2-core x86 CPU.

    flock -x /tmp/tessera-cpu-timing.lock .venv/bin/python benchmarks/mobile_npu.py
    flock -x /tmp/tessera-cpu-timing.lock .venv/bin/python benchmarks/mobile_npu.py --gemm-only
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mobile.npu.direct import tile_order_matmul  # noqa: E402
from mobile.npu.gemm import TileQuantLinear  # noqa: E402
from mobile.npu.lut_softmax import lut_softmax, softmax_ref  # noqa: E402
from mobile.npu.quant import dequant_arith, dequant_lut, pack_int4, quantize  # noqa: E402
from mobile.npu.tiles import TileShape  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = Path(__file__).resolve().parents[1] / "data/models/smollm2-135m-instruct"
TILES = {
    "hmx32x32_pairs": TileShape(32, 32, True),
    "tile16x16_pairs": TileShape(16, 16, True),
    "tile64x64": TileShape(64, 64, False),
    "kgroup32 (conventional)": TileShape(32, 1, False),
}
REPEATS, WARMUP = 7, 2


def median_ms(fn: Callable[[], object]) -> float:
    for _ in range(WARMUP):
        fn()
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbs() -> float:
    """Read+write bandwidth of a 256 MiB numpy copy: the floor any streaming kernel meets."""
    src = np.ones(64 * 2**20, dtype=np.float32)
    dst = np.empty_like(src)
    ms = median_ms(lambda: np.copyto(dst, src))
    return 2 * src.nbytes / (ms / 1e3) / 1e9


def load_weights() -> dict[str, np.ndarray]:
    from safetensors.torch import load_file  # the checkpoint is bf16, which numpy lacks

    tensors = load_file(str(MODEL / "model.safetensors"))
    out = {}
    for name in ("q_proj", "down_proj"):
        key = next(k for k in tensors if "layers.10." in k and name in k)
        out[name] = tensors[key].float().numpy().T.copy()  # [K=in, N=out] for y = x @ W
    return out


def error_table(weights: dict[str, np.ndarray]) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for wname, w in weights.items():
        x = rng.standard_normal((16, w.shape[0])).astype(np.float32)
        exact = x.astype(np.float64) @ w.astype(np.float64)
        for tname, tile in TILES.items():
            for bits in (4, 8):
                qw = quantize(w, tile, bits=bits)
                lin = TileQuantLinear(qw)
                w_err = np.linalg.norm(lin.weight() - w) / np.linalg.norm(w)
                for act in ("fp16", "int8"):
                    err = np.abs(lin(x, act=act) - exact)
                    rows.append({
                        "weight": wname, "shape": list(w.shape), "tile": tname, "bits": bits,
                        "act": act, "weight_rel_err": float(w_err),
                        "out_rel_err": float(np.linalg.norm(err) / np.linalg.norm(exact)),
                        "out_max_abs_err": float(err.max()), "out_mean_abs_err": float(err.mean()),
                    })
                print(f"  error {wname:9s} {tname:24s} int{bits}: weight rel {w_err:.4f}",
                      flush=True)
    return rows


def speed_table(bandwidth_gbs: float) -> dict:
    rng = np.random.default_rng(1)
    gemm = []
    for k, n in ((576, 1536), (1536, 576), (2048, 8192)):
        w = (rng.standard_normal((k, n)) * 0.02).astype(np.float32)
        lin = TileQuantLinear(quantize(w, TILES["hmx32x32_pairs"], bits=4))
        for m in (1, 16):
            x = rng.standard_normal((m, k)).astype(np.float32)
            fp32_ms = median_ms(lambda x=x, w=w: x @ w)
            tq_ms = median_ms(lambda x=x, lin=lin: lin(x, act="fp16"))
            dq_ms = median_ms(lambda lin=lin: lin.weight())
            gemm.append({
                "k": k, "n": n, "m": m, "fp32_matmul_ms": fp32_ms, "tile_w4a16_ms": tq_ms,
                "of_which_dequant_untile_ms": dq_ms, "speed_vs_fp32": fp32_ms / tq_ms,
                "fp32_weight_bytes": w.nbytes, "w4_weight_bytes": lin.weight_bytes,
                # Floor = bytes the op must stream at copy bandwidth: fp32 reads W once; the
                # tile kernel reads packed W and writes + reads an fp32 W-hat.
                "fp32_frac_of_bw_floor": w.nbytes / bandwidth_gbs / 1e6 / fp32_ms,
                "tile_frac_of_bw_floor": (lin.weight_bytes + 2 * w.nbytes)
                / bandwidth_gbs / 1e6 / tq_ms,
            })
            print(f"  gemm {k}x{n} m={m}: fp32 {fp32_ms:.3f} ms, tile W4A16 {tq_ms:.3f} ms",
                  flush=True)
    dequant = []
    for n_weights in (2**20, 2**23):
        w = (rng.standard_normal((n_weights // 1024, 1024)) * 0.02).astype(np.float32)
        packed = pack_int4(quantize(w, TILES["hmx32x32_pairs"], bits=4))
        arith_ms = median_ms(lambda p=packed: dequant_arith(p))
        lut_ms = median_ms(lambda p=packed: dequant_lut(p))
        dequant.append({"weights": n_weights, "arith_ms": arith_ms, "lut_ms": lut_ms,
                        "lut_speedup": arith_ms / lut_ms,
                        "lut_frac_of_bw_floor": (packed.nbytes + 4 * n_weights)
                        / bandwidth_gbs / 1e6 / lut_ms})
        print(f"  dequant {n_weights}: arith {arith_ms:.2f} ms, lut {lut_ms:.2f} ms", flush=True)
    softmax = []
    for rows, cols in ((1, 4096), (16, 4096), (16, 16384)):
        s = (rng.standard_normal((rows, cols)) * 3).astype(np.float32)

        def exact_fp32(s: np.ndarray = s) -> np.ndarray:
            e = np.exp(s - s.max(axis=-1, keepdims=True))
            return e / e.sum(axis=-1, keepdims=True)

        exact_ms = median_ms(exact_fp32)
        lut_ms = median_ms(lambda s=s: lut_softmax(s))
        err = np.abs(lut_softmax(s).astype(np.float64) - softmax_ref(s))
        err32 = np.abs(exact_fp32().astype(np.float64) - softmax_ref(s))
        softmax.append({"rows": rows, "cols": cols, "exact_fp32_ms": exact_ms, "lut_ms": lut_ms,
                        "lut_speedup": exact_ms / lut_ms, "lut_max_abs_err": float(err.max()),
                        "lut_mean_abs_err": float(err.mean()),
                        "fp32_exp_max_abs_err": float(err32.max())})
        print(f"  softmax {rows}x{cols}: exact {exact_ms:.3f} ms, lut {lut_ms:.3f} ms, "
              f"max err {err.max():.2e}", flush=True)
    return {"gemm": gemm, "dequant": dequant, "softmax": softmax}


CHUNKS = {"64KiB": 64 << 10, "256KiB": 256 << 10, "1MiB": 1 << 20, "whole": 1 << 40}


def direct_table(bandwidth_gbs: float) -> list[dict]:
    """fp32 matmul, untiling tile GEMM, tile-order GEMM per chunk size; same x, same W."""
    rng = np.random.default_rng(1)
    rows = []
    for k, n in ((576, 1536), (1536, 576), (2048, 8192)):
        w = (rng.standard_normal((k, n)) * 0.02).astype(np.float32)
        lin = TileQuantLinear(quantize(w, TILES["hmx32x32_pairs"], bits=4))
        for m in (1, 16):
            x = rng.standard_normal((m, k)).astype(np.float32)
            row = {"k": k, "n": n, "m": m,
                   "fp32_matmul_ms": median_ms(lambda x=x, w=w: x @ w),
                   "untile_w4a16_ms": median_ms(lambda x=x, lin=lin: lin(x, act="fp16")),
                   "w4_weight_bytes": lin.weight_bytes, "fp32_weight_bytes": w.nbytes}
            ref = lin(x, act="fp16")
            for name, chunk in CHUNKS.items():
                y = tile_order_matmul(lin, x, act="fp16", chunk_bytes=chunk)
                row[f"direct_{name}_ms"] = median_ms(
                    lambda x=x, lin=lin, c=chunk: tile_order_matmul(lin, x, "fp16", c))
                row[f"direct_{name}_max_abs_diff_vs_untile"] = float(np.abs(y - ref).max())
            best = min(CHUNKS, key=lambda c: row[f"direct_{c}_ms"])
            row["direct_best_chunk"] = best
            row["direct_speedup_vs_untile"] = row["untile_w4a16_ms"] / row[f"direct_{best}_ms"]
            row["direct_speed_vs_fp32"] = row["fp32_matmul_ms"] / row[f"direct_{best}_ms"]
            # Floor: read the packed weight once at copy bandwidth (the fused kernel's W-hat
            # stays in cache); the untiling kernel also writes + reads two fp32 W-hats.
            row["direct_frac_of_bw_floor"] = (lin.weight_bytes / bandwidth_gbs / 1e6
                                              / row[f"direct_{best}_ms"])
            rows.append(row)
            print(f"  {k}x{n} m={m}: fp32 {row['fp32_matmul_ms']:.3f} ms, untile "
                  f"{row['untile_w4a16_ms']:.3f} ms, direct "
                  + ", ".join(f"{c} {row[f'direct_{c}_ms']:.3f}" for c in CHUNKS), flush=True)
    return rows


def plot_direct(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = result["gemm"]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    names = [f"{r['k']}x{r['n']}\nM={r['m']}" for r in g]
    series = [("fp32 matmul", "fp32_matmul_ms"), ("tile W4A16, untile", "untile_w4a16_ms")]
    series += [(f"tile-order W4A16, chunk {c}", f"direct_{c}_ms") for c in CHUNKS]
    width = 0.8 / len(series)
    for i, (label, key) in enumerate(series):
        ax.bar(np.arange(len(g)) + (i - len(series) / 2 + 0.5) * width, [r[key] for r in g],
               width, label=label)
    ax.set_xticks(np.arange(len(g)), names, fontsize=8)
    ax.set(yscale="log", ylabel=f"median ms ({result['repeats']} runs)",
           title="Tile GEMM without the untile pass, this 2-core CPU")
    ax.legend(fontsize=7)
    fig.suptitle(f"benchmarks/mobile_npu.py --gemm-only, {result['date']}")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def plot(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    rows = [r for r in result["errors"] if r["act"] == "fp16"]
    labels = list(TILES)
    for i, (wname, bits) in enumerate([(w, b) for w in ("q_proj", "down_proj") for b in (4, 8)]):
        vals = [next(r["out_rel_err"] for r in rows
                     if r["weight"] == wname and r["bits"] == bits and r["tile"] == t)
                for t in labels]
        axes[0].bar(np.arange(len(labels)) + i * 0.2, vals, 0.2, label=f"{wname} int{bits}")
    axes[0].set_xticks(np.arange(len(labels)) + 0.3, labels, rotation=15, fontsize=8)
    axes[0].set(yscale="log", ylabel="output rel. error vs fp32 (fp16 act)",
                title="Tile-group quantization error, SmolLM2 layer 10")
    axes[0].legend(fontsize=8)
    g = result["speed"]["gemm"]
    names = [f"{r['k']}x{r['n']}\nM={r['m']}" for r in g]
    axes[1].bar(np.arange(len(g)) - 0.2, [r["fp32_matmul_ms"] for r in g], 0.4, label="fp32 matmul")
    axes[1].bar(np.arange(len(g)) + 0.2, [r["tile_w4a16_ms"] for r in g], 0.4,
                label="tile W4A16 (LUT dequant + untile + matmul)")
    axes[1].set_xticks(np.arange(len(g)), names, fontsize=8)
    axes[1].set(yscale="log", ylabel="median ms (7 runs)", title="Speed on this 2-core CPU")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"benchmarks/mobile_npu.py, {result['date']}")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gemm-only", action="store_true",
                        help="only the tile-order vs untile vs fp32 GEMM table")
    parser.add_argument("--plot-only", type=Path)
    args = parser.parse_args()
    if args.plot_only:
        plot_direct(json.loads(args.plot_only.read_text()), args.plot_only.with_suffix(".png"))
        return
    RESULTS.mkdir(exist_ok=True)
    if args.gemm_only:
        bandwidth = copy_bandwidth_gbs()
        print(f"[mobile_npu] copy bandwidth {bandwidth:.1f} GB/s; tile-order GEMM", flush=True)
        result = {"date": dt.date.today().isoformat(),
                  "script": "benchmarks/mobile_npu.py --gemm-only",
                  "copy_bandwidth_gbs": bandwidth, "repeats": REPEATS, "warmup": WARMUP,
                  "gemm": direct_table(bandwidth)}
        out = RESULTS / "mobile_npu_direct.json"
        out.write_text(json.dumps(result, indent=1))
        plot_direct(result, out.with_suffix(".png"))
        print(f"[mobile_npu] wrote {out}", flush=True)
        return
    print("[mobile_npu] copy bandwidth probe", flush=True)
    bandwidth = copy_bandwidth_gbs()
    print(f"  {bandwidth:.1f} GB/s", flush=True)
    print("[mobile_npu] errors on SmolLM2 weights", flush=True)
    errors = error_table(load_weights())
    print("[mobile_npu] speed", flush=True)
    speed = speed_table(bandwidth)
    result = {"date": dt.date.today().isoformat(), "script": "benchmarks/mobile_npu.py",
              "copy_bandwidth_gbs": bandwidth, "repeats": REPEATS, "errors": errors,
              "speed": speed}
    out = RESULTS / "mobile_npu.json"
    out.write_text(json.dumps(result, indent=1))
    plot(result, RESULTS / "mobile_npu.png")
    print(f"[mobile_npu] wrote {out} and mobile_npu.png", flush=True)


if __name__ == "__main__":
    main()
