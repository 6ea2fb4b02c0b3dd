"""The store's change generation: whether anything a PMS read depends on may have changed since then.

PMS launches are mostly the same few reads over and over (a receptionist's PMS opens the patient, a
browser-based PMS asks VIEW_DATA on every page). `Database.read_memo` keeps those read results for as long
as the generation it read them under is still current. The generation must change whenever any process
(this daemon, another daemon on the same store, a CLI `import`, a DBA's UPDATE) commits a change to the
tables the reads come from, or the memo would answer from the past. So it is kept by the database itself:

* Triggers (migration 0003) on WATCHED_TABLES: on SQLite each change adds one to the single row of
  `store_generation`, which a dedicated read-only connection reads in about 2 microseconds, synchronously:
  a commit is seen by the very next lookup. On PostgreSQL they `pg_notify` the channel below once per
  statement (no row every writer would queue on); a listener thread counts notifications. Until the
  listener has (re)connected the generation is unknown and nothing is memoised, and after a reconnect the
  count moves on, so a notification missed while disconnected cannot leave an old answer in place.
* A notification arrives a moment after its commit; this daemon's own writes therefore also move the
  generation (`bump`) before their answer is sent, so a PMS always reads what it has just written here.
* SQL Server has no listener here: the generation is always unknown and every read goes to the database.

Audit, outbox and claim bookkeeping are not watched: they are written all the time and no memoised read
depends on them.
"""

from __future__ import annotations

import itertools
import logging
import math
import sqlite3
import threading
import time
from collections.abc import Hashable
from typing import Any, Generic, Protocol, TypeVar

from sqlalchemy import Engine, create_engine
from sqlalchemy.pool import NullPool

log = logging.getLogger(__name__)
V = TypeVar("V")

# The tables memoised reads come from; migration 0003 made their triggers from a copy of this, and
# test_memo holds the schema's triggers to it.
WATCHED_TABLES = ("patients", "pms_links", "chart_aliases", "studies", "series", "images")
PG_CHANNEL = "pms_bridge_store"
RECONNECT_SECONDS = 2.0
LISTEN_POLL_SECONDS = 0.25  # how soon the listener notices a stop (close) between notifications


class Generation(Protocol):
    """A number that changes whenever a watched table may have changed; None when that is unknown."""

    def current(self) -> int | None: ...

    def bump(self) -> None: ...

    def close(self) -> None: ...


class Unknown:
    """No way to tell (SQL Server, or a store whose schema predates the triggers): nothing is memoised."""

    def current(self) -> int | None:
        return None

    def bump(self) -> None:
        pass

    def close(self) -> None:
        pass


class SqliteGeneration:
    """The `store_generation` row, read through its own read-only connection on the calling thread.

    A WAL reader never waits for a writer; `busy_timeout = 0` makes the rare case that would wait (a
    checkpoint in its exclusive phase) fail at once, which answers "unknown" instead of holding the event
    loop.
    """

    def __init__(self, path: str) -> None:
        self._path = path
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._local = 0

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(
                f"file:{self._path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA busy_timeout = 0")
            self._conn = conn
        return self._conn

    def current(self) -> int | None:
        with self._lock:
            try:
                row = self._connection().execute("SELECT value FROM store_generation WHERE id = 1").fetchone()
            except sqlite3.Error:
                return None  # busy, or a schema without the table: unknown, so read the database
        return None if row is None else (int(row[0]) << 64) + self._local

    def bump(self) -> None:
        with self._lock:
            self._local += 1

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


class PostgresGeneration:
    """Counts `pg_notify` messages on PG_CHANNEL, received by a listener thread on its own connection.

    Unknown (None) until the listener is listening, and again whenever its connection breaks; every
    (re)connect moves the count on, as notifications may have been missed meanwhile.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = create_engine(engine.url, poolclass=NullPool)
        self._counter = itertools.count(1)
        self._value = 0
        self._listening = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def current(self) -> int | None:
        if self._thread is None:
            self._start()
        return self._value if self._listening else None

    def bump(self) -> None:
        self._value = next(self._counter)

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._listen, name="store-changes", daemon=True)
                self._thread.start()

    def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                self._listen_once()
            except Exception as exc:  # any failure of the listening connection: unknown until back
                log.warning(
                    "store change listener lost its connection; memoised reads paused",
                    extra={"error": str(exc)},
                )
            self._listening = False
            self._stop.wait(RECONNECT_SECONDS)

    def _listen_once(self) -> None:
        raw = self._engine.raw_connection()
        try:
            conn: Any = raw.driver_connection
            if not hasattr(conn, "notifies"):
                log.info("the PostgreSQL driver cannot listen (psycopg 3 can); reads are not memoised")
                self._stop.set()
                return
            conn.autocommit = True
            conn.execute(f"LISTEN {PG_CHANNEL}")
            self.bump()  # whatever happened before we listened is behind this number
            self._listening = True
            while not self._stop.is_set():
                for _ in conn.notifies(timeout=LISTEN_POLL_SECONDS):
                    self.bump()
        finally:
            self._listening = False
            raw.close()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(LISTEN_POLL_SECONDS + 5)
        self._engine.dispose()


def generation_for(engine: Engine) -> Generation:
    """The generation source that fits the store's database."""
    if engine.dialect.name == "sqlite":
        database = engine.url.database
        if not database or database == ":memory:":
            return Unknown()
        return SqliteGeneration(database)
    if engine.dialect.name == "postgresql":
        return PostgresGeneration(engine)
    return Unknown()


class GenerationMemo(Generic[V]):
    """Values kept for one store generation: all of them go when it moves, each after `max_age` seconds.

    The pattern of every use: `value, generation = memo.get(key)`; on a miss compute the value and
    `memo.keep(key, generation, value)`, which keeps it only if the generation is still the one it was
    computed under (a change committed meanwhile may not be in it).
    """

    def __init__(self, generation: Generation, *, max_entries: int, max_age: float = math.inf) -> None:
        self.generation = generation
        self._max_entries = max_entries
        self._max_age = max_age
        self._kept: dict[Hashable, tuple[float, V]] = {}
        self._kept_generation: int | None = None

    def get(self, key: Hashable) -> tuple[V | None, int | None]:
        """The value kept for `key` (None if none) and the store generation now (None: unknown)."""
        now = self.generation.current()
        if now is None:
            return None, None
        if now != self._kept_generation:
            self._kept.clear()
            self._kept_generation = now
            return None, now
        found = self._kept.get(key)
        if found is None:
            return None, now
        at, value = found
        if time.monotonic() - at > self._max_age:
            del self._kept[key]
            return None, now
        return value, now

    def keep(self, key: Hashable, generation: int | None, value: V) -> None:
        if generation is None or generation != self._kept_generation:
            return
        if self.generation.current() != generation:
            return
        if len(self._kept) >= self._max_entries:
            self._kept.clear()
        self._kept[key] = (time.monotonic(), value)
