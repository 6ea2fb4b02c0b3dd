"""The store on every dialect: migrations equal the models, every query compiles for SQL Server too."""

from __future__ import annotations

import inspect
import io
import subprocess
import sys
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import insert, select, text
from sqlalchemy.dialects import mssql, postgresql, sqlite
from sqlalchemy.exc import IntegrityError

from bridge.store import queries
from bridge.store.db import (
    SCHEMA_HEAD,
    alembic_config,
    current_revision,
    is_unique_violation,
    make_engine,
    upgrade_schema,
)
from bridge.store.files import STAGING, UPLOADS, FileStore
from bridge.store.models import Base, ChartAlias, Patient

SAMPLE_ARGS: dict[type, Any] = {
    str: "x",
    int: 1,
    bool: True,
    date: date(2020, 1, 2),
    datetime: datetime(2020, 1, 2, 3, 4, 5),
}


def sample_value(annotation: str, name: str) -> Any:
    if name in ("image_ids", "message_ids"):
        return [1, 2]
    if name == "after":
        return (datetime(2020, 1, 2), 5)
    if annotation == "list[str]":
        return ["x", "y"]
    for kind, value in SAMPLE_ARGS.items():
        if annotation.startswith(kind.__name__):
            return value
    raise AssertionError(f"no sample for {name}: {annotation}")


def every_statement() -> list[tuple[str, Any]]:
    """Each statement builder in bridge.store.queries, called with sample arguments (and all filters)."""
    built = []
    for name, fn in inspect.getmembers(queries, inspect.isfunction):
        if fn.__module__ != queries.__name__ or name.startswith("_"):
            continue
        params = inspect.signature(fn).parameters
        kwargs = {n: sample_value(str(p.annotation), n) for n, p in params.items()}
        statement = fn(**kwargs)
        built.append((name, statement.statement if isinstance(statement, queries.Bound) else statement))
    return built


@pytest.mark.parametrize(
    "dialect",
    # SQLAlchemy leaves the pyodbc and psycopg dialects' __init__ unannotated: an untyped call to it.
    [mssql.dialect(), postgresql.dialect(), sqlite.dialect()],  # type: ignore[no-untyped-call]
    ids=lambda d: d.name,
)
def test_every_query_compiles_for_every_dialect(dialect: Any) -> None:
    statements = every_statement()
    assert len(statements) >= 38  # the builders queries.py has: fewer means some were skipped
    for name, statement in statements:
        sql = str(statement.compile(dialect=dialect))
        assert sql.strip(), name
        if dialect.name == "mssql":
            assert "LIMIT" not in sql, f"{name}: SQL Server has no LIMIT: {sql}"


def test_sql_server_migrations_render_offline() -> None:
    cfg = alembic_config("mssql+pyodbc://user:pw@dsn")
    buffer = io.StringIO()
    cfg.output_buffer = buffer
    command.upgrade(cfg, "head", sql=True)
    script = buffer.getvalue()
    assert "CREATE TABLE patients" in script and "IDENTITY" in script
    assert "NVARCHAR(120)" in script  # names keep umlauts on SQL Server
    assert (
        "CREATE UNIQUE INDEX uq_chart_aliases_current ON chart_aliases (chart_number) "
        "WHERE retired_at IS NULL" in script
    )


def test_migrations_equal_the_models(store_url: str) -> None:
    engine = make_engine(store_url)
    try:
        upgrade_schema(engine)
        upgrade_schema(engine)  # idempotent
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diff == []
    finally:
        engine.dispose()


def test_schema_head_is_alembics_newest_revision() -> None:
    assert ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head() == SCHEMA_HEAD


def test_revisions_are_numbered_without_gaps() -> None:
    """What tells a newer release's schema from one of ours without reading the scripts
    (bridge.store.db.unknown_schema): revisions are 0001, 0002, ... up to SCHEMA_HEAD."""
    scripts = ScriptDirectory.from_config(alembic_config("sqlite://"))
    revisions = sorted(script.revision for script in scripts.walk_revisions())
    assert revisions == [f"{n:04d}" for n in range(1, int(SCHEMA_HEAD) + 1)]


def test_an_older_schema_is_still_upgraded(store_url: str) -> None:
    """The one-query check for a current schema lets an older one through to Alembic."""
    engine = make_engine(store_url)
    try:
        with engine.begin() as conn:
            cfg = alembic_config(store_url)
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "0002")
        assert current_revision(engine) == "0002"
        upgrade_schema(engine)
        assert current_revision(engine) == SCHEMA_HEAD
    finally:
        engine.dispose()


def test_several_current_chart_numbers_of_a_patient_are_repaired_and_then_refused(store_url: str) -> None:
    """Simultaneous renumberings could leave a patient several current chart numbers (before the service
    locked the patient). Migration 0004 keeps the newest current and retires the older ones as of when it
    was added; from then on the store itself refuses a second current chart number of one patient, as a
    unique violation (which the service retries)."""
    engine = make_engine(store_url)
    aliases = ChartAlias.__table__
    at = [datetime(2026, 1, day, tzinfo=UTC) for day in range(1, 6)]
    try:
        with engine.begin() as conn:
            cfg = alembic_config(store_url)
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "0003")
        with engine.begin() as conn:
            patient = insert(Patient).values(created_at=at[0], updated_at=at[0]).returning(Patient.id)
            raced, single = (conn.execute(patient).scalar_one() for _ in range(2))
            rows = [
                (raced, "C0", at[0], at[1]),
                (raced, "C1", at[1], None),
                (raced, "C2", at[2], None),
                (raced, "C3", at[3], None),
                (single, "D1", at[0], None),
            ]
            for patient_id, chart, created, retired in rows:
                conn.execute(
                    insert(ChartAlias).values(
                        patient_id=patient_id, chart_number=chart, created_at=created, retired_at=retired
                    )
                )
        upgrade_schema(engine)
        with engine.connect() as conn:
            stored = {
                row.chart_number: row.retired_at
                for row in conn.execute(select(aliases.c.chart_number, aliases.c.retired_at))
            }
        assert stored == {"C0": at[1], "C1": at[3], "C2": at[3], "C3": None, "D1": None}
        with pytest.raises(IntegrityError) as refused, engine.begin() as conn:
            conn.execute(insert(ChartAlias).values(patient_id=single, chart_number="D2", created_at=at[4]))
        assert is_unique_violation(refused.value)
    finally:
        engine.dispose()


def test_a_current_schema_is_seen_without_importing_alembic(tmp_path: Path) -> None:
    """Every command checks the schema as it starts: on a current one Alembic is not even imported."""
    url = f"sqlite:///{tmp_path / 'current.db'}"
    engine = make_engine(url)
    upgrade_schema(engine)
    engine.dispose()
    probe = (
        "import sys; from bridge.store.db import make_engine, upgrade_schema;"
        f" upgrade_schema(make_engine({url!r})); print('alembic' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_sqlite_runs_in_wal_mode(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'w.db'}")
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    finally:
        engine.dispose()


def test_file_store_is_content_addressed_and_atomic(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "images")
    store.create_root()
    digest, path = store.put(b"pixels", "png")
    assert path == tmp_path / "images" / digest[:2] / digest[2:4] / f"{digest}.png"
    assert store.put(b"pixels", "png") == (digest, path)
    assert store.verify(digest, "png") is None
    path.write_bytes(b"tampered")
    assert "mismatch" in str(store.verify(digest, "png"))
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(ValueError):
        store.path_for("../../etc/passwd", "png")
    with pytest.raises(ValueError):
        store.path_for("a" * 64, "png/../x")


def test_a_stored_name_is_flushed_with_the_folders_above_it_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`commit` returns once the file's name is durable: its `ab/cd` folder flushed, and `ab` and the root
    too the first time (they gained a folder). A second file in the same folder flushes that folder
    only. A folder whose parent could not be flushed is not taken as durable: the next file flushes it."""
    import errno
    import os

    files = FileStore(tmp_path / "images")
    files.create_root()
    synced: list[Path] = []
    failing: set[Path] = set()

    def sync_folder(folder: Path) -> None:
        if folder in failing:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(folder))
        synced.append(folder)
        FileStore.sync_folder(folder)

    monkeypatch.setattr(files, "sync_folder", sync_folder)

    def commit(data: bytes, sha256: str) -> Path:
        staged = files.staging_path()
        staged.write_bytes(data)
        return files.commit(staged, sha256, "dcm")

    first = commit(b"one", "ab" * 32)
    assert first.read_bytes() == b"one" and synced == [first.parent, first.parent.parent, files.root]
    synced.clear()
    second = commit(b"two", "abab" + "cd" * 30)  # the same ab/cd folder
    assert synced == [second.parent]
    synced.clear()
    assert commit(b"one", "ab" * 32) == first  # bytes already stored: the copy goes, the name is flushed
    assert synced == [first.parent] and list((files.root / STAGING).iterdir()) == []
    synced.clear()
    failing.add(files.root)
    third = files.path_for("ef" * 32, "dcm")
    with pytest.raises(OSError):
        commit(b"three", "ef" * 32)
    assert third.read_bytes() == b"three"  # in place, its name not durable: the caller removes it
    failing.clear()
    synced.clear()
    files.make_durable([third])
    assert synced == [third.parent, third.parent.parent, files.root]


async def test_a_dropped_database_connection_is_retried_once(pg_server: str) -> None:
    """PostgreSQL restarted or a firewall cut the pool's connections: the next request still succeeds."""
    import psycopg

    from bridge.store.db import Database
    from tests.conftest import new_pg_database

    url = new_pg_database(pg_server)
    db = Database(url, threads=2)
    try:
        upgrade_schema(db.engine)
        assert await db.read(lambda s: s.execute(text("SELECT 1")).scalar()) == 1
        database = url.rsplit("/", 1)[1]
        plain = pg_server.replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(plain + "/postgres", autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (database,)
            )
        assert await db.read(lambda s: s.execute(text("SELECT 2")).scalar()) == 2
        assert await db.write(lambda s: s.execute(text("SELECT 3")).scalar()) == 3
    finally:
        db.close()


def test_what_counts_as_a_lost_postgresql_connection() -> None:
    """psycopg raises some errors of a connection the server ended on the client's side, without an
    SQLSTATE and before it marks the connection broken (seen in CI: "connection socket closed", then a
    failed ROLLBACK): they count as a lost connection, so the unit of work is retried on a new one. An
    error of the statement itself does not."""
    import psycopg
    from psycopg import errors

    from bridge.store.db import lost_connection

    assert lost_connection(psycopg.OperationalError("connection socket closed"))
    assert lost_connection(
        psycopg.OperationalError(
            "sending query failed: terminating connection due to administrator command\n"
            "another command is already in progress"
        )
    )
    assert lost_connection(errors.AdminShutdown("terminating connection due to administrator command"))
    assert lost_connection(errors.ConnectionFailure("connection failure"))
    assert not lost_connection(errors.QueryCanceled("canceling statement due to statement timeout"))
    assert not lost_connection(errors.UniqueViolation("duplicate key value"))
    assert not lost_connection(OSError("not a database error"))


def _age(path: Path, seconds: float) -> None:
    """Set `path`'s times `seconds` into the past."""
    import os
    import time

    past = time.time() - seconds
    os.utime(path, (past, past))


def test_leftovers_of_interrupted_imports_are_removed_once_a_day_old(tmp_path: Path) -> None:
    """Staged files and upload folders nothing touched for a day go; recent ones (a running import, a
    slow upload still writing into its folder) and everything else in the store stay."""
    files = FileStore(tmp_path / "images")
    files.create_root()
    old_staged, new_staged = files.staging_path(), files.staging_path()
    old_staged.write_bytes(b"cut off")
    new_staged.write_bytes(b"being written")
    _age(old_staged, 2 * 86400)
    old_upload = files.root / f"{UPLOADS}dead"
    (old_upload / "00001").mkdir(parents=True)
    (old_upload / "00001" / "a.dcm").write_bytes(b"x")
    for path in (old_upload / "00001" / "a.dcm", old_upload / "00001", old_upload):
        _age(path, 2 * 86400)
    slow_upload = files.root / f"{UPLOADS}slow"
    (slow_upload / "00001").mkdir(parents=True)
    _age(slow_upload, 2 * 86400)  # the folder is old, the part arriving in it is not
    (slow_upload / "00001" / "big.zip").write_bytes(b"arriving")
    stored = files.path_for("ab" * 32, "dcm")
    stored.parent.mkdir(parents=True)
    stored.write_bytes(b"stored")
    _age(stored, 30 * 86400)
    assert files.remove_leftovers() == 2
    assert not old_staged.exists() and not old_upload.exists()
    assert new_staged.exists() and slow_upload.exists() and stored.exists()
    assert (files.root / STAGING).is_dir()
    assert files.remove_leftovers() == 0
    assert FileStore(tmp_path / "never-created").remove_leftovers() == 0


def test_an_engine_that_may_not_create_the_file_refuses_to_connect_and_leaves_its_wal(tmp_path: Path) -> None:
    """The commands' one line (DatabaseFileMissing) before any connection, and the check at every connect
    behind it (a file that goes while they start): SQLite would create an empty file at the path and
    delete the -wal beside it, which holds the latest changes of the store that was there. A store the
    engine opened is used as before."""
    from sqlalchemy.exc import OperationalError

    from bridge.store.db import DatabaseFileMissing

    path = tmp_path / "bridge.db"
    wal = Path(f"{path}-wal")
    wal.write_bytes(b"the latest changes of a store moved away")
    with pytest.raises(DatabaseFileMissing, match=f"the database file {path} does not exist: put it back"):
        make_engine(f"sqlite:///{path}", create=False)
    path.touch()
    engine = make_engine(f"sqlite:///{path}", create=False)
    path.unlink()  # gone between the command's start and its first connection
    try:
        with pytest.raises(OperationalError, match=f"the database file {path} does not exist"):
            engine.connect()
        assert not path.exists() and wal.read_bytes() == b"the latest changes of a store moved away"
        path.touch()  # a file at the path again (an empty database)
        with engine.connect() as conn:
            assert conn.execute(text("SELECT 1")).scalar() == 1
    finally:
        engine.dispose()


def test_a_sqlite_file_moved_away_is_refused_and_used_again_once_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No new connection is opened on a lost file (SQLite would create an empty store at the path), the
    loss is logged once, and the same file moved back is the store again."""
    import logging
    import os

    from bridge.store.db import Database, StoreFileLost

    caplog.set_level(logging.INFO, logger="bridge.store.db")
    path = tmp_path / "bridge.db"
    db = Database(f"sqlite:///{path}")
    try:
        db.write_sync(lambda session: session.execute(text("CREATE TABLE t (x INTEGER)")))
        held = db.engine.connect()  # the pool's only connection is busy: the next one would be new
        away = tmp_path / "moved.db"
        os.rename(path, away)
        with pytest.raises(StoreFileLost, match="was deleted"):
            db.write_sync(lambda session: session.execute(text("INSERT INTO t VALUES (1)")))
        with pytest.raises(StoreFileLost):
            db.engine.connect()
        with pytest.raises(StoreFileLost):
            db.read_sync(lambda session: session.execute(text("SELECT count(*) FROM t")).scalar())
        with pytest.raises(StoreFileLost):
            db.ping()
        assert not path.exists()
        os.rename(away, path)
        db.ping()
        db.write_sync(lambda session: session.execute(text("INSERT INTO t VALUES (1)")))
        held.close()
        assert db.read_sync(lambda session: session.execute(text("SELECT count(*) FROM t")).scalar()) == 1
    finally:
        db.close()
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("ERROR", "store database file lost; store requests refused"),
        ("INFO", "store database file back; store requests served again"),
    ]
    server = Database("postgresql+psycopg://u@127.0.0.1:1/x", memo=False)  # never connected here
    try:
        assert server.file is None  # a server database has no file to lose
    finally:
        server.close()
