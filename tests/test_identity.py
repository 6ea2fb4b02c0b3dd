"""The identity rules and the PMS settings, on SQLite and PostgreSQL, through the real service."""

from __future__ import annotations

import asyncio
import functools
import unicodedata
from dataclasses import replace
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from bridge.events import AcquisitionRequested, Event, ImageViewRequested, PatientOpened
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
from bridge.service import Refused, fold, same_beyond_spelling
from bridge.store.models import AuditEntry, Image, Patient, PmsLink
from bridge.store.types import utcnow
from tests.support.rows import image_row

ORIGIN = Origin(protocol="test", transport="api", workstation="WS1", actor="pytest")


def req(
    pms_id: str = "0042",
    *,
    action: Action = Action.OPEN,
    system: str = "PVS1",
    practice: str = "",
    chart: str = "",
    last: str = "Müller",
    first: str = "Hans",
    birth: date | None = date(1970, 1, 2),
    sex: Sex = Sex.MALE,
    silent: bool = False,
    id_kind: IdKind = IdKind.PMS_ID,
) -> PatientRequest:
    return PatientRequest(
        action=action,
        origin=ORIGIN,
        pms_system=system,
        pms_id=pms_id,
        practice_id=practice,
        chart_number=chart,
        id_kind=id_kind,
        demographics=Demographics(last_name=last, first_name=first, birth_date=birth, sex=sex),
        silent=silent,
    )


async def count_patients(rt: Runtime) -> int:
    return await rt.db.read(lambda s: s.execute(select(func.count()).select_from(Patient)).scalar_one())


def collect(rt: Runtime) -> list[Event]:
    seen: list[Event] = []
    rt.bus.subscribe(seen.append)
    return seen


async def test_open_creates_once_then_finds_the_same_patient(runtime: Runtime) -> None:
    first = await runtime.service.handle(req())
    again = await runtime.service.handle(req())
    assert first.status is Status.CREATED and again.status is Status.OK
    assert first.patient and again.patient and first.patient.id == again.patient.id
    assert again.patient.pms_id == "0042"
    assert await count_patients(runtime) == 1


async def test_pms_ids_are_opaque_strings(runtime: Runtime) -> None:
    ids = ["0042", "42", "A42", "a42"]
    found = {(await runtime.service.handle(req(i))).patient.id for i in ids}  # type: ignore[union-attr]
    assert len(found) == 4


async def test_an_id_differing_only_in_unicode_form_or_padding_is_the_same_patient(runtime: Runtime) -> None:
    """ "Jürgen-1" with a precomposed or a combining umlaut, " 007 " and "007": one key each; inside the
    id nothing is normalised ("007" and "7" stay two patients)."""
    composed = await runtime.service.handle(req("J\u00fcrgen-1"))
    decomposed = await runtime.service.handle(req("Ju\u0308rgen-1"))
    assert composed.patient and decomposed.patient and composed.patient.id == decomposed.patient.id
    padded = await runtime.service.handle(req(" 007 ", chart=" CH7\t"))
    plain = await runtime.service.handle(req("007", chart="CH7"))
    assert padded.patient and plain.patient and padded.patient.id == plain.patient.id
    assert plain.patient.pms_id == "007" and plain.patient.chart_number == "CH7"
    seven = await runtime.service.handle(req("7"))
    assert seven.patient and seven.patient.id != plain.patient.id
    [found] = await runtime.service.search_patients(ORIGIN, pms_id="Ju\u0308rgen-1 ")
    assert found.id == composed.patient.id


async def test_what_the_store_cannot_hold_is_refused_for_every_protocol(runtime: Runtime) -> None:
    """A 150-character surname (PostgreSQL refuses it, SQLite would store it) or a NUL in an id is an
    invalid request, answered in the protocol's way; nothing is stored."""
    too_long = await runtime.service.handle(req("0042", last="M" * 150))
    assert too_long.status is Status.INVALID
    assert too_long.message == "last name must be at most 120 characters, got 150"
    nul = await runtime.service.handle(req("00\x0042"))
    assert (
        nul.status is Status.INVALID and nul.message == "pms id must not contain a control character (U+0000)"
    )
    assert await count_patients(runtime) == 0


async def test_spelling_differences_update_without_conflict(runtime: Runtime) -> None:
    await runtime.service.handle(req(last="Müller"))
    outcome = await runtime.service.handle(req(last="Mueller"))
    assert outcome.status is Status.UPDATED
    assert outcome.patient and outcome.patient.last_name == "Mueller"


@pytest.mark.parametrize(
    ("change", "word"),
    [
        ({"birth": date(1971, 1, 2)}, "birth date"),
        ({"sex": Sex.FEMALE}, "sex"),
        ({"last": "Schmidt"}, "surname"),
    ],
)
async def test_disagreeing_demographics_are_a_conflict_not_a_merge_or_duplicate(
    runtime: Runtime, change: dict[str, Any], word: str
) -> None:
    created = await runtime.service.handle(req())
    outcome = await runtime.service.handle(req(**change))
    assert outcome.status is Status.CONFLICT
    assert word in outcome.message and outcome.conflict_id is not None
    assert await count_patients(runtime) == 1
    stored = await runtime.service.get_patient(ORIGIN, created.patient.id)  # type: ignore[union-attr]
    assert stored is not None and stored.last_name == "Müller" and stored.birth_date == date(1970, 1, 2)
    conflicts = await runtime.service.list_conflicts(ORIGIN)
    assert [c["id"] for c in conflicts] == [outcome.conflict_id]
    # the PMS repeating the request does not pile up conflicts
    repeat = await runtime.service.handle(req(**change))
    assert repeat.conflict_id == outcome.conflict_id


async def test_another_disagreement_for_the_same_id_is_another_conflict(runtime: Runtime) -> None:
    await runtime.service.handle(req())
    birth = await runtime.service.handle(req(birth=date(1971, 1, 2)))
    surname = await runtime.service.handle(req(last="Schmidt"))
    assert birth.status is surname.status is Status.CONFLICT
    assert birth.conflict_id != surname.conflict_id
    messages = sorted(c["message"] for c in await runtime.service.list_conflicts(ORIGIN))
    assert (
        len(messages) == 2 and "birth date" in messages[0] + messages[1] and "Schmidt" in " ".join(messages)
    )


async def test_missing_birth_date_or_unknown_sex_contradict_nothing(runtime: Runtime) -> None:
    await runtime.service.handle(req())
    outcome = await runtime.service.handle(req(birth=None, sex=Sex.UNKNOWN))
    assert outcome.status is Status.OK
    assert (
        outcome.patient and outcome.patient.birth_date == date(1970, 1, 2) and outcome.patient.sex is Sex.MALE
    )


async def test_changed_chart_number_follows_its_patient(runtime: Runtime) -> None:
    created = await runtime.service.handle(req(chart="SMIHA0"))
    moved = await runtime.service.handle(req(chart="SMIHA1"))
    assert moved.status is Status.UPDATED
    assert moved.patient and moved.patient.id == created.patient.id and moved.patient.chart_number == "SMIHA1"  # type: ignore[union-attr]
    assert await runtime.service.search_patients(ORIGIN, chart_number="SMIHA0") == []
    [found] = await runtime.service.search_patients(ORIGIN, chart_number="SMIHA1")
    assert found.id == moved.patient.id
    await runtime.audit.flush()
    actions = [e["action"] for e in await runtime.service.audit_entries(ORIGIN, patient_id=found.id)]
    assert "chart.renumber" in actions


async def test_a_chart_number_held_by_another_patient_is_a_conflict(runtime: Runtime) -> None:
    await runtime.service.handle(req("1", chart="CH1", last="Alpha"))
    second = await runtime.service.handle(req("2", chart="CH2", last="Beta"))
    outcome = await runtime.service.handle(req("2", chart="CH1", last="Beta"))
    assert outcome.status is Status.CONFLICT and "already the chart of another patient" in outcome.message
    [holder] = await runtime.service.search_patients(ORIGIN, chart_number="CH1")
    assert holder.last_name == "Alpha"
    again = await runtime.service.get_patient(ORIGIN, second.patient.id)  # type: ignore[union-attr]
    assert again is not None and again.chart_number == "CH2"


async def test_migrated_patient_is_linked_by_chart_number(runtime: Runtime) -> None:
    migrated = await runtime.service.handle(
        req("", chart="DX100", id_kind=IdKind.CHART_NUMBER, system="migration")
    )
    linked = await runtime.service.handle(req("9001", chart="DX100", system="dentrix"))
    assert linked.status is Status.UPDATED
    assert linked.patient and linked.patient.id == migrated.patient.id  # type: ignore[union-attr]
    assert linked.patient.pms_id == "9001"
    # another Dentrix id claiming the same chart is refused
    other = await runtime.service.handle(req("9002", chart="DX100", system="dentrix"))
    assert other.status is Status.CONFLICT


async def test_same_id_in_two_practices_is_two_patients(make_settings: Any) -> None:
    rt = Runtime.build(make_settings())
    try:
        a = await rt.service.handle(req(practice="P1"))
        b = await rt.service.handle(req(practice="P2"))
        assert a.patient and b.patient and a.patient.id != b.patient.id
    finally:
        rt.close()


async def test_ignore_practice_id_makes_them_one(make_settings: Any) -> None:
    rt = Runtime.build(make_settings(pms={"ignore_practice_id": "yes"}))
    try:
        a = await rt.service.handle(req(practice="P1"))
        b = await rt.service.handle(req(practice="P2"))
        assert a.patient and b.patient and a.patient.id == b.patient.id
        assert await count_patients(rt) == 1
    finally:
        rt.close()


async def test_switching_ignore_practice_id_off_again_finds_the_patients_linked_meanwhile(
    make_settings: Any,
) -> None:
    """Links made while practice ids were ignored carry no practice key; once they count again, the
    practice that made the link still finds its patient (no duplicate, images still listed)."""
    ignoring = Runtime.build(make_settings(pms={"ignore_practice_id": "yes"}))
    try:
        first = (await ignoring.service.handle(req(practice="P1"))).patient
        assert first is not None
        image_id = await add_image(ignoring, first.id)
        await ignoring.audit.flush()
    finally:
        ignoring.close()
    rt = Runtime.build(make_settings(pms={"ignore_practice_id": "no"}))
    try:
        listed = await rt.service.handle(req(practice="P1", action=Action.LIST_IMAGES))
        assert listed.status is Status.OK and [i.id for i in listed.images] == [image_id]
        opened = await rt.service.handle(req(practice="P1"))
        assert opened.status is Status.OK and opened.patient and opened.patient.id == first.id
        again = await rt.service.handle(req(practice="P1"))  # the read-only fast path, keyed again
        assert again.patient and again.patient.id == first.id
        assert await count_patients(rt) == 1
        other = await rt.service.handle(req(practice="P2"))  # another practice's patient 0042
        assert other.status is Status.CREATED and await count_patients(rt) == 2
        await rt.audit.flush()
    finally:
        rt.close()


async def test_a_chart_number_known_to_another_practice_is_a_conflict_not_a_link(runtime: Runtime) -> None:
    """Practices sharing a store number their charts independently: practice B's new id carrying chart
    2001 must not take over (and rewrite) practice NORTH's patient with that chart."""
    north = await runtime.service.handle(
        req("5", system="dentrix", practice="NORTH", chart="2001", last="Garcia", first="Luis")
    )
    assert north.status is Status.CREATED and north.patient is not None
    claimed = await runtime.service.handle(
        req("9", system="dentrix", practice="B", chart="2001", last="Garcia", first="Maria")
    )
    assert claimed.status is Status.CONFLICT
    assert (
        "is the chart of a patient of practice 'NORTH' (dentrix id '5'), not of practice 'B'"
        in claimed.message
    )
    by_chart = await runtime.service.handle(
        req("", system="dentrix", practice="B", chart="2001", id_kind=IdKind.CHART_NUMBER, last="Garcia")
    )
    assert by_chart.status is Status.CONFLICT
    kept = await runtime.service.get_patient(ORIGIN, north.patient.id)
    assert kept is not None and kept.first_name == "Luis" and kept.pms_id == "5"
    assert await count_patients(runtime) == 1
    # the practice's own chart-keyed launch still opens its patient by chart
    own = await runtime.service.handle(
        req(
            "",
            system="dentrix",
            practice="NORTH",
            chart="2001",
            id_kind=IdKind.CHART_NUMBER,
            last="Garcia",
            first="Luis",
        )
    )
    assert own.status is Status.OK and own.patient and own.patient.id == north.patient.id


async def test_an_export_naming_its_patient_hands_out_only_that_patients_images(runtime: Runtime) -> None:
    """MMOEXPORT with PATID: another patient's MMOID is missing, exactly like an unknown one."""
    mine = (await runtime.service.handle(req("0042"))).patient
    theirs = (await runtime.service.handle(req("0043", last="Meier"))).patient
    assert mine and theirs
    my_image, their_image = await add_image(runtime, mine.id), await add_image(runtime, theirs.id)
    refs = (str(my_image), str(their_image), "²")  # "²" is a digit to str.isdigit(), not an MMOID
    export = PatientRequest(Action.EXPORT_IMAGES, ORIGIN, "PVS1", pms_id="0042", image_refs=refs)
    outcome = await runtime.service.handle(export)
    assert outcome.status is Status.PARTIAL
    assert [i.id for i in outcome.images] == [my_image]
    assert outcome.missing_refs == (str(their_image), "²")
    unknown = await runtime.service.handle(replace(export, pms_id="7777"))
    assert unknown.status is Status.NOT_FOUND and unknown.images == ()
    anyone = await runtime.service.handle(replace(export, pms_id=""))  # the MMOID alone is the key
    assert [i.id for i in anyone.images] == [my_image, their_image]


async def test_update_patient_info_off_keeps_stored_demographics(make_settings: Any) -> None:
    rt = Runtime.build(make_settings(pms={"update_patient_info": "no"}))
    try:
        await rt.service.handle(req(first="Hans"))
        outcome = await rt.service.handle(req(first="Johannes"))
        assert outcome.status is Status.OK and outcome.patient and outcome.patient.first_name == "Hans"
    finally:
        rt.close()
    rt = Runtime.build(make_settings(pms={"update_patient_info": "yes"}))
    try:
        await rt.service.handle(req(first="Hans"))
        outcome = await rt.service.handle(req(first="Johannes"))
        assert (
            outcome.status is Status.UPDATED and outcome.patient and outcome.patient.first_name == "Johannes"
        )
    finally:
        rt.close()


async def test_allow_patient_creation_off_refuses_manual_creation_only(make_settings: Any) -> None:
    rt = Runtime.build(make_settings(pms={"allow_patient_creation": "no"}))
    try:
        manual = await rt.service.handle(req("5", action=Action.CREATE_OR_UPDATE))
        assert manual.status is Status.FORBIDDEN
        assert await count_patients(rt) == 0
        launched = await rt.service.handle(req("5", action=Action.OPEN))
        assert launched.status is Status.CREATED
        # updating an existing patient by hand is still allowed
        edited = await rt.service.handle(req("5", action=Action.CREATE_OR_UPDATE, first="Jo"))
        assert edited.status is Status.UPDATED
        imported = await rt.service.import_images(req("6", action=Action.IMPORT), [image_row()])
        assert imported[0].status is Status.FORBIDDEN and imported[1] == []
        assert (await rt.service.handle(req("6", action=Action.IMPORT))).status is Status.FORBIDDEN
        assert await count_patients(rt) == 1
    finally:
        rt.close()


async def test_update_of_an_unknown_patient_is_refused(runtime: Runtime) -> None:
    outcome = await runtime.service.handle(req("77", action=Action.UPDATE))
    assert outcome.status is Status.NOT_FOUND
    assert await count_patients(runtime) == 0


async def test_open_patient_settings_shape_the_event(make_settings: Any) -> None:
    for open_in, single in (("home", "no"), ("clinic", "yes")):
        rt = Runtime.build(make_settings(pms={"open_patient_in": open_in, "single_patient_mode": single}))
        try:
            seen = collect(rt)
            outcome = await rt.service.handle(req(action=Action.ACQUIRE))
            opened = [e for e in seen if isinstance(e, PatientOpened)]
            assert len(opened) == 1 and opened[0].open_in == open_in
            assert opened[0].single_patient is (single == "yes")
            assert f"open={open_in}" in outcome.viewer_url
            assert ("single=1" in outcome.viewer_url) is (single == "yes")
            assert any(isinstance(e, AcquisitionRequested) for e in seen)
        finally:
            rt.close()


async def add_image(rt: Runtime, patient_id: int) -> int:
    [view] = await rt.service.add_images(ORIGIN, patient_id, [image_row()])
    return view.id


async def import_patient(rt: Runtime, request: PatientRequest) -> tuple[Outcome, int]:
    """What a DICOM import of one file does for its patient: found or created with its image."""
    outcome, [view] = await rt.service.import_images(request, [image_row()])
    return outcome, view.id


async def test_an_import_creates_its_patient_only_with_its_images(runtime: Runtime) -> None:
    """An IMPORT request only finds its patient (NOT_FOUND when new); `import_images` resolves it by the
    same rules, creates it and adds the images in one transaction, so refused images leave no patient and
    a conflict leaves the images out, recorded as for any request."""
    assert (await runtime.service.handle(req("I1", action=Action.IMPORT))).status is Status.NOT_FOUND
    assert await count_patients(runtime) == 0
    created, images = await runtime.service.import_images(req("I1", action=Action.IMPORT), [image_row()])
    assert created.status is Status.CREATED and created.patient is not None and len(images) == 1
    assert images[0].patient_id == created.patient.id
    found = await runtime.service.handle(req("I1", action=Action.IMPORT))
    assert found.status is Status.OK and found.patient is not None and found.patient.id == created.patient.id
    other_birth = req("I1", action=Action.IMPORT, birth=date(1971, 1, 2))
    refused, none = await runtime.service.import_images(other_birth, [image_row()])
    assert refused.status is Status.CONFLICT and refused.conflict_id is not None and none == []
    with pytest.raises(Refused, match="belongs to another patient"):
        await runtime.service.import_images(
            req("I2", action=Action.IMPORT), [image_row(study_uid=images[0].study_uid)]
        )
    assert await count_patients(runtime) == 1
    assert len(await runtime.service.list_images(ORIGIN, created.patient.id)) == 1
    await runtime.audit.flush()
    actions = [e["action"] for e in await runtime.service.audit_entries(ORIGIN, limit=1000)]
    assert actions.count("patient.create") == 1 and actions.count("image.add") == 1
    assert actions.count("conflict.record") == 1


async def test_a_request_without_practice_id_finds_the_patient_of_any_practice(runtime: Runtime) -> None:
    """A PMS that sends its practice id on some requests only (a VDDS stage 2 without PRXNR, an import
    under an empty [dicom] practice_id) must not split its patient: such a request takes the id's one
    patient in any practice, refuses to choose between two, and creates one only when there is none."""
    launched = await runtime.service.handle(req("PR7", practice="1"))
    assert launched.status is Status.CREATED and launched.patient is not None
    image_id = await add_image(runtime, launched.patient.id)
    listed = await runtime.service.handle(req("PR7", action=Action.LIST_IMAGES))
    assert listed.status is Status.OK and [i.id for i in listed.images] == [image_id]
    for action in (Action.OPEN, Action.IMPORT, Action.OPEN):
        found = await runtime.service.handle(req("PR7", action=action))
        assert found.status is Status.OK and found.patient and found.patient.id == launched.patient.id
    assert await count_patients(runtime) == 1

    await runtime.service.handle(req("PR8", practice="1"))
    await runtime.service.handle(req("PR8", practice="2", last="Meier"))  # another practice's PR8
    for action in (Action.OPEN, Action.LIST_IMAGES):
        ambiguous = await runtime.service.handle(req("PR8", action=action))
        assert ambiguous.status is Status.CONFLICT and ambiguous.conflict_id is not None
        assert "names no practice" in ambiguous.message and "send the practice id" in ambiguous.message
    [conflict] = await runtime.service.list_conflicts(ORIGIN)
    assert (conflict["kind"], conflict["pms_id"], conflict["practice_id"]) == (
        "ambiguous-practice",
        "PR8",
        "",
    )
    assert await count_patients(runtime) == 3

    new = await runtime.service.handle(req("PR9"))  # unknown in every practice: created, as before
    assert new.status is Status.CREATED and new.patient and new.patient.practice_id == ""
    own = await runtime.service.handle(req("PR7", practice="1"))  # the practice's own key is unchanged
    assert own.status is Status.OK and own.patient and own.patient.id == launched.patient.id
    assert await count_patients(runtime) == 4


async def audit_details(rt: Runtime, action: str) -> list[str]:
    await rt.audit.flush()
    return [e["detail"] for e in await rt.service.audit_entries(ORIGIN) if e["action"] == action]


async def test_a_practice_takes_the_patient_a_request_without_practice_id_made(runtime: Runtime) -> None:
    """An import under an empty [dicom] practice_id made IM1 without a practice; the PMS then launches IM1
    with PRXNR=1. Practice 1 takes that patient (its link now names practice 1, audited), instead of
    making a second one; then IM1 is practice 1's, so practice 2's IM1 is another patient."""
    imported, image_id = await import_patient(runtime, req("IM1", action=Action.IMPORT))
    assert imported.status is Status.CREATED and imported.patient and imported.patient.practice_id == ""
    patient_id = imported.patient.id
    listed = await runtime.service.handle(req("IM1", practice="1", action=Action.LIST_IMAGES))
    assert listed.status is Status.OK and [i.id for i in listed.images] == [image_id]
    [unchanged] = await runtime.service.search_patients(ORIGIN, pms_id="IM1")
    assert unchanged.practice_id == "", "a read gave the link a practice"

    launched = await runtime.service.handle(req("IM1", practice="1", first="Hans-Peter"))
    assert launched.status is Status.UPDATED, launched.message
    assert launched.patient and (launched.patient.id, launched.patient.practice_id) == (patient_id, "1")
    assert await audit_details(runtime, "link.rekey") == ["practice '1' (the link named no practice)"]
    again = await runtime.service.handle(req("IM1", practice="1", first="Hans-Peter"))
    assert again.status is Status.OK and again.patient and again.patient.id == patient_id
    for action in (Action.IMPORT, Action.LIST_IMAGES):  # a request without a practice id still finds it
        found = await runtime.service.handle(req("IM1", action=action))
        assert found.status is Status.OK and found.patient and found.patient.id == patient_id
    assert await count_patients(runtime) == 1

    other = await runtime.service.handle(req("IM1", practice="2", last="Meier"))
    assert other.status is Status.CREATED and other.patient and other.patient.id != patient_id
    assert other.patient.practice_id == "2" and await count_patients(runtime) == 2
    ambiguous = await runtime.service.handle(req("IM1", action=Action.IMPORT))
    assert ambiguous.status is Status.CONFLICT and "names no practice" in ambiguous.message


async def test_a_link_without_practice_and_another_surname_is_a_conflict_not_a_duplicate(
    runtime: Runtime,
) -> None:
    """The usual checks apply to the patient a practice takes: another surname is a conflict, the link is
    left without a practice, and nothing is created; the surname spelled otherwise is the same patient."""
    imported, _ = await import_patient(runtime, req("IM2", action=Action.IMPORT, last="Müller"))
    assert imported.patient is not None
    refused = await runtime.service.handle(req("IM2", practice="1", last="Schmidt"))
    assert refused.status is Status.CONFLICT and refused.conflict_id is not None
    assert "surname 'Müller' in the store, 'Schmidt' sent" in refused.message
    repeated = await runtime.service.handle(req("IM2", practice="1", last="Schmidt"))
    assert repeated.conflict_id == refused.conflict_id
    [kept] = await runtime.service.search_patients(ORIGIN, pms_id="IM2")
    assert (kept.id, kept.practice_id, kept.last_name) == (imported.patient.id, "", "Müller")
    assert await count_patients(runtime) == 1
    spelled = await runtime.service.handle(req("IM2", practice="1", last="Mueller"))
    assert spelled.status is Status.UPDATED and spelled.patient and spelled.patient.id == imported.patient.id
    assert spelled.patient.practice_id == "1" and await count_patients(runtime) == 1


async def test_a_link_without_practice_is_not_taken_when_the_pms_knows_the_id_elsewhere(
    runtime: Runtime,
) -> None:
    """A store that the old rule left with an imported LX without a practice and practice 2's own LX (its
    launch split the import off): practice 1's LX cannot be told to be the imported one, so practice 1
    is refused (ambiguous-practice), for reads too, and nothing is created or relinked."""
    imported, _ = await import_patient(runtime, req("LX", action=Action.IMPORT))
    split = await runtime.service.handle(req("LX-2", system="OTHER", practice="2"))
    assert imported.patient and split.patient
    split_id = split.patient.id

    def old_split_link(session: Session) -> None:  # what practice 2's launch of LX made under the old rule
        now = utcnow()
        session.add(
            PmsLink(
                patient_id=split_id,
                pms_system="PVS1",
                practice_key="2",
                practice_id="2",
                pms_id="LX",
                protocol="test",
                created_at=now,
                last_seen_at=now,
            )
        )

    await runtime.db.write(old_split_link)
    for action in (Action.OPEN, Action.LIST_IMAGES):
        refused = await runtime.service.handle(req("LX", practice="1", action=action))
        assert refused.status is Status.CONFLICT, refused.message
        assert "linked without a practice, and also in practice '2'" in refused.message
    [conflict] = await runtime.service.list_conflicts(ORIGIN)
    assert conflict["kind"] == "ambiguous-practice"
    assert (conflict["patient_id"], conflict["other_patient_id"]) == (imported.patient.id, split_id)
    assert await count_patients(runtime) == 2
    assert await audit_details(runtime, "link.rekey") == []
    own = await runtime.service.handle(req("LX", practice="2"))  # practice 2's own LX is unchanged
    assert own.status is Status.OK and own.patient and own.patient.id == split_id


async def test_a_link_without_practice_on_a_patient_the_practice_knows_by_another_id_is_not_taken(
    make_settings: Any,
) -> None:
    """Practice 1 knows a patient as Y (chart C1); while ignore_practice_id was on, a request without a
    practice linked X to it by that chart. Practice 1's X is then not that patient (it is its Y): a
    conflict, not a patient with two ids of one practice."""
    settings = make_settings(pms={"ignore_practice_id": "no"})
    ignoring = make_settings(pms={"ignore_practice_id": "yes"})
    rt = Runtime.build(settings)
    try:
        known = await rt.service.handle(req("Y", practice="1", chart="C1"))
        assert known.status is Status.CREATED and known.patient is not None
    finally:
        rt.close()
    rt = Runtime.build(ignoring)
    try:
        linked = await rt.service.handle(req("X", chart="C1"))
        assert linked.status is Status.UPDATED and linked.patient and linked.patient.id == known.patient.id
    finally:
        rt.close()
    rt = Runtime.build(settings)
    try:
        refused = await rt.service.handle(req("X", practice="1"))
        assert refused.status is Status.CONFLICT, refused.message
        assert "also knows as 'Y' (practice '1')" in refused.message
        assert await count_patients(rt) == 1
        await rt.audit.flush()
    finally:
        rt.close()


async def test_a_chart_number_does_not_link_a_patient_the_pms_would_open_by_another_id(
    runtime: Runtime,
) -> None:
    """Practice 1 would open the patient imported as X without a practice by X: its new id Y arriving with
    that patient's chart number is a chart-number conflict, as for a patient linked to practice 1 itself.
    Likewise a request without a practice id, which opens an id's patient in any practice, cannot link
    practice 2's patient Z by its chart number under another id W."""
    imported, _ = await import_patient(runtime, req("X", chart="C9", action=Action.IMPORT))
    assert imported.status is Status.CREATED
    by_practice = await runtime.service.handle(req("Y", practice="1", chart="C9"))
    assert by_practice.status is Status.CONFLICT
    assert "belongs to a patient PVS1 knows under id 'X', not 'Y'" in by_practice.message
    practice_2 = await runtime.service.handle(req("Z", practice="2", chart="C8", last="Meier"))
    assert practice_2.status is Status.CREATED
    no_practice = await runtime.service.handle(req("W", chart="C8", last="Meier"))
    assert no_practice.status is Status.CONFLICT
    assert "belongs to a patient PVS1 knows under id 'Z', not 'W'" in no_practice.message
    assert await count_patients(runtime) == 2


async def test_a_name_in_another_unicode_form_is_the_same_name(runtime: Runtime) -> None:
    """'Müller' decomposed (a macOS browser, an OPP web PMS) and composed (VDDS) is one name: no update on
    every other launch, and stored composed whichever form came first."""
    nfd = functools.partial(unicodedata.normalize, "NFD")
    created = await runtime.service.handle(req("N1", last="Müller", first="Zoë"))
    assert created.status is Status.CREATED and created.patient is not None
    for _ in range(2):
        for last, first in ((nfd("Müller"), nfd("Zoë")), ("Müller", "Zoë")):
            again = await runtime.service.handle(req("N1", last=last, first=first))
            assert again.status is Status.OK, again.message
    first_nfd = await runtime.service.handle(req("N2", last=nfd("Jürgens"), first=nfd("Zoë")))
    assert first_nfd.patient and (first_nfd.patient.last_name, first_nfd.patient.first_name) == (
        "Jürgens",
        "Zoë",
    )
    assert (await runtime.service.handle(req("N2", last="Jürgens", first="Zoë"))).status is Status.OK
    await runtime.audit.flush()
    entries = await runtime.service.audit_entries(ORIGIN)
    assert [e for e in entries if e["action"] == "patient.update"] == []


async def test_open_image_as_chooses_preview_or_clinic(make_settings: Any) -> None:
    for open_as, expected in (("preview", "/preview"), ("clinic", "open=clinic")):
        rt = Runtime.build(make_settings(pms={"open_image_as": open_as}))
        try:
            patient = (await rt.service.handle(req())).patient
            assert patient is not None
            image_id = await add_image(rt, patient.id)
            seen = collect(rt)
            view = PatientRequest(Action.VIEW_IMAGE, ORIGIN, "PVS1", image_refs=(str(image_id),))
            outcome = await rt.service.handle(view)
            assert outcome.status is Status.OK and expected in outcome.viewer_url
            [event] = [e for e in seen if isinstance(e, ImageViewRequested)]
            assert event.open_as == open_as and event.image_id == image_id
        finally:
            rt.close()


async def test_silent_requests_publish_nothing(runtime: Runtime) -> None:
    seen = collect(runtime)
    outcome = await runtime.service.handle(req(silent=True))
    assert outcome.status is Status.CREATED and seen == []


async def test_export_names_missing_images(runtime: Runtime) -> None:
    patient = (await runtime.service.handle(req())).patient
    assert patient is not None
    image_id = await add_image(runtime, patient.id)
    export = PatientRequest(Action.EXPORT_IMAGES, ORIGIN, "PVS1", image_refs=(str(image_id), "999999", "x_1"))
    outcome = await runtime.service.handle(export)
    assert outcome.status is Status.PARTIAL
    assert [i.id for i in outcome.images] == [image_id]
    assert outcome.missing_refs == ("999999", "x_1")


async def test_fifty_concurrent_creates_make_one_patient(runtime: Runtime) -> None:
    results = await asyncio.gather(*(runtime.service.handle(req("NEW-1")) for _ in range(50)))
    assert {r.patient.id for r in results if r.patient} == {results[0].patient.id}  # type: ignore[union-attr]
    assert [r.status for r in results].count(Status.CREATED) == 1
    assert all(r.status in (Status.CREATED, Status.OK) for r in results)
    assert await count_patients(runtime) == 1


async def test_every_change_and_read_is_audited(runtime: Runtime) -> None:
    created = await runtime.service.handle(req())
    assert created.patient is not None
    await runtime.service.get_patient(ORIGIN, created.patient.id)
    await runtime.audit.flush()
    entries = await runtime.service.audit_entries(ORIGIN, patient_id=created.patient.id)
    actions = [e["action"] for e in entries]
    assert actions[:1] == ["patient.create"] and "patient.read" in actions
    assert all(e["protocol"] == "test" and e["workstation"] == "WS1" for e in entries)


async def test_a_flush_waits_for_the_batch_another_flush_is_writing(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The periodic flush has taken the queued reads and is still writing them when the audit API flushes
    to show them: that flush must wait for the write, or the API misses those reads."""
    created = await runtime.service.handle(req())
    assert created.patient is not None
    await runtime.audit.flush()
    for _ in range(3):
        await runtime.service.get_patient(ORIGIN, created.patient.id)
    real_write = runtime.db.write

    async def slow_write(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(0.3)
        return await real_write(*args, **kwargs)

    monkeypatch.setattr(runtime.db, "write", slow_write)
    periodic = asyncio.create_task(runtime.audit.flush())
    await asyncio.sleep(0)  # it has taken the queued reads and waits on the database
    await runtime.audit.flush()
    entries = await runtime.service.audit_entries(ORIGIN, patient_id=created.patient.id)
    assert [e["action"] for e in entries].count("patient.read") == 3
    assert await periodic == 3


def test_spelling_rule() -> None:
    assert fold("Müller") == "muller" and fold("Strauß") == "strauss"
    for a, b in [
        ("Müller", "Mueller"),
        ("Van Der Berg", "VanDerBerg"),
        ("O'Neil", "ONeil"),
        ("Meier", "Meyer"),
        ("Schwarzenegger", "Schwartzenegger"),
    ]:
        assert same_beyond_spelling(a, b), (a, b)
    for a, b in [("Müller", "Schmidt"), ("Meier", "Maurer"), ("Smith", "Jones")]:
        assert not same_beyond_spelling(a, b), (a, b)


async def test_opening_a_known_unchanged_patient_needs_no_write_lock(tmp_path: Path) -> None:
    """The common launch (a known patient, nothing new) is a read: it is answered while a writer holds
    the store's write lock (SQLite has one, which makes this observable), and it changes nothing."""
    import sqlite3

    from bridge.config import load_settings
    from tests.conftest import write_config

    settings = load_settings(str(write_config(tmp_path / "home", f"sqlite:///{tmp_path / 'lock.db'}")))
    rt = Runtime.build(settings)
    try:
        created = await rt.service.handle(req(chart="CH7"))
        assert created.patient is not None
        blocker = sqlite3.connect(settings.store.url.removeprefix("sqlite:///"), timeout=1)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            async with asyncio.timeout(5):
                again = await rt.service.handle(req(chart="CH7"))
        finally:
            blocker.rollback()
            blocker.close()
        assert again.status is Status.OK and again.patient == created.patient
        changed = await rt.service.handle(req(chart="CH7", first="Johann"))
        assert changed.status is Status.UPDATED  # a change still takes the writing path
        await rt.audit.flush()
        actions = [e["action"] for e in await rt.service.audit_entries(ORIGIN, patient_id=created.patient.id)]
        assert actions.count("patient.open") == 1 and "patient.update" in actions
    finally:
        rt.close()


async def test_a_batch_of_images_finds_and_creates_its_studies_and_series_once(runtime: Runtime) -> None:
    """`add_images` looks a batch's studies and series up at once: images of one study UID share it (a
    stored one or one the batch creates), an image without UIDs gets a study and series of its own, each
    image's row, audit entry and view come back in the batch's order, and a series UID stored under
    another study refuses the whole batch (nothing of it stays)."""
    outcome, [first] = await runtime.service.import_images(
        req("B1", action=Action.IMPORT), [image_row(study_uid="1.2.9.1")]
    )
    assert outcome.patient is not None
    patient_id = outcome.patient.id
    uids = ["1.2.9.1", "1.2.9.2", "", "1.2.9.2", ""]
    batch = [
        replace(image_row(study_uid=uid, sop_instance_uid=f"1.2.9.9.{n}"), series_uid=uid and uid + ".7")
        for n, uid in enumerate(uids)
    ]
    views = await runtime.service.add_images(ORIGIN, patient_id, batch)
    assert [v.sop_instance_uid for v in views] == [f"1.2.9.9.{n}" for n in range(5)]
    assert views[0].study_uid == first.study_uid == "1.2.9.1"
    assert views[1].study_uid == views[3].study_uid == "1.2.9.2"
    assert views[1].series_uid == views[3].series_uid == "1.2.9.2.7"
    own = {views[2].study_uid, views[4].study_uid}
    assert len(own) == 2 and not own & {"1.2.9.1", "1.2.9.2"}  # generated, one per image
    assert views[2].series_uid != views[4].series_uid

    def stored(session: Session) -> tuple[list[tuple[int, str]], list[int | None]]:
        rows = session.execute(select(Image.id, Image.sop_instance_uid).order_by(Image.id)).all()
        audited = session.scalars(
            select(AuditEntry.image_id).where(AuditEntry.action == "image.add").order_by(AuditEntry.id)
        ).all()
        return [(row.id, row.sop_instance_uid) for row in rows], list(audited)

    rows, audited = runtime.db.read_sync(stored)
    assert rows[1:] == [(v.id, v.sop_instance_uid) for v in views]
    assert audited == [first.id, *(v.id for v in views)]

    moved = replace(image_row(study_uid="1.2.9.3", sop_instance_uid="1.2.9.9.9"), series_uid="1.2.9.2.7")
    with pytest.raises(Refused, match=r"series 1\.2\.9\.2\.7 belongs to another study"):
        await runtime.service.add_images(ORIGIN, patient_id, [image_row(sop_instance_uid="1.2.9.9.8"), moved])
    rows_after, _ = runtime.db.read_sync(stored)
    assert rows_after == rows
