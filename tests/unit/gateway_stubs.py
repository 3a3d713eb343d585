"""Misbehaving workers on real sockets, for failure paths a real vLLM cannot be made to take
on cue (die mid-event, drop a connection after reading a request, never accept).

Each stub answers `/health` and `/v1/models` like a worker serving model "m", so the gateway
takes it into rotation; POSTs get the behaviour under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import httpx

from server.app import create_app
from server.config import ServerSettings

MODEL = "m"
Behaviour = Callable[[bytes, asyncio.StreamWriter], Awaitable[None]]


def respond(status: int, body: bytes, content_type: str = "application/json") -> bytes:
    return (f"HTTP/1.1 {status} X\r\ncontent-type: {content_type}\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode() + body


class StubWorker:
    """An HTTP/1.1 server on 127.0.0.1 that counts the POSTs it received."""

    def __init__(self, on_post: Behaviour) -> None:
        self.on_post = on_post
        self.posts = 0
        self.server: asyncio.AbstractServer | None = None
        self.url = ""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = await reader.readexactly(length)
                if head.startswith(b"GET /v1/models"):
                    models = {"data": [{"id": MODEL, "object": "model"}]}
                    writer.write(respond(200, json.dumps(models).encode()))
                elif head.startswith(b"GET"):
                    writer.write(respond(200, b"{}"))
                else:
                    self.posts += 1
                    writer.peer_reader = reader  # type: ignore[attr-defined]  # for EOF checks
                    await self.on_post(body, writer)
                    if writer.is_closing():
                        return
                await writer.drain()

    async def __aenter__(self) -> StubWorker:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self.server is not None
        self.server.close()


async def answer_ok(body: bytes, writer: asyncio.StreamWriter) -> None:
    writer.write(respond(200, b'{"choices": [{"text": "ok"}]}'))


async def echo_body(body: bytes, writer: asyncio.StreamWriter) -> None:
    writer.write(respond(200, body))


async def close_after_reading(body: bytes, writer: asyncio.StreamWriter) -> None:
    writer.close()  # the request arrived; the worker dies before answering


def slow(seconds: float) -> Behaviour:
    async def behave(body: bytes, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(seconds)
        writer.write(respond(200, b"{}"))

    return behave


def die_mid_event(events: bytes, torn: bytes) -> Behaviour:
    """A chunked SSE answer: whole `events`, then half an event, then the connection drops."""

    async def behave(body: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                     b"transfer-encoding: chunked\r\n\r\n")
        for piece in (events, torn):
            writer.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            await writer.drain()
            await asyncio.sleep(0.05)
        writer.transport.abort()  # no terminating chunk: the worker died

    return behave


class SlowFirstEvent:
    """An SSE answer whose first event comes after `seconds` (a long prefill); records
    whether the gateway closed the connection meanwhile (what makes vLLM abort)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.closed_by_gateway = asyncio.Event()

    async def __call__(self, body: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                     b"transfer-encoding: chunked\r\n\r\n")
        await writer.drain()
        deadline = asyncio.get_running_loop().time() + self.seconds
        while asyncio.get_running_loop().time() < deadline:
            if writer.peer_reader.at_eof() or writer.transport.is_closing():  # type: ignore[attr-defined]
                self.closed_by_gateway.set()
                return
            await asyncio.sleep(0.02)
        event = b"data: {}\n\n"
        writer.write(f"{len(event):x}\r\n".encode() + event + b"\r\n0\r\n\r\n")


@contextlib.contextmanager
def unaccepting_listener() -> Iterator[str]:
    """A port whose accept queue is full: connecting to it hangs until the client's timeout."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):  # fill the accept queue (backlog 0 holds one); later SYNs are dropped
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        for sock in [*fillers, listener]:
            sock.close()


@contextlib.asynccontextmanager
async def gateway_over(urls: list[str], **overrides: object) -> AsyncIterator[httpx.AsyncClient]:
    """A gateway app with its lifespan running (probes done), and a client for it."""
    settings = ServerSettings(workers=0, worker_urls=urls, health_interval_s=3600,
                              upstream_connect_timeout_s=0.5, **overrides)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw",
                                     timeout=30) as client:
            client.gateway = app.state.gateway  # type: ignore[attr-defined]
            client.app = app  # type: ignore[attr-defined]
            yield client
