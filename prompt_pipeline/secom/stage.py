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

from prompt_pipeline.messages import user_text, with_system_note
from prompt_pipeline.secom.memory import ConversationMemory
from prompt_pipeline.secom.retrieval import render_context
from prompt_pipeline.secom.store import ConversationKey
from prompt_pipeline.stage import RequestContext, ResponseOutcome

CONVERSATION_NOTE = "conversation_id"
KEY_NOTE = "secom_key"


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
        query = user_text(request.messages, "latest")
        units = await asyncio.to_thread(self.memory.recall, key, query) if query else []
        context.notes["secom_units"] = len(units)
        if not units:
            return request
        return request.model_copy(
            update={"messages": with_system_note(request.messages, render_context(units))})

    async def after_response(self, request: Any, context: RequestContext,
                             outcome: ResponseOutcome) -> None:
        key = context.notes.get(KEY_NOTE)
        if key is None or not outcome.completed:
            return
        await asyncio.to_thread(self.memory.remember, key, context.request_id,
                                user_text(request.messages, "latest"), outcome.text)
