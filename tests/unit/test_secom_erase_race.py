"""An erase wins over a memory write already in flight for the same conversation: the write
carries the erase generation read when its request arrived, and stores nothing (neither the
exchange nor units rebuilt from it, nor a cached index) if an erase came since."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest
from pydantic import BaseModel

from prompt_pipeline.secom.memory import ConversationMemory, RecallSettings
from prompt_pipeline.secom.segmenter import TailSegmenter
from prompt_pipeline.secom.stage import SecomStage
from prompt_pipeline.secom.store import ConversationErased, ConversationKey, SQLiteMemoryStore
from prompt_pipeline.stage import RequestContext, ResponseOutcome
from tests.unit.test_secom_memory import topic_embed

KEY = ConversationKey.for_request("sk", "alice", "c1")
MARKER = "passport-QX81773"


class Message(BaseModel):
    role: str
    content: str


class Chat(BaseModel):
    model: str = "m"
    messages: list[Message]
    user: str | None = None


def _rows(path: Path) -> tuple[int, int]:
    with sqlite3.connect(path) as db:
        return (db.execute("SELECT COUNT(*) FROM exchanges").fetchone()[0],
                db.execute("SELECT COUNT(*) FROM units").fetchone()[0])


def test_a_write_whose_request_came_before_an_erase_stores_nothing(tmp_path: Path) -> None:
    store = SQLiteMemoryStore(tmp_path / "m.sqlite3")
    memory = ConversationMemory(store, topic_embed)
    memory.remember(KEY, "r0", "We adopted a puppy.", "Lovely!")
    generation = memory.generation(KEY)  # the request arrives
    memory.erase(KEY.tenant, KEY.user, KEY.conversation)  # DELETE while it is answered
    with pytest.raises(ConversationErased):
        memory.remember(KEY, "r1", f"My {MARKER}.", "Noted.", generation)
    assert _rows(tmp_path / "m.sqlite3") == (0, 0)
    assert memory.recall(KEY, "passport") == []


def test_an_erase_between_storing_and_segmenting_leaves_no_units(tmp_path: Path) -> None:
    store = SQLiteMemoryStore(tmp_path / "m.sqlite3")
    memory = ConversationMemory(store, topic_embed)
    memory.remember(KEY, "r0", "We adopted a puppy.", "Lovely!")
    memory.recall(KEY, "puppy")  # the index is cached
    generation = memory.generation(KEY)
    assert memory.store_exchange(KEY, "r1", f"My {MARKER}.", "Noted.", generation)
    tail = memory.open_tail(KEY)  # read before the erase, holds the marker
    memory.erase(KEY.tenant, KEY.user, KEY.conversation)
    with pytest.raises(ConversationErased):
        memory.apply_tail(KEY, tail, [(0, len(tail.texts) - 1)], generation)
    assert _rows(tmp_path / "m.sqlite3") == (0, 0)
    assert memory.recall(KEY, "passport") == []


def test_a_user_wide_erase_also_wins(tmp_path: Path) -> None:
    store = SQLiteMemoryStore(tmp_path / "m.sqlite3")
    memory = ConversationMemory(store, topic_embed)
    generation = memory.generation(KEY)
    memory.erase(KEY.tenant, KEY.user)
    with pytest.raises(ConversationErased):
        memory.remember(KEY, "r1", f"My {MARKER}.", "Noted.", generation)
    # Other users' and later requests' writes go ahead.
    bob = ConversationKey.for_request("sk", "bob", "c1")
    assert memory.remember(bob, "r1", "hello", "hi", memory.generation(bob))
    assert memory.remember(KEY, "r2", "hello again", "hi", memory.generation(KEY))


async def test_through_the_stage_an_erase_during_the_model_call_wins(tmp_path: Path) -> None:
    """The write waits on the served model (segmentation); the user erases meanwhile."""
    path = tmp_path / "m.sqlite3"
    memory = ConversationMemory(SQLiteMemoryStore(path), topic_embed,
                                settings=RecallSettings(top_k=1),
                                segmenter=TailSegmenter(prompts=("incremental",)))
    stage = SecomStage(memory)
    asked, release = asyncio.Event(), asyncio.Event()

    async def model(name: str, prompt: str, max_tokens: int, timeout_s: float) -> str:
        asked.set()
        await release.wait()
        return "Yes"

    stage.use_model(model)
    for number, text in enumerate(("We adopted a puppy.", f"My dog's {MARKER}.")):
        request = Chat(messages=[Message(role="user", content=text)], user="alice")
        context = RequestContext(f"r{number}", "chat", api_key="sk",
                                 notes={"conversation_id": "c1"})
        await stage(request, context)
        write = asyncio.create_task(stage.after_response(
            request, context, ResponseOutcome("Noted.", completed=True)))
        if number == 0:
            await write  # one exchange: no model call
    await asyncio.wait_for(asked.wait(), 10)
    assert await stage.erase_memory("sk", "alice", "c1") == 2
    release.set()
    await write
    assert _rows(path) == (0, 0)
    assert stage.metrics.writes.labels("erased")._value.get() == 1
    question = Chat(messages=[Message(role="user", content="What is my dog's passport?")],
                    user="alice")
    context = RequestContext("r9", "chat", api_key="sk", notes={"conversation_id": "c1"})
    assert (await stage(question, context)).messages == question.messages  # nothing recalled
