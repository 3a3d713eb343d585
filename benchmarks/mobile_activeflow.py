"""ActiveFlow on SmolLM2-135M (issue 25, arXiv 2504.08378): tokens/s vs DRAM budget, vs mmap.

Curve: for each DRAM budget (share of the 405 MiB of fp32 projection weights) and system,
a fresh child process joins its own memory cgroup (v1, nested under this session's cgroup)
whose limit is budget + SLACK for interpreter temporaries, after it has loaded what both
systems keep resident (embedding/lm_head, norms, KV cache: charged to the parent cgroup).
  mmap        dense, np.memmap of the same file; the kernel pages weights in and out
              (the file's page cache is dropped first, pages are charged to the cgroup)
  af-dense    ActiveFlow engine, every channel active, arena = budget, O_DIRECT
  af-sp0.5/0.7  ActiveFlow with per-layer thresholds at 50% / 70% activation sparsity
Each child decodes 8 warm-up tokens then times 16 (teacher-forced text, so every system
sees the same tokens): median tok/s, device bytes read per token from /proc/self/io, and
the cgroup's max usage and failcnt (the limit really held). One run, same machine state.
Quality (budget-independent): perplexity on held-out local text and top-1 agreement with
the dense model per sparsity (thresholds calibrated on other text by
`tessera mobile calibrate`).

    flock -x /tmp/tessera-cpu-timing.lock .venv/bin/python benchmarks/mobile_activeflow.py
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mobile.activeflow.engine import (  # noqa: E402
    ActiveFlowEngine,
    EngineOptions,
    teacher_forced_scores,
)
from mobile.activeflow.layout import FlashIndex, write_flash_file  # noqa: E402
from mobile.activeflow.mmap_baseline import MmapDenseModel  # noqa: E402
from mobile.activeflow.sparsity import load_thresholds  # noqa: E402
from mobile.activeflow.text import load_tokenizer  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
MODEL = ROOT / "data/models/smollm2-135m-instruct"
FLASH = ROOT / "data/mobile/smollm2-135m-instruct.flash.bin"
THRESHOLDS = Path(f"{FLASH}.thresholds.json")
EVAL_TEXT = Path("/usr/share/common-licenses/Apache-2.0")
SHARES = (1.0, 0.6, 0.4, 0.3)
SYSTEMS = ("mmap", "af-dense", "af-sp0.5", "af-sp0.7")
WARM, TIMED = int(os.environ.get("AF_WARM", 8)), int(os.environ.get("AF_TIMED", 16))
SLACK = 24 << 20


def eval_tokens(n: int) -> list[int]:
    return load_tokenizer(MODEL).encode(EVAL_TEXT.read_text()).ids[:n]


# -- cgroup (v1 memory controller, nested under our own cgroup) ---------------------------------
def own_memory_cgroup() -> Path:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return Path("/sys/fs/cgroup/memory") / path.lstrip("/")
    raise RuntimeError("no cgroup v1 memory controller")


def join_limited_cgroup(name: str, limit_bytes: int) -> Path:
    cg = own_memory_cgroup() / name
    cg.mkdir(exist_ok=True)
    (cg / "memory.limit_in_bytes").write_text(str(limit_bytes))
    (cg / "cgroup.procs").write_text(str(os.getpid()))
    return cg


def device_read_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


# -- child: one (system, budget) point ---------------------------------------------------------
def child(system: str, budget: int, flash: Path = FLASH) -> dict:
    index = FlashIndex.load(flash)
    if system == "mmap":
        model: ActiveFlowEngine = MmapDenseModel(index, max_seq_len=WARM + TIMED)
    else:
        sp = None if system == "af-dense" else float(system.removeprefix("af-sp"))
        th = load_thresholds(Path(f"{flash}.thresholds.json"))[sp] if sp else None
        # NOTES: gap-merging experiments (unset = the engine's defaults)
        gap = os.environ.get("AF_ONDEMAND_GAP")
        preload_gap = int(os.environ.get("AF_PRELOAD_GAP", 64 << 10))
        model = ActiveFlowEngine(index, EngineOptions(
            budget_bytes=budget, max_seq_len=WARM + TIMED, merge_gap_bytes=preload_gap,
            ondemand_merge_gap_bytes=int(gap) if gap else None), th)
    ids = eval_tokens(WARM + TIMED)
    # Join before the first token: every arena page and every page-cache page of the file
    # is charged to the limited cgroup (warm-up tokens absorb interpreter first-use costs).
    cg = join_limited_cgroup(f"tessera_mobile_{os.getpid()}", budget + SLACK)
    fd = os.open(flash, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # mmap starts cold, like the engine
    os.close(fd)
    for t in ids[:WARM]:
        model.forward_token(t)
    io0, times = device_read_bytes(), []
    for t in ids[WARM:]:
        t0 = time.perf_counter()
        model.forward_token(t)
        times.append(time.perf_counter() - t0)
    io1 = device_read_bytes()
    summary = model.summary()
    model.close()
    out = {"system": system, "budget_bytes": budget, "limit_bytes": budget + SLACK,
           "tok_s_median": 1 / statistics.median(times), "tok_s_mean": len(times) / sum(times),
           "token_ms": [t * 1e3 for t in times],
           "device_read_bytes_per_token": (io1 - io0) / len(times),
           "cgroup_max_usage_bytes": int((cg / "memory.max_usage_in_bytes").read_text()),
           "cgroup_failcnt": int((cg / "memory.failcnt").read_text()),
           "engine": summary}
    return out


def run_child(system: str, budget: int, flash: Path = FLASH) -> dict:
    proc = subprocess.Popen([sys.executable, __file__, "--child", system, str(budget), str(flash)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate(timeout=300)
    cg = own_memory_cgroup() / f"tessera_mobile_{proc.pid}"
    if cg.exists():
        cg.rmdir()  # empty once the child has exited
    if proc.returncode != 0:
        return {"system": system, "budget_bytes": budget, "error": stderr[-1500:]}
    return json.loads(stdout.strip().splitlines()[-1])


# -- quality -----------------------------------------------------------------------------------
def quality(levels: list[float], n_tokens: int, flash: Path = FLASH) -> list[dict]:
    index = FlashIndex.load(flash)
    table = load_thresholds(Path(f"{flash}.thresholds.json"))
    ids = eval_tokens(n_tokens)
    dense_top1 = None
    rows = []
    for sp in levels:
        engine = ActiveFlowEngine(index, EngineOptions(budget_bytes=index.weight_bytes + (64 << 20),
                                                       max_seq_len=n_tokens),
                                  table[sp] if sp else None)
        perplexity, top1 = teacher_forced_scores(engine, ids)
        active = engine.counters.active_channels
        total = sum(e.channels for e in index.extents.values()) * len(ids)
        engine.close()
        if dense_top1 is None:
            dense_top1 = top1
        rows.append({"sparsity": sp, "realized_sparsity": 1 - active / total,
                     "perplexity": perplexity,
                     "top1_agreement_with_dense": float(np.mean(np.array(top1) ==
                                                                np.array(dense_top1)))})
        print(f"  quality sp={sp}: ppl {rows[-1]['perplexity']:.2f}, top-1 agreement "
              f"{rows[-1]['top1_agreement_with_dense']:.2f}", flush=True)
    return rows


def plot(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    wb = result["weight_bytes"]
    for system in SYSTEMS:
        pts = sorted((r["budget_bytes"] / wb, r) for r in result["curve"]
                     if r["system"] == system and "error" not in r)
        if not pts:
            continue
        xs = [p[0] * 100 for p in pts]
        axes[0].plot(xs, [p[1]["tok_s_median"] for p in pts], "o-", label=system)
        axes[1].plot(xs, [p[1]["device_read_bytes_per_token"] / 2**20 for p in pts], "o-",
                     label=system)
    axes[0].set(xlabel="DRAM budget (% of projection-weight bytes)", yscale="log",
                ylabel="decode tok/s (median)",
                title="SmolLM2-135M fp32, 2-core CPU, cgroup-limited")
    axes[1].set(xlabel="DRAM budget (%)", ylabel="MiB read from disk per token",
                title="/proc/self/io read_bytes")
    for a in axes[:2]:
        a.invert_xaxis()
        a.legend(fontsize=8)
    q = result["quality"]
    ax2 = axes[2].twinx()
    axes[2].plot([r["sparsity"] for r in q], [r["perplexity"] for r in q], "o-", color="C0")
    ax2.plot([r["sparsity"] for r in q], [r["top1_agreement_with_dense"] for r in q], "s--",
             color="C1")
    axes[2].set(xlabel="target activation sparsity", ylabel="perplexity (Apache-2.0 text)",
                yscale="log",
                title="Quality (raw thresholds, no distillation)")
    ax2.set_ylabel("top-1 agreement with dense", color="C1")
    fig.suptitle(f"benchmarks/mobile_activeflow.py, {result['date']}")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", nargs=3, metavar=("SYSTEM", "BUDGET", "FLASH"))
    parser.add_argument("--quality-tokens", type=int, default=64)
    parser.add_argument("--plot-only", type=Path)
    parser.add_argument("--curve-only", action="store_true", help="skip the quality pass")
    parser.add_argument("--shares", default=",".join(map(str, SHARES)))
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--out", default="mobile_activeflow")
    parser.add_argument("--flash", type=Path, default=FLASH,
                        help="flash file (its .thresholds.json beside it), e.g. the distilled "
                        "one from `tessera mobile distill`")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), Path(args.child[2]))))
        return
    if args.plot_only:
        plot(json.loads(args.plot_only.read_text()), args.plot_only.with_suffix(".png"))
        return
    if not Path(f"{FLASH}.json").exists():
        FLASH.parent.mkdir(parents=True, exist_ok=True)
        write_flash_file(MODEL, FLASH)
    if not Path(f"{args.flash}.thresholds.json").exists():
        raise SystemExit("run `tessera mobile calibrate` first (thresholds file missing)")
    index = FlashIndex.load(args.flash)
    print("[mobile_activeflow] quality", flush=True)
    q = [] if args.curve_only else quality([0.0, 0.3, 0.5, 0.7], args.quality_tokens, args.flash)
    curve = []
    for share in [float(s) for s in args.shares.split(",")]:
        budget = int(share * index.weight_bytes)
        for system in args.systems.split(","):
            r = run_child(system, budget, args.flash)
            curve.append(r)
            msg = r.get("error", "").splitlines()[-1:] if "error" in r else (
                f"{r['tok_s_median']:.2f} tok/s, {r['device_read_bytes_per_token'] / 2**20:.1f} "
                f"MiB/token read, cgroup max {r['cgroup_max_usage_bytes'] / 2**20:.0f} MiB of "
                f"{r['limit_bytes'] / 2**20:.0f} MiB")
            print(f"  {share:.0%} {system}: {msg}", flush=True)
    result = {"date": dt.date.today().isoformat(), "script": "benchmarks/mobile_activeflow.py",
              "weight_bytes": index.weight_bytes, "slack_bytes": SLACK, "warm_tokens": WARM,
              "timed_tokens": TIMED, "quality": q, "curve": curve, "flash": str(args.flash),
              "ondemand_merge_gap_bytes": os.environ.get("AF_ONDEMAND_GAP"),
              "preload_merge_gap_bytes": os.environ.get("AF_PRELOAD_GAP")}
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{args.out}.json"
    out.write_text(json.dumps(result, indent=1))
    if q:
        plot(result, out.with_suffix(".png"))
    print(f"[mobile_activeflow] wrote {out}", flush=True)


if __name__ == "__main__":
    main()
