"""`tessera cluster up | status | down`: tessera's vLLM workers as Ray actors behind the gateway.

`cluster up` connects to a Ray cluster (`--address`, or `RAY_ADDRESS`; with neither it starts a
local one on 127.0.0.1), creates one named, detached actor per worker, each reserving
`--cpus-per-worker` / `--gpus-per-worker` (plus any `--resource NAME=N`) so Ray places it on a
node that has them. Each actor runs `tessera worker`'s vLLM OpenAI server as a child process on
its node and reports its URL. The gateway runs in the `cluster up` process: it starts with the
URLs of the actors it finds in Ray's namespace `tessera` and keeps discovering (every
`--discover-interval-s`), so workers added later by another `cluster up --add` are routed to,
and dead ones leave rotation through the gateway's own health checks.

A worker needing several GPUs (tensor parallel on one node) reserves them with
`--gpus-per-worker N` and passes `--worker-extra-args=--tensor-parallel-size=N`: Ray sets
CUDA_VISIBLE_DEVICES for the actor and vLLM's multiprocessing executor uses those GPUs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from server.router import WorkerPool

NAMESPACE = "tessera"
ACTOR_PREFIX = "tessera-worker-"
LOCAL_NODE_IP = "127.0.0.1"  # a local cluster and its workers stay on loopback


def _say(message: str) -> None:
    print(f"[tessera cluster] {message}", file=sys.stderr, flush=True)


def _die_with_parent() -> None:
    """preexec_fn: the child gets SIGKILL when the actor process dies (Linux prctl)."""
    PR_SET_PDEATHSIG = 1  # noqa: N806 - the name of the Linux constant
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    os.setsid()


class WorkerActor:
    """One vLLM worker, run by a Ray actor as a child process on the actor's node.

    Wrapped with `ray.remote` at run time so this module imports without Ray.
    """

    def __init__(
        self, index: int, workers: int, settings: dict[str, Any], host: str | None = None
    ) -> None:
        import ray

        from server.config import ServerSettings

        self.index = index
        # A local cluster keeps everything on loopback; on a real cluster, the node's address.
        self.node_ip = host or ray.util.get_node_ip_address()
        self.settings = ServerSettings(**settings).model_copy(
            update={"workers": workers, "worker_host": self.node_ip}
        )
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0

    def prepare(self) -> str:
        """Prepare the model on this node (idempotent); return its path."""
        from server.launcher import resolve_model_path

        return str(resolve_model_path(self.settings))

    def start(self) -> str:
        """Start vLLM on a free port of this node; return the worker URL (not yet healthy)."""
        from server.launcher import resolve_model_path, worker_command, worker_env

        if self.process is not None and self.process.poll() is None:
            return self.url()
        with socket.socket() as probe:
            probe.bind((self.node_ip, 0))
            self.port = probe.getsockname()[1]
        model_path = resolve_model_path(self.settings)
        log_dir = Path(self.settings.data_dir) / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        with open(log_dir / f"ray-worker-{self.index}.log", "ab") as log:
            self.process = subprocess.Popen(
                worker_command(self.settings, model_path, self.node_ip, self.port),
                env=worker_env(self.settings, self.index),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,
            )
        return self.url()

    def url(self) -> str:
        return f"http://{self.node_ip}:{self.port}"

    def info(self) -> dict[str, Any]:
        running = self.process is not None and self.process.poll() is None
        return {
            "index": self.index,
            "url": self.url(),
            "node_ip": self.node_ip,
            "actor_pid": os.getpid(),
            "vllm_pid": self.process.pid if self.process else None,
            "running": running,
        }

    def stop(self, grace_s: float = 20.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


# --------------------------------------------------------------------------- Ray plumbing


def _import_ray(local: bool) -> Any:
    """Import Ray; for a local cluster, keep all of Ray's own traffic on 127.0.0.1.

    Ray resolves 127.0.0.1 to the host's routable address unless cluster mode is off (the
    variable must be set before Ray is imported; processes Ray starts inherit it).
    """
    if local:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    return ray


def connect(address: str | None, num_cpus: int | None) -> bool:
    """Join the cluster at `address` (or RAY_ADDRESS); else start a local one on loopback.

    Returns True when this process started the cluster (it ends when this process does).
    """
    address = address or os.environ.get("RAY_ADDRESS")
    ray = _import_ray(local=not address)
    if address:
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
        return False
    ray.init(
        namespace=NAMESPACE,
        num_cpus=num_cpus,
        include_dashboard=False,
        object_store_memory=256 * 1024**2,
        log_to_driver=False,
    )
    return True


def join(address: str | None) -> Any:
    """Join a running cluster: `address`, RAY_ADDRESS, else the local one `cluster up` made."""
    address = address or os.environ.get("RAY_ADDRESS")
    ray = _import_ray(local=not address)
    ray.init(address=address or "auto", namespace=NAMESPACE, log_to_driver=False)
    return ray


def worker_actors() -> dict[str, Any]:
    """Name -> handle of every live tessera worker actor in the namespace."""
    import ray
    from ray.util import list_named_actors

    handles = {}
    for entry in list_named_actors(all_namespaces=True):
        if entry["namespace"] != NAMESPACE or not entry["name"].startswith(ACTOR_PREFIX):
            continue
        with contextlib.suppress(ValueError):
            handles[entry["name"]] = ray.get_actor(entry["name"], namespace=NAMESPACE)
    return handles


def actor_infos(timeout_s: float = 10.0) -> list[dict[str, Any]]:
    import ray

    infos = []
    for name, handle in sorted(worker_actors().items()):
        try:
            info = ray.get(handle.info.remote(), timeout=timeout_s)
        except Exception as exc:  # noqa: BLE001 - a dead actor is reported, not raised
            info = {"url": None, "running": False, "error": type(exc).__name__}
        infos.append({"name": name, **info})
    return infos


def start_workers(
    args: argparse.Namespace, settings: dict[str, Any], host: str | None
) -> list[Any]:
    import ray

    remote_cls = ray.remote(WorkerActor)
    existing = worker_actors()
    first = 0 if not args.add else len(existing)
    resources = dict(_parse_resource(r) for r in args.resource)
    handles = []
    for index in range(first, first + args.workers):
        name = f"{ACTOR_PREFIX}{index}"
        if name in existing:
            raise SystemExit(f"actor {name} exists: `tessera cluster down` first, or --add")
        handles.append(
            remote_cls.options(
                name=name,
                namespace=NAMESPACE,
                lifetime="detached",
                num_cpus=args.cpus_per_worker,
                num_gpus=args.gpus_per_worker,
                resources=resources or None,
                max_restarts=0,
            ).remote(index, first + args.workers, settings, host)
        )
    # Sequential prepare: workers sharing a node (and its data dir) convert the model once.
    for handle in handles:
        ray.get(handle.prepare.remote())
    urls = ray.get([handle.start.remote() for handle in handles])
    _say(f"started {len(urls)} worker actor(s): {', '.join(urls)}")
    return handles


def wait_healthy(urls: list[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    pending = set(urls)
    while pending and time.monotonic() < deadline:
        for url in list(pending):
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(url + "/health", timeout=2) as response:
                    if response.status == 200:
                        pending.discard(url)
                        _say(f"worker {url} healthy")
        time.sleep(2)
    if pending:
        raise SystemExit(f"workers not healthy after {timeout_s:.0f} s: {sorted(pending)}")


def stop_handles(handles: list[Any], grace_s: float = 20.0) -> int:
    import ray

    for handle in handles:
        with contextlib.suppress(Exception):
            ray.get(handle.stop.remote(grace_s), timeout=grace_s + 10)
        with contextlib.suppress(Exception):
            ray.kill(handle)
    return len(handles)


def stop_all(grace_s: float = 20.0) -> int:
    """Stop every tessera worker actor in the cluster (their vLLM processes first)."""
    return stop_handles(list(worker_actors().values()), grace_s)


def _parse_resource(text: str) -> tuple[str, float]:
    name, _, amount = text.partition("=")
    return name, float(amount or 1)


# --------------------------------------------------------------------------- gateway


async def discover_workers(pool: WorkerPool, interval_s: float) -> None:
    """Add every worker URL Ray knows of to the gateway's pool, now and every interval."""
    while True:
        try:
            infos = await asyncio.to_thread(actor_infos)
        except Exception as exc:  # noqa: BLE001 - discovery retries; routing goes on
            _say(f"discovery failed: {exc!r}")
            infos = []
        for info in infos:
            url = info.get("url")
            if url and info.get("running") and pool.add(url):
                _say(f"discovered worker {url}")
        await asyncio.sleep(interval_s)


async def run_gateway(settings: Any, interval_s: float) -> None:
    import uvicorn

    from server.app import create_app

    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.shutdown_grace_s),
        access_log=False,
    )
    discovery = asyncio.create_task(discover_workers(app.state.gateway.pool, interval_s))
    try:
        await uvicorn.Server(config).serve()
    finally:
        discovery.cancel()


# --------------------------------------------------------------------------- commands


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM before uvicorn runs: stop the actors on the way out


def _worker_settings(args: argparse.Namespace) -> dict[str, Any]:
    settings: dict[str, Any] = {"data_dir": str(Path(args.data_dir).resolve())}
    if args.kv_cache_gib is not None:
        settings["kv_cache_space_gib"] = args.kv_cache_gib
    if args.worker_extra_args:
        settings["worker_extra_args"] = args.worker_extra_args
    return settings


def cmd_up(args: argparse.Namespace) -> int:
    from server.config import ServerSettings

    remote = args.address or os.environ.get("RAY_ADDRESS")
    if (args.add or args.no_gateway) and not remote:
        join(None)  # add to the local cluster a running `cluster up` made
        started_here = False
    else:
        started_here = connect(args.address, args.num_cpus)
    host = None if remote else LOCAL_NODE_IP
    # The process running the gateway owns the workers' lifetime; --no-gateway only adds.
    owner = not args.no_gateway
    handles: list[Any] = []
    try:
        handles = start_workers(args, _worker_settings(args), host)
        import ray

        wait_healthy(ray.get([h.url.remote() for h in handles]), args.start_timeout_s)
        if args.no_gateway:
            _say(f"{len(handles)} worker(s) up; running gateways discover them")
            return 0
        settings = ServerSettings(
            host=args.host,
            port=args.port,
            workers=0,
            data_dir=Path(args.data_dir),
            worker_urls=[info["url"] for info in actor_infos() if info.get("running")],
        )
        base = f"http://{settings.host}:{settings.port}"
        _say(f"gateway on {base} -> OpenAI base_url={base}/v1; stop with Ctrl-C")
        signal.signal(signal.SIGTERM, _interrupt)
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(run_gateway(settings, args.discover_interval_s))
        return 0
    except BaseException:
        if not owner:
            stop_handles(handles)  # a failed --no-gateway start leaves nothing half-started
        raise
    finally:
        if owner and (started_here or not args.keep_workers):
            _say(f"stopped {stop_all()} worker actor(s)")
        import ray

        ray.shutdown()


def cmd_status(args: argparse.Namespace) -> int:
    ray = join(args.address)
    print(json.dumps(actor_infos(), indent=2))
    ray.shutdown()
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    ray = join(args.address)
    _say(f"stopped {stop_all()} worker actor(s)")
    ray.shutdown()
    return 0


def add_cluster_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `tessera cluster up|status|down` on the CLI's subcommand parser."""
    cluster = subparsers.add_parser("cluster", help="run workers as Ray actors behind the gateway")
    cluster.add_argument("--config", help="YAML config file (default: $TESSERA_CONFIG)")
    actions = cluster.add_subparsers(dest="cluster_command", required=True)

    up = actions.add_parser("up", help="start worker actors and the gateway")
    up.add_argument(
        "--address",
        help="Ray cluster address (default: $RAY_ADDRESS, else a "
        "local cluster on 127.0.0.1 that lives as long as this command)",
    )
    up.add_argument("--workers", type=int, default=2, help="worker actors to start")
    up.add_argument("--cpus-per-worker", type=float, default=1.0)
    up.add_argument("--gpus-per-worker", type=float, default=0.0)
    up.add_argument(
        "--resource",
        action="append",
        default=[],
        metavar="NAME=N",
        help="extra Ray resource each worker reserves (repeatable)",
    )
    up.add_argument(
        "--num-cpus", type=int, default=None, help="CPUs of a local cluster (default: all)"
    )
    up.add_argument(
        "--kv-cache-gib", type=int, default=None, help="VLLM_CPU_KVCACHE_SPACE per CPU worker"
    )
    up.add_argument(
        "--worker-extra-args",
        action="append",
        default=[],
        metavar="ARG",
        help="extra vLLM argument for every worker (repeatable)",
    )
    up.add_argument("--data-dir", default=os.environ.get("TESSERA_DATA_DIR", "data"))
    up.add_argument("--host", default="127.0.0.1", help="gateway bind address")
    up.add_argument("--port", type=int, default=8000, help="gateway port")
    up.add_argument("--start-timeout-s", type=float, default=900.0)
    up.add_argument("--discover-interval-s", type=float, default=5.0)
    up.add_argument(
        "--add", action="store_true", help="add workers to those already in the cluster"
    )
    up.add_argument(
        "--no-gateway",
        action="store_true",
        help="only start worker actors (a gateway elsewhere discovers them)",
    )
    up.add_argument(
        "--keep-workers",
        action="store_true",
        help="leave the actors running on exit (remote clusters only)",
    )
    up.set_defaults(func=cmd_up)

    for name, func, text in (
        ("status", cmd_status, "list worker actors as JSON"),
        ("down", cmd_down, "stop every worker actor"),
    ):
        sub = actions.add_parser(name, help=text)
        sub.add_argument(
            "--address", help="Ray cluster address (default: $RAY_ADDRESS, else the local cluster)"
        )
        sub.set_defaults(func=func)
