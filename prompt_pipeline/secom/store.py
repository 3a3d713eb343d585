"""Durable conversation memory: exchanges and memory units per (tenant, user, conversation).

`MemoryStore` is the repository interface; `SQLiteMemoryStore` is the default (one file under
the data dir). A Postgres implementation would follow the same interface.

Isolation: every read and write is keyed by a `ConversationKey`, whose tenant is a hash of
the API key; no method takes a unit or exchange id alone, so an id guessed from another
tenant reads nothing. Durability: WAL with `synchronous=FULL` (a committed write survives a
crash or kill of the gateway), idempotent exchange writes by request id (a retried write
stores nothing twice). Erasure: `secure_delete` overwrites deleted rows in the file, and the
WAL is checkpointed and truncated, so erased text is gone from disk, not only from queries.

Erasure wins over writes in flight: every erase counts up a per-scope erase counter (the
scope a hash of tenant, user and conversation, so no id is kept in clear after an erase). A
write carries the conversation's `generation` (the sum of its user's and its conversation's
counters) read when its request arrived; the write transaction checks it and stores nothing
(`ConversationErased`) if an erase came in between.
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
    # Erase counters: a write started before an erase must not store after it.
    """
    CREATE TABLE erasures (scope TEXT PRIMARY KEY, count INTEGER NOT NULL);
    """,
)


# User and conversation ids: printable, no slashes (they are path segments of the memory
# routes, so anything stored can also be listed and erased).
VALID_ID = re.compile(r"[^\x00-\x1f\x7f/\\]{1,256}")


class ConversationErased(Exception):
    """The conversation (or its user) was erased after this write's request arrived."""


def _scope(tenant: str, user: str, conversation: str | None) -> str:
    # conversation None (the whole user) hashes apart from any conversation id: ids are
    # never empty (VALID_ID), and the user-wide scope uses the empty string.
    return hashlib.sha256(f"{tenant}\0{user}\0{conversation or ''}".encode()).hexdigest()


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


# One conversation's units of one kind, columns in MemoryUnit's field order (rows become
# MemoryUnit(*row)); callers append the ORDER BY they need.
SELECT_UNITS = ("SELECT kind, first_exchange, last_exchange, text, key_text, vector FROM units "
                "WHERE tenant=? AND user=? AND conversation=? AND kind=? ")


@dataclass(frozen=True)
class ConversationSummary:
    conversation: str
    exchanges: int
    first_at: float
    last_at: float


class MemoryStore(Protocol):
    def generation(self, key: ConversationKey) -> int: ...
    def add_exchange(self, key: ConversationKey, request_id: str, user_text: str,
                     assistant_text: str, vector: bytes | None = None,
                     generation: int | None = None) -> bool: ...
    def exchange_vectors(self, key: ConversationKey, since: int = 0) -> list[bytes | None]: ...
    def exchanges(self, key: ConversationKey, since: int = 0) -> list[Exchange]: ...
    def replace_units(self, key: ConversationKey, kind: str, units: Sequence[MemoryUnit],
                      from_exchange: int = 0, generation: int | None = None) -> None: ...
    def units(self, key: ConversationKey, kind: str) -> list[MemoryUnit]: ...
    def last_unit(self, key: ConversationKey, kind: str) -> MemoryUnit | None: ...
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

    def generation(self, key: ConversationKey) -> int:
        """How many erases reached this conversation (its own and its user's)."""
        with self._lock:
            return self._generation(self._db, key)

    @staticmethod
    def _generation(db: sqlite3.Connection, key: ConversationKey) -> int:
        return db.execute("SELECT COALESCE(SUM(count), 0) FROM erasures WHERE scope IN (?, ?)",
                          (_scope(key.tenant, key.user, None),
                           _scope(key.tenant, key.user, key.conversation))).fetchone()[0]

    def _check_generation(self, db: sqlite3.Connection, key: ConversationKey,
                          generation: int | None) -> None:
        if generation is not None and self._generation(db, key) != generation:
            raise ConversationErased(key.conversation)

    def add_exchange(self, key: ConversationKey, request_id: str, user_text: str,
                     assistant_text: str, vector: bytes | None = None,
                     generation: int | None = None) -> bool:
        """Append one exchange; False (nothing written) if this request id is stored;
        `ConversationErased` (nothing written) if ``generation`` is no longer current."""
        where = (key.tenant, key.user, key.conversation)
        with self._transaction() as db:
            self._check_generation(db, key, generation)
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

    def exchange_vectors(self, key: ConversationKey, since: int = 0) -> list[bytes | None]:
        """The stored embedding (None where none was stored) of each exchange from position
        ``since`` on, in order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT vector FROM exchanges WHERE tenant=? AND user=? AND conversation=? "
                "AND position >= ? ORDER BY position",
                (key.tenant, key.user, key.conversation, since)).fetchall()
        return [row[0] for row in rows]

    def exchanges(self, key: ConversationKey, since: int = 0) -> list[Exchange]:
        """The exchanges from position ``since`` on, in order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT position, request_id, user_text, assistant_text, created_at "
                "FROM exchanges WHERE tenant=? AND user=? AND conversation=? AND position >= ? "
                "ORDER BY position", (key.tenant, key.user, key.conversation, since)).fetchall()
        return [Exchange(*row) for row in rows]

    def replace_units(self, key: ConversationKey, kind: str, units: Sequence[MemoryUnit],
                      from_exchange: int = 0, generation: int | None = None) -> None:
        """The units starting at exchange ``from_exchange`` or later become ``units`` (the
        earlier ones stay); `ConversationErased` if ``generation`` is no longer current."""
        where = (key.tenant, key.user, key.conversation)
        with self._transaction() as db:
            self._check_generation(db, key, generation)
            db.execute("DELETE FROM units WHERE tenant=? AND user=? AND conversation=? "
                       "AND kind=? AND first_exchange >= ?", (*where, kind, from_exchange))
            db.executemany("INSERT INTO units VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", [
                (*where, kind, unit.first_exchange, unit.last_exchange, unit.text,
                 unit.key_text, unit.vector) for unit in units])

    def units(self, key: ConversationKey, kind: str) -> list[MemoryUnit]:
        with self._lock:
            rows = self._db.execute(
                SELECT_UNITS + "ORDER BY first_exchange",
                (key.tenant, key.user, key.conversation, kind)).fetchall()
        return [MemoryUnit(*row) for row in rows]

    def last_unit(self, key: ConversationKey, kind: str) -> MemoryUnit | None:
        """The conversation's latest unit (the open segment), or None."""
        with self._lock:
            row = self._db.execute(
                SELECT_UNITS + "ORDER BY first_exchange DESC LIMIT 1",
                (key.tenant, key.user, key.conversation, kind)).fetchone()
        return None if row is None else MemoryUnit(*row)

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
            # Positions are contiguous from 0 (appended one by one, erased all at once), so
            # the last one counts them through the primary key, without a scan.
            return self._db.execute(
                "SELECT COALESCE(MAX(position) + 1, 0) FROM exchanges WHERE tenant=? AND "
                "user=? AND conversation=?",
                (key.tenant, key.user, key.conversation)).fetchone()[0]

    def erase(self, tenant: str, user: str, conversation: str | None = None) -> int:
        """Delete a user's memory (one conversation or all); returns exchanges deleted. The
        text is overwritten in the file (secure_delete) and the WAL truncated. The erase
        counter moves in the same transaction, so a write still in flight cannot land after
        the erase."""
        where, params = "tenant=? AND user=?", [tenant, user]
        if conversation is not None:
            where, params = where + " AND conversation=?", [*params, conversation]
        with self._transaction() as db:
            deleted = db.execute(f"DELETE FROM exchanges WHERE {where}", params).rowcount
            db.execute(f"DELETE FROM units WHERE {where}", params)
            db.execute("INSERT INTO erasures VALUES (?, 1) ON CONFLICT (scope) DO UPDATE SET "
                       "count = count + 1", (_scope(tenant, user, conversation),))
        with self._lock:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return deleted

    def close(self) -> None:
        with self._lock:
            self._db.close()
