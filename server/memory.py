"""Conversation memory at the gateway: the conversation id a request names, and the
`/v1/memory` routes (list, erase), answered by the pipeline's memory stage (SeCom).

The conversation id comes from the header `x-tessera-conversation` or the body field
`conversation_id` (what an OpenAI client sends through `extra_body`); the body field is
removed before the request goes to a worker. `x-tessera-memory: off` opts a request out of
a key's default; `recall` recalls without storing the exchange. Ids are short printable
tokens; anything else is a 400, never stored.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from prompt_pipeline.secom.store import VALID_ID
from server.errors import OpenAIError
from server.router import WorkerPool

CONVERSATION_HEADER = "x-tessera-conversation"
CONVERSATION_FIELD = "conversation_id"
MEMORY_HEADER = "x-tessera-memory"


class MemoryAdmin(Protocol):
    async def list_memory(self, api_key: str | None, user: str,
                          conversation: str | None = None) -> dict[str, Any]: ...
    async def erase_memory(self, api_key: str | None, user: str,
                           conversation: str | None = None) -> int: ...


def _check_id(value: object, param: str) -> str:
    if not isinstance(value, str) or not VALID_ID.fullmatch(value):
        raise OpenAIError(400, f"`{param}` must be a string of 1 to 256 printable characters "
                          "without slashes.", param=param, code="invalid_memory_id")
    return value


def memory_notes(request: Request, payload: dict[str, Any]) -> dict[str, str]:
    """The pipeline notes this request asks for; pops `conversation_id` from ``payload``."""
    notes: dict[str, str] = {}
    from_body = payload.pop(CONVERSATION_FIELD, None)
    header = request.headers.get(CONVERSATION_HEADER)
    if header is not None:
        notes["conversation_id"] = _check_id(header, CONVERSATION_HEADER)
    elif from_body is not None:
        notes["conversation_id"] = _check_id(from_body, CONVERSATION_FIELD)
    switch = request.headers.get(MEMORY_HEADER)
    if switch is not None:
        if switch.lower() not in ("on", "off", "recall"):
            raise OpenAIError(400, f"`{MEMORY_HEADER}` must be `on`, `off` or `recall`.",
                              param=MEMORY_HEADER, code="invalid_memory_switch")
        notes["memory"] = switch.lower()
    return notes


def find_memory(stages: list[Any]) -> MemoryAdmin | None:
    """The configured stage that keeps conversation memory, unwrapped from its guard."""
    for stage in stages:
        inner = getattr(stage, "stage", stage)
        if hasattr(inner, "list_memory") and hasattr(inner, "erase_memory"):
            return inner
    return None


class NoWorkerForModel(RuntimeError):
    pass


def stage_model_client(pool: WorkerPool, client: Callable[[], httpx.AsyncClient | None],
                       ) -> Callable[[str, str, int, float], Awaitable[str]]:
    """How the memory stage asks the served model to segment a conversation (after the
    answer): a chat completion sent over HTTP to the least loaded healthy worker serving
    the model, counted in that worker's outstanding requests like any other. Raises on any
    failure; the stage falls back to TextTiling and counts it."""

    async def complete(model: str, prompt: str, max_tokens: int, timeout_s: float) -> str:
        http = client()
        worker = pool.choose(model=model)
        if http is None or worker is None:
            raise NoWorkerForModel(model)
        body = {"model": model, "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens, "temperature": 0}
        pool.track_start(worker)
        try:
            response = await http.post(f"{worker.url}/v1/chat/completions", json=body,
                                       timeout=timeout_s)
        finally:
            pool.track_end(worker)
        response.raise_for_status()
        return response.json()["choices"][0]["message"]["content"] or ""

    return complete


def install_memory_routes(app: FastAPI, authenticate: Any, stages: list[Any]) -> None:
    memory = find_memory(stages)

    def admin(request: Request, user: str,
              conversation: str | None) -> tuple[MemoryAdmin, str | None]:
        # 401 first, as on every other route; the key it returns (None on a server without
        # keys) names the tenant exactly as on the chat route.
        api_key = authenticate(request)
        if memory is None:
            raise OpenAIError(404, "Conversation memory is not enabled on this server (add "
                              "`secom` to `pipeline.stages`).", type="not_found_error",
                              code="memory_not_enabled")
        _check_id(user, "user")
        if conversation is not None:
            _check_id(conversation, "conversation_id")
        return memory, api_key

    @app.get("/v1/memory/{user}")
    async def list_user_memory(request: Request, user: str) -> JSONResponse:
        store, key = admin(request, user, None)
        return JSONResponse(await store.list_memory(key, user))

    @app.get("/v1/memory/{user}/{conversation}")
    async def list_conversation(request: Request, user: str, conversation: str) -> JSONResponse:
        store, key = admin(request, user, conversation)
        return JSONResponse(await store.list_memory(key, user, conversation))

    @app.delete("/v1/memory/{user}")
    async def erase_user(request: Request, user: str) -> JSONResponse:
        store, key = admin(request, user, None)
        deleted = await store.erase_memory(key, user)
        return JSONResponse({"object": "memory.deleted", "user": user, "conversation_id": None,
                             "deleted": True, "exchanges_deleted": deleted})

    @app.delete("/v1/memory/{user}/{conversation}")
    async def erase_conversation(request: Request, user: str, conversation: str) -> JSONResponse:
        store, key = admin(request, user, conversation)
        deleted = await store.erase_memory(key, user, conversation)
        return JSONResponse({"object": "memory.deleted", "user": user,
                             "conversation_id": conversation, "deleted": True,
                             "exchanges_deleted": deleted})

