"""Repeated reads answered from memory (`[store] memo_reads`): the store generation that decides when they
are out of date (SQLite and PostgreSQL), the memoised lookups, OPP web's kept answers, and two real daemons
on one store, where a change made through one must be seen by the other."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from sqlalchemy import create_engine, text

from bridge.model import Action, Demographics, Origin, Outcome, PatientRequest, Sex, Status
from bridge.store.changes import PG_CHANNEL, WATCHED_TABLES, Unknown
from bridge.store.db import Database, upgrade_schema
from bridge.web.answers import MAX_REQUEST_BYTES, Kept, RepeatedAnswers
from bridge.web.oppweb import JSON_TYPE
from tests.conftest import DaemonProcess, new_pg_database
from tests.test_oppweb import call, opp_xml, upload_png

T = TypeVar("T")
ORIGIN = Origin(protocol="opp", transport="http", workstation="ws1", request_id="r1")


def eventually(probe: Callable[[], T], done: Callable[[T], bool], seconds: float = 15) -> T:
    """`probe()` until `done` says yes: PostgreSQL notifications arrive a moment after their commit."""
    deadline = time.monotonic() + seconds
    while True:
        value = probe()
        if done(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.02)


def known_generation(db: Database) -> int:
    value = eventually(db.generation.current, lambda g: g is not None)
    assert value is not None, "the store generation never became known"
    return value


def insert_patient(url: str, last_name: str) -> None:
    """A change by another process (a DBA, another daemon): its own engine and connection."""
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO patients (last_name, first_name, middle_name, title, sex, name_key, street,"
                " city, postal_code, phone, email, created_at, updated_at) VALUES (:n, 'A', '', '', 'U',"
                " :k, '', '', '', '', '', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
            ),
            {"n": last_name, "k": last_name.lower()},
        )
    engine.dispose()


def insert_audit_row(url: str) -> None:
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO audit_log (at, action, protocol, transport, workstation, actor, request_id,"
                " detail) VALUES (CURRENT_TIMESTAMP, 'patient.open', 'opp', 'http', '', '', '', '')"
            )
        )
    engine.dispose()


@pytest.fixture
def store_db(store_url: str) -> Any:
    db = Database(store_url)
    upgrade_schema(db.engine)
    yield db
    db.close()


# --------------------------------------------------------------------------------------------------
# The generation


def test_the_generation_moves_on_every_watched_change_and_not_on_bookkeeping(
    store_db: Database, store_url: str
) -> None:
    before = known_generation(store_db)
    insert_patient(store_url, "Watched")
    after = eventually(store_db.generation.current, lambda g: g != before)
    assert after is not None and after != before

    if store_db.dialect == "sqlite":  # read synchronously: an audit row provably changes nothing
        insert_audit_row(store_url)
        assert store_db.generation.current() == after


def test_the_triggers_watch_exactly_the_watched_tables(store_db: Database) -> None:
    """`changes.WATCHED_TABLES` says which tables the memoised reads may depend on; migration 0003 has its
    own copy (a migration is a snapshot), so the triggers it made are held to the constant."""
    with store_db.engine.connect() as conn:
        if store_db.dialect == "sqlite":
            rows = conn.execute(
                text("SELECT tbl_name, name FROM sqlite_master WHERE type = 'trigger' AND name LIKE 'store%'")
            )
            found = {(table, name) for table, name in rows}
            expected = {
                (table, f"store_generation_{table}_{event}")
                for table in WATCHED_TABLES
                for event in ("insert", "update", "delete")
            }
        else:
            rows = conn.execute(
                text(
                    "SELECT c.relname, t.tgname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid"
                    " WHERE NOT t.tgisinternal"
                )
            )
            found = {(table, name) for table, name in rows}
            expected = {(table, "store_changed") for table in WATCHED_TABLES}
    assert found == expected


def test_postgresql_triggers_notify_for_watched_tables_only(pg_server: str) -> None:
    import psycopg

    store_url = new_pg_database(pg_server)
    db = Database(store_url)
    upgrade_schema(db.engine)
    db.close()
    listener = psycopg.connect(store_url.replace("postgresql+psycopg", "postgresql"), autocommit=True)
    try:
        listener.execute(f"LISTEN {PG_CHANNEL}")
        insert_audit_row(store_url)  # not watched: no notification
        insert_patient(store_url, "Notified")  # watched
        payloads = [n.payload for n in listener.notifies(timeout=15, stop_after=1)]
    finally:
        listener.close()
    # Notifications arrive in commit order, so an audit notification would have come first.
    assert payloads == ["patients"]


def test_own_writes_move_the_generation_before_their_answer(store_db: Database) -> None:
    before = known_generation(store_db)
    store_db.write_sync(lambda session: session.execute(text("UPDATE store_generation SET id = id")))
    assert store_db.generation.current() != before  # no waiting for a notification


def test_memo_off_or_sql_server_means_every_read_asks_the_database(store_url: str) -> None:
    db = Database(store_url, memo=False)
    try:
        assert isinstance(db.generation, Unknown) and db.generation.current() is None
    finally:
        db.close()


async def test_read_memo_answers_again_until_another_writer_changes_the_store(
    store_db: Database, store_url: str
) -> None:
    calls: list[int] = []

    def count_patients(session: Any) -> int:
        calls.append(1)
        return int(session.execute(text("SELECT COUNT(*) FROM patients")).scalar_one())

    known_generation(store_db)
    assert await store_db.read_memo("count", count_patients) == 0
    assert await store_db.read_memo("count", count_patients) == 0
    assert len(calls) == 1  # the second came from memory

    insert_patient(store_url, "Other")  # another process
    value = 0
    deadline = time.monotonic() + 15
    while value != 1 and time.monotonic() < deadline:
        value = await store_db.read_memo("count", count_patients)
    assert value == 1


def test_a_sqlite_change_by_a_plain_sqlite3_connection_is_seen_at_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    db = Database(url)
    upgrade_schema(db.engine)
    try:
        before = db.generation.current()
        with sqlite3.connect(tmp_path / "store.db") as conn:  # a DBA, or a tool that knows nothing of us
            conn.execute("UPDATE patients SET first_name = 'x'")  # no rows: a statement, no change
            conn.execute(
                "INSERT INTO chart_aliases (patient_id, chart_number, created_at) "
                "SELECT 1, '7', CURRENT_TIMESTAMP WHERE 0"
            )
            conn.execute("DELETE FROM images")
        assert db.generation.current() == before  # row triggers: statements that change nothing count nothing
        insert_patient(url, "Seen")
        assert db.generation.current() != before
    finally:
        db.close()


# --------------------------------------------------------------------------------------------------
# Kept answers


class FakeGeneration:
    """A generation the test moves by hand (the real ones are tested above)."""

    def __init__(self) -> None:
        self.value: int | None = 1

    def current(self) -> int | None:
        return self.value

    def bump(self) -> None:
        assert self.value is not None
        self.value += 1

    def close(self) -> None:
        pass


def kept(repeatable: bool = True) -> Kept[str]:
    return Kept("message", Outcome(Status.OK, "1 images", repeatable=repeatable), b"{}", JSON_TYPE)


def test_kept_answers_go_when_the_generation_moves_or_they_age() -> None:
    generation = FakeGeneration()
    answers: RepeatedAnswers[str] = RepeatedAnswers(generation, max_age=30)
    found, seen = answers.get("k")
    assert found is None and seen == 1
    answers.keep("k", 10, seen, kept())
    assert answers.get("k")[0] is not None

    generation.bump()
    assert answers.get("k") == (None, 2)

    short: RepeatedAnswers[str] = RepeatedAnswers(generation, max_age=0.01)
    _, seen = short.get("old")
    short.keep("old", 10, seen, kept())
    time.sleep(0.05)  # older than max_age (signed thumbnail URLs in it would be closer to expiry)
    assert short.get("old")[0] is None


def test_only_repeatable_small_answers_computed_under_the_current_generation_are_kept() -> None:
    generation = FakeGeneration()
    answers: RepeatedAnswers[str] = RepeatedAnswers(generation, max_age=30)
    _, seen = answers.get("probe")
    answers.keep("written", 10, seen, kept(repeatable=False))
    answers.keep("big", MAX_REQUEST_BYTES + 1, seen, kept())
    generation.bump()  # the store changed while the answer was computed
    answers.keep("raced", 10, seen, kept())
    generation.value = None  # unknown (listener down)
    answers.keep("unknown", 10, None, kept())
    generation.value = 2
    for key in ("written", "big", "raced", "unknown"):
        assert answers.get(key)[0] is None, key


async def test_repeat_refuses_an_outcome_that_was_not_a_pure_read(runtime: Any) -> None:
    request = PatientRequest(
        action=Action.OPEN,
        origin=ORIGIN,
        pms_system="WebPMS",
        pms_id="1",
        demographics=Demographics(last_name="Muster", first_name="Max", sex=Sex.MALE),
    )
    with pytest.raises(ValueError, match="repeatable"):
        runtime.service.repeat(request, Outcome(Status.CREATED, "created"))


# --------------------------------------------------------------------------------------------------
# Two real daemons on one store


def view_data(daemon: DaemonProcess, reference: str, workstation: str = "") -> dict[str, Any]:
    headers = {"Accept": JSON_TYPE, **({"X-PMS-Workstation": workstation} if workstation else {})}
    status, _, body = call(daemon, "POST", "/opp", opp_xml("VIEW_DATA", reference), headers)
    assert status == 200, body
    data: dict[str, Any] = json.loads(body)
    return data


def audit(daemon: DaemonProcess, patient_id: int) -> list[dict[str, Any]]:
    status, body = daemon.request("GET", f"/api/v1/audit?patient_id={patient_id}&limit=500")
    assert status == 200
    items: list[dict[str, Any]] = json.loads(body)["items"]
    return items


def events_counted(daemon: DaemonProcess, name: str) -> float:
    status, body = daemon.request("GET", "/metrics", token=None)
    assert status == 200
    found = re.search(rf'pms_bridge_events_total{{event="{name}"}} ([0-9.e+]+)', body.decode())
    return float(found.group(1)) if found else 0.0


def test_repeated_view_data_is_audited_and_announced_each_time_and_sees_the_other_daemons_changes(
    daemon_factory: Any,
) -> None:
    first = daemon_factory()
    # two daemons on one store and one image share, as a scale-out runs them
    second = daemon_factory(store={"images": str(first.settings.store.images)})
    created = call(first, "POST", "/opp", opp_xml("UPDATE_CREATE", "21"), {"Accept": JSON_TYPE})
    patient_id = json.loads(created[2])["patient_id"]
    opened_before = events_counted(first, "patient-opened")

    answers = [view_data(first, "21", workstation=f"ws{n}") for n in range(3)]
    assert [len(a["images"]) for a in answers] == [0, 0, 0]
    assert answers[0] == answers[1] == answers[2]
    listed = [e for e in audit(first, patient_id) if e["action"] == "images.list"]
    assert sorted(e["workstation"] for e in listed) == ["ws0", "ws1", "ws2"]  # each asking, with its origin
    assert len({e["request_id"] for e in listed}) == 3
    assert events_counted(first, "patient-opened") == opened_before + 3

    # An image added through the other daemon, then a first name changed through it.
    upload_png(second, patient_id)
    listing = eventually(lambda: view_data(first, "21"), lambda d: len(d["images"]) == 1)
    assert len(listing["images"]) == 1 and listing["images"][0]["thumbnail_url"]
    renamed = opp_xml("UPDATE", "21").replace(b'firstName="J\xc3\xbcrgen"', b'firstName="J\xc3\xb6rg"')
    assert call(second, "POST", "/opp", renamed, {"Accept": JSON_TYPE})[0] == 200
    listing = eventually(lambda: view_data(first, "21"), lambda d: d["patient"]["first_name"] == "Jörg")
    assert listing["patient"]["first_name"] == "Jörg"


def test_a_kept_answer_names_the_host_it_was_asked_through(daemon_factory: Any) -> None:
    daemon = daemon_factory(opp_web={"allowed_hosts": "pms-server"})
    created = json.loads(
        call(daemon, "POST", "/opp", opp_xml("UPDATE_CREATE", "22"), {"Accept": JSON_TYPE})[2]
    )
    upload_png(daemon, created["patient_id"])
    port = daemon.settings.opp_web.port
    for host in ("127.0.0.1", "pms-server", "127.0.0.1", "pms-server"):
        headers = {"Accept": JSON_TYPE, "Host": f"{host}:{port}"}
        data = json.loads(call(daemon, "POST", "/opp", opp_xml("VIEW_DATA", "22"), headers)[2])
        assert data["images"][0]["thumbnail_url"].startswith(f"http://{host}:{port}/opp/thumbnails/")


async def test_a_repeated_request_is_answered_without_the_store_until_it_changes(
    runtime: Any, store_url: str
) -> None:
    from aiohttp.test_utils import TestClient, TestServer

    from bridge.web.oppweb import build_oppweb_app

    reads: list[str] = []
    real_read = runtime.db.read

    async def counted_read(work: Any) -> Any:  # the real read, counted
        reads.append(getattr(work, "__name__", "work"))
        return await real_read(work)

    runtime.db.read = counted_read
    client = TestClient(TestServer(build_oppweb_app(runtime)))
    await client.start_server()
    try:
        headers = {"Accept": JSON_TYPE}
        created = await client.post("/opp", data=opp_xml("UPDATE_CREATE", "31"), headers=headers)
        assert created.status == 200
        known_generation(runtime.db)

        async def ask() -> dict[str, Any]:
            response = await client.post("/opp", data=opp_xml("VIEW_DATA", "31"), headers=headers)
            assert response.status == 200
            data: dict[str, Any] = await response.json()
            return data

        first = await ask()
        for _ in range(200):  # PostgreSQL: the creation's own notification may still be on its way
            asked = len(reads)
            again = await ask()
            if len(reads) == asked:
                break
            await asyncio.sleep(0.02)
        assert again == first
        assert len(reads) == asked  # kept: no store read at all

        insert_patient(store_url, "Unrelated")  # any watched change by anyone drops what was kept
        deadline = time.monotonic() + 15
        while len(reads) == asked and time.monotonic() < deadline:
            assert await ask() == first
        assert len(reads) > asked
    finally:
        await client.close()


def test_postgresql_listener_lost_means_unknown_until_it_is_back_with_a_new_generation(
    pg_server: str,
) -> None:
    store_url = new_pg_database(pg_server)
    db = Database(store_url)
    upgrade_schema(db.engine)
    try:
        before = known_generation(db)
        admin = create_engine(store_url)
        with admin.begin() as conn:  # the server drops the listener's connection (a restart, a network cut)
            dropped = conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND query LIKE 'LISTEN%'"
                )
            ).all()
        admin.dispose()
        assert dropped == [(True,)]
        # Notifications sent meanwhile would be lost: nothing may be memoised until it listens again...
        assert eventually(db.generation.current, lambda g: g is None) is None
        # ...and then under a generation no earlier memo can have.
        after = known_generation(db)
        assert after != before
    finally:
        db.close()
