"""One real stack for the whole integration suite: two vLLM CPU workers serving SmolLM2,
a third serving it as an embedding model (vLLM's pooling runner), a gateway over all three,
a second gateway that requires API keys (and caps max_tokens), and a third with tight
limits. All real processes, real HTTP on 127.0.0.1. Start-up takes about a minute; every
test shares it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

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

MODEL = "smollm2-135m-instruct"
# The same weights served by vLLM's pooling runner: a generative worker has no /v1/embeddings.
EMBED_MODEL = "smollm2-135m-embed"
EMBED_WORKER_ARGS = ["--runner", "pooling", "--convert", "embed"]
API_KEY = "sk-test-integration"
KEYED_MAX_TOKENS_CEILING = 8
LIMITS_READ_TIMEOUT_S = 2.0
# Short context so the too-long-prompt case costs only tokenisation.
TEST_MAX_MODEL_LEN = 2048



@dataclass
class Stack:
    gateway_url: str
    keyed_gateway_url: str  # API key required, on /metrics too; max_tokens ceiling 8
    limits_gateway_url: str  # short upstream read timeout, one request per key at a time
    workers: list[WorkerProcess]  # the two generative workers
    embed_worker: WorkerProcess
    stats_dir: Path

    @property
    def base_url(self) -> str:
        return f"{self.gateway_url}/v1"


def _start_gateway(worker_urls: list[str], port: int, log_path: Path,
                   extra: list[str]) -> subprocess.Popen:
    command = [sys.executable, "-m", "server.cli", "gateway", "--port", str(port),
               "--health-interval-s", "0.5", *extra]
    for url in worker_urls:
        command += ["--worker-url", url]
    with open(log_path, "ab") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    run_dir = tmp_path_factory.mktemp("stack")
    stats_dir = run_dir / "attention-stats"
    os.environ["TESSERA_ATTENTION_STATS_DIR"] = str(stats_dir)
    settings = ServerSettings(
        data_dir=Path(os.environ.get("TESSERA_DATA_DIR", "data")).resolve(),
        workers=2, kv_cache_space_gib=1,
        max_model_len=TEST_MAX_MODEL_LEN, responses_store=True,
    )
    model_path = resolve_model_path(settings)
    workers: list[WorkerProcess] = []
    gateways: list[subprocess.Popen] = []
    try:
        for index in range(2):
            # Ports chosen free one by one (base + i may be taken on a shared machine).
            workers.append(start_worker(settings, model_path, index, port=free_port()))
        embed_settings = settings.model_copy(update={"served_model_name": EMBED_MODEL,
                                                     "worker_extra_args": EMBED_WORKER_ARGS})
        workers.append(start_worker(
            embed_settings, model_path, 2, port=free_port(),
            extra_env={"TESSERA_ATTENTION_STATS_DIR": str(run_dir / "embed-stats")}))
        wait_until_healthy(workers, timeout_s=600)
        urls = [worker.url for worker in workers[:2]]
        port, keyed_port, limits_port = free_port(), free_port(), free_port()
        gateways.append(_start_gateway([*urls, workers[2].url], port, run_dir / "gateway.log",
                                       []))
        gateways.append(_start_gateway(
            urls, keyed_port, run_dir / "gateway-keyed.log",
            ["--api-keys", API_KEY, "--metrics-require-key",
             "--max-tokens-ceiling", str(KEYED_MAX_TOKENS_CEILING)]))
        gateways.append(_start_gateway(
            urls, limits_port, run_dir / "gateway-limits.log",
            ["--upstream-read-timeout-s", str(LIMITS_READ_TIMEOUT_S),
             "--max-concurrent-per-key", "1"]))
        stack = Stack(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{keyed_port}",
                      f"http://127.0.0.1:{limits_port}", workers[:2], workers[2], stats_dir)
        for url, gateway in zip((stack.gateway_url, stack.keyed_gateway_url,
                                 stack.limits_gateway_url), gateways, strict=True):
            wait_for_health(url, gateway)
        yield stack
    finally:
        for gateway in gateways:
            gateway.terminate()
        for gateway in gateways:
            try:
                gateway.wait(timeout=15)
            except subprocess.TimeoutExpired:
                gateway.kill()
        stop_workers(workers)


@pytest.fixture
def client(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.gateway_url, timeout=120.0) as http:
        yield http


def assert_openai_error(response: httpx.Response, status: int) -> dict:
    """The response is an OpenAI-shaped error with this status; returns its `error` object."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    return error
