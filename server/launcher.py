"""`tessera serve`: start vLLM workers, wait for them, run the gateway, stop everything cleanly.

Each worker runs in its own session (process group) so that Ctrl-C in the terminal reaches
only the launcher: the gateway drains in-flight requests first, then the workers' groups
(vLLM's API server plus its engine-core children) get SIGTERM, then SIGKILL after a grace.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from server.config import ServerSettings
from server.gpu_placement import (
    GpuSlot,
    PlacementError,
    check_heads_split,
    plan_workers,
    tensor_parallel_size,
    visible_gpus,
)
from server.model_prep import prepare_model


@dataclass
class WorkerProcess:
    url: str
    process: subprocess.Popen
    log_path: Path


# Ports free_port has handed out in this process. A worker binds its port seconds after it
# is chosen, so the OS may offer the same port again meanwhile; vLLM binds with SO_REUSEPORT,
# so two workers would then share one port and answer for each other.
_handed_out_ports: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now and not handed out before by this process (for
    tests, benchmarks and ad-hoc workers)."""
    while True:
        with socket.socket() as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
        if port not in _handed_out_ports:
            _handed_out_ports.add(port)
            return port


def _say(message: str) -> None:
    print(f"[tessera] {message}", file=sys.stderr, flush=True)


def resolve_model_path(settings: ServerSettings) -> Path:
    if settings.model_path is not None:
        return settings.model_path
    return prepare_model(settings.data_dir)


WORKER_METRICS_MIDDLEWARE = "attention_backends.worker_metrics.TesseraWorkerMetrics"


def worker_command(settings: ServerSettings, model_path: Path, host: str, port: int) -> list[str]:
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_path),
        "--served-model-name", settings.served_model_name,
        "--host", host,
        "--port", str(port),
        "--dtype", settings.dtype,
        "--max-model-len", str(settings.max_model_len),
        # Lets the gateway's x-request-id become vLLM's request id (one id across hops).
        "--enable-request-id-headers",
        "--disable-uvicorn-access-log",
        # tessera's own worker metrics (KV bytes, attention paths) on the worker's /metrics.
        "--middleware", WORKER_METRICS_MIDDLEWARE,
    ]
    if settings.enforce_eager:
        command.append("--enforce-eager")
    extra = list(settings.worker_extra_args)
    if "--attention-backend" not in extra and _cuda_host():
        # On CUDA, vLLM runs tessera's backend only when asked for (on CPU the plugin
        # replaces CPU_ATTN by itself).
        from attention_backends.plugin import CUDA_BACKEND_ARGS

        command += list(CUDA_BACKEND_ARGS)
    return command + extra


def _cuda_host() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def worker_env(settings: ServerSettings, worker_index: int) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.kv_cache_space_gib))
    # Spread workers over the cores instead of stacking every worker on core 0.
    cores = os.cpu_count() or 1
    count = settings.workers if isinstance(settings.workers, int) else 1
    # vllm-cpu's automatic binding wants a NUMA node per tensor-parallel rank (and fails with
    # an AssertionError on a one-node host): a TP worker's cores are split between its ranks.
    ranks = tensor_parallel_size(None, settings.worker_extra_args)
    if (count > 1 or ranks > 1) and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        per_worker = max(cores // count, 1)
        first = (worker_index * per_worker) % cores
        per_rank = max(per_worker // ranks, 1)
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(
            f"{start}-{start + per_rank - 1}"
            for start in (first + rank * per_rank for rank in range(ranks)))
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    if settings.responses_store:
        env["VLLM_ENABLE_RESPONSES_API_STORE"] = "1"
    env["HF_HUB_OFFLINE"] = "1"  # never download anything at serve time
    env["TRANSFORMERS_OFFLINE"] = "1"
    return env


def worker_launch(settings: ServerSettings, model_path: Path, index: int, port: int,
                  gpu: GpuSlot | None = None) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of local worker ``index``, on its GPUs if any."""
    command = worker_command(settings, model_path, settings.worker_host, port)
    env = worker_env(settings, index)
    if gpu is not None:
        command += gpu.args(settings.gpu_memory_utilization, settings.worker_extra_args)
        env |= gpu.env()
    return command, env


def start_worker(
    settings: ServerSettings,
    model_path: Path,
    index: int,
    port: int | None = None,
    extra_env: dict[str, str] | None = None,
    gpu: GpuSlot | None = None,
) -> WorkerProcess:
    port = port if port is not None else settings.worker_base_port + index
    log_dir = settings.data_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"worker-{index}.log"
    command, env = worker_launch(settings, model_path, index, port, gpu)
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            command, env=env | (extra_env or {}), stdout=log,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
    return WorkerProcess(f"http://{settings.worker_host}:{port}", process, log_path)


def start_waves(slots: list[GpuSlot | None]) -> list[list[int]]:
    """Worker indices in start order: each wave holds at most one worker per set of devices.

    vLLM sizes its KV cache from a memory profile taken while it starts, and any memory that
    another process allocates on the same GPU meanwhile counts as its own (two workers that
    start together on one GPU at 0.45 each got "Available KV cache memory: -0.04 GiB" on the
    H200). Workers that share devices therefore start one after another; workers on their
    own devices, and CPU workers (whose KV size is fixed), start together."""
    waves: list[list[int]] = []
    seen: dict[tuple[str, ...] | None, int] = {}
    for index, slot in enumerate(slots):
        key = slot.devices if slot is not None else None
        wave = seen.get(key, -1) + 1 if key is not None else 0
        seen[key] = wave
        while len(waves) <= wave:
            waves.append([])
        waves[wave].append(index)
    return waves


def start_workers(settings: ServerSettings, model_path: Path, slots: list[GpuSlot] | None,
                  timeout_s: float, ports: list[int] | None = None,
                  extra_env: dict[str, str] | None = None) -> list[WorkerProcess]:
    """Start ``settings.workers`` workers wave by wave (``start_waves``) and return them once
    all are healthy; on a failure every started worker is stopped before the error rises."""
    placed: list[GpuSlot | None] = list(slots) if slots else [None] * int(settings.workers)
    started: dict[int, WorkerProcess] = {}
    try:
        for wave in start_waves(placed):
            batch = [start_worker(settings, model_path, index,
                                  port=ports[index] if ports else None,
                                  extra_env=extra_env, gpu=placed[index]) for index in wave]
            started.update(zip(wave, batch, strict=True))
            wait_until_healthy(batch, timeout_s)
    except BaseException:
        stop_workers(list(started.values()))
        raise
    return [started[index] for index in sorted(started)]


@contextlib.contextmanager
def one_worker(settings: ServerSettings, model_path: Path | None = None,
               env: dict[str, str] | None = None) -> Iterator[str]:
    """One vLLM worker on a free port for a benchmark or a test: yields its URL once it is
    healthy, and stops its whole process group on the way out."""
    path = model_path if model_path is not None else resolve_model_path(settings)
    worker = start_worker(settings, path, 0, port=free_port(), extra_env=env)
    try:
        wait_until_healthy([worker], timeout_s=600)
        yield worker.url
    finally:
        stop_workers([worker])


def wait_for_health(url: str, process: subprocess.Popen, timeout_s: float = 60.0) -> None:
    """Poll one server's /health until 200; fail at once if its process exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: process exited with {process.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{url} not healthy after {timeout_s:.0f} s")


def wait_until_healthy(workers: list[WorkerProcess], timeout_s: float) -> None:
    """Poll each worker's /health, printing progress; fail fast if one exits."""
    deadline = time.monotonic() + timeout_s
    pending = {worker.url: worker for worker in workers}
    started = time.monotonic()
    while pending:
        for url, worker in list(pending.items()):
            code = worker.process.poll()
            if code is not None:
                tail = worker.log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"worker {url} exited with {code} during start:\n{tail}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                    _say(f"worker {url} ready after {time.monotonic() - started:.0f} s")
                    del pending[url]
        if not pending:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"workers not healthy after {timeout_s:.0f} s: {sorted(pending)}")
        _say(f"waiting for {len(pending)} worker(s) to load the model "
             f"({time.monotonic() - started:.0f} s)...")
        time.sleep(3.0)


def stop_workers(workers: list[WorkerProcess], grace_s: float = 20.0) -> None:
    for worker in workers:
        if worker.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.process.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for worker in workers:
        remaining = max(deadline - time.monotonic(), 0.1)
        try:
            worker.process.wait(timeout=remaining)
        except subprocess.TimeoutExpired:
            _say(f"worker {worker.url} did not stop in {grace_s:.0f} s; killing it")
        # Kill the whole group even after a clean exit: engine-core children must not outlive it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.process.pid, signal.SIGKILL)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def place_workers(settings: ServerSettings,
                  gpus: list[str] | None = None) -> tuple[ServerSettings, list[GpuSlot] | None]:
    """``settings`` with ``workers`` resolved to a count, and each worker's GPUs on a CUDA
    host (None on a CPU host: workers there share the cores, see ``worker_env``)."""
    if gpus is None:
        gpus = visible_gpus() if _cuda_host() else []
    auto = settings.workers == "auto"
    if not gpus:
        return settings.model_copy(update={"workers": 1 if auto else settings.workers}), None
    if not auto and settings.workers == 0:
        return settings, None
    slots = plan_workers(gpus, None if auto else int(settings.workers),
                         # a --tensor-parallel-size in worker_extra_args needs that many GPUs
                         max(settings.gpus_per_worker,
                             tensor_parallel_size(None, settings.worker_extra_args)))
    return settings.model_copy(update={"workers": len(slots)}), slots


def serve(settings: ServerSettings) -> int:
    import uvicorn

    from server.app import create_app
    from server.logs import configure_logging

    configure_logging(settings.log_level)
    workers: list[WorkerProcess] = []
    # SIGTERM outside uvicorn's lifetime (while workers load) must still clean up.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        settings, gpu_slots = place_workers(settings)
        if settings.workers:
            model_path = resolve_model_path(settings)
            for slot in gpu_slots or [None]:
                check_heads_split(model_path,
                                  tensor_parallel_size(slot, settings.worker_extra_args))
            _say(f"starting {settings.workers} vLLM worker(s) for {model_path}; logs in "
                 f"{settings.data_dir / 'logs'}")
            if gpu_slots:
                _say("GPUs per worker: " + "; ".join(
                    f"worker {i}: {','.join(slot.devices)}" for i, slot in enumerate(gpu_slots)))
            workers = start_workers(settings, model_path, gpu_slots,
                                    settings.worker_start_timeout_s)
        base = f"http://{settings.host}:{settings.port}"
        _say(f"gateway on {base}  ->  OpenAI base_url={base}/v1  "
             f"model={settings.served_model_name}")
        _say("stop with Ctrl-C")
        config = uvicorn.Config(
            create_app(settings), host=settings.host, port=settings.port,
            log_level=settings.log_level, timeout_graceful_shutdown=int(settings.shutdown_grace_s),
            access_log=False,
        )
        uvicorn.Server(config).run()  # returns after SIGINT/SIGTERM once in-flight work drained
        return 0
    except PlacementError as exc:
        _say(f"cannot start the workers: {exc}")
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        if workers:
            _say("stopping workers")
            stop_workers(workers)
            _say("stopped")
