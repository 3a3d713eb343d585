"""The ActiveFlow tokens/s-vs-DRAM-budget curve over repeated runs of
``benchmarks/mobile_activeflow.py --curve-only`` (each run: every system at every budget, each
point a fresh process in its own memory cgroup, median tok/s over its timed tokens).

Per (system, budget share): the median over runs of the per-run medians, the min and max
(run-to-run spread), bytes read per token, and ActiveFlow's ratio to the mmap baseline of
the same run. Writes results/mobile_activeflow_repeats.{json,png}.

    .venv/bin/python benchmarks/mobile_activeflow_repeats.py mobile_activeflow_run4 ...
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def aggregate(runs: list[dict]) -> list[dict]:
    weight_bytes = runs[0]["weight_bytes"]
    per_point: dict[tuple[str, float], list[dict]] = defaultdict(list)
    mmap_of_run: list[dict[float, float]] = []
    for run in runs:
        mmap = {}
        for point in run["curve"]:
            share = round(point["budget_bytes"] / weight_bytes, 2)
            per_point[(point["system"], share)].append(point)
            if point["system"] == "mmap":
                mmap[share] = point["tok_s_median"]
        mmap_of_run.append(mmap)
    rows = []
    for (system, share), points in sorted(per_point.items(), key=lambda kv: (-kv[0][1], kv[0][0])):
        tok_s = [p["tok_s_median"] for p in points]
        ratios = [p["tok_s_median"] / mmap_of_run[i][share]
                  for i, p in enumerate(points) if share in mmap_of_run[i]]
        rows.append({
            "system": system, "budget_share": share, "runs": len(points),
            "tok_s_median_of_runs": statistics.median(tok_s),
            "tok_s_min": min(tok_s), "tok_s_max": max(tok_s),
            "vs_mmap_same_run_median": statistics.median(ratios) if ratios else None,
            "read_mib_per_token_median": statistics.median(
                p["device_read_bytes_per_token"] for p in points) / 2**20,
            "cgroup_max_over_limit": max(p["cgroup_max_usage_bytes"] / p["limit_bytes"]
                                         for p in points),
        })
    return rows


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for system in sorted({r["system"] for r in rows}):
        mine = sorted((r for r in rows if r["system"] == system), key=lambda r: r["budget_share"])
        x = [100 * r["budget_share"] for r in mine]
        median = [r["tok_s_median_of_runs"] for r in mine]
        low = [r["tok_s_median_of_runs"] - r["tok_s_min"] for r in mine]
        high = [r["tok_s_max"] - r["tok_s_median_of_runs"] for r in mine]
        axes[0].errorbar(x, median, yerr=[low, high], marker="o", capsize=3, label=system)
        axes[1].plot(x, [r["read_mib_per_token_median"] for r in mine], marker="o",
                     label=system)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("decode tok/s (median of runs; bars: min-max)")
    axes[1].set_ylabel("MiB read from the device per token")
    for ax in axes:
        ax.set_xlabel("DRAM budget, % of the projection weights")
        ax.invert_xaxis()
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="result stems under benchmarks/results/")
    parser.add_argument("--out", default="mobile_activeflow_repeats")
    args = parser.parse_args()
    runs = [json.loads((RESULTS / f"{stem}.json").read_text()) for stem in args.runs]
    rows = aggregate(runs)
    result = {"script": "benchmarks/mobile_activeflow_repeats.py",
              "date": time.strftime("%Y-%m-%d"), "runs": args.runs, "rows": rows}
    (RESULTS / f"{args.out}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, RESULTS / f"{args.out}.png",
         f"ActiveFlow vs mmap, SmolLM2-135M, {len(runs)} runs, {result['date']}")
    for row in rows:
        ratio = row["vs_mmap_same_run_median"]
        print(f"{100 * row['budget_share']:5.0f}% {row['system']:9s} "
              f"{row['tok_s_median_of_runs']:6.2f} tok/s [{row['tok_s_min']:.2f}-"
              f"{row['tok_s_max']:.2f}] x{ratio:.2f} vs mmap, "
              f"{row['read_mib_per_token_median']:.0f} MiB/token")


if __name__ == "__main__":
    main()
