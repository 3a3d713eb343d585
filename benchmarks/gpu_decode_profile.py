"""What one decode step costs inside a running vLLM server, seen three ways (GPU host tooling).

Issue 18's decode ITL gap (the TriangleMix server decodes ~0.2 ms a step slower than FA3 and
than tessera in dense mode, whose decode code is the same) needs evidence from inside the
server, not more timings from outside:

- `profiler_args`: the `--profiler-config` that lets a server record a torch profile of a
  window of engine steps on `/start_profile` (skipping the prefill steps), at no cost until
  then.
- `summarize_trace`: one worker trace reduced to what a decode step is made of: the period
  between CUDA-graph launches, the GPU time of the kernels inside each graph, the kernels
  launched outside graphs, and the top kernels by time. Two servers' summaries side by side
  say whether the extra time is GPU work (which kernels) or host time between steps.
- `ClockSampler`: SM clock and power from `nvidia-smi` while a request streams, to see
  whether the GPU simply runs slower (power or thermal state) for one server.
"""

from __future__ import annotations

import gzip
import json
import statistics
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import httpx


def profiler_args(trace_dir: Path, skip_steps: int, steps: int) -> list[str]:
    """Server arguments: a torch profile of ``steps`` engine steps, ``skip_steps`` after
    `/start_profile` (the prompt's prefill chunks), worker side only, no Python stacks."""
    config = {"profiler": "torch", "torch_profiler_dir": str(trace_dir),
              "torch_profiler_with_stack": False, "ignore_frontend": True,
              "delay_iterations": skip_steps, "max_iterations": steps}
    return ["--profiler-config", json.dumps(config)]


def profile_window(url: str, trace_dir: Path, send_request) -> list[Path]:
    """Start the server's profiler, run ``send_request()``, stop it; the new trace files."""
    before = set(trace_dir.rglob("*.json*")) if trace_dir.exists() else set()
    httpx.post(f"{url}/start_profile", timeout=60).raise_for_status()
    try:
        send_request()
    finally:
        httpx.post(f"{url}/stop_profile", timeout=300).raise_for_status()
    deadline = time.monotonic() + 60  # the worker writes its trace after the stop returns
    while time.monotonic() < deadline:
        new = sorted(set(trace_dir.rglob("*.json*")) - before)
        if new and all(_size_settled(path) for path in new):
            return new
        time.sleep(1)
    return sorted(set(trace_dir.rglob("*.json*")) - before)


def _size_settled(path: Path) -> bool:
    size = path.stat().st_size
    time.sleep(0.5)
    return size > 0 and path.stat().st_size == size


def _load_events(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as handle:
        return json.load(handle)["traceEvents"]


def summarize_trace(path: Path, top: int = 15) -> dict:
    """A worker trace reduced to per-decode-step figures (times in microseconds)."""
    events = _load_events(path)
    kernels = [e for e in events if e.get("cat") == "kernel" and "dur" in e]
    launches = sorted((e for e in events if e.get("cat") == "cuda_runtime"
                       and e.get("name") == "cudaGraphLaunch"), key=lambda e: e["ts"])
    by_correlation: dict[int, list[dict]] = defaultdict(list)
    for kernel in kernels:
        by_correlation[kernel.get("args", {}).get("correlation", -1)].append(kernel)
    graph_correlations = {e.get("args", {}).get("correlation") for e in launches}
    graph_busy, graph_span, graph_kernels, boundary_gaps, overlapping = [], [], [], [], []
    for launch in launches:
        inside = by_correlation.get(launch.get("args", {}).get("correlation"), [])
        if not inside:
            continue
        # Gaps between consecutive kernels of one replay: ~0.1 us with overlapping
        # (early-launched) kernels, ~0.4 us without (issue 18's decode ITL).
        ordered = sorted(inside, key=lambda k: k["ts"])
        gaps = [b["ts"] - (a["ts"] + a["dur"]) for a, b in zip(ordered, ordered[1:], strict=False)]
        boundary_gaps.extend(gaps)
        overlapping.append(sum(gap < 0 for gap in gaps))
        graph_busy.append(sum(k["dur"] for k in inside))
        graph_span.append(max(k["ts"] + k["dur"] for k in inside) - min(k["ts"] for k in inside))
        graph_kernels.append(len(inside))
    outside = [k for k in kernels
               if k.get("args", {}).get("correlation") not in graph_correlations]
    totals: dict[str, list[float]] = defaultdict(list)
    for kernel in kernels:
        totals[kernel["name"][:120]].append(kernel["dur"])
    steps = max(len(launches), 1)
    periods = [b["ts"] - a["ts"] for a, b in zip(launches, launches[1:], strict=False)]
    return {
        "trace": path.name,
        "graph_launches": len(launches),
        "step_period_us_median": statistics.median(periods) if periods else None,
        "graph_gpu_busy_us_median": statistics.median(graph_busy) if graph_busy else None,
        "graph_gpu_span_us_median": statistics.median(graph_span) if graph_span else None,
        "kernels_per_graph_median": statistics.median(graph_kernels) if graph_kernels else None,
        "boundary_gap_us_median": statistics.median(boundary_gaps) if boundary_gaps else None,
        "overlapping_boundaries_per_graph": (statistics.median(overlapping) if overlapping
                                             else None),
        "outside_graph_kernels_per_step": len(outside) / steps,
        "outside_graph_gpu_us_per_step": sum(k["dur"] for k in outside) / steps,
        "top_kernels_per_step": [
            {"name": name, "count_per_step": len(durs) / steps,
             "us_per_step": sum(durs) / steps, "median_us": statistics.median(durs)}
            for name, durs in sorted(totals.items(), key=lambda item: -sum(item[1]))[:top]],
    }


class ClockSampler:
    """``nvidia-smi`` samples (SM clock MHz, power W, temperature C) every ``interval_ms``
    while the block runs; ``summary()`` gives their medians. Absent nvidia-smi: empty."""

    FIELDS = ("clocks.sm", "clocks.mem", "power.draw", "temperature.gpu")

    def __init__(self, interval_ms: int = 50) -> None:
        self.interval_ms = interval_ms
        self.process: subprocess.Popen | None = None
        self.lines: list[str] = []

    def __enter__(self) -> ClockSampler:
        try:
            self.process = subprocess.Popen(
                ["nvidia-smi", f"--query-gpu={','.join(self.FIELDS)}",
                 "--format=csv,noheader,nounits", f"-lms={self.interval_ms}"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except FileNotFoundError:
            self.process = None
        return self

    def __exit__(self, *exc) -> None:
        if self.process is None:
            return
        self.process.terminate()
        output, _ = self.process.communicate(timeout=10)
        self.lines = [line for line in output.splitlines() if line.strip()]

    def summary(self) -> dict:
        columns: dict[str, list[float]] = defaultdict(list)
        for line in self.lines:
            values = [part.strip() for part in line.split(",")]
            for field, value in zip(self.FIELDS, values, strict=False):
                try:
                    columns[field].append(float(value))
                except ValueError:
                    continue
        return {"samples": len(self.lines),
                **{f"{field}_median": statistics.median(v) for field, v in columns.items() if v}}
