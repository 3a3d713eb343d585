"""Gateway capacity: requests per second with 0 errors, on routes that cost no model time.

One run starts an instant-answer stub worker (a raw ASGI app under uvicorn, in
gateway_load.py) and a gateway over it, then drives closed-loop load from a lean HTTP/1.1
client in its own process at each target, interleaved, `--repeats` times:
  - stub direct, POST /v1/completions (what the stub and the client alone can do)
  - gateway GET /health and GET /v1/models (routes the gateway answers itself)
  - gateway POST /v1/completions (validated, routed, proxied to the stub)
Reports the median req/s per target and every non-2xx or dropped connection. Everything
shares the same 2 cores: the number is the gateway's on this machine with its load
generator and upstream beside it, not on a core of its own.
Writes benchmarks/results/<output>.json and .png.

    flock -x /tmp/tessera-cpu-timing.lock .venv/bin/python benchmarks/gateway_capacity.py
    # the gateway of another checkout (before/after): --gateway-src /path/to/checkout
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.gateway_load import STUB_MODEL  # noqa: E402
from server.launcher import free_port, wait_for_health  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LOAD = str(Path(__file__).resolve().parent / "gateway_load.py")
BODY = json.dumps({"model": STUB_MODEL, "prompt": "Hi", "max_tokens": 1})
TARGET_RPS = 1000


def load(url: str, path: str, body: str | None, connections: int, seconds: float) -> dict:
    command = [sys.executable, LOAD, "load", url, path]
    command += [body] if body is not None else []
    command += ["--connections", str(connections), "--seconds", str(seconds)]
    return json.loads(subprocess.run(command, capture_output=True, check=True,
                                     text=True).stdout)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["targets"])
    medians = [result["targets"][name]["median_rps"] for name in names]
    fig, axis = plt.subplots(figsize=(9, 4))
    bars = axis.bar(names, medians, color="tab:blue")
    axis.bar_label(bars, fmt="%.0f")
    axis.axhline(TARGET_RPS, color="tab:red", linestyle="--", label="target 1,000 req/s")
    axis.set(ylabel="req/s (median of repeats)",
             title=f"{result['label']}: closed loop, {result['connections']} connections, "
                   "all on 2 shared cores")
    axis.legend()
    plt.xticks(rotation=12)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--gateway-src", type=Path, default=ROOT,
                        help="checkout whose server/ runs as the gateway (default: this one)")
    parser.add_argument("--label", default="after")
    parser.add_argument("--output", default="gateway_capacity")
    args = parser.parse_args()

    load_before = os.getloadavg()
    stub_port, gateway_port = free_port(), free_port()
    stub = subprocess.Popen([sys.executable, LOAD, "stub", "--port", str(stub_port)])
    stub_url, gateway_url = f"http://127.0.0.1:{stub_port}", f"http://127.0.0.1:{gateway_port}"
    gateway = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "gateway", "--port", str(gateway_port),
         "--worker-url", stub_url, "--log-level", "warning"],
        cwd=args.gateway_src, env=os.environ | {"PYTHONPATH": str(args.gateway_src)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    targets = {
        "stub direct: POST /v1/completions": (stub_url, "/v1/completions", BODY),
        "gateway: GET /health": (gateway_url, "/health", None),
        "gateway: GET /v1/models": (gateway_url, "/v1/models", None),
        "gateway -> stub: POST /v1/completions": (gateway_url, "/v1/completions", BODY),
    }
    runs: dict[str, list[dict]] = {name: [] for name in targets}
    try:
        wait_for_health(stub_url, stub, timeout_s=20)
        wait_for_health(gateway_url, gateway, timeout_s=30)
        for url, path, body in targets.values():  # warm-up, not recorded
            load(url, path, body, args.connections, 1.0)
        for repeat in range(args.repeats):
            for name, (url, path, body) in targets.items():
                runs[name].append(load(url, path, body, args.connections, args.seconds))
            print(f"repeat {repeat + 1}/{args.repeats}: " + ", ".join(
                f"{name.split(':')[0]} {runs[name][-1]['rps']:.0f}" for name in targets),
                file=sys.stderr)
    finally:
        for process in (gateway, stub):
            process.terminate()
            process.wait(timeout=15)

    summary = {}
    for name, rows in runs.items():
        errors = sum(row["non_2xx"] + row["connection_errors"] for row in rows)
        summary[name] = {
            "median_rps": statistics.median(row["rps"] for row in rows),
            "rps": [row["rps"] for row in rows], "requests": sum(row["requests"] for row in rows),
            "errors": errors,
            "latency_ms_p50": statistics.median(row["latency_ms"]["p50"] for row in rows),
            "latency_ms_p99": statistics.median(row["latency_ms"]["p99"] for row in rows),
        }
    result = {
        "benchmark": "gateway_capacity", "label": args.label,
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(sys.argv), "gateway_src": str(args.gateway_src),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "connections": args.connections, "seconds_per_run": args.seconds,
        "repeats": args.repeats, "target_rps": TARGET_RPS, "targets": summary,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.output}.json").write_text(json.dumps(result, indent=2))
    plot(result, RESULTS / f"{args.output}.png")
    for name, row in summary.items():
        print(f"{name}: median {row['median_rps']:.0f} req/s, errors {row['errors']}")


if __name__ == "__main__":
    main()
