"""Which worker holds a stored Responses-API response (issue 19: Responses state across workers).

vLLM keeps a response (`store: true`, with `VLLM_ENABLE_RESPONSES_API_STORE=1`) in the memory
of the worker that produced it. A follow-up turn (`previous_response_id`), a
`GET /v1/responses/{id}` or a `POST .../cancel` only works on that worker, so the gateway
remembers, per response id, the worker that answered and the API key that asked:

- `ResponseOwners`: a bounded map (least recently used entries go first) filled from each
  answer (the JSON body's `id`, or the `response.created` event of a stream);
- `locate`: for an id the gateway never saw (it restarted, or another gateway replica
  answered), ask every healthy worker `GET /v1/responses/{id}` and take the one that has it;
- another API key than the creator's gets the same 404 as an unknown id, so ids cannot be
  probed across tenants. A located id has no recorded key: it answers anyone with the id
  (ids are random 128-bit strings; written in the README).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import httpx

from server.errors import OpenAIError

# vLLM's ids are "resp_" + 32 hex digits; OpenAI's are similar. Anything else never reaches
# a worker's URL path.
RESPONSE_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


@dataclass(frozen=True)
class Owner:
    worker_url: str
    key_digest: str | None  # sha256 of the creator's API key; None: unknown (located)


def key_digest(api_key: str | None) -> str:
    return hashlib.sha256((api_key or "").encode()).hexdigest()


class ResponseOwners:
    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self._owners: OrderedDict[str, Owner] = OrderedDict()

    def record(self, response_id: str, worker_url: str, digest: str | None) -> None:
        """``digest``: ``key_digest`` of the creator's API key, None when not known."""
        self._owners[response_id] = Owner(worker_url, digest)
        self._owners.move_to_end(response_id)
        while len(self._owners) > self.capacity:
            self._owners.popitem(last=False)

    def get(self, response_id: str) -> Owner | None:
        owner = self._owners.get(response_id)
        if owner is not None:
            self._owners.move_to_end(response_id)
        return owner

    def __len__(self) -> int:
        return len(self._owners)


def not_found(response_id: str, param: str | None) -> OpenAIError:
    return OpenAIError(404, f"No response found with id '{response_id}'.", param=param,
                       type="invalid_request_error", code="response_not_found")


def check_id(response_id: str, param: str | None) -> None:
    if not RESPONSE_ID.match(response_id):
        raise OpenAIError(400, "Invalid response id: letters, digits, '_' and '-' only, at "
                          "most 128 characters.", param=param, code="invalid_response_id")


async def locate(client: httpx.AsyncClient, worker_urls: Sequence[str],
                 response_id: str) -> str | None:
    """The first worker (by list order) whose store has ``response_id``, asked in parallel."""
    async def has(url: str) -> bool:
        try:
            reply = await client.get(f"{url}/v1/responses/{response_id}", timeout=5.0)
        except httpx.HTTPError:
            return False
        return reply.status_code == 200

    found = await asyncio.gather(*(has(url) for url in worker_urls))
    return next((url for url, ok in zip(worker_urls, found, strict=True) if ok), None)


def id_from_json(body: bytes) -> str | None:
    """The `id` of a Responses-API answer body (an object of type "response")."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if isinstance(payload, dict) and payload.get("object") == "response":
        response_id = payload.get("id")
        return response_id if isinstance(response_id, str) else None
    return None


def id_from_event(event: bytes) -> str | None:
    """The response id in a `response.created` server-sent event, else None."""
    for line in event.splitlines():
        if not line.startswith(b"data:"):
            continue
        try:
            data = json.loads(line[5:])
        except (ValueError, UnicodeDecodeError):
            return None
        if isinstance(data, dict) and data.get("type") == "response.created":
            response = data.get("response")
            if isinstance(response, dict) and isinstance(response.get("id"), str):
                return response["id"]
    return None


async def watch_stream_for_id(chunks: AsyncIterator[bytes],
                              on_id: Callable[[str], None]) -> AsyncIterator[bytes]:
    """Relay a Responses stream unchanged, calling ``on_id`` once with its response id.
    The relay yields whole events (server/sse.py), a chunk may hold several."""
    seen = False
    async for chunk in chunks:
        if not seen:
            for event in chunk.split(b"\n\n"):
                response_id = id_from_event(event)
                if response_id is not None:
                    on_id(response_id)
                    seen = True
                    break
        yield chunk
