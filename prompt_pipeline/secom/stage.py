"""SeCom as a gateway stage: recall before the request, remember after the response.

Opt-in per request: the request names a `user`, and the gateway puts the conversation id
(header `x-tessera-conversation`) into ``context.notes["conversation_id"]``. Recall injects
the chosen units' original text into the system message; the user's messages stay as sent.
After a completed answer, the exchange (the latest user message and the answer) is stored
under the request id, so a retried request is stored once; a failed or cancelled answer
stores nothing. Both steps run SQLite and MiniLM in a worker thread, off the event loop.
"""

from __future__ import annotations

import asyncio
from typing import Any

from prompt_pipeline.secom.memory import ConversationMemory
from prompt_pipeline.secom.retrieval import render_context
from prompt_pipeline.secom.store import ConversationKey
from prompt_pipeline.stage import RequestContext, ResponseOutcome

CONVERSATION_NOTE = "conversation_id"
KEY_NOTE = "secom_key"


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: the text ones
        return " ".join(part.get("text", "") for part in content
                        if isinstance(part, dict) and part.get("type") == "text")
    return ""


def latest_user_text(messages: list[Any]) -> str:
    for message in reversed(messages):
        if message.role == "user":
            return _text(message.content)
    return ""


def with_memory(messages: list[Any], block: str) -> list[Any]:
    """The memory block appended to the first system message (one is created if none)."""
    for index, message in enumerate(messages):
        if message.role == "system":
            content = f"{_text(message.content)}\n\n{block}"
            return [*messages[:index], message.model_copy(update={"content": content}),
                    *messages[index + 1:]]
    return [type(messages[0])(role="system", content=block), *messages]


class SecomStage:
    name = "secom"

    def __init__(self, memory: ConversationMemory) -> None:
        self.memory = memory

    def conversation_key(self, request: Any, context: RequestContext) -> ConversationKey | None:
        user = getattr(request, "user", None)
        conversation = context.notes.get(CONVERSATION_NOTE)
        if context.route != "chat" or not user or not conversation:
            return None
        return ConversationKey.for_request(context.api_key, str(user), str(conversation))

    async def __call__(self, request: Any, context: RequestContext) -> Any:
        key = self.conversation_key(request, context)
        if key is None:
            return request
        context.notes[KEY_NOTE] = key
        query = latest_user_text(request.messages)
        units = await asyncio.to_thread(self.memory.recall, key, query) if query else []
        context.notes["secom_units"] = len(units)
        if not units:
            return request
        return request.model_copy(
            update={"messages": with_memory(request.messages, render_context(units))})

    async def after_response(self, request: Any, context: RequestContext,
                             outcome: ResponseOutcome) -> None:
        key = context.notes.get(KEY_NOTE)
        if key is None or not outcome.completed:
            return
        await asyncio.to_thread(self.memory.remember, key, context.request_id,
                                latest_user_text(request.messages), outcome.text)
