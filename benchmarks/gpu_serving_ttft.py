"""TTFT of real vLLM 0.26 on the GPU host: tessera's TriangleMix backend vs vLLM's own FA3.

Llama-3.1-8B shape, dummy weights (`--load-format dummy`: speed does not depend on the
values), bf16, 131072-token context, 64-token KV blocks, chunked prefill (8192 tokens a step),
prefix caching on, CUDA graphs on, identical server settings except `--attention-backend`
(FLASH_ATTN vs CUSTOM with TriangleMix, the paper's split: layers 0-15 dense, 16-31 sparse).
A third server runs tessera's backend in dense mode: its gap to FA3 is what our glue costs
(the per-step split, the hooks), apart from the pattern. The servers share the GPU with a
fixed KV budget each (20 GiB: one 128K prompt is 16 GiB); fa3 and tessera also sit behind a
tessera gateway. TTFT = send to first streamed token, `max_tokens=1`, random-token prompts
distinct per request (no prefix-cache hit); the five paths alternate within every repeat.
Inter-token latency: streamed decode of 64 tokens after a 32K prompt (and other prompt
lengths with --itl-prompts), the three servers alternating, with the GPU's SM clock and power
sampled during each. --profile-decode records a torch profile of 20 decode steps inside each
server (benchmarks/gpu_decode_profile.py) and reduces it to per-step figures. Servers outlive
one call (own sessions) so a run can span two calls:

    python3 benchmarks/gpu_serving_ttft.py --out $OUT --sizes 32768 65536 --itl      # call 1
    python3 benchmarks/gpu_serving_ttft.py --out $OUT --sizes 130048 --stop          # call 2
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_decode_profile import (  # noqa: E402
    ClockSampler,
    profile_window,
    profiler_args,
    summarize_trace,
)
from gpu_servers import GpuServer, grep_log, healthy, join_calls, wait_healthy  # noqa: E402

from attention_backends.usage import total_usage  # noqa: E402

MODEL = "llama8b-dummy"
STATE = Path("/root/ttft_servers.json")
STATS_DIR = Path("/root/ttft_stats")
PROFILE_DIR = Path("/root/decode_profiles")
# A 32K prompt is 4 prefill steps of 8192 tokens: the profile skips 6 steps, then records 20.
PROFILE_SKIP_STEPS, PROFILE_STEPS = 6, 20
COMMON_ARGS = ["--load-format", "dummy", "--dtype", "bfloat16", "--max-model-len", "131072",
               "--block-size", "64", "--gpu-memory-utilization", "0.3",
               "--kv-cache-memory-bytes", str(20 << 30)]
DIRECT_PATHS = ("fa3_direct", "tessera_direct", "dense_direct")


def make_servers() -> list[GpuServer]:
    def args(name: str, backend: str) -> list[str]:
        # The profiler is idle until /start_profile: every server gets it, so all three keep
        # identical settings whether or not a run profiles.
        profile = profiler_args(PROFILE_DIR / name, PROFILE_SKIP_STEPS, PROFILE_STEPS)
        return [*COMMON_ARGS, "--attention-backend", backend, *profile]

    return [
        GpuServer("fa3", 8411, args("fa3", "FLASH_ATTN")),
        GpuServer("tessera", 8412, args("tessera", "CUSTOM"),
                  {"TESSERA_ATTENTION_METHOD": "trianglemix",
                   "TESSERA_ATTENTION_DENSE_FIRST_LAYERS": "16",
                   "TESSERA_ATTENTION_STATS_DIR": str(STATS_DIR)}),
        GpuServer("dense", 8413, args("dense", "CUSTOM"),
                  {"TESSERA_ATTENTION_METHOD": "dense",
                   "TESSERA_ATTENTION_STATS_DIR": str(STATS_DIR / "dense")}),
    ]


def start_gateway(port: int, worker_url: str, log_path: Path) -> subprocess.Popen:
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "server.cli", "gateway", "--port", str(port),
             "--worker-url", worker_url], stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)


def stream(url: str, prompt: list[int], max_tokens: int, force_token: int | None = None) -> dict:
    """TTFT and per-token arrival times of one streamed completion. ``force_token``: every
    server emits that token (logit bias), so their decode steps detokenize and stream the
    same text, whatever their prefill computed."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}
    if force_token is not None:
        body["logit_bias"] = {str(force_token): 100}
    started = time.perf_counter()
    arrivals = []
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=900) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {response.status_code} {response.read()[:300]!r}")
        for line in response.iter_lines():
            if line.startswith("data:") and line.strip() != "data: [DONE]":
                chunk = json.loads(line[5:])
                if chunk.get("choices"):
                    arrivals.append(time.perf_counter() - started)
    return {"ttft_s": arrivals[0], "arrivals": arrivals}


def itl(paths: dict[str, str], prompt_sizes: list[int], repeats: int,
        force_token: int | None, names: tuple[str, ...] = DIRECT_PATHS) -> list[dict]:
    """Decode ITL of the servers ``names`` (default: the three direct ones) after each prompt
    length, every server in every position (rotated, and reversed every other repeat), SM
    clock and power sampled during each stream."""
    runs = []
    for size in prompt_sizes:
        for repeat in range(repeats):
            shift = (repeat // 2) % len(names)
            order = names[shift:] + names[:shift]
            for name in order[:: 1 if repeat % 2 == 0 else -1]:
                with ClockSampler() as clocks:
                    arrivals = stream(paths[name], prompt_tokens(size, 777 + repeat * 7), 64,
                                      force_token)["arrivals"]
                gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
                runs.append({"path": name, "prompt": size, "repeat": repeat,
                             "itl_median_ms": 1000 * statistics.median(gaps),
                             "tokens": len(arrivals), "gpu": clocks.summary()})
                print(f"  itl {size:6d} r{repeat} {name:16s} {runs[-1]['itl_median_ms']:.3f} ms"
                      f" {runs[-1]['gpu']}", flush=True)
    return runs


def profile_decode(paths: dict[str, str], out: Path) -> dict:
    """A torch profile of 20 decode steps after a 32K prompt in each direct server, reduced
    to per-step figures; the raw traces and vLLM's kernel tables go to one archive."""
    summaries = {}
    for name in DIRECT_PATHS:
        server = name.removesuffix("_direct")
        trace_dir = PROFILE_DIR / server
        prompt = prompt_tokens(32768, 4242)
        print(f"[profile] {name}", flush=True)
        traces = profile_window(paths[name], trace_dir,
                                lambda url=paths[name], p=prompt: stream(url, p, 40))
        worker = [t for t in traces if "profiler_out" not in t.name]
        summaries[name] = (summarize_trace(worker[0]) if worker
                           else {"error": f"no trace in {trace_dir}"})
    subprocess.run(["tar", "-czf", str(out / "decode_profiles.tar.gz"), "-C",
                    str(PROFILE_DIR.parent), PROFILE_DIR.name], check=False)
    return summaries


def prompt_tokens(size: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 49000) for _ in range(size)]


def plot(result: dict, png: Path) -> None:
    """TTFT medians per length and path, with the change vs FA3 (run where matplotlib is)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = result["sizes"]
    medians = result["ttft_median_s"]
    with_itl = "itl_median_ms_by_prompt" in result
    fig, axes = plt.subplots(1, 3 if with_itl else 2, figsize=(16 if with_itl else 11, 4))
    left, right = axes[0], axes[1]
    if with_itl:
        plot_itl(result, axes[2])
    names = [n for n in ("fa3_direct", "tessera_direct", "dense_direct", "fa3_gateway",
                         "tessera_gateway") if f"{n}@{sizes[0]}" in medians]
    width = 0.8 / len(names)
    for offset, name in enumerate(names):
        xs = [i + (offset - (len(names) - 1) / 2) * width for i in range(len(sizes))]
        left.bar(xs, [medians[f"{name}@{size}"] for size in sizes], width, label=name)
    left.set_xticks(range(len(sizes)), [f"{size // 1024}K" for size in sizes])
    left.set_ylabel("TTFT, median of 5 (s)")
    left.set_title("vLLM 0.26, Llama-3.1-8B shape, H200")
    left.legend(fontsize=8)
    for where, marker in (("direct", "o-"), ("gateway", "s--")):
        right.plot([f"{size // 1024}K" for size in sizes],
                   [result["ttft_change_pct"][f"{where}@{size}"] for size in sizes], marker,
                   label=f"TriangleMix vs FA3, {where}")
    if "dense_vs_fa3_pct" in result:
        right.plot([f"{size // 1024}K" for size in sizes],
                   [result["dense_vs_fa3_pct"][f"{size}"] for size in sizes], "^:",
                   label="tessera dense vs FA3 (glue cost)")
    right.axhline(-25, color="gray", lw=0.8, ls=":")
    right.axhline(-35, color="gray", lw=0.8, ls=":")
    right.set_ylabel("TTFT change (%)")
    right.set_title("targets: -25% at 64K, -35% at 128K (dotted)")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def plot_itl(result: dict, axis) -> None:
    """Decode ITL per server after each prompt length; the legend gives the median gap
    between kernels of the replayed decode graph where a profile was taken."""
    prompts = result["itl_prompts"]
    width = 0.8 / len(DIRECT_PATHS)
    profile = result.get("decode_profile", {})
    for offset, name in enumerate(DIRECT_PATHS):
        xs = [i + (offset - (len(DIRECT_PATHS) - 1) / 2) * width for i in range(len(prompts))]
        gap = profile.get(name, {}).get("boundary_gap_us_median")
        label = name if gap is None else f"{name} (graph kernel gap {gap:.2f} us)"
        axis.bar(xs, [result["itl_median_ms_by_prompt"][f"{name}@{p}"] for p in prompts],
                 width, label=label)
    axis.set_xticks(range(len(prompts)), [f"after {p} tokens" for p in prompts])
    axis.set_ylim(4.0, None)
    axis.set_ylabel("decode ITL, median of 5 (ms; axis from 4)")
    axis.set_title("decode ITL (target: unchanged within noise)")
    axis.legend(fontsize=7)


def itl_checks(runs: dict[str, dict]) -> dict:
    """Several ITL-only runs (``--sizes --itl``), by label, as one result."""
    return {"benchmark": "gpu_serving_itl_checks", "date": time.strftime("%Y-%m-%d"),
            "what": "decode ITL after a 32K prompt, 64 tokens, FA3 vs tessera TriangleMix vs "
                    "tessera dense; every server in every position; runs with "
                    "--itl-force-token stream the same text from every server",
            "runs": {label: {key: run.get(key) for key in
                             ("itl_median_ms", "itl_runs", "itl_force_token", "server_args",
                              "healthy_after_s")}
                     for label, run in runs.items()}}


def plot_itl_checks(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(result["runs"])
    fig, axis = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(DIRECT_PATHS)
    for offset, name in enumerate(DIRECT_PATHS):
        xs = [i + (offset - (len(DIRECT_PATHS) - 1) / 2) * width for i in range(len(labels))]
        axis.bar(xs, [result["runs"][label]["itl_median_ms"][name] for label in labels],
                 width, label=name)
    axis.set_xticks(range(len(labels)), labels, fontsize=8)
    axis.set_ylim(5.0, None)
    axis.set_ylabel("decode ITL after a 32K prompt, median (ms; axis from 5)")
    axis.set_title("vLLM 0.26, Llama-3.1-8B shape, H200: FA3 vs tessera TriangleMix / dense")
    axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def merge_calls(parts: list[dict]) -> dict:
    """One result from the calls of one run (servers kept up between them): sizes, runs and
    the per-size tables are joined; ITL and start-up facts come from the call that had them;
    usage counters are cumulative, so the last call's are the run's."""
    return join_calls(parts, concat=("sizes", "runs"),
                      update=("ttft_median_s", "ttft_change_pct", "dense_vs_fa3_pct"),
                      latest=("tessera_usage", "dense_usage"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="/root/models/llama8b")
    parser.add_argument("--sizes", type=int, nargs="*", default=[32768, 65536, 130048])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--itl", action="store_true", help="also time decode (64 tokens)")
    parser.add_argument("--itl-force-token", type=int,
                        help="ITL runs emit this token id at every step (same text everywhere)")
    parser.add_argument("--itl-prompts", type=int, nargs="+", default=[32768],
                        help="prompt lengths the ITL runs decode after (600: TriangleMix's "
                             "pattern is then dense, so its KV cache equals dense's)")
    parser.add_argument("--profile-decode", action="store_true",
                        help="torch-profile 20 decode steps in each server (after --itl)")
    parser.add_argument("--stop", action="store_true", help="stop the servers at the end")
    parser.add_argument("--fresh", action="store_true", help="stop other vLLM servers first")
    parser.add_argument("--plot-only", type=Path, help="draw the PNG of a result JSON, run nothing")
    parser.add_argument("--merge", type=Path, nargs="+",
                        help="merge the JSONs of one run's calls into --out/gpu_serving_ttft.json "
                             "(+ PNG), run nothing")
    parser.add_argument("--itl-checks", nargs="+", metavar="LABEL=JSON",
                        help="collect ITL-only runs into --out/gpu_serving_itl_checks.json "
                             "(+ PNG), run nothing")
    args = parser.parse_args()
    if args.itl_checks:
        pairs = [item.split("=", 1) for item in args.itl_checks]
        result = itl_checks({label: json.loads(Path(path).read_text()) for label, path in pairs})
        target = args.out / "gpu_serving_itl_checks.json"
        target.write_text(json.dumps(result, indent=1))
        plot_itl_checks(result, target.with_suffix(".png"))
        return
    if args.merge:
        merged = merge_calls([json.loads(path.read_text()) for path in args.merge])
        target = args.out / "gpu_serving_ttft.json"
        target.write_text(json.dumps(merged, indent=1))
        plot(merged, target.with_suffix(".png"))
        return
    if args.plot_only is not None:
        plot(json.loads(args.plot_only.read_text()), args.plot_only.with_suffix(".png"))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    if args.fresh:
        # Servers of another benchmark would share the GPU: stop every vLLM server first.
        subprocess.run(["pkill", "-f", "vllm.entrypoints.openai.api_server"], check=False)
        time.sleep(8)
    servers = make_servers()
    gateways = {"fa3": "http://127.0.0.1:8421", "tessera": "http://127.0.0.1:8422"}
    result: dict = {"benchmark": "gpu_serving_ttft", "date": time.strftime("%Y-%m-%d"),
                    "server_args": COMMON_ARGS, "sizes": args.sizes, "repeats": args.repeats}
    fresh = [s for s in servers if not healthy(s.url)]
    for server in fresh:
        server.start(args.model, MODEL, Path("/root"))
    if fresh:
        wait_healthy(fresh, timeout_s=400)
        result["healthy_after_s"] = {s.name: s.healthy_after_s for s in fresh}
        for server in fresh:
            result.setdefault("backend_log_lines", {})[server.name] = grep_log(
                server, "Using AttentionBackendEnum", "tessera", "block size",
                "FlashAttention version", "KV cache size", "CUDA graph")
        STATE.write_text(json.dumps({s.name: s.process.pid for s in servers}))
    for (name, gateway_url), server in zip(gateways.items(), servers[:2], strict=True):
        if not healthy(gateway_url):
            port = int(gateway_url.rsplit(":", 1)[1])
            start_gateway(port, server.url, Path(f"/root/gateway-{name}.log"))
    deadline = time.monotonic() + 60
    while not all(healthy(url) for url in gateways.values()):
        if time.monotonic() > deadline:
            raise RuntimeError(Path("/root/gateway-tessera.log").read_text()[-2000:])
        time.sleep(0.5)

    paths = {"fa3_direct": servers[0].url, "tessera_direct": servers[1].url,
             "dense_direct": servers[2].url,
             "fa3_gateway": gateways["fa3"], "tessera_gateway": gateways["tessera"]}
    print("[ttft] warm-up (first long prefill: kernels compile)", flush=True)
    tag = "_".join(str(s) for s in args.sizes) or "itl"
    for url in paths.values():
        stream(url, prompt_tokens(32768, seed=hash(url) & 0xFFFF), 1)
    runs: list[dict] = []
    for size in args.sizes:
        for repeat in range(args.repeats):
            order = list(paths.items())
            if repeat % 2:
                order.reverse()  # alternate who goes first
            for name, url in order:
                seed = size * 1000 + repeat * 10 + list(paths).index(name)
                ttft = stream(url, prompt_tokens(size, seed), 1)["ttft_s"]
                runs.append({"path": name, "tokens": size, "repeat": repeat, "ttft_s": ttft})
                print(f"  {size:6d} r{repeat} {name:16s} {ttft:.3f} s", flush=True)
        result["runs"] = runs
        (args.out / f"gpu_serving_ttft_{tag}.json").write_text(json.dumps(result, indent=1))
    result["runs"] = runs
    result["ttft_median_s"] = {
        f"{name}@{size}": statistics.median(r["ttft_s"] for r in runs
                                            if r["path"] == name and r["tokens"] == size)
        for size in args.sizes for name in paths}
    for size in args.sizes:  # (none: an ITL-only run)
        for where in ("direct", "gateway"):
            fa3 = result["ttft_median_s"][f"fa3_{where}@{size}"]
            ours = result["ttft_median_s"][f"tessera_{where}@{size}"]
            result.setdefault("ttft_change_pct", {})[f"{where}@{size}"] = 100 * (ours / fa3 - 1)
        dense = result["ttft_median_s"][f"dense_direct@{size}"]
        result.setdefault("dense_vs_fa3_pct", {})[f"{size}"] = (
            100 * (dense / result["ttft_median_s"][f"fa3_direct@{size}"] - 1))
    if args.itl:
        itl_runs = itl(paths, args.itl_prompts, args.repeats, args.itl_force_token)
        result["itl_runs"] = itl_runs
        result["itl_force_token"] = args.itl_force_token
        result["itl_prompts"] = args.itl_prompts
        medians = {f"{name}@{size}": statistics.median(
            r["itl_median_ms"] for r in itl_runs if r["path"] == name and r["prompt"] == size)
            for size in args.itl_prompts for name in DIRECT_PATHS}
        result["itl_median_ms_by_prompt"] = medians
        # the headline: after the first prompt length (32K unless told otherwise)
        result["itl_median_ms"] = {name: medians[f"{name}@{args.itl_prompts[0]}"]
                                   for name in DIRECT_PATHS}
        (args.out / f"gpu_serving_ttft_{tag}.json").write_text(json.dumps(result, indent=1))
    if args.profile_decode:
        result["decode_profile"] = profile_decode(paths, args.out)
    result["tessera_usage"] = total_usage(STATS_DIR)
    result["dense_usage"] = total_usage(STATS_DIR / "dense")
    (args.out / f"gpu_serving_ttft_{tag}.json").write_text(json.dumps(result, indent=1))
    print("[ttft] medians:", json.dumps(result["ttft_median_s"], indent=1))
    print("[ttft] change vs fa3 (%):", json.dumps(result.get("ttft_change_pct"), indent=1))
    print("[ttft] tessera dense vs fa3 (%):", json.dumps(result.get("dense_vs_fa3_pct")))
    if args.itl:
        print("[ttft] ITL median ms:", json.dumps(result["itl_median_ms_by_prompt"], indent=1))
    for name, summary in result.get("decode_profile", {}).items():
        print(f"[profile] {name}: " + json.dumps({k: v for k, v in summary.items()
                                                  if k != "top_kernels_per_step"}))
    if args.stop:
        subprocess.run(["pkill", "-f", "vllm.entrypoints.openai.api_server"], check=False)
        subprocess.run(["pkill", "-f", "server.cli gateway"], check=False)


if __name__ == "__main__":
    main()
