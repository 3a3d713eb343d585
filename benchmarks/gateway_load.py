"""A lean closed-loop HTTP/1.1 load generator and an instant-answer stub worker.

Both are for the gateway's capacity benchmark (`gateway_capacity.py`): on a 2-core machine
the load generator and the stub share the CPU with the gateway, so they must cost far less
per request than it does. httpx costs about as much per request as the gateway itself; this
client writes pre-encoded requests on kept-alive connections and parses only the status line
and Content-Length (the gateway answers JSON with a length; streams are not measured here).

    python benchmarks/gateway_load.py stub --port P          # the stub worker
    python benchmarks/gateway_load.py load URL PATH BODY --connections 32 --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from urllib.parse import urlsplit

STUB_MODEL = "stub-model"
_COMPLETION = json.dumps({
    "id": "cmpl-stub", "object": "text_completion", "created": 0, "model": STUB_MODEL,
    "choices": [{"index": 0, "text": "!", "finish_reason": "length", "logprobs": None}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}).encode()
_MODELS = json.dumps({"object": "list", "data": [{"id": STUB_MODEL, "object": "model"}]}).encode()


async def stub_app(scope: dict, receive, send) -> None:  # noqa: ANN001 - raw ASGI
    """Answers like a vLLM worker that generates one token in no time."""
    if scope["type"] != "http":
        return
    more = True
    while more:  # drain the body
        message = await receive()
        more = message.get("more_body", False)
    path = scope["path"]
    body = _MODELS if path == "/v1/models" else b"{}" if path == "/health" else _COMPLETION
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class _Connection(asyncio.Protocol):
    """One kept-alive connection sending the same request again as soon as an answer ends."""

    def __init__(self, request: bytes, stats: dict, deadline: float) -> None:
        self.request = request
        self.stats = stats
        self.deadline = deadline
        self.buffer = b""
        self.sent_at = 0.0
        self.closed = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._send()

    def _send(self) -> None:
        self.sent_at = time.perf_counter()
        assert self.transport is not None
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            head_end = self.buffer.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = self.buffer[:head_end].lower()
            length_at = head.find(b"content-length:")
            if length_at < 0:  # the gateway always sends a length for JSON; count and stop
                self.stats["errors"] += 1
                self.transport.close()  # type: ignore[union-attr]
                return
            line_end = head.find(b"\r\n", length_at)
            length = int(head[length_at + 15: line_end if line_end > 0 else None])
            total = head_end + 4 + length
            if len(self.buffer) < total:
                return
            status = int(self.buffer[9:12])
            self.buffer = self.buffer[total:]
            now = time.perf_counter()
            self.stats["latencies"].append(now - self.sent_at)
            self.stats["statuses"][status] = self.stats["statuses"].get(status, 0) + 1
            if now >= self.deadline:
                self.transport.close()  # type: ignore[union-attr]
                return
            self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        if time.perf_counter() < self.deadline:
            self.stats["errors"] += 1  # dropped by the server before the run ended
        if not self.closed.done():
            self.closed.set_result(None)


async def run_load(url: str, path: str, body: bytes | None, connections: int,
                   seconds: float) -> dict:
    """Closed loop: each connection re-sends as soon as its answer arrives, for `seconds`."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    method = "POST" if body is not None else "GET"
    head = (f"{method} {path} HTTP/1.1\r\nhost: {host}:{port}\r\n"
            "content-type: application/json\r\n")
    head += f"content-length: {len(body)}\r\n" if body is not None else ""
    request = head.encode() + b"\r\n" + (body or b"")
    stats: dict = {"latencies": [], "statuses": {}, "errors": 0}
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    deadline = started + seconds
    protocols = []
    for _ in range(connections):
        _, protocol = await loop.create_connection(
            lambda: _Connection(request, stats, deadline), host, port)
        protocols.append(protocol)
    await asyncio.gather(*(protocol.closed for protocol in protocols))
    elapsed = time.perf_counter() - started
    latencies = sorted(stats["latencies"])
    done = len(latencies)

    def pick(q: float) -> float:
        return latencies[min(int(q * done), done - 1)] * 1e3 if done else float("nan")

    ok = sum(count for status, count in stats["statuses"].items() if 200 <= status < 300)
    return {"requests": done, "seconds": elapsed, "rps": done / elapsed,
            "ok": ok, "non_2xx": done - ok, "connection_errors": stats["errors"],
            "statuses": {str(k): v for k, v in stats["statuses"].items()},
            "latency_ms": {"p50": pick(0.5), "p99": pick(0.99)}}


def _use_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    stub = commands.add_parser("stub")
    stub.add_argument("--port", type=int, required=True)
    load = commands.add_parser("load")
    load.add_argument("url")
    load.add_argument("path")
    load.add_argument("body", nargs="?", default=None)
    load.add_argument("--connections", type=int, default=32)
    load.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    if args.command == "stub":
        import uvicorn

        uvicorn.run(stub_app, host="127.0.0.1", port=args.port, log_level="warning",
                    access_log=False, loop="uvloop", http="httptools")
        return
    _use_uvloop()
    body = args.body.encode() if args.body is not None else None
    result = asyncio.run(run_load(args.url, args.path, body, args.connections, args.seconds))
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
