"""The database connection: engine set-up per dialect, schema migration, and work in worker threads.

The event loop never waits on the database. Every unit of database work is a plain function taking a
Session; `Database.read` and `Database.write` run it in a small thread pool inside one transaction.
pyodbc (SQL Server) has no asyncio driver, so threads give one code path for all three databases.

`Database.read_memo` answers a repeated read from memory while the store's change generation (changes)
says nothing it depends on has changed since.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import os
import sqlite3
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from bridge.store.changes import Generation, GenerationMemo, Unknown, generation_for

log = logging.getLogger(__name__)
T = TypeVar("T")

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
_WRITE = "pms_bridge_write"
MEMO_ENTRIES = 20_000  # memoised reads kept at most (a practice's patients opened today, many times over)


def make_engine(url: str, *, pool_size: int = 5, autocommit: bool = False) -> Engine:
    """An engine with the per-dialect settings the store relies on (`autocommit`: for a read pool on a
    server database, whose lookups then need no BEGIN and COMMIT round trips)."""
    if url.startswith("sqlite"):
        _create_private_file(url)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        _configure_sqlite(engine)
        return engine
    # No pre-ping: it is a round trip on every checkout, a quarter of a lookup on PostgreSQL. A connection
    # that died (a server restart) fails its first statement instead; `Database` then retries the unit of
    # work once on a fresh connection (SQLAlchemy's "optimistic" disconnect handling).
    options: dict[str, Any] = {"isolation_level": "AUTOCOMMIT"} if autocommit else {}
    return create_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_recycle=3600, **options)


def _create_private_file(url: str) -> None:
    """Create a new SQLite store's file readable and writable by the daemon's user only (0600, POSIX).

    SQLite creates a missing database file with the process's umask (0644 under the usual 022), so every
    local account could read the practice's patients; its -wal and -shm files take the database file's
    mode. An existing file keeps its mode (an admin may have chosen a group), and a file that cannot be
    created here (no folder) is left to SQLite, which reports it on connect. Windows files take the
    folder's ACL instead.
    """
    from sqlalchemy.engine import make_url

    database = make_url(url).database
    if os.name != "posix" or not database or database == ":memory:" or database.startswith("file:"):
        return
    with contextlib.suppress(OSError):
        os.close(os.open(database, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def _configure_sqlite(engine: Engine) -> None:
    """WAL, foreign keys, a busy timeout, and BEGIN IMMEDIATE for writing transactions.

    A deferred transaction that reads and then writes can fail at once with "database is locked" when
    another writer got there first (SQLite does not wait in that case); taking the write lock at BEGIN
    makes writers queue on the busy timeout instead.
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: sqlite3.Connection, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # SQLAlchemy's "begin" event issues BEGIN itself
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(_WRITE) else "BEGIN")


# The newest migration in bridge/store/migrations/versions (tests/test_store.py holds it to Alembic's head).
SCHEMA_HEAD = "0005"


def unreachable(url: str, exc: Exception) -> str:
    """One line for a store that cannot be reached: the url without its password, the driver's reason
    (its first line, without SQLAlchemy's "Background on this error" link) and what to check."""
    from sqlalchemy.engine import make_url

    reason = getattr(exc, "orig", None) or exc
    first = (str(reason).strip().splitlines() or [type(reason).__name__])[0]
    try:
        shown = make_url(url).render_as_string(hide_password=True)
    except Exception:  # an unparsable url: config validation names it; never echo a password here
        shown = "(the configured url)"
    return (
        f"[store] url = {shown}: the store cannot be reached ({first}): check that the database server"
        " runs and accepts this account, or for SQLite that the folder exists and may be written"
    )


def upgrade_schema(engine: Engine) -> None:
    """Bring the schema to the newest Alembic revision (creates it on an empty database).

    A database already at the newest revision, the usual case, is seen with one query: importing Alembic
    and reading its migration scripts costs every command about an eighth of a second of its start-up.
    """
    if current_revision(engine) == SCHEMA_HEAD:
        return
    from alembic import command

    with engine.begin() as conn:
        cfg = alembic_config(engine.url.render_as_string(hide_password=False))
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def current_revision(engine: Engine) -> str | None:
    """The Alembic revision the database is at; None for a database without our schema."""
    try:
        with engine.connect() as conn:
            revision = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    except DBAPIError:  # no such table: an empty database (or one the migration will report on)
        return None
    return str(revision) if revision is not None else None


def alembic_config(url: str) -> Any:
    """An Alembic config pointing at our migrations, usable from code and from tests."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def is_unique_violation(exc: IntegrityError) -> bool:
    """True for a duplicate key (the race the identity rules retry on), across dialects."""
    orig = exc.orig
    code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if code == "23505":  # PostgreSQL unique_violation
        return True
    message = str(orig).lower()
    return "unique" in message or "duplicate" in message or "2627" in message or "2601" in message


class Database:
    """Runs units of database work in worker threads, each in its own transaction."""

    def __init__(self, url: str, *, threads: int = 4, memo: bool = True) -> None:
        self.url = url
        self.engine = make_engine(url, pool_size=threads)
        self.dialect = self.engine.dialect.name
        # Reads on a server database use a pool of autocommit connections: no BEGIN and COMMIT round trips
        # around a lookup (each statement still sees a consistent snapshot), which halves a PMS lookup on
        # PostgreSQL. SQLite's BEGIN is local and costs nothing.
        self.read_engine = (
            self.engine if self.dialect == "sqlite" else make_engine(url, pool_size=threads, autocommit=True)
        )
        self._reader = sessionmaker(self.read_engine, expire_on_commit=False)
        self._writer = sessionmaker(self.engine.execution_options(**{_WRITE: True}), expire_on_commit=False)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="db")
        self.generation: Generation = generation_for(self.engine) if memo else Unknown()
        self._memo: GenerationMemo[Any] = GenerationMemo(self.generation, max_entries=MEMO_ENTRIES)

    def read_sync(self, work: Callable[[Session], T]) -> T:
        """Run `work` in a read transaction, in the calling thread (for CLI commands and tests)."""
        for attempt in range(2):
            try:
                # No explicit begin: the session begins lazily and rolls back on close (a read commits
                # nothing); on a server database the connection is in autocommit anyway.
                with self._reader() as session:
                    return work(session)
            except DBAPIError as exc:
                if not exc.connection_invalidated or attempt:
                    raise
                log.warning("database connection lost; retrying on a new one")
        raise AssertionError("unreachable")

    def write_sync(self, work: Callable[[Session], T], *, retries: int = 5, watched: bool = True) -> T:
        """Run `work` in a write transaction, retrying when SQLite reports a lock it could not wait out
        or the connection turns out to be dead (then nothing was committed).

        `watched=False` is for bookkeeping that touches none of changes.WATCHED_TABLES (audit, outbox,
        claims): it leaves memoised reads in place. Everything else moves the generation on.
        """
        for attempt in range(retries + 1):
            try:
                try:
                    with self._writer() as session, session.begin():
                        return work(session)
                finally:  # after the commit (or whatever became of it): a read now sees this write
                    if watched:
                        self.generation.bump()
            except DBAPIError as exc:
                locked = isinstance(exc, OperationalError) and "locked" in str(exc).lower()
                if not (locked or exc.connection_invalidated) or attempt == retries:
                    raise
                log.warning("database busy or reconnecting, retrying", extra={"attempt": attempt + 1})
        raise AssertionError("unreachable")

    async def read(self, work: Callable[[Session], T]) -> T:
        """Run `work` in a read transaction in a worker thread."""
        return await self._in_thread(self.read_sync, work)

    async def write(self, work: Callable[[Session], T], *, watched: bool = True) -> T:
        """Run `work` in a write transaction in a worker thread (`watched`: as in `write_sync`)."""
        if watched:
            return await self._in_thread(self.write_sync, work)
        return await self._in_thread(functools.partial(self.write_sync, watched=False), work)

    async def read_memo(self, key: Hashable, work: Callable[[Session], T]) -> T:
        """`read(work)`, answered from memory while the store's generation is the one `work` last ran
        under. `work` must read only changes.WATCHED_TABLES and return an immutable value; `key` names
        it with its parameters.
        """
        kept, generation = self._memo.get(key)
        if kept is not None:
            result: T = kept
            return result
        result = await self.read(work)
        self._memo.keep(key, generation, result)
        return result

    async def _in_thread(
        self, runner: Callable[[Callable[[Session], T]], T], work: Callable[[Session], T]
    ) -> T:
        ctx = contextvars.copy_context()  # keeps the request id in the worker's log lines
        call = functools.partial(ctx.run, runner, work)
        return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    def ping(self) -> None:
        """Raise if the database cannot be reached."""
        with self.read_engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def close(self) -> None:
        self.generation.close()
        self._pool.shutdown(wait=True)
        self.engine.dispose()
        self.read_engine.dispose()
