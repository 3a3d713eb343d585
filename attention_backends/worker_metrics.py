"""tessera's worker metrics on the worker's own ``/metrics``, beside vLLM's.

The attention backend runs in vLLM's engine process, but ``/metrics`` is served by the API
server process, and metrics created in the engine never reach it. So the engine writes small
JSON snapshots into the stats dir (``TESSERA_ATTENTION_STATS_DIR``, one per worker), and the
API server renders them on every scrape, through the one hook vLLM gives into its API
server: an ASGI middleware (``--middleware attention_backends.worker_metrics.
TesseraWorkerMetrics``; the launcher adds it). A scrape of one worker then shows:

- ``tessera_kv_bytes{kind="k|v",state="dense|stored"}``: the KV pool's bytes as stored in
  the pages and as a dense cache would need for the same token capacity (equal on a dense
  worker; LeanK's pruned K makes ``stored`` smaller), and ``tessera_kv_capacity_tokens``.
- ``tessera_attention_query_tokens_total{path}``: query tokens per attention path (dense,
  sparse prefill, RetroInfer decode...), summed over layers, from ``usage.py``'s snapshots.

Only snapshots of live processes count (a restarted worker leaves its old files behind). The
engine's tensor-parallel ranks (one process each, their rank in the usage snapshot) each hold
a share of the KV pool, so their bytes are summed; each runs every query token, so the path
counts are their maximum.
This module's rendering functions import neither vLLM nor torch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

KV_BYTES_GLOB = "kv-bytes-*.json"
USAGE_GLOB = "attention-usage-*.json"
KV_KEYS = ("k_dense", "k_stored", "v_dense", "v_stored", "capacity_tokens")
OPENMETRICS_EOF = b"# EOF\n"


def write_kv_bytes(stats_dir: Path, values: dict[str, int]) -> Path:
    """This process's KV pool snapshot (``KV_KEYS``), replaced atomically."""
    stats_dir.mkdir(parents=True, exist_ok=True)
    target = stats_dir / f"kv-bytes-{os.getpid()}.json"
    staging = target.with_suffix(".tmp")
    staging.write_text(json.dumps({key: int(values[key]) for key in KV_KEYS}))
    staging.replace(target)
    return target


class DensePoolBytes:
    """The KV pool of a worker whose pages hold plain K and V (no LeanK), summed over the
    layers' cache tensors as each is first written; the snapshot is rewritten once per
    new layer, so after the first step a call costs one set lookup."""

    def __init__(self, stats_dir: Path | None) -> None:
        self.stats_dir = stats_dir
        self.seen: set[int] = set()
        self.totals = dict.fromkeys(KV_KEYS, 0)

    def note(self, layer: object, kv_cache, num_kv_heads: int, head_size: int) -> None:
        """``kv_cache``: one layer's paged cache tensor, K and V halves of equal size."""
        if self.stats_dir is None or id(layer) in self.seen:
            return
        self.seen.add(id(layer))
        half = kv_cache.numel() * kv_cache.element_size() // 2
        for key in ("k_dense", "k_stored", "v_dense", "v_stored"):
            self.totals[key] += half
        # Every layer holds the same tokens: the pool's capacity is one layer's.
        self.totals["capacity_tokens"] = kv_cache.numel() // (2 * num_kv_heads * head_size)
        write_kv_bytes(self.stats_dir, self.totals)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _live_snapshots(stats_dir: Path, pattern: str) -> Iterable[dict]:
    for path in sorted(stats_dir.glob(pattern)):
        try:
            pid = int(path.stem.rsplit("-", 1)[1])
            if _pid_alive(pid):
                yield json.loads(path.read_text())
        except (ValueError, OSError):  # a foreign or half-copied file is not a metric
            continue


def render(stats_dir: Path) -> str:
    """Prometheus text (also valid OpenMetrics lines) for the live snapshots in
    ``stats_dir``; empty when there are none yet (before the first forward pass)."""
    if not stats_dir.is_dir():
        return ""
    lines: list[str] = []
    kv = [snapshot for snapshot in _live_snapshots(stats_dir, KV_BYTES_GLOB)]
    if kv:
        totals = {key: sum(int(s.get(key, 0)) for s in kv) for key in KV_KEYS}
        lines += ["# HELP tessera_kv_bytes KV cache pool bytes, as stored and as dense.",
                  "# TYPE tessera_kv_bytes gauge"]
        for kind in ("k", "v"):
            for state in ("dense", "stored"):
                lines.append(f'tessera_kv_bytes{{kind="{kind}",state="{state}"}} '
                             f"{totals[f'{kind}_{state}']}")
        lines += ["# HELP tessera_kv_capacity_tokens Tokens the KV cache pool holds.",
                  "# TYPE tessera_kv_capacity_tokens gauge",
                  f"tessera_kv_capacity_tokens {totals['capacity_tokens'] // len(kv)}"]
    usage = list(_live_snapshots(stats_dir, USAGE_GLOB))
    if usage:
        # Every tensor-parallel rank runs every query token (on its share of the heads), so
        # the ranks' counts are the same tokens: the engine's count is their maximum.
        per_path: dict[str, int] = {}
        for snapshot in usage:
            mine: dict[str, int] = {}
            for paths in snapshot.get("layers", {}).values():
                for path, tokens in paths.items():
                    mine[path] = mine.get(path, 0) + int(tokens)
            for path, tokens in mine.items():
                per_path[path] = max(per_path.get(path, 0), tokens)
        lines += ["# HELP tessera_attention_query_tokens Query tokens per attention path, "
                  "summed over layers.",
                  "# TYPE tessera_attention_query_tokens counter"]
        lines += [f'tessera_attention_query_tokens_total{{path="{path}"}} {tokens}'
                  for path, tokens in sorted(per_path.items())]
    return "\n".join(lines) + "\n" if lines else ""


def append_metrics(body: bytes, extra: str) -> bytes:
    """``body`` (a Prometheus or OpenMetrics exposition) with ``extra`` added; OpenMetrics
    must end with ``# EOF``, so the lines go before it."""
    if not extra:
        return body
    if body.endswith(OPENMETRICS_EOF):
        return body[: -len(OPENMETRICS_EOF)] + extra.encode() + OPENMETRICS_EOF
    if body and not body.endswith(b"\n"):
        body += b"\n"
    return body + extra.encode()


class TesseraWorkerMetrics:
    """ASGI middleware for vLLM's API server: ``GET /metrics`` answers with vLLM's metrics
    plus ``render(stats_dir)``. The scrape is asked for uncompressed (prometheus_client
    would gzip it for a Prometheus server) so the text can be extended; everything else
    passes through untouched."""

    def __init__(self, app, stats_dir: Path | None = None) -> None:
        self.app = app
        if stats_dir is None:
            env = os.environ.get("TESSERA_ATTENTION_STATS_DIR")
            stats_dir = Path(env) if env else None
        self.stats_dir = stats_dir

    async def __call__(self, scope, receive, send) -> None:
        if (self.stats_dir is None or scope["type"] != "http"
                or not scope["path"].rstrip("/") == "/metrics"):
            await self.app(scope, receive, send)
            return
        headers = [(name, value) for name, value in scope["headers"]
                   if name.lower() != b"accept-encoding"]
        scope = dict(scope, headers=headers)
        start: dict = {}
        chunks: list[bytes] = []

        async def capture(message: dict) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
                return
            if message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = b"".join(chunks)
            if start.get("status") == 200:
                body = append_metrics(body, render(self.stats_dir))
            response_headers = [(name, value) for name, value in start.get("headers", [])
                                if name.lower() != b"content-length"]
            response_headers.append((b"content-length", str(len(body)).encode()))
            await send(dict(start, headers=response_headers))
            await send({"type": "http.response.body", "body": body, "more_body": False})

        await self.app(scope, receive, capture)
