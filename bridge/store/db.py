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
import hashlib
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from bridge.store.changes import Generation, GenerationMemo, Unknown, generation_for
from bridge.store.files import FileStore

log = logging.getLogger(__name__)
T = TypeVar("T")

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
_WRITE = "pms_bridge_write"
MEMO_ENTRIES = 20_000  # memoised reads kept at most (a practice's patients opened today, many times over)


def make_engine(
    url: str,
    *,
    pool_size: int = 5,
    autocommit: bool = False,
    create: bool = True,
    home: Path | None = None,
    guard: SqliteFileGuard | None = None,
) -> Engine:
    """An engine with the per-dialect settings the store relies on.

    `autocommit`: for a read pool on a server database, whose lookups then need no BEGIN and COMMIT
    round trips. `create`: whether a missing SQLite database file may be created; if not, a missing one
    raises DatabaseFileMissing here (its remedy names `home`, see there) and every new connection checks
    again (`_check_connections`). `guard`: the file's SqliteFileGuard (Database's), which that same
    check before each new connection serves.
    """
    if url.startswith("sqlite"):
        if create:
            _create_private_file(url)
        else:
            missing = _absent_file(url)
            if missing is not None:
                raise DatabaseFileMissing(url, missing, home=home)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        path = sqlite_file(url)
        if path is not None and (guard is not None or not create):
            _check_connections(engine, path, create=create, guard=guard)
        _configure_sqlite(engine)
        return engine
    # No pre-ping: it is a round trip on every checkout, a quarter of a lookup on PostgreSQL. A connection
    # that died (a server restart) fails its first statement instead; `Database` then retries the unit of
    # work once on a fresh connection (SQLAlchemy's "optimistic" disconnect handling).
    options: dict[str, Any] = {"isolation_level": "AUTOCOMMIT"} if autocommit else {}
    engine = create_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_recycle=3600, **options)
    if engine.dialect.driver == "psycopg":
        _recognise_lost_connections(engine)
    return engine


# SQLSTATEs of a connection the server ended: class 08 (connection exception), and the server shutting
# down (admin_shutdown, crash_shutdown) or not accepting connections yet (cannot_connect_now)
_SHUTDOWN_STATES = ("57P01", "57P02", "57P03")


def lost_connection(exc: BaseException) -> bool:
    """Whether a psycopg error says the connection is gone: an OperationalError raised on the client's
    side (no SQLSTATE: "connection socket closed", "sending query failed: terminating connection ..."),
    or one whose SQLSTATE is a connection exception or a server shutdown."""
    import psycopg

    if not isinstance(exc, psycopg.OperationalError):
        return False
    state = exc.sqlstate
    return state is None or state.startswith("08") or state in _SHUTDOWN_STATES


def _recognise_lost_connections(engine: Engine) -> None:
    """Count every `lost_connection` error as a disconnect. SQLAlchemy's own check asks only whether
    psycopg has marked the connection closed or broken, which it does not always do before it raises
    (a CI run saw "connection socket closed" and then a failed ROLLBACK on a connection the server had
    just terminated): the error then escaped `Database`'s retry on a new connection."""

    @event.listens_for(engine, "handle_error")
    def lost(context: ExceptionContext) -> None:
        if not context.is_disconnect and lost_connection(context.original_exception):
            context.is_disconnect = True


def sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite url; None for another database, an in-memory or a `file:` URI one."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return None
    return None if database.startswith("file:") else Path(database)


def _absent_file(url: str) -> Path | None:
    """The database file of a SQLite url when it does not exist in a folder that does, else None (a
    server database, a file that is there, or a missing folder: then the store cannot be reached at
    all, as opening it says, and SQLite could create nothing there)."""
    path = sqlite_file(url)
    if path is None or path.exists() or not path.parent.is_dir():
        return None
    return path


class DatabaseFileMissing(Exception):
    """A SQLite store's database file does not exist in its folder, for an engine that may not create it
    (`make_engine(create=False)`): every command but `init` and `serve`. Its text is one line that names
    the file and what to do (commands print it and exit 2; doctor reports it).

    Those commands refuse instead of opening the path, which would make a new, empty store there: the
    file was most often moved or deleted, a daemon that had it open may still hold everything written
    before, and SQLite deletes the `-wal` and `-shm` left beside the path when it opens a new file there
    (see `_check_connections`). `home`: the folder whose `pms-bridge init --home` reads this config;
    None when init would write another config instead, and a new store is then made by starting the
    daemon on this one.
    """

    def __init__(self, url: str, path: Path, *, home: Path | None) -> None:
        new_store = f"run 'pms-bridge init --home {home}'" if home is not None else "start the daemon"
        super().__init__(
            f"[store] url = {shown_url(url)}: the database file {path} does not exist: put it back, or"
            " restore it from the backup (a daemon that had it open cannot save anything until then:"
            f' docs/operations.md, "Troubleshooting"); for a new store, {new_store}'
        )


def _create_private_file(url: str) -> None:
    """Create a new SQLite store's file readable and writable by the daemon's user only (0600, POSIX).

    SQLite creates a missing database file with the process's umask (0644 under the usual 022), so every
    local account could read the practice's patients; its -wal and -shm files take the database file's
    mode. An existing file keeps its mode (an admin may have chosen a group), and a file that cannot be
    created here (no folder) is left to SQLite, which reports it on connect. Windows files take the
    folder's ACL instead.
    """
    database = sqlite_file(url)
    if os.name != "posix" or database is None:
        return
    with contextlib.suppress(OSError):
        os.close(os.open(database, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


class StoreFileLost(Exception):
    """The SQLite store's database file is no longer at its path: deleted, or replaced by another file,
    while this process had it open. Its text names the path and what to do; every protocol answers with
    it in its own way (REST and OPP web: a 503 problem; VDDS: ERRORLEVEL=1; launches: an exit code)."""

    def __init__(self, path: Path, what: str) -> None:
        super().__init__(
            f"the store's database file {path} {what} while the daemon had it open: nothing can be saved"
            ' until it is restored and the daemon restarted (docs/operations.md, "Troubleshooting")'
        )
        self.brief = f"database file {path} {what}"  # for answers with little room (VDDS ERRORTEXT)


class SqliteFileGuard:
    """Whether the path of a SQLite store still names the file this process opened.

    SQLite keeps working on an open file that was deleted or replaced (on POSIX; Windows normally refuses to
    delete an open database): every write lands in a file nobody opens again, so it is lost at the next
    start. The guard remembers the file's device and inode when the first connection opens it and
    compares them with one stat of the path: before every write transaction (refused then), on every
    health check, every few seconds from the daemon, and before a new connection is opened (which would
    create an empty file at the path, or open the replacement). A stat of a cached local path costs a
    few microseconds; a SQLite write transaction costs hundreds of them.

    Reads take the last finding without a stat of their own: once the loss is known they are refused
    too. Their audit entries could no longer be written, and beside a replaced file the old file's
    `-wal` and `-shm` are shared with whatever opens the new one, which can make the old connections
    read "database disk image is malformed" or wrong rows. The change is logged once, as an error; if
    the same file comes back (moved away and back), once as info, and the store is used again.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._opened: tuple[int, int] | None = None
        self._lost: str | None = None
        self._lock = threading.Lock()

    @property
    def has_opened(self) -> bool:
        """Whether a connection has opened the file (and so which file this process works on is known)."""
        return self._opened is not None

    def opened(self) -> None:
        """A connection has opened the file: the first one tells which file this process works on."""
        if self._opened is None:
            with contextlib.suppress(OSError):
                found = os.stat(self.path)
                self._opened = (found.st_dev, found.st_ino)

    def problem(self) -> str | None:
        """What happened to the file ("was deleted"), or None while the path names the file that was
        opened (or none has been opened yet)."""
        if self._opened is None:
            return None
        try:
            found = os.stat(self.path)
        except (FileNotFoundError, NotADirectoryError):
            return "was deleted"
        if (found.st_dev, found.st_ino) == self._opened:
            return None
        return "was replaced by another file"

    def refuse_if_lost(self) -> None:
        """Raise StoreFileLost if the last check found the file lost (no stat: for every read)."""
        what = self._lost
        if what is not None:
            raise StoreFileLost(self.path, what)

    def check(self) -> None:
        """Raise StoreFileLost unless the path still names the opened file; log the change once."""
        problem = self.problem()
        with self._lock:
            before, self._lost = self._lost, problem
        if problem is None:
            if before is not None:
                log.info(
                    "store database file back; store requests served again", extra={"path": str(self.path)}
                )
            return
        lost = StoreFileLost(self.path, problem)
        if before is None:
            log.error(
                "store database file lost; store requests refused",
                extra={"path": str(self.path), "error": str(lost)},
            )
        raise lost


def _check_connections(engine: Engine, path: Path, *, create: bool, guard: SqliteFileGuard | None) -> None:
    """One check, one stat of the path, before SQLite opens each new connection:

    - once a connection has opened the file, the guard's (`SqliteFileGuard.check`): none on a lost file,
      where SQLite would create an empty one at the path, or open the file that replaced it;
    - before that, for an engine that may not create the file, that it exists: refused as SQLite refuses
      a file it cannot open. SQLite would create it, empty, and then delete a `-wal` and `-shm` left
      beside it as an empty database's: the latest changes of the store that was there, which its
      recovery needs (docs/operations.md, "Troubleshooting"). `make_engine` refuses a missing file
      before any connection (DatabaseFileMissing); this covers a file that goes in between. A DBAPI
      error, so that it reaches every caller as the store being unreachable.

    The first connection tells the guard which file it opened.
    """

    @event.listens_for(engine, "do_connect")
    def _before_connect(_dialect: Any, _record: Any, _cargs: Any, _cparams: Any) -> None:
        if guard is not None and guard.has_opened:
            guard.check()
        elif not create and not path.exists():
            raise sqlite3.OperationalError(f"the database file {path} does not exist")

    if guard is not None:

        @event.listens_for(engine, "connect")
        def _on_connect(_dbapi_conn: Any, _record: Any) -> None:
            guard.opened()


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
# Revisions are numbered 0001, 0002, ... without gaps, so a number above it is a newer release's.
SCHEMA_HEAD = "0005"

# Taken around a migration (PostgreSQL: a transaction-level advisory lock; the number is "pmsbridg" in ASCII).
MIGRATION_LOCK_KEY = 0x706D_7362_7269_6467
MSSQL_MIGRATION_LOCK = (
    "DECLARE @granted int; EXEC @granted = sp_getapplock @Resource = 'pms-bridge schema',"
    " @LockMode = 'Exclusive', @LockOwner = 'Transaction', @LockTimeout = -1;"
    " IF @granted < 0 THROW 50000, 'the schema migration lock was not granted', 1;"
)
# Where migration 0004 leaves how many patients' chart numbers it repaired (Alembic config attributes).
CHARTS_REPAIRED = "charts_repaired"


class SchemaError(Exception):
    """The store's schema cannot be used by this release, or bringing it up to date failed: one line that
    says which and what to do (commands print it and exit 2)."""


@dataclass(frozen=True)
class SchemaUpgrade:
    """What `upgrade_schema` did: the revision it found (None: an empty database, now created), the one
    it left, and how many patients migration 0004 repaired (several current chart numbers; None when
    0004 did not run)."""

    from_revision: str | None
    to_revision: str
    charts_repaired: int | None = None

    def describe(self) -> str:
        """One line for the log and for `pms-bridge init`."""
        if self.from_revision is None:
            return f"schema created at {self.to_revision}"
        line = f"schema upgraded {self.from_revision} -> {self.to_revision}"
        if self.charts_repaired:
            line += (
                f"; migration 0004 repaired the chart numbers of {self.charts_repaired} patient(s) that had"
                " several current ones (the newest kept current, the others retired)"
            )
        return line


def shown_url(url: str) -> str:
    """The store's url as messages name it: without its password."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # an unparsable url: config validation names it; never echo a password here
        return "(the configured url)"


def unreachable(url: str, exc: Exception) -> str:
    """One line for a store that cannot be reached: the url without its password, the driver's reason
    (its first line, without SQLAlchemy's "Background on this error" link) and what to check."""
    return (
        f"[store] url = {shown_url(url)}: the store cannot be reached ({_first_line(exc)}): check that the"
        " database server runs and accepts this account, or for SQLite that the folder exists and may be"
        " written"
    )


def remains_of_store(url: str, images: Path) -> str | None:
    """One line when a SQLite store's database file does not exist but what is left of a store is there
    (its `-wal` or `-shm` file beside the path, images stored in `images`), or None.

    For `init` and `serve`, which make a missing file a new, empty store (a fresh home, a first start):
    made over such remains, it would answer every PMS as a working store that has lost every patient,
    and SQLite would delete the `-wal`, which holds the lost store's latest changes.
    """
    path = _absent_file(url)
    if path is None:
        return None
    left = [str(side) for side in (Path(f"{path}-wal"), Path(f"{path}-shm")) if side.exists()]
    if FileStore(images).holds_images():
        left.append(f"the images stored in {images}")
    if not left:
        return None
    return (
        f"[store] url = {shown_url(url)}: the database file {path} does not exist, but what is left of a"
        f" store is there ({', '.join(left)}): put the file back, or restore it from the backup"
        ' (docs/operations.md, "Troubleshooting"); for a new, empty store there, move them away first'
    )


def _first_line(exc: BaseException) -> str:
    """The driver's reason for a database error (its first line), or the exception's own."""
    reason = getattr(exc, "orig", None) or exc
    return (str(reason).strip().splitlines() or [type(reason).__name__])[0]


def unknown_schema(url: str, revision: str | None) -> str | None:
    """Why this release cannot touch a store at `revision` at all (a newer release migrated it, or the
    revision is none of ours), or None. Alembic would fail on it with a traceback ("Can't locate
    revision"), and this release's queries may not fit a newer schema."""
    number = int(revision) if revision is not None and revision.isascii() and revision.isdigit() else None
    if revision is None or (number is not None and 1 <= number <= int(SCHEMA_HEAD)):
        return None
    if number is not None and number > int(SCHEMA_HEAD):
        return (
            f"[store] url = {shown_url(url)}: the store was migrated by a newer release ({revision}); this"
            f" one knows up to {SCHEMA_HEAD}: run that release (or a newer one), or restore the backup taken"
            ' before the upgrade (docs/operations.md, "Upgrading")'
        )
    return (
        f"[store] url = {shown_url(url)}: the schema is at revision {revision!r}, which is not a pms-bridge"
        " revision (another program's database?): check [store] url"
    )


def schema_problem(url: str, revision: str | None, *, migrate: bool, home: Path | None) -> str | None:
    """Why this release cannot work on a store at `revision` as it is, or None (at the newest revision).

    `migrate`: whether starting a daemon with this config migrates the store (`[store] migrate`), which
    decides the remedy; `home`: the folder `pms-bridge init --home` reads this config from (it migrates
    too), None when init would not find it there.
    """
    if revision == SCHEMA_HEAD:
        return None
    unknown = unknown_schema(url, revision)
    if unknown is not None:
        return unknown
    found = f"the schema is at {revision}" if revision else "the store has no schema yet"
    init = f" or run 'pms-bridge init --home {home}'" if home is not None else ""
    remedy = (
        f"start the daemon (it migrates the store at start: [store] migrate = yes){init}"
        if migrate
        else "[store] migrate = no: start one daemon with migrate = yes (PMS_BRIDGE__STORE__MIGRATE=yes for"
        f" that start){init}, then the others"
    )
    return f"[store] url = {shown_url(url)}: {found} and this release needs {SCHEMA_HEAD}: {remedy}"


def upgrade_schema(engine: Engine) -> SchemaUpgrade | None:
    """Bring the schema to the newest Alembic revision (creates it on an empty database); None when it
    was there already. Raises SchemaError (one line) for a schema of a newer release and for a migration
    that failed; a store that cannot be reached raises SQLAlchemy's error, as every other use does.

    A database already at the newest revision, the usual case, is seen with one query: importing Alembic
    and reading its migration scripts costs every command about an eighth of a second of its start-up.

    Several processes may start on one store at once (daemons sharing a PostgreSQL store, an import
    beside a starting daemon). Two migrations interleaving fail (PostgreSQL: "deadlock detected";
    SQLite: "database is locked"), so the migration holds a store-wide lock for its transaction and
    reads the revision again under it: the first process migrates, the others wait and then find the
    schema current. PostgreSQL: an advisory lock; SQL Server: an application lock; SQLite: BEGIN
    IMMEDIATE (its write lock, waited for up to the busy timeout, 30 s).
    """
    revision = current_revision(engine)
    if revision == SCHEMA_HEAD:
        return None
    url = engine.url.render_as_string(hide_password=False)
    unknown = unknown_schema(url, revision)
    if unknown is not None:
        raise SchemaError(unknown)
    from alembic import command
    from alembic.runtime.migration import MigrationContext

    cfg = alembic_config(url)
    try:
        with engine.execution_options(**{_WRITE: True}).begin() as conn:
            if engine.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
            elif engine.dialect.name == "mssql":
                conn.exec_driver_sql(MSSQL_MIGRATION_LOCK)
            revision = MigrationContext.configure(conn).get_current_revision()
            if revision == SCHEMA_HEAD:  # another process migrated it while this one waited
                return None
            unknown = unknown_schema(url, revision)
            if unknown is not None:
                raise SchemaError(unknown)
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
    except SchemaError:
        raise
    except Exception as exc:
        raise SchemaError(
            f"[store] url = {shown_url(url)}: migrating the schema from {revision or 'nothing'} to"
            f" {SCHEMA_HEAD} failed ({_first_line(exc)}); the migration is one transaction, so the store"
            f" is left at {revision or 'nothing'}: fix the cause and start again, or restore the backup"
            ' taken before the upgrade (docs/operations.md, "Upgrading")'
        ) from exc
    upgrade = SchemaUpgrade(revision, SCHEMA_HEAD, cfg.attributes.get(CHARTS_REPAIRED))
    log.info(
        upgrade.describe(),
        extra={
            "from_revision": revision,
            "to_revision": SCHEMA_HEAD,
            **({} if upgrade.charts_repaired is None else {CHARTS_REPAIRED: upgrade.charts_repaired}),
        },
    )
    return upgrade


def current_revision(engine: Engine) -> str | None:
    """The Alembic revision the database is at; None for a database without our schema. A store that
    cannot be reached raises (it is not an empty one)."""
    with engine.connect() as conn:
        try:
            revision = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
        except DBAPIError as exc:  # no such table: an empty database
            if exc.connection_invalidated:
                raise
            return None
    return str(revision) if revision is not None else None


def alembic_config(url: str) -> Any:
    """An Alembic config pointing at our migrations, usable from code and from tests."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


# The first key of the transaction-level advisory locks `lock_key` takes on PostgreSQL ("pmsb" in ASCII);
# two-key locks never meet the one-key migration lock.
KEY_LOCK_SPACE = 0x706D_7362


def lock_key(session: Session, name: str) -> None:
    """Wait until no other transaction holds `name`, then hold it until this transaction ends.

    For checks that no unique key can back (two rows with different keys that must not both be made):
    PostgreSQL takes an advisory lock on a 32-bit hash of `name` (an unrelated name with the same hash
    waits too, never wrongly passes), SQL Server an application lock on the name. SQLite lets one writer
    in at a time (BEGIN IMMEDIATE), so there is nothing to take."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        digest = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big", signed=True)
        session.execute(
            text("SELECT pg_advisory_xact_lock(:space, :key)"), {"space": KEY_LOCK_SPACE, "key": digest}
        )
    elif dialect == "mssql":
        session.execute(
            text(
                "DECLARE @granted int; EXEC @granted = sp_getapplock @Resource = :name,"
                " @LockMode = 'Exclusive', @LockOwner = 'Transaction', @LockTimeout = -1;"
                " IF @granted < 0 THROW 50000, 'a lock of the store was not granted', 1;"
            ),
            {"name": hashlib.sha256(name.encode()).hexdigest()},
        )


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

    def __init__(
        self, url: str, *, threads: int = 4, memo: bool = True, create: bool = True, home: Path | None = None
    ) -> None:
        """`create`: whether a missing SQLite database file may be made a new store (the daemon, where
        `remains_of_store` allows it) or is refused with DatabaseFileMissing (every other command; `home`
        for its remedy, see there)."""
        self.url = url
        path = sqlite_file(url)
        # SQLite only: a server database has no file here to lose
        self.file = SqliteFileGuard(path) if path is not None else None
        self.engine = make_engine(url, pool_size=threads, create=create, home=home, guard=self.file)
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
        """Run `work` in a read transaction, in the calling thread (for CLI commands and tests); refused
        while a SQLite store's file is known to be lost (SqliteFileGuard)."""
        if self.file is not None:
            self.file.refuse_if_lost()
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
        claims): it leaves memoised reads in place. Everything else moves the generation on. A SQLite
        store whose file is gone refuses the write (StoreFileLost) rather than lose it.
        """
        if self.file is not None:
            self.file.check()
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
        if self.file is not None:
            self.file.refuse_if_lost()
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
        """Raise if the database cannot be reached, or (SQLite) its file is no longer at its path."""
        if self.file is not None:
            self.file.check()
        with self.read_engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def close(self) -> None:
        self.generation.close()
        self._pool.shutdown(wait=True)
        self.engine.dispose()
        self.read_engine.dispose()
