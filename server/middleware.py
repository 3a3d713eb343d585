"""Pure-ASGI middleware: one request id per request, and its status and duration counted.

Unlike BaseHTTPMiddleware it does not buffer or detach streaming bodies, so the duration of a
stream is measured to its last byte and a client disconnect still reaches the route.
"""

from __future__ import annotations

import logging
import os
import re
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.metrics import GatewayMetrics

logger = logging.getLogger("tessera.gateway")

# What a client may choose as its id: it is echoed in a header, logged, and forwarded to
# vLLM as its request id, so only short printable tokens pass; anything else is replaced.
_VALID_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")

KNOWN_ROUTES = {
    "/v1/chat/completions": "chat", "/v1/completions": "completions",
    "/v1/responses": "responses", "/v1/embeddings": "embeddings", "/tokenize": "tokenize",
    "/detokenize": "detokenize", "/v1/models": "models", "/health": "health",
    "/metrics": "metrics",
}


def route_label(path: str) -> str:
    # Bounded label values: unknown paths share one label instead of one series each.
    if path.startswith("/v1/models/"):
        return "models"
    if path.startswith("/v1/responses/"):
        return "responses_by_id"
    if path.startswith("/v1/memory/"):
        return "memory"
    return KNOWN_ROUTES.get(path, "other")


def request_id_from(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's `x-request-id` if it is a sane token, else a fresh one."""
    for name, value in headers:
        if name == b"x-request-id":
            if _VALID_REQUEST_ID.fullmatch(value):
                return value.decode("ascii")
            break
    return os.urandom(16).hex()  # what uuid4().hex carries, without building a UUID


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_from(scope["headers"])
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = 500
        id_header = (b"x-request-id", request_id.encode())

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    (k, v) for k, v in message.get("headers", []) if k != b"x-request-id"
                ] + [id_header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            route = route_label(scope["path"])
            elapsed = time.perf_counter() - started
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.request_duration.labels(route).observe(elapsed)
            if logger.isEnabledFor(logging.INFO):
                logger.info("request_id=%s %s %s -> %d in %.1f ms", request_id,
                            scope["method"], scope["path"], status, elapsed * 1e3)
