"""The SeCom stage: opt-in, injection into the system message, remember after completion."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from prompt_pipeline.secom.memory import ConversationMemory, RecallSettings
from prompt_pipeline.secom.stage import SecomStage
from prompt_pipeline.secom.store import SQLiteMemoryStore
from prompt_pipeline.stage import RequestContext, ResponseOutcome
from tests.unit.test_secom_memory import topic_embed


class Message(BaseModel):
    role: str
    content: str | list


class Chat(BaseModel):
    model: str = "m"
    messages: list[Message]
    user: str | None = None


def _stage(tmp_path: Path) -> SecomStage:
    store = SQLiteMemoryStore(tmp_path / "memory.sqlite3")
    return SecomStage(ConversationMemory(store, topic_embed, settings=RecallSettings(top_k=1)))


def _context(request_id: str, conversation: str | None = "c1") -> RequestContext:
    context = RequestContext(request_id, "chat", api_key="sk")
    if conversation:
        context.notes["conversation_id"] = conversation
    return context


async def test_a_request_without_user_or_conversation_is_untouched(tmp_path: Path) -> None:
    stage = _stage(tmp_path)
    request = Chat(messages=[Message(role="user", content="hi")])
    assert await stage(request, _context("r1")) is request
    request = Chat(messages=[Message(role="user", content="hi")], user="alice")
    assert await stage(request, _context("r2", conversation=None)) is request


async def test_answers_are_remembered_and_recalled_into_the_system_message(
    tmp_path: Path,
) -> None:
    stage = _stage(tmp_path)
    first = Chat(messages=[Message(role="user", content="The dog is called Biscuit.")],
                 user="alice")
    context = _context("r1")
    await stage(first, context)
    await stage.after_response(first, context, ResponseOutcome("Cute!", completed=True))
    failed = _context("r2")
    flight = Chat(messages=[Message(role="user", content="I booked a flight.")], user="alice")
    await stage(flight, failed)
    await stage.after_response(flight, failed, ResponseOutcome("", completed=False))
    question = Chat(messages=[Message(role="system", content="Be brief."),
                              Message(role="user", content="What is my dog called?")],
                    user="alice")
    rewritten = await stage(question, _context("r3"))
    system = rewritten.messages[0].content
    assert system.startswith("Be brief.") and "Biscuit" in system
    assert "flight" not in system  # the failed answer was not stored
    assert rewritten.messages[1] == question.messages[1]  # the user's message as sent
    other_user = Chat(messages=question.messages, user="bob")
    assert (await stage(other_user, _context("r4"))).messages == question.messages
