"""Start and stop real vLLM OpenAI servers on the GPU host (stdlib + httpx; no vLLM import).

Used by the GPU serving benchmarks: each server is `python3 -m vllm.entrypoints.openai.
api_server` in its own session, with tessera's settings in its environment.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx


@dataclass
class GpuServer:
    name: str
    port: int
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen | None = None
    log_path: Path | None = None
    started_at: float = 0.0
    healthy_after_s: float | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, model: str, served_name: str, log_dir: Path) -> None:
        self.log_path = log_dir / f"server-{self.name}.log"
        command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                   "--model", model, "--served-model-name", served_name,
                   "--port", str(self.port), "--disable-uvicorn-access-log", *self.args]
        self.started_at = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, env=os.environ | self.env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    def is_up(self) -> bool:
        return healthy(self.url)

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.process is None:  # started by an earlier call: find it by its port
            subprocess.run(["pkill", "-f", f"--port {self.port}"], check=False)
            return
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)


def healthy(url: str) -> bool:
    """Whether a server (vLLM or the gateway) answers its /health with 200 now."""
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def wait_healthy(servers: list[GpuServer], timeout_s: float = 420) -> None:
    """Poll every server's /health; raise with the log tail of one that exits or times out."""
    pending = [server for server in servers if server.process is not None]
    deadline = time.monotonic() + timeout_s
    while pending:
        for server in list(pending):
            if server.process.poll() is not None:
                raise RuntimeError(f"{server.name} exited:\n{server.log_tail()}")
            if healthy(server.url):
                server.healthy_after_s = round(time.monotonic() - server.started_at, 1)
                print(f"[servers] {server.name} healthy after {server.healthy_after_s} s",
                      flush=True)
                pending.remove(server)
        if time.monotonic() > deadline:
            raise RuntimeError(f"not healthy in time: {[s.name for s in pending]}\n"
                               + pending[0].log_tail())
        time.sleep(1)


def grep_log(server: GpuServer, *needles: str, limit: int = 12) -> list[str]:
    if server.log_path is None or not server.log_path.exists():
        return []
    lines = server.log_path.read_text(errors="replace").splitlines()
    return [line[-300:] for line in lines if any(n in line for n in needles)][:limit]


def join_calls(parts: list[dict], concat: tuple[str, ...] = (), update: tuple[str, ...] = (),
               latest: tuple[str, ...] = ()) -> dict:
    """One result from the JSONs of one run's device calls (servers kept up between them):
    ``concat`` keys' lists are joined, ``update`` keys' dicts merged, ``latest`` keys taken
    from the last call that has them (cumulative counters), any other key from the first."""
    merged: dict = {}
    for part in parts:
        for key, value in part.items():
            if key in concat:
                merged[key] = merged.get(key, []) + value
            elif key in update:
                merged.setdefault(key, {}).update(value)
            elif key in latest or key not in merged:
                merged[key] = value
    merged["calls"] = len(parts)
    return merged
