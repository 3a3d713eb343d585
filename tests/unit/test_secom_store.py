"""SeCom's SQLite memory store: isolation, idempotent writes, concurrency, real erasure."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from prompt_pipeline.secom.store import (
    MIGRATIONS,
    ConversationKey,
    MemoryUnit,
    SQLiteMemoryStore,
    tenant_of,
)


@pytest.fixture
def store(tmp_path: Path) -> SQLiteMemoryStore:
    db = SQLiteMemoryStore(tmp_path / "memory.sqlite3")
    yield db
    db.close()


ALICE = ConversationKey.for_request("sk-alice", "alice", "trip")


def test_exchanges_come_back_in_order(store: SQLiteMemoryStore) -> None:
    for number in range(3):
        assert store.add_exchange(ALICE, f"req-{number}", f"question {number}", f"answer {number}")
    assert [e.user_text for e in store.exchanges(ALICE)] == ["question 0", "question 1",
                                                             "question 2"]
    assert [e.position for e in store.exchanges(ALICE)] == [0, 1, 2]


def test_a_retried_write_is_stored_once(store: SQLiteMemoryStore) -> None:
    assert store.add_exchange(ALICE, "req-1", "hello", "hi")
    assert not store.add_exchange(ALICE, "req-1", "hello", "hi")
    assert len(store.exchanges(ALICE)) == 1


def test_tenants_users_and_conversations_never_see_each_other(store: SQLiteMemoryStore) -> None:
    store.add_exchange(ALICE, "req-1", "my passport number is X123", "noted")
    other_key = ConversationKey.for_request("sk-mallory", "alice", "trip")  # guessed ids
    other_user = ConversationKey.for_request("sk-alice", "bob", "trip")
    other_conv = ConversationKey.for_request("sk-alice", "alice", "work")
    for key in (other_key, other_user, other_conv):
        assert store.exchanges(key) == []
    store.replace_units(ALICE, "turn", [MemoryUnit("turn", 0, 0, "secret", "secret")])
    assert store.units(other_key, "turn") == []
    assert store.conversations(tenant_of("sk-mallory"), "alice") == []
    assert store.conversations(tenant_of("sk-alice"), "alice") == ["trip"]


def test_the_api_key_itself_is_never_stored(store: SQLiteMemoryStore) -> None:
    store.add_exchange(ALICE, "req-1", "hello", "hi")
    assert b"sk-alice" not in store.path.read_bytes()


def test_concurrent_writers_on_one_conversation_lose_nothing(store: SQLiteMemoryStore) -> None:
    def write(worker: int) -> None:
        for number in range(25):
            store.add_exchange(ALICE, f"w{worker}-{number}", "q", "a")

    threads = [threading.Thread(target=write, args=(worker,)) for worker in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    positions = [exchange.position for exchange in store.exchanges(ALICE)]
    assert positions == list(range(100))


def test_erasure_removes_the_text_from_the_file(store: SQLiteMemoryStore) -> None:
    marker = "ZEBRA-PLATYPUS-4471"
    store.add_exchange(ALICE, "req-1", f"my code word is {marker}", f"ok, {marker}")
    store.replace_units(ALICE, "turn", [MemoryUnit("turn", 0, 0, marker, marker)])
    keep = ConversationKey.for_request("sk-alice", "alice", "work")
    store.add_exchange(keep, "req-2", "unrelated", "fine")
    assert store.erase(ALICE.tenant, "alice", "trip") == 1
    assert store.exchanges(ALICE) == [] and store.units(ALICE, "turn") == []
    assert len(store.exchanges(keep)) == 1
    on_disk = b"".join(path.read_bytes() for path in store.path.parent.iterdir())
    assert marker.encode() not in on_disk  # the file and its WAL, byte for byte


def test_schema_migrations_run_once(tmp_path: Path) -> None:
    path = tmp_path / "memory.sqlite3"
    SQLiteMemoryStore(path).close()
    reopened = SQLiteMemoryStore(path)
    assert reopened.schema_version == len(MIGRATIONS)
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    reopened.close()


def test_a_version_1_file_is_migrated_with_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "memory.sqlite3"
    with sqlite3.connect(path) as db:  # a file as the first shipped schema wrote it
        db.executescript(MIGRATIONS[0] + "; PRAGMA user_version=1;")
        db.execute("INSERT INTO exchanges VALUES (?, ?, ?, 0, 'r0', 'hello', 'hi', 1.0)",
                   (ALICE.tenant, ALICE.user, ALICE.conversation))
    store = SQLiteMemoryStore(path)
    assert store.schema_version == len(MIGRATIONS)
    assert [e.user_text for e in store.exchanges(ALICE)] == ["hello"]
    assert store.exchange_vectors(ALICE) == [None]  # filled in by the next rebuild
    store.close()
