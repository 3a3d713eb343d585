"""A worker of its own with an attention method, behind a gateway, for the serving tests of
the attention backends (the shared stack stays dense), and the usage counters it writes."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from attention_backends.usage import read_usage
from server.config import ServerSettings
from server.launcher import (
    WorkerProcess,
    free_port,
    resolve_model_path,
    start_worker,
    stop_workers,
    wait_for_health,
    wait_until_healthy,
)
from tests.integration.conftest import MODEL, _start_gateway


@contextmanager
def gateway_over_worker(run_dir: Path, env: dict[str, str], settings: ServerSettings,
                        model_path: Path | None = None) -> Iterator[tuple[str, WorkerProcess]]:
    """(the gateway's URL, the worker) for one worker of ``settings`` started with ``env``."""
    path = model_path if model_path is not None else resolve_model_path(settings)
    worker = start_worker(settings, path, 0, port=free_port(), extra_env=env)
    gateway: subprocess.Popen | None = None
    try:
        wait_until_healthy([worker], timeout_s=600)
        port = free_port()
        gateway = _start_gateway([worker.url], port, run_dir / "gateway.log", [])
        url = f"http://127.0.0.1:{port}"
        wait_for_health(url, gateway)
        yield url, worker
    finally:
        if gateway is not None:
            gateway.terminate()
            gateway.wait(timeout=15)
        stop_workers([worker])


@contextmanager
def gateway_over_attention_worker(run_dir: Path, env: dict[str, str],
                                  chunk_tokens: int) -> Iterator[str]:
    """The gateway's URL, over one worker started with ``env`` whose prefill runs in
    ``chunk_tokens``-token chunks (so long prompts take several steps)."""
    settings = ServerSettings(
        workers=1, kv_cache_space_gib=1, max_model_len=2048,
        worker_extra_args=["--max-num-batched-tokens", str(chunk_tokens)],
    )
    with gateway_over_worker(run_dir, env, settings) as (url, _):
        yield url


@contextmanager
def attention_gateway(run_dir: Path, env: dict[str, str],
                      chunk_tokens: int) -> Iterator[tuple[str, Path]]:
    """(the gateway's URL, the worker's usage-counter directory) for one worker started with
    ``env`` plus a stats directory under ``run_dir``, prefill in ``chunk_tokens`` chunks."""
    stats_dir = run_dir / "stats"
    with gateway_over_attention_worker(
            run_dir, {**env, "TESSERA_ATTENTION_STATS_DIR": str(stats_dir)}, chunk_tokens) as url:
        yield url, stats_dir


def complete(url: str, prompt: str, max_tokens: int) -> str:
    """The greedy completion of ``prompt`` through the gateway's completions API."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def assert_answers_a_short_prompt(url: str) -> None:
    """The served model still knows the capital of France: the path did not break it."""
    assert "Paris" in complete(url, "The capital of France is", 4)


def usage_after(stats_dir: Path, min_steps: int) -> dict[int, dict[str, int]]:
    """Rows per layer and path from the worker's counters, once it has run ``min_steps``."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        snapshots = read_usage(stats_dir)
        if snapshots and snapshots[0]["steps"] >= min_steps:
            return {int(layer): paths for layer, paths in snapshots[0]["layers"].items()}
        time.sleep(0.2)
    raise AssertionError("worker wrote no attention usage")
