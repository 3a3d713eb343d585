"""Durable conversation memory: exchanges and memory units per (tenant, user, conversation).

`MemoryStore` is the repository interface; `SQLiteMemoryStore` is the default (one file under
the data dir). A Postgres implementation would follow the same interface.

Isolation: every read and write is keyed by a `ConversationKey`, whose tenant is a hash of
the API key; no method takes a unit or exchange id alone, so an id guessed from another
tenant reads nothing. Durability: WAL with `synchronous=FULL` (a committed write survives a
crash or kill of the gateway), idempotent exchange writes by request id (a retried write
stores nothing twice). Erasure: `secure_delete` overwrites deleted rows in the file, and the
WAL is checkpointed and truncated, so erased text is gone from disk, not only from queries.
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

# Each entry moves the schema one version up (PRAGMA user_version); never edit a shipped one.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE exchanges (
        tenant TEXT NOT NULL, user TEXT NOT NULL, conversation TEXT NOT NULL,
        position INTEGER NOT NULL, request_id TEXT NOT NULL,
        user_text TEXT NOT NULL, assistant_text TEXT NOT NULL, created_at REAL NOT NULL,
        PRIMARY KEY (tenant, user, conversation, position),
        UNIQUE (tenant, user, conversation, request_id)
    );
    CREATE TABLE units (
        tenant TEXT NOT NULL, user TEXT NOT NULL, conversation TEXT NOT NULL,
        kind TEXT NOT NULL, first_exchange INTEGER NOT NULL, last_exchange INTEGER NOT NULL,
        text TEXT NOT NULL, key_text TEXT NOT NULL,
        PRIMARY KEY (tenant, user, conversation, kind, first_exchange)
    );
    """,
    # Embeddings stored with the rows: a write embeds only the new exchange and the changed
    # units, and a restart rebuilds no index (re-embedding everything cost 170 s at 10,000
    # units, benchmarks/results/secom_overhead.json).
    """
    ALTER TABLE exchanges ADD COLUMN vector BLOB;
    ALTER TABLE units ADD COLUMN vector BLOB;
    """,
)


# User and conversation ids: printable, no slashes (they are path segments of the memory
# routes, so anything stored can also be listed and erased).
VALID_ID = re.compile(r"[^\x00-\x1f\x7f/\\]{1,256}")


def tenant_of(api_key: str | None) -> str:
    """A stable tenant id that never stores the key itself."""
    return hashlib.sha256((api_key or "").encode()).hexdigest()[:32]


@dataclass(frozen=True)
class ConversationKey:
    tenant: str
    user: str
    conversation: str

    @classmethod
    def for_request(cls, api_key: str | None, user: str, conversation: str) -> ConversationKey:
        return cls(tenant_of(api_key), user, conversation)


@dataclass(frozen=True)
class Exchange:
    position: int  # 0-based order within the conversation
    request_id: str
    user_text: str
    assistant_text: str
    created_at: float

    @property
    def text(self) -> str:
        return f"[user]: {self.user_text}\n[assistant]: {self.assistant_text}"


@dataclass(frozen=True)
class MemoryUnit:
    kind: str  # "segment", "turn" or "session"
    first_exchange: int
    last_exchange: int  # inclusive
    text: str  # what the generator receives
    key_text: str  # what retrieval indexes (compressed text, or the text itself)
    vector: bytes | None = field(default=None, compare=False, repr=False)  # float32 key emb.


@dataclass(frozen=True)
class ConversationSummary:
    conversation: str
    exchanges: int
    first_at: float
    last_at: float


class MemoryStore(Protocol):
    def add_exchange(self, key: ConversationKey, request_id: str, user_text: str,
                     assistant_text: str, vector: bytes | None = None) -> bool: ...
    def exchange_vectors(self, key: ConversationKey) -> list[bytes | None]: ...
    def exchanges(self, key: ConversationKey) -> list[Exchange]: ...
    def replace_units(self, key: ConversationKey, kind: str,
                      units: Sequence[MemoryUnit]) -> None: ...
    def units(self, key: ConversationKey, kind: str) -> list[MemoryUnit]: ...
    def conversations(self, tenant: str, user: str) -> list[str]: ...
    def conversation_summaries(self, tenant: str, user: str) -> list[ConversationSummary]: ...
    def exchange_count(self, key: ConversationKey) -> int: ...
    def erase(self, tenant: str, user: str, conversation: str | None = None) -> int: ...


class SQLiteMemoryStore:
    """`MemoryStore` on one SQLite file; safe to share between threads."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None,
                                   timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA secure_delete=ON")
        self._migrate()

    def _migrate(self) -> None:
        with self._transaction() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in filter(str.strip, script.split(";")):
                    db.execute(statement)
                db.execute(f"PRAGMA user_version={number}")

    @property
    def schema_version(self) -> int:
        return self._db.execute("PRAGMA user_version").fetchone()[0]

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def add_exchange(self, key: ConversationKey, request_id: str, user_text: str,
                     assistant_text: str, vector: bytes | None = None) -> bool:
        """Append one exchange; False (nothing written) if this request id is stored."""
        where = (key.tenant, key.user, key.conversation)
        with self._transaction() as db:
            if db.execute("SELECT 1 FROM exchanges WHERE tenant=? AND user=? AND conversation=?"
                          " AND request_id=?", (*where, request_id)).fetchone():
                return False
            position = db.execute("SELECT COALESCE(MAX(position) + 1, 0) FROM exchanges "
                                  "WHERE tenant=? AND user=? AND conversation=?",
                                  where).fetchone()[0]
            db.execute("INSERT INTO exchanges VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (*where, position, request_id, user_text, assistant_text, time.time(),
                        vector))
        return True

    def exchange_vectors(self, key: ConversationKey) -> list[bytes | None]:
        """Each exchange's stored embedding (None where none was stored), in order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT vector FROM exchanges WHERE tenant=? AND user=? AND conversation=? "
                "ORDER BY position", (key.tenant, key.user, key.conversation)).fetchall()
        return [row[0] for row in rows]

    def exchanges(self, key: ConversationKey) -> list[Exchange]:
        with self._lock:
            rows = self._db.execute(
                "SELECT position, request_id, user_text, assistant_text, created_at "
                "FROM exchanges WHERE tenant=? AND user=? AND conversation=? ORDER BY position",
                (key.tenant, key.user, key.conversation)).fetchall()
        return [Exchange(*row) for row in rows]

    def replace_units(self, key: ConversationKey, kind: str,
                      units: Sequence[MemoryUnit]) -> None:
        where = (key.tenant, key.user, key.conversation)
        with self._transaction() as db:
            db.execute("DELETE FROM units WHERE tenant=? AND user=? AND conversation=? "
                       "AND kind=?", (*where, kind))
            db.executemany("INSERT INTO units VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", [
                (*where, kind, unit.first_exchange, unit.last_exchange, unit.text,
                 unit.key_text, unit.vector) for unit in units])

    def units(self, key: ConversationKey, kind: str) -> list[MemoryUnit]:
        with self._lock:
            rows = self._db.execute(
                "SELECT kind, first_exchange, last_exchange, text, key_text, vector FROM units "
                "WHERE "
                "tenant=? AND user=? AND conversation=? AND kind=? ORDER BY first_exchange",
                (key.tenant, key.user, key.conversation, kind)).fetchall()
        return [MemoryUnit(*row) for row in rows]

    def conversations(self, tenant: str, user: str) -> list[str]:
        with self._lock:
            rows = self._db.execute("SELECT DISTINCT conversation FROM exchanges WHERE "
                                    "tenant=? AND user=? ORDER BY conversation",
                                    (tenant, user)).fetchall()
        return [row[0] for row in rows]

    def conversation_summaries(self, tenant: str, user: str) -> list[ConversationSummary]:
        with self._lock:
            rows = self._db.execute(
                "SELECT conversation, COUNT(*), MIN(created_at), MAX(created_at) FROM exchanges "
                "WHERE tenant=? AND user=? GROUP BY conversation ORDER BY conversation",
                (tenant, user)).fetchall()
        return [ConversationSummary(*row) for row in rows]

    def exchange_count(self, key: ConversationKey) -> int:
        with self._lock:
            return self._db.execute(
                "SELECT COUNT(*) FROM exchanges WHERE tenant=? AND user=? AND conversation=?",
                (key.tenant, key.user, key.conversation)).fetchone()[0]

    def erase(self, tenant: str, user: str, conversation: str | None = None) -> int:
        """Delete a user's memory (one conversation or all); returns exchanges deleted. The
        text is overwritten in the file (secure_delete) and the WAL truncated."""
        where, params = "tenant=? AND user=?", [tenant, user]
        if conversation is not None:
            where, params = where + " AND conversation=?", [*params, conversation]
        with self._transaction() as db:
            deleted = db.execute(f"DELETE FROM exchanges WHERE {where}", params).rowcount
            db.execute(f"DELETE FROM units WHERE {where}", params)
        with self._lock:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return deleted

    def close(self) -> None:
        with self._lock:
            self._db.close()
