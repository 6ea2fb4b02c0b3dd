"""OPP commands against the real service and store (SQLite and PostgreSQL): what each command changes and
which events it publishes. The transports are tested in test_opp_launch.py and test_oppweb.py."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from datetime import date

import pytest
from sqlalchemy import func, select

from bridge.events import AcquisitionRequested, Event, PatientOpened
from bridge.handlers.opp import execute as run_message
from bridge.handlers.opp import options
from bridge.model import Origin, Outcome, Status
from bridge.runtime import Runtime
from bridge.store.models import Patient
from protocols.opp import OppMessage, parse_args, parse_xml
from tests.support.rows import image_row

ORIGIN = Origin(protocol="opp", transport="cli", workstation="WS1")
# The daemon's date the parsers check birth dates against: fixed, so no test depends on the clock.
TODAY = date(2026, 12, 5)


async def execute(rt: Runtime, message: OppMessage, origin: Origin) -> Outcome:
    """Run a message as the transports do: as its request from `origin`."""
    return await run_message(rt, message, message.request(origin))


def message(rt: Runtime, *args: str) -> OppMessage:
    return parse_args(list(args), options(rt.settings), today=TODAY)


def events(rt: Runtime) -> list[Event]:
    seen: list[Event] = []
    rt.bus.subscribe(seen.append)
    return seen


async def count_patients(rt: Runtime) -> int:
    return await rt.db.read(lambda s: s.execute(select(func.count()).select_from(Patient)).scalar_one())


async def test_update_of_an_unknown_patient_is_refused_and_creates_nothing(runtime: Runtime) -> None:
    seen = events(runtime)
    outcome = await execute(runtime, message(runtime, "-c", "UPDATE", "-p", "0815", "-l", "Meier"), ORIGIN)
    assert outcome.status is Status.NOT_FOUND
    assert outcome.message == "no patient with id '0815' from OPP"
    assert await count_patients(runtime) == 0
    assert seen == []


async def test_update_create_twice_gives_one_patient(runtime: Runtime) -> None:
    msg = message(runtime, "-p", "0815", "-l", "Müller", "-f", "Jürgen", "-b", "1985-07-14", "-g", "MALE")
    first = await execute(runtime, msg, ORIGIN)
    second = await execute(runtime, msg, ORIGIN)
    assert (first.status, second.status) == (Status.CREATED, Status.OK)
    assert first.patient and second.patient and first.patient.id == second.patient.id
    assert await count_patients(runtime) == 1


async def test_concurrent_update_creates_for_one_new_patient_create_one(runtime: Runtime) -> None:
    msg = message(runtime, "-p", "0816", "-l", "Gleich", "-b", "1970-01-02")
    outcomes = await asyncio.gather(*(execute(runtime, msg, ORIGIN) for _ in range(12)))
    assert len({o.patient.id for o in outcomes if o.patient}) == 1
    assert [o.status for o in outcomes].count(Status.CREATED) == 1
    assert all(o.status in (Status.CREATED, Status.OK) for o in outcomes)
    assert await count_patients(runtime) == 1


async def test_update_changes_a_known_patient(runtime: Runtime) -> None:
    await execute(runtime, message(runtime, "-p", "7", "-l", "Weiß", "-f", "Hans"), ORIGIN)
    outcome = await execute(
        runtime, message(runtime, "-c", "UPDATE", "-p", "7", "-l", "Weiß", "-f", "Hans-Peter"), ORIGIN
    )
    assert outcome.status is Status.UPDATED
    assert outcome.patient and outcome.patient.first_name == "Hans-Peter"


async def test_update_with_another_birth_date_is_a_conflict_not_a_merge(runtime: Runtime) -> None:
    await execute(runtime, message(runtime, "-p", "8", "-l", "Roe", "-b", "1990-01-03"), ORIGIN)
    outcome = await execute(
        runtime, message(runtime, "-c", "UPDATE", "-p", "8", "-l", "Roe", "-b", "1990-03-01"), ORIGIN
    )
    assert outcome.status is Status.CONFLICT and outcome.conflict_id is not None
    assert await count_patients(runtime) == 1


async def test_acquire_opens_and_requests_an_acquisition(runtime: Runtime) -> None:
    seen = events(runtime)
    outcome = await execute(runtime, message(runtime, "-c", "ACQUIRE", "-p", "9", "-l", "Roe"), ORIGIN)
    assert outcome.status is Status.CREATED
    assert [type(e) for e in seen] == [PatientOpened, AcquisitionRequested]
    assert isinstance(seen[1], AcquisitionRequested) and seen[1].pms_id == "9"


async def test_silent_publishes_no_ui_event(runtime: Runtime) -> None:
    seen = events(runtime)
    for command in ("ACQUIRE", "VIEW", "UPDATE_CREATE"):
        outcome = await execute(
            runtime, message(runtime, "-c", command, "-s", "YES", "-p", "10", "-l", "Leise"), ORIGIN
        )
        assert outcome.status.ok and outcome.viewer_url == ""
    assert seen == []


async def test_view_opens_and_a_viewer_follows(runtime: Runtime) -> None:
    seen = events(runtime)
    outcome = await execute(runtime, message(runtime, "-c", "VIEW", "-p", "11", "-l", "Roe"), ORIGIN)
    assert outcome.status is Status.CREATED
    assert [type(e) for e in seen] == [PatientOpened]
    assert outcome.patient and outcome.viewer_url.startswith(f"/viewer/?patient={outcome.patient.id}")


async def add_image(rt: Runtime, patient_id: int) -> None:
    await rt.service.add_images(ORIGIN, patient_id, [image_row(tooth_numbers=(36,))])


async def test_view_data_lists_the_images_and_a_viewer_follows(runtime: Runtime) -> None:
    created = await execute(runtime, message(runtime, "-p", "12", "-l", "Roe"), ORIGIN)
    assert created.patient is not None
    await add_image(runtime, created.patient.id)
    seen = events(runtime)
    outcome = await execute(runtime, message(runtime, "-c", "VIEW_DATA", "-p", "12"), ORIGIN)
    assert (outcome.status, outcome.message, [i.tooth_numbers for i in outcome.images]) == (
        Status.OK,
        "1 images",
        [(36,)],
    )
    assert [type(e) for e in seen] == [PatientOpened]
    assert outcome.viewer_url.startswith(f"/viewer/?patient={created.patient.id}")


async def test_view_data_reads_only(runtime: Runtime) -> None:
    seen = events(runtime)
    unknown = await execute(runtime, message(runtime, "-c", "VIEW_DATA", "-p", "13", "-l", "Neu"), ORIGIN)
    assert unknown.status is Status.NOT_FOUND and await count_patients(runtime) == 0
    await execute(runtime, message(runtime, "-p", "13", "-l", "Neu", "-f", "Alt"), ORIGIN)
    seen.clear()
    listed = await execute(
        runtime, message(runtime, "-c", "VIEW_DATA", "-s", "YES", "-p", "13", "-f", "Anders"), ORIGIN
    )
    assert listed.status is Status.OK and listed.patient and listed.patient.first_name == "Alt"
    assert seen == []


async def test_the_software_name_and_practice_id_key_the_patient(runtime: Runtime) -> None:
    """Two PMSs (or two practices of one) may use the same reference for different people. (A reference
    without a practice is not another practice's: a practice takes it, see test_identity.py.)"""
    a = await execute(runtime, message(runtime, "-p", "1", "-l", "A"), ORIGIN)
    custom = replace(options(runtime.settings), software_name="Other-PMS", practice_id="P1")
    b = await execute(runtime, parse_args(["-p", "1", "-l", "B"], custom, today=TODAY), ORIGIN)
    practice = replace(custom, practice_id="P2")
    c = await execute(runtime, parse_args(["-p", "1", "-l", "C"], practice, today=TODAY), ORIGIN)
    assert a.patient and b.patient and c.patient
    assert len({a.patient.id, b.patient.id, c.patient.id}) == 3
    assert (b.patient.pms_system, b.patient.practice_id) == ("Other-PMS", "P1")
    assert (c.patient.pms_system, c.patient.practice_id) == ("Other-PMS", "P2")


async def test_the_sending_software_version_is_logged_at_debug(
    runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    """OPP's softwareVersion changes nothing in the store; the debug log names it for an integration
    engineer (which PMS build sent what)."""
    xml = (
        '<opp version="1.3"><command type="UPDATE_CREATE" silent="NO"/>'
        '<software name="Praxis-PMS" version="7.2.1"/><patient reference="4711" lastName="Roe"/></opp>'
    )
    sent = parse_xml(xml.encode(), options(runtime.settings), today=TODAY)
    with caplog.at_level(logging.DEBUG, logger="bridge.handlers.opp"):
        outcome = await execute(runtime, sent, ORIGIN)
    assert outcome.status is Status.CREATED
    [record] = [r for r in caplog.records if r.getMessage() == "OPP message"]
    # The extra= fields are attributes LogRecord does not declare: read them from its __dict__.
    logged = {key: record.__dict__[key] for key in ("command", "version", "software_version")}
    assert logged == {"command": "UPDATE_CREATE", "version": "1.3", "software_version": "7.2.1"}
