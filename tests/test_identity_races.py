"""Concurrent requests that check and then change one patient, on SQLite and PostgreSQL, for real.

Each test fires its requests at once through the real service (its database threads, one connection each)
and repeats that over fresh patients: on PostgreSQL (READ COMMITTED) the checks of a patient's links,
demographics and chart numbers raced without the patient's row lock, and these rounds showed it every
time. SQLite serialises writers (BEGIN IMMEDIATE) and must give the same answers.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import date
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from bridge.config import Settings
from bridge.model import (
    Action,
    Demographics,
    IdKind,
    Origin,
    Outcome,
    PatientRequest,
    Sex,
    Status,
)
from bridge.runtime import Runtime
from bridge.store.models import ChartAlias, Conflict, Image, Patient, PmsLink
from tests.support.rows import image_row

ORIGIN = Origin(protocol="dentrix", transport="http", workstation="WS1", actor="pytest")
ROUNDS = 8
RACERS = 8  # requests fired at once per round; the store gets as many database threads


@pytest.fixture
async def racing(make_settings: Any) -> Any:
    """A runtime with one database thread (and connection) per racing request."""
    settings: Settings = make_settings(store={"db_threads": RACERS})
    rt = Runtime.build(settings)
    yield rt
    await rt.audit.flush()
    rt.close()


def smith(
    pms_id: str,
    *,
    chart: str = "",
    practice: str = "",
    action: Action = Action.OPEN,
    birth: date | None = date(1960, 5, 6),
    sex: Sex = Sex.MALE,
) -> PatientRequest:
    return PatientRequest(
        action=action,
        origin=ORIGIN,
        pms_system="DEMO",
        practice_id=practice,
        pms_id=pms_id,
        chart_number=chart,
        id_kind=IdKind.PMS_ID if pms_id else IdKind.CHART_NUMBER,
        demographics=Demographics(last_name="Smith", first_name="John", birth_date=birth, sex=sex),
    )


async def at_once(rt: Runtime, requests: list[PatientRequest]) -> list[Outcome]:
    return list(await asyncio.gather(*(rt.service.handle(r) for r in requests)))


async def migrated(rt: Runtime, chart: str) -> int:
    """A patient known only by its chart number, as migrated from the legacy imaging system."""
    outcome = await rt.service.handle(smith("", chart=chart, action=Action.CREATE_OR_UPDATE))
    assert outcome.status is Status.CREATED and outcome.patient is not None
    return outcome.patient.id


async def scalar(rt: Runtime, statement: Any) -> Any:
    return await rt.db.read(lambda session: session.scalar(statement))


async def current_charts(rt: Runtime, patient_id: int) -> list[str]:
    current = select(ChartAlias.chart_number).where(
        ChartAlias.patient_id == patient_id, ChartAlias.retired_at.is_(None)
    )
    return await rt.db.read(lambda session: list(session.scalars(current)))


async def test_two_ids_racing_for_one_migrated_chart_number_link_it_once(racing: Runtime) -> None:
    """Ids X-0 .. X-7 of one PMS all arrive with the chart number of one migrated patient: the first links
    it, every other is a chart-number conflict (never a second id of the same PMS on the patient)."""
    for round_ in range(ROUNDS):
        chart = f"MG{round_}"
        patient_id = await migrated(racing, chart)
        outcomes = await at_once(racing, [smith(f"X{round_}-{n}", chart=chart) for n in range(RACERS)])
        statuses = sorted(o.status for o in outcomes)
        assert statuses == sorted([Status.UPDATED] + [Status.CONFLICT] * (RACERS - 1)), statuses
        assert {o.message.split(" belongs")[0] for o in outcomes if o.status is Status.CONFLICT} == {
            f"chart number {chart!r}"
        }
        links = select(func.count()).select_from(PmsLink).where(PmsLink.patient_id == patient_id)
        assert await scalar(racing, links) == 1


async def test_two_practices_racing_for_one_migrated_chart_number_link_it_once(racing: Runtime) -> None:
    """Practices P0 .. P7 each claim one migrated patient by its chart number at once: chart numbers belong
    to one practice, so one links it and the others are told it is another practice's patient."""
    for round_ in range(ROUNDS):
        chart = f"PR{round_}"
        patient_id = await migrated(racing, chart)
        outcomes = await at_once(
            racing, [smith(f"Y{round_}", chart=chart, practice=f"P{n}") for n in range(RACERS)]
        )
        statuses = sorted(o.status for o in outcomes)
        assert statuses == sorted([Status.UPDATED] + [Status.CONFLICT] * (RACERS - 1)), statuses
        links = select(func.count()).select_from(PmsLink).where(PmsLink.patient_id == patient_id)
        assert await scalar(racing, links) == 1


async def test_one_id_with_two_birth_dates_at_once_is_one_update_and_one_conflict(racing: Runtime) -> None:
    """LU1 is known without a birth date and sex; two launches at once bring 1980-01-01/M and 1990-12-31/F.
    One fills them in, the other disagrees with what the first stored: a conflict, and no caller is shown
    data the store does not hold."""
    births = [(date(1980, 1, 1), Sex.MALE), (date(1990, 12, 31), Sex.FEMALE)]
    for round_ in range(ROUNDS):
        pms_id = f"LU{round_}"
        created = await racing.service.handle(
            smith(pms_id, action=Action.CREATE_OR_UPDATE, birth=None, sex=Sex.UNKNOWN)
        )
        assert created.status is Status.CREATED and created.patient is not None
        outcomes = await at_once(racing, [smith(pms_id, birth=b, sex=s) for b, s in births * (RACERS // 2)])
        accepted = [o for o in outcomes if o.status is not Status.CONFLICT]
        assert {(o.patient.birth_date, o.patient.sex) for o in accepted if o.patient} in [
            {(b, s)} for b, s in births
        ], [o.status for o in outcomes]
        stored = await racing.service.get_patient(ORIGIN, created.patient.id)
        assert stored is not None and accepted[0].patient is not None
        assert (stored.birth_date, stored.sex) == (accepted[0].patient.birth_date, accepted[0].patient.sex)
        assert [o.status for o in outcomes].count(Status.CONFLICT) == RACERS // 2


async def test_renumbering_one_chart_at_once_leaves_one_current_chart_number(racing: Runtime) -> None:
    """Eight launches for RN at once, each with another chart number: they renumber one after the other,
    and the patient ends with exactly one current chart number."""
    for round_ in range(ROUNDS):
        pms_id = f"RN{round_}"
        created = await racing.service.handle(smith(pms_id, chart=f"{pms_id}-C0"))
        assert created.patient is not None
        outcomes = await at_once(racing, [smith(pms_id, chart=f"{pms_id}-C{n + 1}") for n in range(RACERS)])
        assert all(o.status is Status.UPDATED for o in outcomes), [o.message for o in outcomes]
        charts = await current_charts(racing, created.patient.id)
        assert len(charts) == 1, charts
        stored = await racing.service.get_patient(ORIGIN, created.patient.id)
        assert stored is not None and stored.chart_number == charts[0]


async def test_identical_conflicting_requests_at_once_record_one_conflict(racing: Runtime) -> None:
    """Eight identical launches at once disagree with the stored birth date: all are refused with the same
    conflict, as the docs promise for a PMS repeating a request."""
    for round_ in range(ROUNDS):
        pms_id = f"CF{round_}"
        await racing.service.handle(smith(pms_id))
        outcomes = await at_once(racing, [smith(pms_id, birth=date(1961, 5, 6))] * RACERS)
        assert all(o.status is Status.CONFLICT for o in outcomes)
        assert len({o.conflict_id for o in outcomes}) == 1

        def open_conflicts(session: Session, pms_id: str = pms_id) -> int:
            stmt = select(func.count()).select_from(Conflict).where(Conflict.pms_id == pms_id)
            return int(session.scalar(stmt.where(Conflict.resolved_at.is_(None))) or 0)

        assert await racing.db.read(open_conflicts) == 1


async def test_one_id_arriving_at_once_with_a_migrated_chart_number_links_it_without_conflict(
    racing: Runtime,
) -> None:
    """The same launch (id X, the migrated chart number) eight times at once: the first links the patient
    and the others, having waited for it, find that link; none is told its own id is another one."""
    for round_ in range(ROUNDS):
        chart = f"SM{round_}"
        patient_id = await migrated(racing, chart)
        outcomes = await at_once(racing, [smith(f"Z{round_}", chart=chart)] * RACERS)
        assert all(o.status in (Status.UPDATED, Status.OK) for o in outcomes), [o.message for o in outcomes]
        assert {o.patient.id for o in outcomes if o.patient} == {patient_id}


async def test_a_chart_number_renumbered_away_while_linking_by_it_is_not_followed(racing: Runtime) -> None:
    """Another PMS renumbers a patient from C0 to C1 while DEMO links by C0 at once. Either DEMO came first
    and linked the patient while C0 was its chart, or it came second and C0 belongs to nobody: a new
    patient. Either way DEMO's patient has chart C0 when DEMO is answered, never C1."""
    for round_ in range(ROUNDS * 2):
        other = replace(smith(f"O{round_}", chart=f"RC{round_}-C0"), pms_system="OTHER")
        created = await racing.service.handle(other)
        assert created.status is Status.CREATED
        renumber = replace(other, chart_number=f"RC{round_}-C1")
        outcomes = await at_once(racing, [renumber, smith(f"D{round_}", chart=f"RC{round_}-C0")])
        assert outcomes[0].status is Status.UPDATED
        linked = outcomes[1]
        assert linked.status in (Status.UPDATED, Status.CREATED) and linked.patient is not None
        assert linked.patient.chart_number == f"RC{round_}-C0", linked.status


async def test_practices_taking_one_link_without_practice_at_once_leave_it_to_one(racing: Runtime) -> None:
    """An import made AD without a practice; practices P0 .. P7 launch AD at once. One takes the imported
    patient (its link then names that practice); every other, having waited for the patient, finds the
    link is another practice's now and makes its own patient, as practice ids count. None takes the link
    from the one that took it, none fails."""
    for round_ in range(ROUNDS):
        pms_id = f"AD{round_}"
        imported, _ = await racing.service.import_images(
            smith(pms_id, action=Action.IMPORT), [image_row(sop_instance_uid=f"2.25.9{round_}")]
        )
        assert imported.status is Status.CREATED and imported.patient is not None
        outcomes = await at_once(racing, [smith(pms_id, practice=f"P{n}") for n in range(RACERS)])
        assert all(o.patient is not None for o in outcomes), [o.message for o in outcomes]
        patients = [o.patient for o in outcomes if o.patient]
        [winner] = [p for p in patients if p.id == imported.patient.id]
        others = [o for o in outcomes if o.patient and o.patient.id != imported.patient.id]
        assert all(o.status is Status.CREATED for o in others), [o.message for o in others]
        assert len({o.patient.id for o in others if o.patient}) == RACERS - 1
        owner = select(PmsLink.practice_id).where(PmsLink.patient_id == imported.patient.id)
        assert await scalar(racing, owner) == winner.practice_id != ""


async def test_imports_of_one_new_patient_at_once_create_it_once_and_refused_ones_nothing(
    racing: Runtime,
) -> None:
    """Eight imports of the new patient IM at once, each with one image; half of them carry a SOP Instance
    UID another patient's image already has. The patient is created once, in the transaction of an
    import whose image is added: the refused ones roll back (creation included), the others find the
    created patient (the link's unique key decides, the loser retries) and add their images to it."""
    taken = await racing.service.handle(smith("TAKEN", action=Action.CREATE_OR_UPDATE))
    assert taken.patient is not None
    await racing.service.add_images(ORIGIN, taken.patient.id, [image_row(sop_instance_uid="2.25.1")])
    for round_ in range(ROUNDS):
        request = smith(f"IM{round_}", action=Action.IMPORT)
        uids = [f"2.25.{round_}0{n}" if n % 2 else "2.25.1" for n in range(RACERS)]
        results = await asyncio.gather(
            *(racing.service.import_images(request, [image_row(sop_instance_uid=uid)]) for uid in uids),
            return_exceptions=True,
        )
        refused = [r for r in results if isinstance(r, BaseException)]
        assert len(refused) == RACERS // 2 and all(isinstance(r, IntegrityError) for r in refused), refused
        imported = [r for r in results if not isinstance(r, BaseException)]
        statuses = sorted(outcome.status for outcome, _images in imported)
        assert statuses == sorted([Status.CREATED] + [Status.OK] * (RACERS // 2 - 1)), statuses
        patient_ids = {outcome.patient.id for outcome, _images in imported if outcome.patient}
        assert len(patient_ids) == 1
        links = select(func.count()).select_from(PmsLink).where(PmsLink.pms_id == f"IM{round_}")
        assert await scalar(racing, links) == 1
        images = select(func.count()).select_from(Image).where(Image.patient_id.in_(patient_ids))
        assert await scalar(racing, images) == RACERS // 2
    assert await scalar(racing, select(func.count()).select_from(Patient)) == ROUNDS + 1


async def test_a_new_id_asked_for_with_and_without_its_practice_at_once_is_one_patient(
    racing: Runtime,
) -> None:
    """A new id NP launched by practice P (VDDS with PRXNR) and imported without a practice (an empty
    `[dicom] practice_id`) at the same moment. The two keys differ, so no unique key decided between
    them: on PostgreSQL both found no link and each made a patient. Every request for a PMS id now waits
    for the others of that id (whatever their practice) before it looks, so the later one finds the
    earlier one's patient: one patient, one CREATED."""
    for round_ in range(ROUNDS):
        pms_id = f"NP{round_}"
        requests = [smith(pms_id, practice="P" if n % 2 else "") for n in range(RACERS)]
        outcomes = await at_once(racing, requests)
        assert all(o.patient is not None for o in outcomes), [o.message for o in outcomes]
        assert len({o.patient.id for o in outcomes if o.patient}) == 1
        assert sorted(o.status for o in outcomes) == sorted([Status.CREATED] + [Status.OK] * (RACERS - 1))
    assert await scalar(racing, select(func.count()).select_from(Patient)) == ROUNDS
