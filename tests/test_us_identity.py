"""Identity rules the US formats add to the service, on SQLite and PostgreSQL.

Patterson's legacy bridge sends only the last 5 characters of its patient number: the service matches
them against the ends of known numbers, on the number alone, and refuses an ambiguous match. CLINIVIEW
strips spaces from names: such a name neither conflicts nor overwrites the stored one.
"""

from __future__ import annotations

from datetime import date
from typing import Any

import pytest

from bridge.model import Action, Demographics, IdKind, Origin, PatientRequest, Sex, Status
from bridge.runtime import Runtime

ORIGIN = Origin(protocol="eaglesoft", transport="cli", workstation="OP1", actor="pytest")


def patient(
    pms_id: str,
    *,
    suffix: int = 0,
    system: str = "eaglesoft",
    practice: str = "",
    last: str = "Brontë",
    first: str = "Anne",
    birth: date | None = date(1980, 1, 17),
    action: Action = Action.OPEN,
) -> PatientRequest:
    return PatientRequest(
        action=action,
        origin=ORIGIN,
        pms_system=system,
        pms_id=pms_id,
        practice_id=practice,
        id_kind=IdKind.PMS_ID_SUFFIX if suffix else IdKind.PMS_ID,
        id_suffix_length=suffix,
        demographics=Demographics(last_name=last, first_name=first, birth_date=birth, sex=Sex.FEMALE),
    )


async def conflicts(rt: Runtime) -> list[dict[str, Any]]:
    return await rt.service.list_conflicts(ORIGIN)


async def test_a_truncated_number_finds_the_one_patient_whose_number_ends_so(runtime: Runtime) -> None:
    full = await runtime.service.handle(patient("1042817"))
    found = await runtime.service.handle(patient("42817", suffix=5))
    assert found.status is Status.OK
    assert found.patient and full.patient and found.patient.id == full.patient.id
    assert found.patient.pms_id == "1042817"  # the link keeps the whole number
    assert await runtime.service.search_patients(ORIGIN, pms_id="42817") == []


async def test_an_ambiguous_truncated_number_is_a_recorded_conflict(runtime: Runtime) -> None:
    await runtime.service.handle(patient("1012345", last="Alpha"))
    await runtime.service.handle(patient("2012345", last="Beta"))
    outcome = await runtime.service.handle(patient("12345", suffix=5, last="Alpha"))
    assert outcome.status is Status.CONFLICT
    assert "1012345, 2012345" in outcome.message and "send the whole number" in outcome.message
    again = await runtime.service.handle(patient("12345", suffix=5, last="Alpha"))
    assert again.conflict_id == outcome.conflict_id  # a repeated launch does not pile conflicts up
    [conflict] = await conflicts(runtime)
    assert (conflict["kind"], conflict["pms_id"]) == ("ambiguous-id-suffix", "12345")
    assert conflict["detail"]["candidates"] == ["1012345", "2012345"]
    assert await runtime.service.search_patients(ORIGIN, pms_id="12345") == []  # nobody created


async def test_a_number_shorter_than_the_suffix_is_a_whole_number(runtime: Runtime) -> None:
    await runtime.service.handle(patient("10817", last="Alpha"))
    outcome = await runtime.service.handle(patient("817", suffix=5))
    assert outcome.status is Status.CREATED  # 817 was sent whole: it is not the end of 10817
    assert outcome.patient and outcome.patient.pms_id == "817"


async def test_an_unknown_truncated_number_creates_a_patient_found_again_by_it(runtime: Runtime) -> None:
    created = await runtime.service.handle(patient("00817", suffix=5))
    again = await runtime.service.handle(patient("00817", suffix=5))
    assert created.status is Status.CREATED and again.status is Status.OK
    assert created.patient and again.patient and created.patient.id == again.patient.id
    assert again.patient.pms_id == "00817"  # leading zeros of the suffix are kept


async def test_suffix_matching_is_exact_text_per_system_and_practice(runtime: Runtime) -> None:
    await runtime.service.handle(patient("91_45", last="Alpha"))
    await runtime.service.handle(patient("9A145", system="other", last="Beta"))
    await runtime.service.handle(patient("7712345", practice="P2", last="Gamma"))
    # "_" is no wildcard, the other system and the other practice do not count
    assert (await runtime.service.handle(patient("1_45", suffix=4, last="Alpha"))).status is Status.OK
    assert (await runtime.service.handle(patient("12345", suffix=5, last="Delta"))).status is Status.CREATED


async def test_a_suffix_match_with_other_demographics_is_refused(runtime: Runtime) -> None:
    """The cross-check that keeps a truncated number from opening somebody else."""
    await runtime.service.handle(patient("1042817", birth=date(1980, 1, 17)))
    outcome = await runtime.service.handle(patient("42817", suffix=5, birth=date(1990, 5, 5)))
    assert outcome.status is Status.CONFLICT and "birth date" in outcome.message


async def test_suffix_request_without_a_length_is_invalid(runtime: Runtime) -> None:
    bad = PatientRequest(
        action=Action.OPEN, origin=ORIGIN, pms_system="eaglesoft", pms_id="1", id_kind=IdKind.PMS_ID_SUFFIX
    )
    assert (await runtime.service.handle(bad)).status is Status.INVALID


@pytest.mark.parametrize(
    ("stored", "sent", "kept"),
    [
        ("Van Der Berg", "VanDerBerg", "Van Der Berg"),  # spaces lost: the stored name stays
        ("Van Der Berg", "VanDenBerg", "VanDenBerg"),  # another spelling: updated as before
        ("Smith", "Smith", "Smith"),
    ],
)
async def test_a_name_that_only_lost_its_spaces_does_not_overwrite(
    runtime: Runtime, stored: str, sent: str, kept: str
) -> None:
    await runtime.service.handle(patient("5", system="cliniview", last=stored, first="Mary Ann"))
    outcome = await runtime.service.handle(patient("5", system="cliniview", last=sent, first="MaryAnn"))
    assert outcome.status in (Status.OK, Status.UPDATED)
    assert outcome.patient and (outcome.patient.last_name, outcome.patient.first_name) == (kept, "Mary Ann")
