"""SeCom's memory service end to end on a real SQLite file, with a deterministic embedder."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from prompt_pipeline.secom.memory import ConversationMemory, RecallSettings
from prompt_pipeline.secom.store import ConversationKey, SQLiteMemoryStore

TOPIC_WORDS = {"dog": 0, "puppy": 0, "biscuit": 0, "flight": 1, "lisbon": 1, "june": 1,
               "cake": 2, "chocolate": 2, "birthday": 2}


def topic_embed(texts: list[str]) -> np.ndarray:
    """3 topic dimensions + a little per-text noise: stands in for MiniLM in unit tests."""
    rows = []
    for text in texts:
        row = np.full(3, 0.05)
        for word in text.lower().replace(".", " ").replace("?", " ").split():
            if word in TOPIC_WORDS:
                row[TOPIC_WORDS[word]] += 1.0
        rows.append(row / np.linalg.norm(row))
    return np.asarray(rows)


def test_recall_returns_the_topic_segment_with_its_context(tmp_path: Path) -> None:
    store = SQLiteMemoryStore(tmp_path / "memory.sqlite3")
    memory = ConversationMemory(store, topic_embed, settings=RecallSettings(top_k=1))
    key = ConversationKey.for_request("sk", "alice", "c1")
    talk = [("We adopted a puppy.", "Lovely!"), ("The dog is called Biscuit.", "Cute name."),
            ("The puppy sleeps a lot.", "Normal."), ("I booked a flight to Lisbon.", "Nice."),
            ("The flight is in June.", "Great."), ("June flights are pricey.", "True."),
            ("Birthday cake ideas?", "Chocolate."), ("Chocolate cake it is.", "Yum.")]
    for number, (user, assistant) in enumerate(talk):
        assert memory.remember(key, f"r{number}", user, assistant)
    units = memory.recall(key, "What is my dog called?")
    assert len(units) == 1 and "Biscuit" in units[0].text and "adopted a puppy" in units[0].text
    assert memory.recall(ConversationKey.for_request("sk", "bob", "c1"), "dog") == []
    store.close()


def test_a_repeated_request_id_changes_nothing(tmp_path: Path) -> None:
    store = SQLiteMemoryStore(tmp_path / "memory.sqlite3")
    memory = ConversationMemory(store, topic_embed)
    key = ConversationKey.for_request(None, "u", "c")
    assert memory.remember(key, "same", "The dog is called Biscuit.", "ok")
    assert not memory.remember(key, "same", "The dog is called Biscuit.", "ok")
    assert len(store.exchanges(key)) == 1
    store.close()
