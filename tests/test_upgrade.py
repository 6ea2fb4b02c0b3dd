"""Upgrading a practice's store from an earlier release: what each command does with a schema that is
older than this release's, newer than it, or being migrated by another process at the same moment.

Stores at an older revision are made with Alembic from the current migrations (upgrade to "0003", the
previous release's schema); a newer release's store is this one's with alembic_version moved on.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from sqlalchemy import Engine, insert, inspect, text
from sqlalchemy.engine import make_url

from bridge.store.db import (
    SCHEMA_HEAD,
    SchemaError,
    SchemaUpgrade,
    alembic_config,
    current_revision,
    make_engine,
    upgrade_schema,
)
from bridge.store.models import ChartAlias, Patient
from tests.conftest import start_daemon, write_config
from tests.support.commands import one_line, pms_bridge, store_commands

PREVIOUS_RELEASE = "0003"
NEWER = f"{int(SCHEMA_HEAD) + 1:04d}"
NEWER_RELEASE_LINE = (
    f"the store was migrated by a newer release ({NEWER}); this one knows up to {SCHEMA_HEAD}"
)


def migrate_to(url: str, revision: str) -> None:
    """The store at `revision`, by Alembic from the current migrations (as an earlier release left it)."""
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            cfg = alembic_config(url)
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
    finally:
        engine.dispose()


def revision_of(url: str) -> str | None:
    engine = make_engine(url)
    try:
        return current_revision(engine)
    finally:
        engine.dispose()


def with_raced_chart_numbers(url: str) -> None:
    """One patient with three current chart numbers (what simultaneous renumberings left before 0004),
    one with a single current chart number."""
    engine = make_engine(url)
    at = [datetime(2026, 1, day, tzinfo=UTC) for day in range(1, 4)]
    try:
        with engine.begin() as conn:
            patient = insert(Patient).values(created_at=at[0], updated_at=at[0]).returning(Patient.id)
            raced, single = (conn.execute(patient).scalar_one() for _ in range(2))
            for patient_id, chart, created in (
                (raced, "C1", at[0]),
                (raced, "C2", at[1]),
                (raced, "C3", at[2]),
            ):
                conn.execute(
                    insert(ChartAlias).values(patient_id=patient_id, chart_number=chart, created_at=created)
                )
            conn.execute(insert(ChartAlias).values(patient_id=single, chart_number="D1", created_at=at[0]))
    finally:
        engine.dispose()


def test_an_older_schema_with_migrate_no_is_refused_at_start_by_every_command(
    store_url: str, tmp_path: Path
) -> None:
    """[store] migrate = no on the previous release's store: serve used to log "started", answer ready
    and then fail an upload with a 500 (no such column outbox.claimed_by). Now it, and every other
    command that opens the store, stops with one line naming both ways to migrate; doctor says the same,
    and nothing is changed."""
    migrate_to(store_url, PREVIOUS_RELEASE)
    home = tmp_path / "home"
    config = write_config(home, store_url, {"store": {"migrate": "no"}})
    for name, args in store_commands(config, tmp_path).items():
        line = one_line(pms_bridge(*args), name)
        assert line.startswith(f"pms-bridge {args[0]}: [store] url = "), line
        assert f"the schema is at {PREVIOUS_RELEASE} and this release needs {SCHEMA_HEAD}" in line, line
        assert "[store] migrate = no: start one daemon with migrate = yes" in line, line
        assert f"'pms-bridge init --home {home}'" in line, line
    doctor = pms_bridge("doctor", "--config", str(config))
    (store_line,) = [line for line in doctor.stdout.splitlines() if "store reachable" in line]
    assert doctor.returncode == 1 and store_line.startswith("FAIL"), doctor.stdout
    assert "migrate = yes" in store_line and "start the daemon (it migrates" not in store_line
    assert revision_of(store_url) == PREVIOUS_RELEASE
    # with migrate = yes (the default) doctor says that starting the daemon is enough
    default = write_config(tmp_path / "default", store_url)
    doctor = pms_bridge("doctor", "--config", str(default))
    assert (
        f"this release needs {SCHEMA_HEAD}: start the daemon (it migrates the store at start" in doctor.stdout
    )


def test_a_newer_releases_store_is_refused_by_every_command_with_one_line(
    store_url: str, tmp_path: Path
) -> None:
    """A store migrated by a newer release (alembic_version 0006): every command crashed with Alembic's
    "Can't locate revision" traceback, and doctor and outbox advised starting the daemon. Now each says
    what it is, in one line with exit 2, and leaves the store alone."""
    migrate_to(store_url, "head")
    engine = make_engine(store_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = :v"), {"v": NEWER})
        with pytest.raises(SchemaError, match=NEWER_RELEASE_LINE.replace("(", r"\(").replace(")", r"\)")):
            upgrade_schema(engine)
    finally:
        engine.dispose()
    home = tmp_path / "home"
    config = write_config(home, store_url)
    commands = {**store_commands(config, tmp_path), "init": ["init", "--home", str(home)]}
    for name, args in commands.items():
        line = one_line(pms_bridge(*args), name)
        assert line.startswith(f"pms-bridge {args[0]}: [store] url = ") and NEWER_RELEASE_LINE in line, line
    doctor = pms_bridge("doctor", "--config", str(config))
    (store_line,) = [line for line in doctor.stdout.splitlines() if "store reachable" in line]
    assert doctor.returncode == 1 and store_line.startswith("FAIL") and NEWER_RELEASE_LINE in store_line
    assert "start the daemon" not in doctor.stdout and "Traceback" not in doctor.stdout + doctor.stderr
    assert revision_of(store_url) == NEWER


def test_serve_logs_the_upgrade_with_the_chart_numbers_it_repaired(store_url: str, tmp_path: Path) -> None:
    """The daemon migrating the previous release's store says so in one log line, with how many patients
    migration 0004 repaired (Alembic's own lines are silenced)."""
    migrate_to(store_url, PREVIOUS_RELEASE)
    with_raced_chart_numbers(store_url)
    daemon = start_daemon(write_config(tmp_path / "home", store_url))
    try:
        records = daemon.records()
    finally:
        assert daemon.stop() == 0
    (upgraded,) = [r for r in records if r["msg"].startswith("schema upgraded")]
    assert upgraded["msg"].startswith(f"schema upgraded {PREVIOUS_RELEASE} -> {SCHEMA_HEAD}; ")
    assert "repaired the chart numbers of 1 patient(s)" in upgraded["msg"]
    assert (upgraded["from_revision"], upgraded["to_revision"], upgraded["charts_repaired"]) == (
        PREVIOUS_RELEASE,
        SCHEMA_HEAD,
        1,
    )
    assert [r["msg"] for r in records].index(upgraded["msg"]) < [r["msg"] for r in records].index("started")
    assert revision_of(store_url) == SCHEMA_HEAD


def test_init_reports_the_upgrade_it_does(store_url: str, tmp_path: Path) -> None:
    """`pms-bridge init --home` on an earlier release's home migrated the schema and said "nothing to do".
    It names the upgrade now; a second run has nothing to do."""
    migrate_to(store_url, PREVIOUS_RELEASE)
    home = tmp_path / "home"
    write_config(home, store_url, {"store": {"migrate": "no"}})  # init migrates whatever serve would do
    first = pms_bridge("init", "--home", str(home))
    assert first.returncode == 0, first.stderr
    assert f": schema upgraded {PREVIOUS_RELEASE} -> {SCHEMA_HEAD}\n" in first.stdout
    assert "nothing to do" not in first.stdout
    assert revision_of(store_url) == SCHEMA_HEAD
    second = pms_bridge("init", "--home", str(home))
    assert second.returncode == 0 and "nothing to do: the home folder is complete" in second.stdout


def test_a_failed_migration_is_worded_as_one_and_leaves_the_store_as_it_was(
    store_url: str, tmp_path: Path
) -> None:
    """A migration that fails (here: a column 0005 adds is there already, put in by hand) is a failed
    migration, not "the store cannot be reached"; 0004 and 0005 run in one transaction, so neither
    is left half done."""
    migrate_to(store_url, PREVIOUS_RELEASE)
    engine = make_engine(store_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("ALTER TABLE outbox ADD COLUMN claimed_by VARCHAR(40)"))
    finally:
        engine.dispose()
    line = one_line(pms_bridge("serve", "--config", str(write_config(tmp_path / "home", store_url))), "serve")
    assert f"migrating the schema from {PREVIOUS_RELEASE} to {SCHEMA_HEAD} failed (" in line, line
    assert f"the store is left at {PREVIOUS_RELEASE}" in line and "cannot be reached" not in line, line
    engine = make_engine(store_url)
    try:
        assert current_revision(engine) == PREVIOUS_RELEASE
        indexes = {index["name"] for index in inspect(engine).get_indexes("chart_aliases")}
        assert "uq_chart_aliases_current_patient" not in indexes  # 0004 rolled back with 0005
    finally:
        engine.dispose()


MIGRATING_PROCESS = """
import logging, sys
from bridge.store.db import make_engine, upgrade_schema
logging.basicConfig(stream=sys.stderr, format="%(message)s")
logging.getLogger("sqlalchemy.engine").setLevel(logging.INFO)  # each statement, before it runs
print(repr(upgrade_schema(make_engine(sys.argv[1]))))
"""


def test_two_processes_migrating_at_once_migrate_once(store_url: str, tmp_path: Path) -> None:
    """Two daemons starting together on a store that needs migrating: both read the old revision, both
    migrated, and one failed (PostgreSQL: "deadlock detected", or an index that "already exists"; SQLite:
    "database is locked"). The
    window is held open as the auditor did: a third connection holds a lock the migration needs until
    both processes wait. Now the first migrates under the migration lock and the second finds it done."""
    migrate_to(store_url, PREVIOUS_RELEASE)
    logs = [tmp_path / f"migrating{i}.log" for i in range(2)]
    with TableLock(store_url) as lock:
        processes = []
        for log in logs:
            with open(log, "wb") as stderr:
                processes.append(
                    subprocess.Popen(
                        [sys.executable, "-c", MIGRATING_PROCESS, store_url],
                        stdout=subprocess.PIPE,
                        stderr=stderr,
                        text=True,
                    )
                )
        lock.wait_until_blocked(processes, logs)
    outcomes = []
    for process, log in zip(processes, logs, strict=True):
        out, _ = process.communicate(timeout=120)
        assert process.returncode == 0, log.read_text(encoding="utf-8")[-3000:]
        outcomes.append(out.strip())
    assert sorted(outcomes) == ["None", repr(SchemaUpgrade(PREVIOUS_RELEASE, SCHEMA_HEAD, 0))]
    assert revision_of(store_url) == SCHEMA_HEAD


class TableLock:
    """Holds a lock that blocks every migration (PostgreSQL: chart_aliases, which 0004 reads first;
    SQLite: the database's write lock) until the two migrating processes wait on it."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.postgres = url.startswith("postgresql")
        self._engine: Engine | None = None
        self._conn: Any = None

    def __enter__(self) -> TableLock:
        if self.postgres:
            self._engine = make_engine(self.url)
            self._conn = self._engine.connect()
            self._conn.begin()
            self._conn.execute(text("LOCK TABLE chart_aliases IN ACCESS EXCLUSIVE MODE"))
        else:
            self._conn = sqlite3.connect(make_url(self.url).database or "", isolation_level=None)
            self._conn.execute("BEGIN IMMEDIATE")
        return self

    def __exit__(self, *_exc: object) -> None:
        self._conn.rollback()
        self._conn.close()
        if self._engine is not None:
            self._engine.dispose()

    def wait_until_blocked(self, processes: list[subprocess.Popen[str]], logs: list[Path]) -> None:
        """Until both processes wait for a lock (or one has ended: it failed, which the test reports).
        PostgreSQL shows the waits in pg_stat_activity; a SQLite process has logged a writing statement
        (BEGIN IMMEDIATE, or the migration's first write), which cannot pass while this lock is held."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if any(process.poll() is not None for process in processes):
                return
            if self._waiting(logs) == len(processes):
                return
            time.sleep(0.05)
        raise AssertionError("the migrating processes never waited for the held lock")

    def _waiting(self, logs: list[Path]) -> int:
        if self.postgres:
            assert self._engine is not None
            with self._engine.connect() as conn:
                return int(
                    conn.execute(
                        text(
                            "SELECT count(*) FROM pg_stat_activity"
                            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                        )
                    ).scalar()
                    or 0
                )
        return sum(
            1 for log in logs if any(_writes(line) for line in log.read_text(encoding="utf-8").splitlines())
        )


WRITES = ("BEGIN IMMEDIATE", "UPDATE ", "INSERT ", "DELETE ", "CREATE ", "ALTER ", "DROP ")


def _writes(statement: str) -> bool:
    return statement.lstrip().upper().startswith(WRITES)


# docs/operations.md, "Upgrading", gives this command for taking a store back to the previous release.
DOWNGRADE = (
    "import sys; from alembic import command; from bridge.config import load_settings;"
    " from bridge.store.db import alembic_config;"
    " command.downgrade(alembic_config(load_settings(sys.argv[1]).store.url), '0003')"
)


def test_the_documented_downgrade_takes_the_store_back_to_the_previous_release(
    store_url: str, tmp_path: Path
) -> None:
    """The way back besides restoring the backup: Alembic's downgrade through this release's migrations.
    It drops the outbox claims (0005) and the one-current-chart index (0004), keeps the data (chart
    numbers 0004 retired stay retired), and the store upgrades again afterwards."""
    docs = (Path(__file__).parents[1] / "docs" / "operations.md").read_text(encoding="utf-8")
    assert DOWNGRADE in docs
    migrate_to(store_url, PREVIOUS_RELEASE)
    with_raced_chart_numbers(store_url)
    config = write_config(tmp_path / "home", store_url)
    engine = make_engine(store_url)
    try:
        upgraded = upgrade_schema(engine)
        assert upgraded == SchemaUpgrade(PREVIOUS_RELEASE, SCHEMA_HEAD, 1)
        done = subprocess.run(
            [sys.executable, "-c", DOWNGRADE, str(config)], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        assert current_revision(engine) == PREVIOUS_RELEASE
        schema = inspect(engine)
        assert "claimed_by" not in {column["name"] for column in schema.get_columns("outbox")}
        assert "uq_chart_aliases_current_patient" not in {
            i["name"] for i in schema.get_indexes("chart_aliases")
        }
        with engine.connect() as conn:
            current = conn.execute(text("SELECT chart_number FROM chart_aliases WHERE retired_at IS NULL"))
            assert sorted(row[0] for row in current) == ["C3", "D1"]
        assert upgrade_schema(engine) == SchemaUpgrade(PREVIOUS_RELEASE, SCHEMA_HEAD, 0)
    finally:
        engine.dispose()
