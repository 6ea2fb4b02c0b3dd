"""THE one place where a request meets the store: the identity rules and the PMS policy settings.

Identity rules (ARCHITECTURE section 4), all here and nowhere else:

* A patient is keyed by (PMS system, practice id unless `ignore_practice_id`, the PMS's patient id). The
  PMS id is an opaque string: leading zeros, letters and case are kept.
* A chart number is an alias that can change: the link follows the immutable PMS id and the alias moves.
  A chart number that is current for another patient is a recorded conflict, never a silent relink.
* Nobody is matched by name, SSN or birth date alone. A known id arriving with demographics that disagree
  beyond spelling (another birth date, another sex, another surname) is neither merged nor duplicated: a
  conflict is recorded and the PMS gets a clear error.
* Concurrent requests for one new patient create one patient: the unique key on the link decides, and
  the loser retries and finds the winner's patient (no check-then-insert race).
* Every read or change is audited.

PMS settings (DTX Studio Clinic's, same meaning): `ignore_practice_id`, `update_patient_info`,
`allow_patient_creation` (creation outside a PMS launch: REST "+", import), `single_patient_mode`,
`open_patient_in`, `open_image_as` (the last three shape the events and viewer links).
"""

from __future__ import annotations

import logging
import time
import unicodedata
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import date, datetime
from types import SimpleNamespace
from typing import Any, TypeVar

from sqlalchemy import Select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from bridge.announce import OwnAdditions
from bridge.audit import AuditLog
from bridge.config import PmsSettings
from bridge.events import AcquisitionRequested, EventBus, ImagesAdded, ImageViewRequested, PatientOpened
from bridge.model import (
    Action,
    Category,
    Demographics,
    IdKind,
    ImageDetails,
    ImageView,
    NewImage,
    Origin,
    Outcome,
    PatientRequest,
    PatientView,
    Sex,
    Status,
)
from bridge.store import queries as q
from bridge.store.db import Database, is_unique_violation, lock_key
from bridge.store.limits import DEMOGRAPHIC_TEXTS, text_problem
from bridge.store.models import (
    AuditEntry,
    ChartAlias,
    Conflict,
    OutboxMessage,
    Patient,
    PmsLink,
    Series,
    Study,
)
from bridge.store.types import utcnow
from protocols.common import latest_birth_date

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_CREATE_RETRIES = 8
MAX_REMEMBERED_IMAGE_VIEWS = 10_000

# Decides which push channels (outbox) announce new images to the PMS behind a link:
# (protocol of the link, pms_system) -> channel names. Protocols register theirs at daemon start.
PushTargets = Callable[[str, str], Sequence[str]]

# The protocol the push targets are asked about for a patient that has a current chart number: PMSs that
# key patients by chart number (Dentrix Smart Image) leave no link behind, only the chart alias.
CHART_KEYED = "chart-number"


def _no_push(_protocol: str, _pms_system: str) -> Sequence[str]:
    return ()


# --------------------------------------------------------------------------------------------------
# Name folding and the "beyond spelling" test


_TRANSLIT = str.maketrans({"ß": "ss", "æ": "ae", "ø": "o", "đ": "d", "ł": "l", "þ": "th"})


def fold(text: str) -> str:
    """Case- and accent-insensitive form of a name: 'Müller' -> 'muller', 'Ørsted' -> 'orsted'."""
    text = text.casefold().translate(_TRANSLIT)
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).strip()


def key_text(text: str) -> str:
    """A key (PMS system, practice id, PMS id, chart number) as the identity rules compare it: in Unicode
    NFC ("Jürgen-1" typed with a combining umlaut is the same id) and without surrounding white space (a
    padded field). Inside, nothing changes: leading zeros, letters and case are kept."""
    return unicodedata.normalize("NFC", text).strip()


def nfc_demographics(demo: Demographics) -> Demographics:
    """Demographic texts in Unicode NFC, as they are compared and stored. A macOS browser or an OPP web
    PMS may send 'Müller' decomposed (u + combining diaeresis) where a VDDS PMS sends it composed: the
    same name, which must neither count as a change on every other launch nor be stored in two forms."""
    texts: dict[str, Any] = {
        name: unicodedata.normalize("NFC", getattr(demo, name)) for name in DEMOGRAPHIC_TEXTS
    }
    return replace(demo, **texts)


def normalized(req: PatientRequest) -> PatientRequest:
    """A request's keys and demographic texts as the identity rules compare and store them (`key_text`,
    `nfc_demographics`): every way into the rules (`handle`, `import_images`) starts here."""
    return replace(
        req,
        pms_system=key_text(req.pms_system),
        practice_id=key_text(req.practice_id),
        pms_id=key_text(req.pms_id),
        chart_number=key_text(req.chart_number),
        demographics=nfc_demographics(req.demographics),
    )


def name_key(last_name: str, first_name: str) -> str:
    """What name search matches on: folded "last first"."""
    return f"{fold(last_name)} {fold(first_name)}".strip()[:250]


def _letters(text: str) -> str:
    """Folded, with spaces, hyphens, apostrophes and dots gone ('Van Der-Berg' -> 'vanderberg')."""
    return "".join(c for c in fold(text) if c.isalnum())


def _umlaut_spelled(text: str) -> str:
    """German spelling without umlauts: 'Müller' and 'Mueller' both become 'mueller'."""
    text = text.casefold().replace("ä", "ae").replace("ö", "oe").replace("ü", "ue")
    return _letters(text)


def _edit_distance(a: str, b: str) -> int:
    """Optimal-string-alignment distance (a transposition counts as one edit)."""
    prev2: list[int] = []
    prev = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        cur = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cost = 0 if a[i - 1] == b[j - 1] else 1
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                cur[j] = min(cur[j], prev2[j - 2] + 1)
        prev2, prev = prev, cur
    return prev[len(b)]


def same_beyond_spelling(a: str, b: str) -> bool:
    """True when two surnames differ only in spelling: case, accents, umlaut spelling, spaces, a typo.

    A PMS that strips spaces (CLINIVIEW), transliterates umlauts (cp1252 fallbacks) or fixes a typo is
    not another person; a different surname is. One edit is tolerated, two for names of 10+ letters.
    """
    if a == b:  # the common case (a PMS sending the name it sent before), without folding
        return True
    la, lb = _letters(a), _letters(b)
    if not la or not lb or la == lb or _umlaut_spelled(a) == _umlaut_spelled(b):
        return True
    allowed = 2 if max(len(la), len(lb)) >= 10 else 1
    return _edit_distance(la, lb) <= allowed


def disagreements(stored: Any, incoming: Demographics) -> dict[str, str]:
    """How incoming demographics contradict a stored patient beyond spelling, as {fact: both values in
    words} ("surname": "surname 'Müller' in the store, 'Meier' sent"); empty when they agree. The fact
    alone names the difference where the values must not go (the audit log).

    Only facts both sides know are compared: a PMS that omits the birth date or sends an unknown sex
    contradicts nothing.
    """
    found: dict[str, str] = {}
    if stored.birth_date and incoming.birth_date and stored.birth_date != incoming.birth_date:
        found["birth date"] = (
            f"birth date {stored.birth_date.isoformat()} in the store, {incoming.birth_date.isoformat()} sent"
        )
    known = (Sex.MALE.value, Sex.FEMALE.value)
    if stored.sex in known and incoming.sex.value in known and stored.sex != incoming.sex.value:
        found["sex"] = f"sex {stored.sex} in the store, {incoming.sex.value} sent"
    if (
        stored.last_name
        and incoming.last_name
        and not same_beyond_spelling(stored.last_name, incoming.last_name)
    ):
        found["surname"] = f"surname {stored.last_name!r} in the store, {incoming.last_name!r} sent"
    return found


def new_uid() -> str:
    """A DICOM UID from a random UUID (the 2.25 root needs no registered organisation prefix)."""
    return f"2.25.{uuid.uuid4().int}"


IN_CHUNK = 500  # values per IN (...) list: SQL Server takes at most 2100 parameters in a statement
StudyOrSeries = TypeVar("StudyOrSeries", Study, Series)


def _stored_by_uid(
    session: Session, uids: list[str], query: Callable[[list[str]], Select[StudyOrSeries]]
) -> dict[str, StudyOrSeries]:
    """The stored studies (or series) of the non-empty `uids`, by UID: one query per IN_CHUNK of them."""
    wanted = sorted({uid for uid in uids if uid})
    found: dict[str, StudyOrSeries] = {}
    for start in range(0, len(wanted), IN_CHUNK):
        for row in session.scalars(query(wanted[start : start + IN_CHUNK])):
            found[row.study_uid if isinstance(row, Study) else row.series_uid] = row
    return found


# --------------------------------------------------------------------------------------------------
# Views


def patient_view(patient: Patient, link: PmsLink | None, chart: str | None) -> PatientView:
    return PatientView(
        id=patient.id,
        last_name=patient.last_name,
        first_name=patient.first_name,
        middle_name=patient.middle_name,
        title=patient.title,
        birth_date=patient.birth_date,
        sex=Sex(patient.sex),
        chart_number=chart,
        pms_system=link.pms_system if link else None,
        pms_id=link.pms_id if link else None,
        practice_id=link.practice_id if link else None,
        street=patient.street,
        city=patient.city,
        postal_code=patient.postal_code,
        phone=patient.phone,
        email=patient.email,
    )


def image_view(image: Any, series_uid: str, study_uid: str) -> ImageView:
    """The view of an image from an ORM object or a row of `queries._image_view_select` (same names)."""
    return ImageView(
        id=image.id,
        patient_id=image.patient_id,
        study_uid=study_uid,
        series_uid=series_uid,
        sop_instance_uid=image.sop_instance_uid,
        captured_at=image.captured_at,
        category=Category(image.category),
        tooth_numbers=tuple(int(t) for t in image.tooth_numbers or ()),
        rotation=image.rotation,
        mirrored=bool(image.mirrored),
        width=image.width,
        height=image.height,
        bits_stored=image.bits_stored,
        color=bool(image.color),
        sha256=image.sha256,
        media_type=image.media_type,
        file_ext=image.file_ext,
        device=image.device,
        comment=image.comment,
        frames=image.frames,
        imported_at=image.imported_at,
    )


def _rows(session: Session, statement: Any, params: dict[str, Any] | None = None) -> Any:
    """Plain rows of a read, straight from the session's connection: view statements select columns,
    not entities, so the ORM's result processing would only cost time on every PMS request."""
    return session.connection().execute(statement, params)


def image_view_row(row: Any) -> ImageView:
    return image_view(row, row.series_uid, row.study_uid)


def patient_view_row(row: Any) -> PatientView:
    """The view of a patient from a row of `queries._patient_view_select`."""
    return PatientView(
        id=row.id,
        last_name=row.last_name,
        first_name=row.first_name,
        middle_name=row.middle_name,
        title=row.title,
        birth_date=row.birth_date,
        sex=Sex(row.sex),
        chart_number=row.chart_number,
        pms_system=row.pms_system,
        pms_id=row.pms_id,
        practice_id=row.practice_id,
        street=row.street,
        city=row.city,
        postal_code=row.postal_code,
        phone=row.phone,
        email=row.email,
    )


def _load_patient_view(session: Session, patient: Patient, link: PmsLink | None = None) -> PatientView:
    if link is None:
        link = session.scalars(*q.links_of_patient(patient.id)).first()
    alias = session.scalars(*q.current_chart_of_patient(patient.id)).first()
    return patient_view(patient, link, alias.chart_number if alias else None)


# --------------------------------------------------------------------------------------------------
# Identity resolution (runs inside one write transaction)


class Refused(Exception):
    """The request cannot be served as asked; carries the outcome to answer with.

    A refusal for an identity conflict also carries the conflict to record. It is recorded in a
    transaction of its own after the refused one rolled back, so a refusal never leaves half a change.
    """

    def __init__(self, outcome: Outcome, conflict: Conflict | None = None) -> None:
        super().__init__(outcome.message)
        self.outcome = outcome
        self.conflict = conflict


class _Moved(Refused):
    """What led a request to a patient changed while it waited for the patient's lock (a concurrent
    request renumbered the chart, or linked the request's own id): the transaction is rolled back and the
    request resolved afresh (`_retry_unique`). Answered as an error only if that keeps happening."""

    def __init__(self, what: str) -> None:
        super().__init__(Outcome(Status.ERROR, f"{what} changed while the request was served; send it again"))


class _ImagesRefused(Exception):
    """The images of a transaction were refused (Refused, or a unique violation such as a stored SOP
    Instance UID): carried out of the transaction past what handles the patient's own refusals and lost
    creation races (`_retry_unique`), then raised again as it was (`add_images`, `import_images`)."""

    def __init__(self, refusal: Refused | IntegrityError) -> None:
        super().__init__(str(refusal))
        self.refusal = refusal


def _lock_patient(session: Session, patient_id: int) -> Patient:
    """The patient, its row locked for the rest of the transaction and read as committed.

    Every write path that checks or changes a patient's links, demographics or chart numbers takes this
    first: on PostgreSQL and SQL Server (READ COMMITTED) two transactions otherwise both pass a check
    (no other id of this PMS, no other birth date, the current chart number) and both write, and the
    check meant to refuse the second never sees the first. Once the lock is granted, every following
    statement sees what the previous holder committed. SQLite serialises writers anyway.
    """
    patient: Patient = session.scalars(*q.patient_for_update(patient_id)).one()
    return patient


@dataclass
class _Resolved:
    patient: Patient
    link: PmsLink | None
    status: Status  # OK (found, unchanged), CREATED, UPDATED


_KEY_FIELDS = ("pms_system", "practice_id", "pms_id", "chart_number")


def _invalid(req: PatientRequest) -> Outcome | None:
    """Why a normalized request cannot meet the identity rules at all, for every way in alike (`handle`,
    `import_images`: every protocol, the REST API, DICOM import), or None when it can.

    - What the store cannot take in its keys and demographics (bridge.store.limits: longer than its
      column, a control character): a PMS's 150-character surname is refused in the protocol's way
      instead of failing on PostgreSQL (SQLite would store it).
    - A birth date after the daemon's local date plus a day of slack (`latest_birth_date`): a typo (2099
      for 1999), never a patient. Stored, it would turn the PMS's correct date into a demographics
      conflict. The parsers refuse it earlier in their own words; this is the rule for every way in,
      DICOM files included, whose reader takes any calendar date.
    """
    fields = [(name, getattr(req, name)) for name in _KEY_FIELDS]
    fields += [(name, getattr(req.demographics, name)) for name in DEMOGRAPHIC_TEXTS]
    for name, value in fields:
        problem = text_problem(name, value) if value else None
        if problem:
            return Outcome(Status.INVALID, f"{name.replace('_', ' ')} {problem}", field=name)
    born = req.demographics.birth_date
    if born is not None and born > latest_birth_date(date.today()):
        message = f"birth date '{born.isoformat()}' is in the future"
        return Outcome(Status.INVALID, message, field="birth_date")
    return None


def _speaks_for_link(req: PatientRequest) -> bool:
    """Whether a request is the PMS itself speaking, whose protocol a link records: the link's protocol
    decides the PMS's pushes (a VDDS PMS gets stage-6 pushes). An import, or the front desk's REST
    "create or update", is not the PMS: it must not switch a VDDS patient's pushes off."""
    return bool(req.origin.protocol) and req.action not in (Action.IMPORT, Action.CREATE_OR_UPDATE)


def _origin_text(origin: Origin) -> str:
    return f"{origin.protocol}/{origin.transport} {origin.workstation}".strip()[:200]


def _conflict(
    req: PatientRequest,
    kind: str,
    message: str,
    *,
    patient_id: int | None,
    other_patient_id: int | None = None,
    detail: dict[str, Any] | None = None,
) -> Refused:
    """The refusal for an identity conflict, with the conflict to record."""
    conflict = Conflict(
        kind=kind,
        pms_system=req.pms_system,
        practice_id=req.practice_id,
        pms_id=req.pms_id,
        chart_number=req.chart_number,
        patient_id=patient_id,
        other_patient_id=other_patient_id,
        detail={"message": message, **(detail or {})},
        origin=_origin_text(req.origin),
    )
    return Refused(Outcome(Status.CONFLICT, message), conflict)


def _store_conflict(session: Session, draft: Conflict, origin: Origin) -> int:
    """Record a conflict, or find the same open one: a PMS repeating a request does not pile them up.
    The same one is the same disagreement (its message); another birth date, then another surname, for one
    id are two conflicts, each shown until resolved."""
    message = (draft.detail or {}).get("message", "")
    if draft.patient_id is not None:
        # Serialises the check below with every other write about this patient: identical requests
        # refused at once otherwise each find no open conflict and each record one.
        _lock_patient(session, draft.patient_id)
    for existing in session.scalars(
        q.open_conflict_like(
            draft.kind, draft.pms_system, draft.practice_id, draft.pms_id, draft.chart_number
        )
    ):
        if (existing.detail or {}).get("message", "") == message:
            # what a person accepting it applies is what the PMS sent last (same disagreement, perhaps a
            # new phone number)
            sent = (draft.detail or {}).get("sent")
            if sent is not None and (existing.detail or {}).get("sent") != sent:
                existing.detail = {**existing.detail, "sent": sent}
            return existing.id
    draft.created_at = utcnow()
    session.add(draft)
    session.flush()
    AuditLog.change(session, origin, "conflict.record", patient_id=draft.patient_id, detail=_audited(draft))
    log.warning("identity conflict", extra={"kind": draft.kind, "conflict_id": draft.id})
    return draft.id


def _audited(conflict: Conflict) -> str:
    """A conflict as its audit entry names it: its kind, its id and which facts differ, never their
    values or the ids the PMS sent (docs/identity.md, "Audit"); the conflict keeps those, for
    GET /api/v1/conflicts."""
    text = f"{conflict.kind} conflict {conflict.id}"
    kept = (conflict.detail or {}).get("differing")
    differing = [str(fact) for fact in kept] if isinstance(kept, list) else []
    if differing:
        text += f": {', '.join(differing)} {'differs' if len(differing) == 1 else 'differ'}"
    return text


def demographics_json(demo: Demographics) -> dict[str, Any]:
    """Demographics as a conflict keeps them (its `detail["sent"]`): what accepting the conflict applies."""
    return {
        **{name: getattr(demo, name) for name in DEMOGRAPHIC_TEXTS},
        "birth_date": demo.birth_date.isoformat() if demo.birth_date else None,
        "sex": demo.sex.value,
    }


def demographics_from_conflict(data: dict[str, Any]) -> Demographics:
    """The demographics a conflict recorded as sent (`demographics_json`), which accepting it applies."""
    birth = data.get("birth_date")
    return Demographics(
        birth_date=date.fromisoformat(birth) if birth else None,
        sex=Sex(data.get("sex") or Sex.UNKNOWN.value),
        **{name: str(data.get(name) or "") for name in DEMOGRAPHIC_TEXTS},
    )


def _demographic_changes(stored: Any, demo: Demographics) -> dict[str, Any]:
    """What an update with `demo` would change on a stored patient (a Patient or a patient view row).

    Only fields the PMS sent count; an unknown sex or a missing birth date never erases a known one, and a
    name that only lost its spaces (CLINIVIEW) is not a change.
    """
    changes: dict[str, Any] = {}
    values: dict[str, Any] = {
        "last_name": demo.last_name,
        "first_name": demo.first_name,
        "middle_name": demo.middle_name,
        "title": demo.title,
        "birth_date": demo.birth_date,
        "sex": demo.sex.value if demo.sex is not Sex.UNKNOWN else None,
        "street": demo.street,
        "city": demo.city,
        "postal_code": demo.postal_code,
        "phone": demo.phone,
        "email": demo.email,
    }
    for name, value in values.items():
        if value in (None, ""):
            continue
        if name in _NAME_FIELDS and _only_spaces_lost(getattr(stored, name), value):
            continue
        if getattr(stored, name) != value:
            changes[name] = value
    return changes


def _apply_demographics(patient: Patient, demo: Demographics) -> list[str]:
    """Overwrite stored demographics with what the PMS sent (see `_demographic_changes`); changed names."""
    changed = list(_demographic_changes(patient, demo).items())
    for name, value in changed:
        setattr(patient, name, value)
    changed_names = [name for name, _ in changed]
    if {"last_name", "first_name"} & set(changed_names):
        patient.name_key = name_key(patient.last_name, patient.first_name)
    if changed_names:
        patient.updated_at = utcnow()
    return changed_names


_NAME_FIELDS = frozenset({"last_name", "first_name", "middle_name"})


def _only_spaces_lost(stored: str, incoming: str) -> bool:
    """True when `incoming` is the stored name with its spaces removed (CLINIVIEW strips them).

    Such a name is the same name with less information: it neither conflicts nor overwrites
    'Van Der Berg' with 'VanDerBerg'.
    """
    return " " in stored and " " not in incoming and stored.replace(" ", "") == incoming


def _new_patient(demo: Demographics) -> Patient:
    now = utcnow()
    return Patient(
        last_name=demo.last_name,
        first_name=demo.first_name,
        middle_name=demo.middle_name,
        title=demo.title,
        name_key=name_key(demo.last_name, demo.first_name),
        birth_date=demo.birth_date,
        sex=demo.sex.value,
        street=demo.street,
        city=demo.city,
        postal_code=demo.postal_code,
        phone=demo.phone,
        email=demo.email,
        created_at=now,
        updated_at=now,
    )


class BridgeService:
    """Maps PMS requests and API calls onto the store; every identity decision is made here."""

    def __init__(
        self,
        db: Database,
        settings: PmsSettings,
        bus: EventBus,
        audit: AuditLog,
        *,
        push_targets: PushTargets = _no_push,
        refresh_targets: PushTargets = _no_push,
    ) -> None:
        self.db = db
        self.settings = settings
        self.bus = bus
        self.audit = audit
        self.push_targets = push_targets
        self.refresh_targets = refresh_targets  # the channels that get a changed image again
        # The images this process adds, known before their transactions commit (bridge.announce).
        self.own_additions = OwnAdditions()
        # Image views recently read for the thumbnail path: id -> (monotonic time read, view).
        self._image_views: OrderedDict[int, tuple[float, ImageView]] = OrderedDict()

    # ---------------------------------------------------------------------------------------------
    # PMS requests

    async def handle(self, req: PatientRequest) -> Outcome:
        """Serve one PMS request; every failure becomes an Outcome the protocol can render."""
        req = normalized(req)
        if invalid := _invalid(req):
            return invalid
        try:
            if req.action in (
                Action.OPEN,
                Action.ACQUIRE,
                Action.UPDATE,
                Action.CREATE_OR_UPDATE,
                Action.IMPORT,
            ):
                return await self._open(req)
            if req.action is Action.LIST_IMAGES:
                return await self._list_for_pms(req)
            if req.action is Action.VIEW_IMAGE:
                return await self._view_image(req)
            if req.action is Action.EXPORT_IMAGES:
                return await self._images_by_refs(req)
        except Refused as refused:
            return await self.refusal_outcome(refused, req.origin)
        return Outcome(Status.INVALID, f"unsupported action {req.action}")

    async def refusal_outcome(self, refused: Refused, origin: Origin) -> Outcome:
        """The outcome of a refusal, after recording its conflict (if any) in its own transaction."""
        draft = refused.conflict
        if draft is None:
            return refused.outcome
        conflict_id = await self.db.write(lambda session: _store_conflict(session, draft, origin))
        return replace(refused.outcome, conflict_id=conflict_id)

    def _check_request(self, req: PatientRequest) -> None:
        """Refuse a request without the key its id kind needs, naming the field at fault. One with no key
        at all names both the PMS id and the chart number: a REST body may send either, and naming only
        the one its id kind fell back to sent the front desk after the wrong field."""
        if not req.pms_id.strip() and not req.chart_number.strip():
            message = "the request carries neither a patient id (pms_id) nor a chart number (chart_number)"
            raise Refused(Outcome(Status.INVALID, message, field="pms_id"))
        if req.id_kind in (IdKind.PMS_ID, IdKind.PMS_ID_SUFFIX) and not req.pms_id.strip():
            raise Refused(Outcome(Status.INVALID, "the request carries no patient id", field="pms_id"))
        if req.id_kind is IdKind.PMS_ID_SUFFIX and req.id_suffix_length < 1:
            raise Refused(Outcome(Status.INVALID, "an id suffix request must say how long the suffix is"))
        if req.id_kind is IdKind.CHART_NUMBER and not req.chart_number.strip():
            raise Refused(
                Outcome(Status.INVALID, "the request carries no chart number", field="chart_number")
            )
        if not req.pms_system.strip():
            message = "the request does not name its PMS system"
            raise Refused(Outcome(Status.INVALID, message, field="pms_system"))

    async def _open(self, req: PatientRequest) -> Outcome:
        """Open, create or update the patient of a request (IMPORT: only find it, see `import_images`)."""
        self._check_request(req)
        if req.action in (Action.UPDATE, Action.IMPORT):
            # An import's new patient is created by `import_images`, in the transaction of its first
            # images: here it is NOT_FOUND (or FORBIDDEN without allow_patient_creation, `_cannot_create`).
            may_create = False
        elif req.action is Action.CREATE_OR_UPDATE:
            may_create = self.settings.allow_patient_creation
        else:
            may_create = True  # a PMS launch may always create: that is what the integration is for
        update = self._updates(req)

        shown = req.action not in (Action.CREATE_OR_UPDATE, Action.IMPORT) and not req.silent

        view = await self._open_unchanged(req, update=update)
        if view is not None:
            outcome = Outcome(
                Status.OK,
                _status_message(Status.OK, req),
                patient=view,
                viewer_url=self.patient_viewer_url(view.id) if shown else "",
                repeatable=True,
            )
            self._announce_read(req, outcome)
            return outcome

        def work(session: Session) -> tuple[Status, PatientView]:
            return self._open_in(session, req, may_create=may_create, update=update)

        status, view = await self._retry_unique(work)
        outcome = Outcome(status, _status_message(status, req), patient=view)
        if shown:
            outcome = replace(outcome, viewer_url=self.patient_viewer_url(view.id))
            self._publish_opened(req, view, outcome.viewer_url)
        return outcome

    def _updates(self, req: PatientRequest) -> bool:
        """Whether a request's demographics are applied to the patient it finds.

        An imported file's header is a snapshot taken at the modality; the PMS owns the demographics,
        so an import never overwrites them (a disagreement is still a conflict, as for every request).
        update_patient_info says what the PMS's launches may change (DTX Studio Clinic's "update patient
        info"); the REST API's create-or-update is a person editing the patient on purpose, so its
        changes apply whatever that setting says (they would otherwise be dropped while answering 200).
        """
        return req.action is Action.CREATE_OR_UPDATE or (
            self.settings.update_patient_info and req.action is not Action.IMPORT
        )

    def _open_in(
        self, session: Session, req: PatientRequest, *, may_create: bool, update: bool
    ) -> tuple[Status, PatientView]:
        """Resolve a request in the caller's write transaction: the status and the patient. A patient
        found unchanged is audited here (`patient.open`, or `patient.import` for an import); a creation or
        a change audits itself."""
        resolved = self._resolve(session, req, may_create=may_create, update=update)
        if resolved.status is Status.OK:
            opened = "patient.import" if req.action is Action.IMPORT else "patient.open"
            self.audit.change(session, req.origin, opened, patient_id=resolved.patient.id)
        return resolved.status, _load_patient_view(session, resolved.patient, resolved.link)

    def repeat(self, req: PatientRequest, outcome: Outcome) -> None:
        """`req` answered again with `outcome`: an earlier, `repeatable` outcome of an identical request
        (origin aside), which a caller kept while the store generation held. Records the read and tells
        viewers exactly as the first answer did, so a repeated answer is audited like any other."""
        if not outcome.repeatable:
            raise ValueError("only a repeatable (read-only) outcome can be given again")
        self._announce_read(req, outcome)

    def _announce_read(self, req: PatientRequest, outcome: Outcome) -> None:
        """The effects of a read answer, first or repeated: its audit entry and, when the answer names a
        viewer, the viewer events."""
        patient = outcome.patient
        if patient is None:
            return
        if req.action is Action.LIST_IMAGES:
            detail = f"{len(outcome.images)} images"
            self.audit.read(req.origin, "images.list", patient_id=patient.id, detail=detail)
        else:
            opened = "patient.import" if req.action is Action.IMPORT else "patient.open"
            self.audit.read(req.origin, opened, patient_id=patient.id)
        if outcome.viewer_url:
            self._publish_opened(req, patient, outcome.viewer_url)

    async def _open_unchanged(self, req: PatientRequest, *, update: bool) -> PatientView | None:
        """The patient when the request only opens a known one and would change nothing, read in one
        round trip without a write transaction; None sends the request down the full (writing) path.

        Most launches open a patient the store already knows as the PMS does: answering those with a
        read keeps writers (and SQLite's single write lock) free for the requests that change something.
        Anything else (a new key, other demographics, a moved chart number, another protocol on the link,
        ignore_practice_id's several links) takes the full path, which applies every rule.
        """
        if req.id_kind is not IdKind.PMS_ID or self.settings.ignore_practice_id:
            return None
        row = await self.db.read_memo(
            ("patient-by-link", req.pms_system, req.practice_id, req.pms_id),
            lambda session: session.execute(
                *q.patient_view_by_link_key(req.pms_system, req.practice_id, req.pms_id)
            ).first(),
        )
        if row is None or disagreements(row, req.demographics):
            return None
        if req.chart_number and req.chart_number != row.chart_number:
            return None
        if _speaks_for_link(req) and row.link_protocol != req.origin.protocol:
            return None
        if update and _demographic_changes(row, req.demographics):
            return None
        return patient_view_row(row)

    async def _retry_unique(self, work: Callable[[Session], Any]) -> Any:
        """Run a write that may lose a race: on a unique key (the retry sees the winner's row), or for a
        patient's lock (`_Moved`: the retry resolves the request afresh)."""
        for attempt in range(MAX_CREATE_RETRIES):
            try:
                return await self.db.write(work)
            except IntegrityError as exc:
                if not is_unique_violation(exc) or attempt == MAX_CREATE_RETRIES - 1:
                    raise
                log.info("lost a creation race; retrying", extra={"attempt": attempt + 1})
            except _Moved:
                if attempt == MAX_CREATE_RETRIES - 1:
                    raise
                log.info("the patient changed while waiting for it; retrying", extra={"attempt": attempt + 1})
        raise AssertionError("unreachable")

    def _practice_key(self, req: PatientRequest) -> str:
        return "" if self.settings.ignore_practice_id else req.practice_id

    def _find_link(self, session: Session, req: PatientRequest) -> PmsLink | None:
        if req.id_kind is IdKind.PMS_ID_SUFFIX and len(req.pms_id) >= req.id_suffix_length:
            return self._find_link_by_suffix(session, req)
        # A suffix shorter than the PMS truncates to is a whole id: exact, as below.
        if not self.settings.ignore_practice_id:
            link = session.scalars(*q.link_by_key(req.pms_system, req.practice_id, req.pms_id)).first()
            if link is None and req.practice_id:
                # No link of this practice, but one without a practice key: made while ignore_practice_id
                # was on by this practice (recorded beside), or by a request of this PMS that named no
                # practice (an import under an empty `[dicom] practice_id`). Either is this practice's
                # patient, not a reason to create a second one; `_resolve` gives it this practice's key.
                link = session.scalars(
                    q.unkeyed_link_for_practice(req.pms_system, req.practice_id, req.pms_id)
                ).first()
                if link is not None and not link.practice_id:
                    self._refuse_if_unclear_whose(session, req, link)
            if link is not None or req.practice_id:
                return link
            # A request without a practice id (a VDDS stage 2 without PRXNR, an import under an empty
            # `[dicom] practice_id`) names no practice, so it does not name another one either: the id's
            # patient in whichever practice has it, as under ignore_practice_id. Otherwise the same PMS
            # patient would split in two as soon as one of its requests omits the practice.
        links = list(session.scalars(q.links_by_system_id(req.pms_system, req.pms_id)))
        patients = sorted({link.patient_id for link in links})
        if len(patients) > 1:
            why = (
                "with ignore_practice_id they cannot be told apart"
                if self.settings.ignore_practice_id
                else "the request names no practice, so they cannot be told apart: send the practice id"
            )
            raise _conflict(
                req,
                "ambiguous-practice",
                f"patient id {req.pms_id!r} of {req.pms_system} belongs to different patients in different "
                f"practices; {why}",
                patient_id=patients[0],
                other_patient_id=patients[1],
            )
        return links[0] if links else None

    def _find_link_by_suffix(self, session: Session, req: PatientRequest) -> PmsLink | None:
        """The one link whose id ends with the received suffix (a PMS that truncates its ids).

        Matches on the id alone, never on name, SSN or birth date. Two patients whose ids end alike
        cannot be told apart: that is a recorded conflict, not a guess, and the PMS gets an error asking
        for the whole number. No match at all means a new patient, keyed by the suffix as received.
        """
        practice = None if self.settings.ignore_practice_id else req.practice_id
        links = list(session.scalars(q.links_by_id_suffix(req.pms_system, req.pms_id, practice)))
        patients = sorted({link.patient_id for link in links})
        if len(patients) > 1:
            ids = sorted({link.pms_id for link in links})
            raise _conflict(
                req,
                "ambiguous-id-suffix",
                f"patient number {req.pms_id!r} from {req.pms_system} is the end of {len(ids)} known numbers "
                f"({', '.join(ids[:5])}): the last {req.id_suffix_length} characters cannot tell them apart;"
                " send the whole number",
                patient_id=patients[0],
                other_patient_id=patients[1],
                detail={"candidates": ids[:20]},
            )
        return links[0] if links else None

    def _resolve(self, session: Session, req: PatientRequest, *, may_create: bool, update: bool) -> _Resolved:
        """Find, link or create the patient a request means, or raise Refused."""
        if req.id_kind is IdKind.CHART_NUMBER:
            return self._resolve_by_chart(session, req, may_create=may_create, update=update)
        # Requests for one PMS id take turns, whatever practice they name: a practice's request and one
        # naming no practice (an import under an empty `[dicom] practice_id`) look for each other's links
        # (`_find_link`), but their links' keys differ, so no unique key stops both from creating.
        lock_key(session, f"pms-id\0{req.pms_system}\0{req.pms_id}")
        link = self._find_link(session, req)
        if link is not None:
            patient = _lock_patient(session, link.patient_id)  # a link never moves to another patient
            rekey = self._takes_unkeyed_link(session, req, link)
            named = "" if link.practice_id else " (the link named no practice)"
            self._refuse_if_disagreeing(session, req, patient)
            changed = self._move_chart_number(session, req, patient)
            changed += self._maybe_update(session, req, patient, update)
            link.last_seen_at = utcnow()
            if rekey:
                # the link now names this practice: the read paths key on it, and the next request without
                # a practice id still finds it (its id's one patient in any practice)
                link.practice_key = link.practice_id = req.practice_id
                self.audit.change(
                    session,
                    req.origin,
                    "link.rekey",
                    patient_id=patient.id,
                    detail=f"practice {req.practice_id!r}{named}",
                )
            if _speaks_for_link(req) and link.protocol != req.origin.protocol:
                link.protocol = req.origin.protocol
            return _Resolved(patient, link, Status.UPDATED if changed else Status.OK)

        # No link yet: a migrated patient carrying the same chart number is this PMS's patient.
        if req.chart_number:
            alias = session.scalars(*q.current_chart_alias(req.chart_number)).first()
            if alias is not None:
                patient = self._lock_chart_holder(session, req, alias.patient_id)
                if self._find_link(session, req) is not None:
                    raise _Moved(f"patient {req.pms_id!r}")  # linked meanwhile: take the link's way
                self._refuse_if_linked_elsewhere(session, req, patient)
                self._refuse_if_disagreeing(session, req, patient)
                link = self._add_link(session, req, patient)
                self._maybe_update(session, req, patient, update)
                self.audit.change(
                    session, req.origin, "link.create", patient_id=patient.id, detail="linked by chart number"
                )
                return _Resolved(patient, link, Status.UPDATED)

        if not may_create:
            raise self._cannot_create(req)
        patient = _new_patient(req.demographics)
        session.add(patient)
        session.flush()
        link = self._add_link(session, req, patient)
        if req.chart_number:
            self._set_chart_alias(session, patient, req.chart_number)
        session.flush()  # the unique key on the link decides a creation race here
        self.audit.change(session, req.origin, "patient.create", patient_id=patient.id)
        return _Resolved(patient, link, Status.CREATED)

    def _takes_unkeyed_link(self, session: Session, req: PatientRequest, link: PmsLink) -> bool:
        """Whether a request of a practice takes the link it found without a practice key (see
        `_find_link`), which then gets that practice's key. Called with the link's patient locked.

        The link is read again first, as committed: a request of another practice may have taken it while
        this one waited for the lock. It is that practice's link then, and this request is resolved afresh
        (`_Moved`): it finds no link of its own and makes its own patient.
        """
        key = self._practice_key(req)
        if not key or link.practice_key == key:
            return False
        session.refresh(link)
        if link.practice_key == key:  # taken by another request of this practice meanwhile
            return False
        if link.practice_key:
            raise _Moved(f"the link of patient {req.pms_id!r}")
        return True

    @staticmethod
    def _refuse_if_unclear_whose(session: Session, req: PatientRequest, link: PmsLink) -> None:
        """A link that names no practice says nothing about whose patient it is, so a practice takes it
        (opens, lists, exports its patient; `_resolve` gives it the practice's key) only when nothing else
        says whose it is. When this PMS system knows the same id in another practice (a store
        where that practice's launch split an imported patient before this rule existed: the import most
        likely was that practice's patient), or knows the link's patient under another id or in another
        practice, it cannot be told whether the link is this practice's patient `req.pms_id`: refused as
        `ambiguous-practice`, never guessed (an import carries too little to rely on the demographics)."""
        for other in session.scalars(q.links_by_system_id(req.pms_system, req.pms_id)):
            if other.id != link.id:
                raise _conflict(
                    req,
                    "ambiguous-practice",
                    f"patient id {req.pms_id!r} of {req.pms_system} is linked without a practice, and also in"
                    f" practice {other.practice_id!r}: the link without a practice may be that practice's"
                    f" patient; it is not taken as practice {req.practice_id!r}'s",
                    patient_id=link.patient_id,
                    other_patient_id=other.patient_id if other.patient_id != link.patient_id else None,
                )
        for other in session.scalars(*q.links_of_patient(link.patient_id)):
            if other.id != link.id and other.pms_system == req.pms_system:
                where = f"practice {other.practice_id!r}" if other.practice_id else "no practice"
                raise _conflict(
                    req,
                    "ambiguous-practice",
                    f"patient id {req.pms_id!r} of {req.pms_system} is linked without a practice to a patient"
                    f" {req.pms_system} also knows as {other.pms_id!r} ({where}): it cannot be told whether"
                    f" it is practice {req.practice_id!r}'s patient {req.pms_id!r}",
                    patient_id=link.patient_id,
                )

    def _resolve_by_chart(
        self, session: Session, req: PatientRequest, *, may_create: bool, update: bool
    ) -> _Resolved:
        """The PMS sends the chart number as its key (a per-profile setting, e.g. Dentrix by chart).

        Without an immutable id a renumbered chart cannot be followed from this request alone; the
        linkage by PMS id (when the PMS also sends it) or the REST API re-links it.
        """
        alias = session.scalars(*q.current_chart_alias(req.chart_number)).first()
        if alias is not None:
            patient = self._lock_chart_holder(session, req, alias.patient_id)
            self._refuse_if_of_another_practice(session, req, patient)
            self._refuse_if_disagreeing(session, req, patient)
            changed = self._maybe_update(session, req, patient, update)
            return _Resolved(patient, None, Status.UPDATED if changed else Status.OK)
        if not may_create:
            raise self._cannot_create(req)
        patient = _new_patient(req.demographics)
        session.add(patient)
        session.flush()
        self._set_chart_alias(session, patient, req.chart_number)
        session.flush()  # the unique current-chart index decides a creation race here
        self.audit.change(
            session, req.origin, "patient.create", patient_id=patient.id, detail="keyed by chart"
        )
        return _Resolved(patient, None, Status.CREATED)

    @staticmethod
    def _lock_chart_holder(session: Session, req: PatientRequest, patient_id: int) -> Patient:
        """Lock the patient found holding the request's chart number, and check that it still holds it
        once the lock is granted (a concurrent renumbering may have moved it on meanwhile)."""
        patient = _lock_patient(session, patient_id)
        holder = session.scalars(*q.current_chart_alias(req.chart_number)).first()
        if holder is None or holder.patient_id != patient.id:
            raise _Moved(f"chart number {req.chart_number!r}")
        return patient

    def _cannot_create(self, req: PatientRequest) -> Refused:
        key = req.pms_id or req.chart_number
        if req.action is Action.IMPORT and self.settings.allow_patient_creation:
            return Refused(
                Outcome(
                    Status.NOT_FOUND,
                    f"no patient with id {key!r} from {req.pms_system} yet: the import creates it with its"
                    " first image",
                )
            )
        if req.action in (Action.CREATE_OR_UPDATE, Action.IMPORT):
            return Refused(
                Outcome(
                    Status.FORBIDDEN,
                    f"no patient with id {key!r} from {req.pms_system}, and patient creation is disabled"
                    " (allow_patient_creation = no): patients come from the PMS",
                )
            )
        return Refused(Outcome(Status.NOT_FOUND, f"no patient with id {key!r} from {req.pms_system}"))

    def _refuse_if_disagreeing(self, session: Session, req: PatientRequest, patient: Patient) -> None:
        found = disagreements(patient, req.demographics)
        if found:
            key = req.pms_id or req.chart_number
            raise _conflict(
                req,
                "demographics",
                f"patient {key!r} is known with other data: " + "; ".join(found.values()),
                patient_id=patient.id,
                detail={
                    "differences": list(found.values()),
                    "differing": list(found),
                    "sent": demographics_json(req.demographics),
                },
            )

    def _refuse_if_linked_elsewhere(self, session: Session, req: PatientRequest, patient: Patient) -> None:
        """A chart number's patient already known to this PMS under another id is not ours to take."""
        for other in session.scalars(*q.links_of_patient(patient.id)):
            if self._is_own_pms_link(req, other):
                raise _conflict(
                    req,
                    "chart-number",
                    f"chart number {req.chart_number!r} belongs to a patient {req.pms_system} knows under "
                    f"id {other.pms_id!r}, not {req.pms_id!r}",
                    patient_id=patient.id,
                )
        self._refuse_if_of_another_practice(session, req, patient)

    def _is_own_pms_link(self, req: PatientRequest, link: PmsLink) -> bool:
        """Whether a link is the request's own PMS knowing a patient: a link its id lookup (`_find_link`)
        takes for that link's id. A request of practice P takes P's links and those without a practice
        key made by P or by a request naming no practice; a request naming no practice takes its id's
        link in any practice. So a chart number's holder that P (or a practice-less request) would open by
        another id is not linked under this one. Under ignore_practice_id: the links without a practice
        key, as before."""
        if link.pms_system != req.pms_system:
            return False
        if self.settings.ignore_practice_id:
            return link.practice_key == ""
        if not req.practice_id:
            return True
        return link.practice_key == req.practice_id or (
            link.practice_key == "" and link.practice_id in (req.practice_id, "")
        )

    def _refuse_if_of_another_practice(self, session: Session, req: PatientRequest, patient: Patient) -> None:
        """A chart number names a patient only within one practice: the holder of a chart number that a PMS
        of another practice knows is that practice's patient, never linked or opened by this request's
        chart number (practices sharing a store number their charts independently). Links without a
        practice (ignore_practice_id, or a PMS without practice ids) say nothing about the practice."""
        practice_key = self._practice_key(req)
        if not practice_key:
            return
        for other in session.scalars(*q.links_of_patient(patient.id)):
            if other.practice_key and other.practice_key != practice_key:
                raise _conflict(
                    req,
                    "chart-number",
                    f"chart number {req.chart_number!r} is the chart of a patient of practice "
                    f"{other.practice_id!r} ({other.pms_system} id {other.pms_id!r}), not of practice "
                    f"{req.practice_id!r}",
                    patient_id=patient.id,
                )

    def _move_chart_number(self, session: Session, req: PatientRequest, patient: Patient) -> list[str]:
        """Follow a renumbered chart: the alias moves to the new number, unless another patient holds it."""
        if not req.chart_number:
            return []
        current = session.scalars(*q.current_chart_of_patient(patient.id)).first()
        if current is not None and current.chart_number == req.chart_number:
            return []
        holder = session.scalars(*q.current_chart_alias(req.chart_number)).first()
        if holder is not None and holder.patient_id != patient.id:
            raise _conflict(
                req,
                "chart-number",
                f"chart number {req.chart_number!r} is already the chart of another patient",
                patient_id=patient.id,
                other_patient_id=holder.patient_id,
            )
        old = current.chart_number if current else None
        self._set_chart_alias(session, patient, req.chart_number)
        if old is not None:
            self._enqueue_chart_move(session, patient.id, old)
        self.audit.change(
            session,
            req.origin,
            "chart.renumber",
            patient_id=patient.id,
            # the numbers are the patient's chart aliases (kept with their dates), not audit text
            detail="chart number changed" if old is not None else "chart number set",
        )
        return ["chart_number"]

    @staticmethod
    def _set_chart_alias(session: Session, patient: Patient, chart_number: str) -> None:
        now = utcnow()
        session.execute(q.retire_chart_aliases(patient.id, now))
        session.add(ChartAlias(patient_id=patient.id, chart_number=chart_number, created_at=now))
        session.flush()

    def _maybe_update(
        self, session: Session, req: PatientRequest, patient: Patient, update: bool
    ) -> list[str]:
        if not update:
            return []
        changed = _apply_demographics(patient, req.demographics)
        if changed:
            self.audit.change(
                session, req.origin, "patient.update", patient_id=patient.id, detail=",".join(changed)
            )
        return changed

    def _add_link(self, session: Session, req: PatientRequest, patient: Patient) -> PmsLink:
        now = utcnow()
        link = PmsLink(
            patient=patient,
            pms_system=req.pms_system,
            practice_key=self._practice_key(req),
            practice_id=req.practice_id,
            pms_id=req.pms_id,
            protocol=req.origin.protocol,
            created_at=now,
            last_seen_at=now,
        )
        session.add(link)
        session.flush()
        return link

    def _find_existing(self, session: Session, req: PatientRequest) -> Patient:
        """The patient a request means, without creating or changing anything (image lists, exports)."""
        if req.id_kind is IdKind.CHART_NUMBER:
            alias: ChartAlias | None = session.scalars(*q.current_chart_alias(req.chart_number)).first()
            if alias is None:
                raise self._cannot_create(req)
            self._refuse_if_of_another_practice(session, req, alias.patient)
            return alias.patient
        link = self._find_link(session, req)
        if link is None:
            raise self._cannot_create(req)
        return link.patient

    def _publish_opened(self, req: PatientRequest, view: PatientView, viewer_url: str) -> None:
        common = {"origin_protocol": req.origin.protocol, "workstation": req.origin.workstation}
        self.bus.publish(
            PatientOpened(
                patient_id=view.id,
                pms_system=req.pms_system,
                pms_id=req.pms_id or req.chart_number,
                open_in=self.settings.open_patient_in,
                single_patient=self.settings.single_patient_mode,
                viewer_url=viewer_url,
                **common,
            )
        )
        if req.action is Action.ACQUIRE:
            self.bus.publish(
                AcquisitionRequested(
                    patient_id=view.id,
                    pms_system=req.pms_system,
                    pms_id=req.pms_id or req.chart_number,
                    viewer_url=viewer_url,
                    **common,
                )
            )

    def patient_viewer_url(self, patient_id: int) -> str:
        """Where a viewer shows a PMS-opened patient (`open_patient_in`, `single_patient_mode`)."""
        url = f"/viewer/?patient={patient_id}&open={self.settings.open_patient_in}"
        return url + ("&single=1" if self.settings.single_patient_mode else "")

    def image_viewer_url(self, image_id: int) -> str:
        """Where a PMS-opened image is shown (`open_image_as`): a watermarked preview, or the viewer."""
        if self.settings.open_image_as == "preview":
            return f"/api/v1/images/{image_id}/preview"
        url = f"/viewer/?image={image_id}&open=clinic"
        return url + ("&single=1" if self.settings.single_patient_mode else "")

    async def _list_for_pms(self, req: PatientRequest) -> Outcome:
        self._check_request(req)

        by_link = req.id_kind is IdKind.PMS_ID and not self.settings.ignore_practice_id

        def work(session: Session) -> tuple[PatientView, tuple[ImageView, ...]]:
            # the common case in one round trip, as `_open_unchanged`
            row = (
                _rows(
                    session, *q.patient_view_by_link_key(req.pms_system, req.practice_id, req.pms_id)
                ).first()
                if by_link
                else None
            )
            if row is None:  # another kind of key, unknown, or linked while ignore_practice_id was on
                patient = self._find_existing(session, req)
                row = _rows(session, *q.patient_view_by_id(patient.id)).one()
            view = patient_view_row(row)
            rows = _rows(session, *q.images_of_patient(view.id, limit=10_000)).all()
            return view, tuple(image_view_row(r) for r in rows)

        if by_link:  # a PMS listing the same patient again (VIEW_DATA on every page) is answered from memory
            key = ("images-by-link", req.pms_system, req.practice_id, req.pms_id)
            view, images = await self.db.read_memo(key, work)
        else:
            view, images = await self.db.read(work)
        outcome = Outcome(Status.OK, f"{len(images)} images", patient=view, images=images, repeatable=True)
        self._announce_read(req, outcome)
        return outcome

    @staticmethod
    def _ref_ids(refs: Sequence[str]) -> dict[str, int]:
        ids: dict[str, int] = {}
        for ref in refs:
            text = ref.strip()
            if text.isascii() and text.isdigit() and len(text) < 19:  # "²".isdigit() is True
                ids[ref] = int(text)
        return ids

    async def _images_by_refs(self, req: PatientRequest) -> Outcome:
        """The images a PMS refers to by MMOID (our image id); the missing ones are named, not dropped.

        When the request also names its patient (a VDDS MMOEXPORT with PATID), only that patient's images
        are handed out: another patient's MMOID is reported missing, like an unknown one, whatever the
        PMS sent. Without a patient (the MMOID alone, as stage 3 and the confirmed stage 4 send it) the
        MMOID is the key: the PMS had it from a listing or push of ours."""
        if not req.image_refs:
            return Outcome(Status.INVALID, "the request names no images")
        ids = self._ref_ids(req.image_refs)
        key = req.chart_number if req.id_kind is IdKind.CHART_NUMBER else req.pms_id
        names_patient = bool(key.strip())
        if names_patient:
            self._check_request(req)

        def work(session: Session) -> list[ImageView]:
            owner = self._find_existing(session, req).id if names_patient else None
            if not ids:
                return []
            rows = _rows(session, q.images_by_ids(sorted(set(ids.values()))))
            return [view for view in map(image_view_row, rows) if owner is None or view.patient_id == owner]

        found = {image.id: image for image in await self.db.read(work)}
        images = tuple(found[ids[ref]] for ref in req.image_refs if ref in ids and ids[ref] in found)
        missing = tuple(ref for ref in req.image_refs if ref not in ids or ids[ref] not in found)
        for image in images:
            self.audit.read(req.origin, "image.export", patient_id=image.patient_id, image_id=image.id)
        if not images:
            return Outcome(Status.NOT_FOUND, "none of the requested images exist", missing_refs=missing)
        status = Status.PARTIAL if missing else Status.OK
        message = f"images not found: {', '.join(missing)}" if missing else f"{len(images)} images"
        return Outcome(status, message, images=images, missing_refs=missing)

    async def _view_image(self, req: PatientRequest) -> Outcome:
        outcome = await self._images_by_refs(replace(req, image_refs=req.image_refs[:1]))
        if not outcome.images:
            return outcome
        image = outcome.images[0]
        url = self.image_viewer_url(image.id)
        if not req.silent:
            self.bus.publish(
                ImageViewRequested(
                    image_id=image.id,
                    patient_id=image.patient_id,
                    open_as=self.settings.open_image_as,
                    viewer_url=url,
                    origin_protocol=req.origin.protocol,
                    workstation=req.origin.workstation,
                )
            )
        return replace(outcome, viewer_url=url)

    async def view_data(self, req: PatientRequest) -> Outcome:
        """A PMS asks to see a patient's data (OPP VIEW_DATA): the image list, and a viewer follows.

        It reads only: an unknown patient is NOT_FOUND (never created) and demographics are not applied.
        Unless the request is silent, viewers are told to show the patient (PatientOpened), so the
        clinician sees the images the PMS just listed.
        """
        outcome = await self.handle(replace(req, action=Action.LIST_IMAGES))
        if outcome.patient is None or not outcome.status.ok or req.silent:
            return outcome
        url = self.patient_viewer_url(outcome.patient.id)
        self._publish_opened(req, outcome.patient, url)
        return replace(outcome, viewer_url=url)

    # ---------------------------------------------------------------------------------------------
    # API reads

    async def search_patients(
        self,
        origin: Origin,
        *,
        pms_id: str | None = None,
        pms_system: str | None = None,
        chart_number: str | None = None,
        name: str | None = None,
        birth_date: Any = None,
        after_id: int = 0,
        limit: int = 50,
    ) -> list[PatientView]:
        name_prefix = name_key(*[*name.replace(",", " ").split(None, 1), ""][:2]) if name else None

        def work(session: Session) -> list[PatientView]:
            stmt = q.search_patients(
                pms_id=None if pms_id is None else key_text(pms_id),
                pms_system=None if pms_system is None else key_text(pms_system),
                chart_number=None if chart_number is None else key_text(chart_number),
                name_prefix=name_prefix,
                birth_date=birth_date,
                after_id=after_id,
                limit=limit,
            )
            return [patient_view_row(row) for row in _rows(session, *stmt)]

        found = await self.db.read(work)
        for view in found:
            self.audit.read(origin, "patient.read", patient_id=view.id)
        return found

    async def recorded_state(
        self, keys: Sequence[tuple[str, str]], *, image_limit: int
    ) -> list[tuple[PatientView, int]]:
        """Each (pms_system, pms_id) key held by exactly one patient: that patient and how many images it
        has (at most `image_limit`), in one unit of work and without audit entries.

        Record mode's effect.json is the store's state of the patients a session touched, read again
        after every recorded step. That is bookkeeping of the capture, not a read of patient data on
        anyone's behalf: the requests it captures were audited with their own origins. Read through
        `search_patients` and `list_images`, it wrote two audit entries per touched patient per step
        (quadratic in the session's length), which buried the real reads.
        """

        def work(session: Session) -> list[tuple[PatientView, int]]:
            found = []
            for pms_system, pms_id in keys:
                statement = q.search_patients(pms_id=key_text(pms_id), pms_system=key_text(pms_system))
                rows = _rows(session, *statement).all()
                if len(rows) != 1:
                    continue
                view = patient_view_row(rows[0])
                images = _rows(session, *q.images_of_patient(view.id, limit=image_limit)).all()
                found.append((view, len(images)))
            return found

        result: list[tuple[PatientView, int]] = await self.db.read(work)
        return result

    async def get_patient(self, origin: Origin, patient_id: int) -> PatientView | None:
        def work(session: Session) -> PatientView | None:
            row = _rows(session, *q.patient_view_by_id(patient_id)).first()
            return patient_view_row(row) if row else None

        view = await self.db.read(work)
        if view is not None:
            self.audit.read(origin, "patient.read", patient_id=view.id)
        return view

    async def list_images(
        self,
        origin: Origin,
        patient_id: int,
        *,
        after: tuple[datetime | None, int] | None = None,
        limit: int = 100,
    ) -> list[ImageView]:
        def work(session: Session) -> list[ImageView]:
            return [
                image_view_row(row)
                for row in _rows(session, *q.images_of_patient(patient_id, after=after, limit=limit))
            ]

        images = await self.db.read(work)
        self.audit.read(origin, "images.list", patient_id=patient_id, detail=f"{len(images)} images")
        return images

    async def get_image(
        self, origin: Origin, image_id: int, *, action: str = "image.read", max_age: float = 0.0
    ) -> ImageView | None:
        """One image's metadata (audited). With `max_age`, a view read at most that many seconds ago
        may answer without a database round trip: the thumbnail path of a PMS fetching 40 thumbnails.
        `update_image` replaces the remembered view, so this daemon never serves a stale orientation;
        another daemon sharing the store may, for at most `max_age` seconds.
        """
        cached = self._image_views.get(image_id) if max_age > 0 else None
        if cached is not None and time.monotonic() - cached[0] <= max_age:
            image: ImageView | None = cached[1]
        else:

            def work(session: Session) -> ImageView | None:
                row = _rows(session, *q.image_view_by_id(image_id)).first()
                return image_view_row(row) if row else None

            image = await self.db.read(work)
            if image is not None:
                self._remember_view(image)
        if image is not None:
            self.audit.read(origin, action, patient_id=image.patient_id, image_id=image.id)
        return image

    def _remember_view(self, image: ImageView) -> None:
        self._image_views[image.id] = (time.monotonic(), image)
        self._image_views.move_to_end(image.id)
        while len(self._image_views) > MAX_REMEMBERED_IMAGE_VIEWS:
            self._image_views.popitem(last=False)

    async def update_image(
        self,
        origin: Origin,
        image_id: int,
        *,
        rotation: int | None = None,
        mirrored: bool | None = None,
        tooth_numbers: Sequence[int] | None = None,
        category: Category | None = None,
    ) -> ImageView | None:
        """Change what a clinician may change about an image: orientation, teeth, category (audited).

        The pixels are never touched: orientation is metadata applied at render time, and renderings
        are cached by orientation, so the next thumbnail request renders the new one. None = unchanged.
        """
        if rotation is not None and rotation not in (0, 90, 180, 270):
            raise Refused(Outcome(Status.INVALID, f"rotation must be 0, 90, 180 or 270, got {rotation}"))
        wanted: dict[str, Any] = {
            "rotation": rotation,
            "mirrored": mirrored,
            "tooth_numbers": list(tooth_numbers) if tooth_numbers is not None else None,
            "category": category.value if category is not None else None,
        }

        def work(session: Session) -> ImageView | None:
            image = session.scalars(q.image_by_id(image_id)).first()
            if image is None:
                return None
            changes = []
            for name, value in wanted.items():
                if value is not None and getattr(image, name) != value:
                    changes.append(f"{name} {getattr(image, name)!r} -> {value!r}")
                    setattr(image, name, value)
            if changes:
                session.flush()
                self.audit.change(
                    session,
                    origin,
                    "image.update",
                    patient_id=image.patient_id,
                    image_id=image.id,
                    detail="; ".join(changes),
                )
                # PMS thumbnail folders show the image as it is now: they get it again
                self._enqueue_pushes(session, image.patient_id, [image.id], utcnow(), changed=True)
            return image_view_row(_rows(session, *q.image_view_by_id(image_id)).one())

        view = await self.db.write(work)
        if view is not None:
            self._remember_view(view)
        return view

    async def stored_instances(self, sop_instance_uids: Sequence[str]) -> dict[str, tuple[int, str]]:
        """Which of these SOP Instance UIDs are stored: uid -> (patient id, sha256). Not audited: it
        reveals no patient data, and decides whether an imported file is already in the store.
        """
        if not sop_instance_uids:
            return {}

        def work(session: Session) -> dict[str, tuple[int, str]]:
            rows = session.execute(q.images_by_sop_uids(list(sop_instance_uids)))
            return {uid: (patient_id, sha256) for uid, patient_id, sha256 in rows}

        found: dict[str, tuple[int, str]] = await self.db.read(work)
        return found

    async def image_details(self, origin: Origin, patient_id: int) -> list[ImageDetails]:
        """Every image of a patient with its stored facts, study and series (audited as an export)."""

        def work(session: Session) -> list[ImageDetails]:
            return [
                ImageDetails(
                    image=image_view_row(row),
                    attributes=dict(row.attributes or {}),
                    imported_at=row.imported_at,
                    study_description=row.study_description,
                    study_date=row.study_date,
                    accession_number=row.accession_number,
                    series_number=row.series_number,
                    series_modality=row.series_modality,
                    series_description=row.series_description,
                )
                for row in session.execute(q.image_details_of_patient(patient_id))
            ]

        found = await self.db.read(work)
        for details in found:
            self.audit.read(origin, "image.export", patient_id=patient_id, image_id=details.image.id)
        return found

    async def referenced_hashes(self, sha256s: Sequence[str]) -> set[str]:
        """Which of these file hashes some stored image uses (reveals no patient data; not audited).

        Decides whether an ingested file whose images could not be added may be removed again.
        """
        if not sha256s:
            return set()
        found = await self.db.read(
            lambda session: list(session.scalars(q.images_using_hashes(list(sha256s))))
        )
        return set(found)

    # ---------------------------------------------------------------------------------------------
    # Adding images

    async def add_images(self, origin: Origin, patient_id: int, new: Sequence[NewImage]) -> list[ImageView]:
        """Store metadata of images whose files are in the file store; queue the pushes; announce them.

        Pushes to PMSs are written to the outbox in the same transaction, so a crash can neither lose a
        push nor announce images that were not stored. Their ids are registered as this process's own
        before the commit, so the daemon's watcher of the store never announces them a second time.
        """

        def owner(session: Session) -> tuple[None, int]:
            if session.scalars(*q.patient_by_id(patient_id)).first() is None:
                raise Refused(Outcome(Status.NOT_FOUND, f"no patient with id {patient_id}"))
            return None, patient_id

        try:
            _nothing, added = await self._add_with(origin, new, owner, self.db.write)
        except _ImagesRefused as refused:
            raise refused.refusal from None
        return added

    async def import_images(
        self, req: PatientRequest, new: Sequence[NewImage]
    ) -> tuple[Outcome, list[ImageView]]:
        """An IMPORT request's patient and its images, in ONE transaction: found by the identity rules (the
        same rules, conflicts and audit entries as `handle`), created when it is new and
        `allow_patient_creation` allows it, and the images added as by `add_images`.

        Nothing half-imported remains: when the images are refused, the patient's creation is rolled back
        with them, so an import none of whose files is added leaves no empty patient (deleting one
        afterwards is no answer: SQLite gives a deleted patient's id to the next one). A creation race is
        decided by the link's unique key: the loser's transaction is retried and adds its images to the
        winner's patient, as `handle` does for a PMS launch.

        Answers the patient's outcome and the images added. A refused request (a conflict, recorded;
        creation disabled) is answered as `handle` answers it, with no images. Refused images raise as in
        `add_images` (Refused, or IntegrityError for a unique key such as a stored SOP Instance UID), after
        the whole transaction rolled back.
        """
        if req.action is not Action.IMPORT or not new:
            raise ValueError("import_images takes an IMPORT request and at least one image")
        req = normalized(req)
        if invalid := _invalid(req):
            return invalid, []
        may_create, update = self.settings.allow_patient_creation, self._updates(req)

        def owner(session: Session) -> tuple[tuple[Status, PatientView], int]:
            status, view = self._open_in(session, req, may_create=may_create, update=update)
            return (status, view), view.id

        try:
            self._check_request(req)
            (status, view), added = await self._add_with(req.origin, new, owner, self._retry_unique)
        except _ImagesRefused as refused:
            raise refused.refusal from None
        except Refused as refused:  # the patient's
            return await self.refusal_outcome(refused, req.origin), []
        return Outcome(status, _status_message(status, req), patient=view), added

    async def _add_with(
        self,
        origin: Origin,
        new: Sequence[NewImage],
        owner: Callable[[Session], tuple[T, int]],
        write: Callable[[Callable[[Session], Any]], Awaitable[Any]],
    ) -> tuple[T, list[ImageView]]:
        """Add images in the transaction in which `owner` settles their patient (answers what the caller
        wants back, and the patient's id), run by `write`: `db.write`, or `_retry_unique` where the patient
        may be created in it. A refusal of the images themselves is raised as `_ImagesRefused` (for the
        caller to raise as it was), so it is never retried as a lost creation race nor taken for a
        refusal of the patient."""
        registered: list[int] = []
        queued: set[str] = set()

        def work(session: Session) -> tuple[T, int, list[ImageView]]:
            queued.clear()  # a retried transaction queues anew
            answer, patient_id = owner(session)
            try:
                added = self._insert_images(session, origin, patient_id, new, registered, queued)
            except (Refused, IntegrityError) as exc:
                raise _ImagesRefused(exc) from exc
            return answer, patient_id, added

        try:
            answer, patient_id, added = await write(work)
        except BaseException:
            self.own_additions.not_added(registered)
            raise
        # the ids of an attempt that was rolled back and retried, where the retry got other ids
        self.own_additions.not_added(set(registered).difference(view.id for view in added))
        if added:
            self.bus.publish(
                ImagesAdded(
                    patient_id=patient_id,
                    image_ids=tuple(v.id for v in added),
                    origin_protocol=origin.protocol,
                    workstation=origin.workstation,
                    push_channels=frozenset(queued),
                )
            )
        return answer, added

    def _insert_images(
        self,
        session: Session,
        origin: Origin,
        patient_id: int,
        new: Sequence[NewImage],
        registered: list[int],
        queued: set[str],
    ) -> list[ImageView]:
        """Insert the images of one patient, audit them and queue their pushes (the channels go to
        `queued`); their ids are registered as this process's own (and kept in `registered`) before the
        transaction commits."""
        now = utcnow()
        studies = self._studies_for(session, patient_id, new, now)
        series = self._series_for(session, studies, new, now)
        rows = [
            {
                "patient_id": patient_id,
                "series_id": placed.id,
                "sop_instance_uid": item.sop_instance_uid or new_uid(),
                "sha256": item.sha256,
                "file_ext": item.file_ext,
                "media_type": item.media_type,
                "size_bytes": item.size_bytes,
                "category": item.category.value,
                "tooth_numbers": list(item.tooth_numbers),
                "rotation": item.rotation,
                "mirrored": item.mirrored,
                "width": item.width,
                "height": item.height,
                "frames": item.frames,
                "bits_stored": item.bits_stored,
                "color": item.color,
                "captured_at": item.captured_at,
                "imported_at": now,
                "device": item.device,
                "comment": item.comment,
                "attributes": item.attributes,
            }
            for item, placed in zip(new, series, strict=True)
        ]
        image_ids = list(session.scalars(q.insert_images(), rows))
        registered.extend(image_ids)
        self.own_additions.adding(registered)
        self.audit.image_changes(session, origin, "image.add", patient_id, image_ids)
        added = [
            image_view(SimpleNamespace(id=image_id, **row), placed.series_uid, study.study_uid)
            for image_id, row, placed, study in zip(image_ids, rows, series, studies, strict=True)
        ]
        queued.update(self._enqueue_pushes(session, patient_id, image_ids, now))
        return added

    @staticmethod
    def _studies_for(
        session: Session, patient_id: int, new: Sequence[NewImage], now: datetime
    ) -> list[Study]:
        """Each new image's study: the stored one of its UID (looked up for the whole batch at once),
        else created; an image without a study UID gets a study of its own. A stored study of another
        patient is refused."""
        known = _stored_by_uid(session, [item.study_uid for item in new], q.studies_by_uid)
        studies: list[Study] = []
        for item in new:
            study = known.get(item.study_uid) if item.study_uid else None
            if study is None:
                study = Study(
                    patient_id=patient_id,
                    study_uid=item.study_uid or new_uid(),
                    description=item.study_description,
                    study_date=item.captured_at,
                    created_at=now,
                )
                session.add(study)
                if item.study_uid:
                    known[item.study_uid] = study
            elif study.patient_id != patient_id:
                raise Refused(Outcome(Status.CONFLICT, f"study {item.study_uid} belongs to another patient"))
            studies.append(study)
        session.flush()  # the new studies' ids
        return studies

    @staticmethod
    def _series_for(
        session: Session, studies: list[Study], new: Sequence[NewImage], now: datetime
    ) -> list[Series]:
        """Each new image's series (in `studies`, the images' studies), as `_studies_for` finds studies;
        a stored series of another study is refused."""
        known = _stored_by_uid(session, [item.series_uid for item in new], q.series_by_uid)
        found: list[Series] = []
        for item, study in zip(new, studies, strict=True):
            series = known.get(item.series_uid) if item.series_uid else None
            if series is None:
                series = Series(
                    study_id=study.id,
                    series_uid=item.series_uid or new_uid(),
                    modality=item.modality,
                    description=item.series_description,
                    number=item.series_number,
                    created_at=now,
                )
                session.add(series)
                if item.series_uid:
                    known[item.series_uid] = series
            elif series.study_id != study.id:
                raise Refused(Outcome(Status.CONFLICT, f"series {item.series_uid} belongs to another study"))
            found.append(series)
        session.flush()  # the new series' ids, before the images that reference them
        return found

    def _enqueue_pushes(
        self,
        session: Session,
        patient_id: int,
        image_ids: list[int],
        now: datetime,
        *,
        changed: bool = False,
    ) -> set[str]:
        """One outbox message per (link, channel) the push targets name for the patient's links; the
        channels that got one. `changed`: the images are not new but changed, for the refresh targets.

        A patient with a current chart number is also announced to the channels of PMSs keyed by chart
        number (CHART_KEYED), once per channel and only where no link already announces it.
        """
        if not image_ids:
            return set()
        targets = self.refresh_targets if changed else self.push_targets
        batch = f"{image_ids[0]}-{image_ids[-1]}:{len(image_ids)}"
        if changed:  # each change is its own message (the key of the first push is taken)
            batch += f":changed:{now.isoformat()}"
        queued: set[str] = set()

        def add(channel: str, link_key: str, payload: dict[str, Any]) -> None:
            queued.add(channel)
            _queue_push(
                session, f"{channel}:{link_key}:{batch}", channel, patient_id, image_ids, payload, now
            )

        for link in session.scalars(*q.links_of_patient(patient_id)):
            for channel in targets(link.protocol, link.pms_system):
                add(channel, str(link.id), {"link_id": link.id, "pms_system": link.pms_system})
        if session.scalars(*q.current_chart_of_patient(patient_id)).first() is not None:
            for channel in targets(CHART_KEYED, ""):
                if channel not in queued:
                    add(channel, "chart", {"link_id": None, "pms_system": ""})
        return queued

    def _enqueue_chart_move(self, session: Session, patient_id: int, old: str) -> None:
        """A renumbered patient's images go to the folders of its new chart number: PMSs keyed by chart
        number (CHART_KEYED channels) get all of them again, with the old number, whose folder the channel
        clears of them (that number may become another patient's)."""
        channels = self.push_targets(CHART_KEYED, "")
        image_ids = list(session.scalars(q.image_ids_of_patient(patient_id))) if channels else []
        if not image_ids:
            return
        now = utcnow()
        payload = {"link_id": None, "pms_system": "", "retired_chart": old}
        for channel in channels:
            key = f"{channel}:chart:{patient_id}:{now.isoformat()}"
            _queue_push(session, key, channel, patient_id, image_ids, payload, now)

    async def images_for_push(
        self, origin: Origin, patient_id: int, link_id: int | None, image_ids: Sequence[int]
    ) -> tuple[PatientView | None, list[ImageView]]:
        """What a push channel announces: the patient as the PMS behind the link knows it, and the images.

        With a `link_id`, the view carries that link's PMS system and id; a link deleted since the push
        was queued announces nothing (None), so a push never goes to another PMS. Without one (channels
        keyed by chart number) the view carries the first link. Images deleted since, or of another
        patient, are left out.
        """

        def work(session: Session) -> tuple[PatientView | None, list[ImageView]]:
            patient = session.scalars(*q.patient_by_id(patient_id)).first()
            if patient is None:
                return None, []
            link = session.get(PmsLink, link_id) if link_id is not None else None
            if link_id is not None and (link is None or link.patient_id != patient_id):
                return None, []
            rows = _rows(session, q.images_by_ids(sorted(set(image_ids)))).all() if image_ids else []
            images = sorted(
                (image_view_row(r) for r in rows if r.patient_id == patient_id), key=lambda i: i.id
            )
            return _load_patient_view(session, patient, link), images

        view, images = await self.db.read(work)
        if view is not None:
            self.audit.read(origin, "images.push", patient_id=view.id, detail=f"{len(images)} images")
        return view, images

    # ---------------------------------------------------------------------------------------------
    # Conflicts

    async def list_conflicts(
        self, origin: Origin, *, open_only: bool = True, after_id: int = 0, limit: int = 50
    ) -> list[dict[str, Any]]:
        def work(session: Session) -> list[dict[str, Any]]:
            stmt = q.conflicts(open_only=open_only, after_id=after_id, limit=limit)
            return [conflict_json(c) for c in session.scalars(stmt)]

        found = await self.db.read(work)
        for item in found:
            self.audit.read(origin, "conflict.read", patient_id=item["patient_id"])
        return found

    async def resolve_conflict(
        self, origin: Origin, conflict_id: int, resolution: str, *, accept: bool = False
    ) -> dict[str, Any] | None:
        """Close a conflict once a person has sorted it out (e.g. corrected the PMS or the store).

        Closing alone changes no patient data, so a PMS that is right (a marriage name, a corrected birth
        date) would be refused again on its next launch, as a new conflict. `accept` is the person saying
        the PMS is right: the demographics the refused request sent are applied to the patient in the
        transaction that closes the conflict (see `_accept`). None: no such conflict; Refused: it cannot
        be accepted (the message says why).
        """

        def work(session: Session) -> dict[str, Any] | None:
            conflict = session.scalars(q.conflict_by_id(conflict_id)).first()
            if conflict is None:
                return None
            if accept:
                self._accept(session, origin, conflict)
            if conflict.resolved_at is None:
                conflict.resolved_at = utcnow()
                conflict.resolution = resolution[:40]
                self.audit.change(
                    session, origin, "conflict.resolve", patient_id=conflict.patient_id, detail=resolution
                )
            return conflict_json(conflict)

        result: dict[str, Any] | None = await self.db.write(work)
        return result

    def _accept(self, session: Session, origin: Origin, conflict: Conflict) -> None:
        """Apply what a demographics conflict's refused request sent to its patient (audited
        patient.update), so that the same launch then opens the patient; mark the conflict accepted.

        Only a demographics conflict carries data to accept: the others (chart numbers, ambiguous ids)
        are sorted out in the PMS or the store. Accepting again is a no-op; accepting a conflict closed
        without accepting is refused, as is one recorded before its request's data was kept (until the
        PMS repeats the request: `_store_conflict` then keeps what it sent in this open conflict).
        """
        detail = conflict.detail or {}
        if conflict.kind != "demographics":
            raise Refused(
                Outcome(
                    Status.CONFLICT,
                    f"conflict {conflict.id} is a {conflict.kind} conflict: it carries no patient data to"
                    " accept; correct the PMS or the store, then resolve it without accept",
                )
            )
        if detail.get("accepted"):
            return
        if conflict.resolved_at is not None:
            raise Refused(
                Outcome(
                    Status.CONFLICT,
                    f"conflict {conflict.id} was already resolved without accepting the PMS's data; the"
                    " PMS's next launch with that data records a new conflict, which can be accepted",
                )
            )
        sent = detail.get("sent")
        if not isinstance(sent, dict):
            raise Refused(
                Outcome(
                    Status.CONFLICT,
                    f"conflict {conflict.id} was recorded before the bridge kept the data a refused request"
                    " sent, so there is nothing to accept yet; leave it open and launch the patient from"
                    " the PMS again: that launch is refused again and keeps what it sent in this conflict,"
                    " which can then be accepted",
                )
            )
        patient = (  # locked, as every change of a patient's demographics (see _lock_patient)
            session.scalars(*q.patient_for_update(conflict.patient_id)).first()
            if conflict.patient_id is not None
            else None
        )
        if patient is None:
            raise Refused(Outcome(Status.CONFLICT, f"the patient of conflict {conflict.id} no longer exists"))
        changed = _apply_demographics(patient, demographics_from_conflict(sent))
        if changed:
            self.audit.change(
                session,
                origin,
                "patient.update",
                patient_id=patient.id,
                detail=f"{','.join(changed)} (conflict {conflict.id} accepted)",
            )
        conflict.detail = {**detail, "accepted": True}

    async def audit_entries(
        self, origin: Origin, *, patient_id: int | None = None, after_id: int = 0, limit: int = 100
    ) -> list[dict[str, Any]]:
        """The audit log (reading it is audited too)."""

        def work(session: Session) -> list[dict[str, Any]]:
            stmt = q.audit_entries(patient_id=patient_id, after_id=after_id, limit=limit)
            return [audit_json(entry) for entry in session.scalars(stmt)]

        entries = await self.db.read(work)
        self.audit.read(origin, "audit.read", patient_id=patient_id)
        return entries


def _queue_push(
    session: Session,
    key: str,
    channel: str,
    patient_id: int,
    image_ids: list[int],
    payload: dict[str, Any],
    now: datetime,
) -> None:
    """One outbox message announcing `image_ids` of a patient to a channel, due now."""
    session.add(
        OutboxMessage(
            channel=channel,
            key=key,
            patient_id=patient_id,
            payload={**payload, "image_ids": image_ids},
            next_attempt_at=now,
            created_at=now,
        )
    )


def audit_json(entry: AuditEntry) -> dict[str, Any]:
    return {
        "id": entry.id,
        "at": entry.at.isoformat(),
        "action": entry.action,
        "protocol": entry.protocol,
        "transport": entry.transport,
        "workstation": entry.workstation,
        "actor": entry.actor,
        "request_id": entry.request_id,
        "patient_id": entry.patient_id,
        "image_id": entry.image_id,
        "detail": entry.detail,
    }


def conflict_json(conflict: Conflict) -> dict[str, Any]:
    return {
        "id": conflict.id,
        "kind": conflict.kind,
        "pms_system": conflict.pms_system,
        "practice_id": conflict.practice_id,
        "pms_id": conflict.pms_id,
        "chart_number": conflict.chart_number,
        "patient_id": conflict.patient_id,
        "other_patient_id": conflict.other_patient_id,
        "message": (conflict.detail or {}).get("message", ""),
        "detail": conflict.detail,
        "origin": conflict.origin,
        "created_at": conflict.created_at.isoformat(),
        "resolved_at": conflict.resolved_at.isoformat() if conflict.resolved_at else None,
        "resolution": conflict.resolution,
    }


def _status_message(status: Status, req: PatientRequest) -> str:
    key = req.pms_id or req.chart_number
    return {
        Status.CREATED: f"patient {key} created",
        Status.UPDATED: f"patient {key} updated",
        Status.OK: f"patient {key} opened",
    }.get(status, status.value)
