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


class CountingEmbed:
    """topic_embed, counting the texts it was asked to embed."""

    def __init__(self) -> None:
        self.texts = 0

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.texts += len(texts)
        return topic_embed(texts)


def test_a_write_embeds_only_the_new_exchange_and_changed_units(tmp_path: Path) -> None:
    store = SQLiteMemoryStore(tmp_path / "memory.sqlite3")
    embed = CountingEmbed()
    memory = ConversationMemory(store, embed)
    key = ConversationKey.for_request(None, "u", "long")
    topics = ["dog puppy", "flight lisbon", "cake chocolate"]
    for number in range(300):  # a long conversation: 30 runs of 10 exchanges per topic
        before = embed.texts
        memory.remember(key, f"r{number}", f"{topics[number // 10 % 3]} {number}", "ok")
        # The new exchange, plus the units whose text changed (normally the last one; a
        # boundary that moves re-embeds its neighbours): never the whole conversation.
        assert embed.texts - before <= 4, (number, embed.texts - before)
    units = store.units(key, "segment")
    assert units[0].first_exchange == 0 and units[-1].last_exchange == 299
    assert all(a.last_exchange + 1 == b.first_exchange
               for a, b in zip(units, units[1:], strict=False))
    before = embed.texts
    reopened = ConversationMemory(SQLiteMemoryStore(tmp_path / "memory.sqlite3"), embed)
    assert "dog" in reopened.recall(key, "dog puppy")[0].text
    assert embed.texts - before == 1  # a restart embeds the query only: vectors are stored


def test_concurrent_writers_on_one_conversation_leave_consistent_units(tmp_path: Path) -> None:
    import threading

    store = SQLiteMemoryStore(tmp_path / "memory.sqlite3")
    memory = ConversationMemory(store, topic_embed)
    key = ConversationKey.for_request(None, "u", "shared")

    def writer(name: str) -> None:
        for number in range(15):
            memory.remember(key, f"{name}-{number}", f"dog flight cake {name} {number}", "ok")
            memory.remember(key, f"{name}-{number}", "a retry of the same request", "ok")

    threads = [threading.Thread(target=writer, args=(f"w{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    exchanges = store.exchanges(key)
    assert len(exchanges) == 60 and len({e.request_id for e in exchanges}) == 60
    units = store.units(key, "segment")
    covered = [i for unit in units for i in range(unit.first_exchange, unit.last_exchange + 1)]
    assert covered == list(range(60))  # the last rebuild saw every exchange


def test_units_left_stale_by_a_crash_are_rebuilt_on_recall(tmp_path: Path) -> None:
    store = SQLiteMemoryStore(tmp_path / "memory.sqlite3")
    key = ConversationKey.for_request(None, "u", "c")
    memory = ConversationMemory(store, topic_embed)
    memory.remember(key, "r0", "We adopted a puppy.", "Lovely!")
    # The process died after storing this exchange, before rebuilding the units.
    store.add_exchange(key, "r1", "The dog is called Biscuit.", "Cute.")
    fresh = ConversationMemory(store, topic_embed)
    units = fresh.recall(key, "What is the dog called?")
    assert any("Biscuit" in unit.text for unit in units)
    assert store.units(key, "segment")[-1].last_exchange == 1


def test_a_huge_exchange_is_stored_but_never_injected_over_the_budget(tmp_path: Path) -> None:
    store = SQLiteMemoryStore(tmp_path / "memory.sqlite3")
    memory = ConversationMemory(store, topic_embed,
                                settings=RecallSettings(granularity="turn", token_budget=100))
    key = ConversationKey.for_request(None, "u", "c")
    memory.remember(key, "big", "dog " * 200_000, "ok")  # ~800 KB of one message
    memory.remember(key, "small", "The dog is called Biscuit.", "ok")
    units = memory.recall(key, "dog")
    assert [unit.first_exchange for unit in units] == [1]
    assert len(store.exchanges(key)[0].user_text) == 800_000


class CountingStore(SQLiteMemoryStore):
    """The real store, counting the exchange rows each read returns."""

    rows_read = 0

    def exchanges(self, key, since=0):  # noqa: ANN001, ANN201 - the store's signature
        found = super().exchanges(key, since)
        self.rows_read += len(found)
        return found


def test_a_write_reads_only_the_open_tail_not_the_conversation(tmp_path: Path) -> None:
    store = CountingStore(tmp_path / "memory.sqlite3")
    memory = ConversationMemory(store, topic_embed)
    key = ConversationKey.for_request(None, "u", "long")
    topics = ["dog puppy", "flight lisbon", "cake chocolate"]
    most = 0
    for number in range(400):  # one topic for 50 exchanges: the cap closes segments too
        before = store.rows_read
        memory.remember(key, f"r{number}", f"{topics[number // 50 % 3]} {number}", "ok")
        most = max(most, store.rows_read - before)
    # The open segment (at most 24 exchanges), the new one and 2 rows of context, whatever
    # the conversation's length.
    assert most <= 24 + 1 + 2
    units = store.units(key, "segment")
    assert max(u.last_exchange - u.first_exchange + 1 for u in units) <= 24
    boundaries = {u.first_exchange for u in units}
    assert {50, 100, 150, 200, 250, 300, 350} <= boundaries  # every topic change found


def test_an_exchange_whose_segmentation_is_still_running_is_recalled(tmp_path: Path) -> None:
    # A write stores the exchange, then segments (the served model's call, seconds under
    # load), then writes the units. A next turn sent in between must see the exchange.
    store = SQLiteMemoryStore(tmp_path / "memory.sqlite3")
    memory = ConversationMemory(store, topic_embed, settings=RecallSettings(top_k=2))
    key = ConversationKey.for_request(None, "alice", "c1")
    assert memory.remember(key, "r0", "I booked a flight to Lisbon.", "Nice.")
    assert memory.recall(key, "When is the flight?")  # the index is now cached
    assert memory.store_exchange(key, "r1", "The dog is called Biscuit.", "Cute name.")
    recalled = memory.recall(key, "What is my dog called?")
    assert any("Biscuit" in unit.text for unit in recalled)
    # the write then completes: its units replace the provisional one, nothing twice
    tail = memory.open_tail(key)
    memory.apply_tail(key, tail, memory.segments_without_model(tail))
    texts = [unit.text for unit in memory.recall(key, "What is my dog called?")]
    assert sum("Biscuit" in text for text in texts) == 1
    store.close()
