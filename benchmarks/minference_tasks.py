"""Completion-style task accuracy of the searched per-head config vs dense, served by vLLM
(CPU) on SmolLM2-135M: byte-identical prompts, lost cases counted (DESIGN.md, "Fidelity").

Dense runs first on a dense worker (the rows stored by ``trianglemix_fidelity.py`` for
these tasks predate prompt hashes); the searched config's worker rebuilds the cases, and each
prompt must match the dense row's sha256, token count, answer and depth, or the run stops.
Negative control: every head of every layer A-shape with 4 sinks and a 64-token window (no
dense layer, no last rows).
It must lose passkey cases that dense gets right, which shows the suite can detect dropped keys.
Writes ``results/minference_tasks.json`` (after each step) and ``.png``.

    .venv/bin/python benchmarks/minference_tasks.py [--lengths 2048 4096] [--cases 10]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import trianglemix_fidelity as tf  # noqa: E402
from longctx_suite import build_cases  # noqa: E402

from attention_backends.patterns.minference import AShapeHead  # noqa: E402
from attention_backends.patterns.minference.policy import (  # noqa: E402
    committed_config,
    uniform_policy,
)
from attention_backends.policy import SMOLLM2_135M  # noqa: E402
from server.config import ServerSettings  # noqa: E402
from server.launcher import one_worker, resolve_model_path  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def log(message: str) -> None:
    print(f"[minference-tasks {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr,
          flush=True)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [(task, length) for task, by_length in result["accuracy"]["dense"].items()
             for length in by_length]
    labels = [f"{task}\n{length}" for task, length in cells]
    x = range(len(cells))
    fig, ax = plt.subplots(figsize=(max(8, len(cells) * 1.3), 4))
    for offset, method in ((-0.2, "dense"), (0.2, "searched")):
        ax.bar([i + offset for i in x],
               [result["accuracy"][method][task][length] for task, length in cells], 0.4,
               label=method)
    negative = result.get("negative_control")
    if negative:
        ax.axhline(negative["passkey_accuracy"], color="red", linestyle=":",
                   label="negative control, passkey")
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.set(ylabel="cases passed", ylim=(0, 1.05),
           title=f"SmolLM2-135M, searched per-head config vs dense "
                 f"(lost: {len(result['lost_cases'])})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--tasks", nargs="+",
                        default=["passkey", "needle_prose", "variable_lookup"])
    parser.add_argument("--cases", type=int, default=10)
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS / "minference_tasks.json")
    args = parser.parse_args()
    config = args.config or committed_config(SMOLLM2_135M)
    settings = ServerSettings(workers=1, kv_cache_space_gib=2, max_model_len=8192)
    model_path = resolve_model_path(settings)
    result: dict = {"script": "benchmarks/minference_tasks.py",
                    "date": time.strftime("%Y-%m-%d"), "config": str(config),
                    "dense": "run here on a dense worker; prompts checked by sha256",
                    "args": {k: str(v) for k, v in vars(args).items()}}
    with one_worker(settings, model_path, {"TESSERA_ATTENTION_METHOD": "dense"}) as url:
        count_tokens = tf.token_counter(url)
        cases = [case for task in args.tasks for length in args.lengths
                 for case in build_cases(task, length, args.cases, count_tokens)]
        log(f"dense: {len(cases)} cases")
        dense_rows = tf.run_tasks(url, cases)
    result["dense_rows"] = dense_rows
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    env = {"TESSERA_ATTENTION_METHOD": "minference",
           "TESSERA_ATTENTION_HEAD_PATTERNS_FILE": str(config.resolve())}
    with one_worker(settings, model_path, env) as url:
        count_tokens = tf.token_counter(url)
        cases = [case for task in args.tasks for length in args.lengths
                 for case in build_cases(task, length, args.cases, count_tokens)]
        tf.check_prompts(cases, dense_rows, count_tokens)
        log(f"searched config: {len(cases)} cases, prompts match the stored dense rows")
        began = time.perf_counter()
        rows = tf.run_tasks(url, cases)
        result["wall_seconds"] = time.perf_counter() - began
    result["searched_rows"] = rows
    result["accuracy"] = {"dense": tf.accuracy_table(dense_rows),
                          "searched": tf.accuracy_table(rows)}
    result["lost_cases"] = tf.lost_cases(dense_rows, rows)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    log(f"accuracy {result['accuracy']}; lost {len(result['lost_cases'])}")

    negative = uniform_policy(SMOLLM2_135M, lambda layer: AShapeHead(4, 64))
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        handle.write(json.dumps(negative.to_json({"purpose": "negative control"})))
    env["TESSERA_ATTENTION_HEAD_PATTERNS_FILE"] = handle.name
    length = max(args.lengths)
    negative_cases = [c for c in cases if c.task == "passkey" and c.target_tokens == length]
    with one_worker(settings, model_path, env) as url:
        negative_rows = tf.run_tasks(url, negative_cases)
    dense_passkey = [r for r in dense_rows if r["task"] == "passkey"
                     and r["target_tokens"] == length]
    result["negative_control"] = {
        "config": "every head of every layer A-shape (4 sinks, 64-token window)",
        "length": length,
        "passkey_accuracy": sum(r["passed"] for r in negative_rows) / len(negative_rows),
        "dense_passkey_accuracy": sum(r["passed"] for r in dense_passkey) / len(dense_passkey),
        "lost_cases": len(tf.lost_cases(dense_passkey, negative_rows)),
        "rows": negative_rows}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out.with_suffix(".png"))
    log(f"negative control passkey {length}: {result['negative_control']['passkey_accuracy']}")


if __name__ == "__main__":
    main()
