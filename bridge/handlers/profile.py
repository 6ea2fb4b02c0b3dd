"""Glue the launch-style US formats share: a PMS profile turns parsed fields into a request, an outcome
becomes an exit code and one line.

Dexis, Dentrix, Eaglesoft and CLINIVIEW launches have no answer file: the PMS (or the person at it) gets
the exit code of `pms-bridge <protocol> ...` and one line of text, and that is all. Every failure must
become such an answer, never an exception escaping into the daemon: a message that cannot be read, an
identity conflict, a store that is down.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from bridge.config import LaunchProfile
from bridge.exits import ExitCode
from bridge.handlers.base import Launch, LaunchReply
from bridge.model import Action, IdKind, Outcome, PatientRequest, Status
from bridge.store.db import StoreFileLost
from protocols.fields import MessageError, PatientFields

if TYPE_CHECKING:
    from bridge.runtime import Runtime

log = logging.getLogger(__name__)


# The US profiles' table (docs/us-pms.md): refusals are told apart, unlike OPP's.
EXIT_CODES: dict[Status, ExitCode] = {
    Status.OK: ExitCode.OK,
    Status.CREATED: ExitCode.OK,
    Status.UPDATED: ExitCode.OK,
    Status.PARTIAL: ExitCode.OK,
    Status.NOT_FOUND: ExitCode.NOT_FOUND,
    Status.CONFLICT: ExitCode.CONFLICT,
    Status.FORBIDDEN: ExitCode.FORBIDDEN,
    Status.INVALID: ExitCode.INVALID,
    Status.ERROR: ExitCode.ERROR,
}


def build_request(
    fields: PatientFields, profile: LaunchProfile, launch: Launch, *, id_suffix_length: int = 0
) -> PatientRequest:
    """The request a profile makes of a message: which id it carries is the profile's `id_field`.

    With `id_field = chart_number` the message's id is the chart number and a second chart number in it
    is ignored. `id_suffix_length` > 0 says the PMS truncates its internal ids to that many trailing
    characters (Patterson legacy); chart numbers are never truncated.
    """
    by_chart = profile.id_field == "chart_number"
    suffix_kind = IdKind.PMS_ID_SUFFIX if id_suffix_length else IdKind.PMS_ID
    return PatientRequest(
        action=Action.OPEN,
        origin=launch.origin(),
        pms_system=profile.pms_system,
        practice_id=profile.practice_id,
        pms_id="" if by_chart else fields.patient_id,
        chart_number=fields.patient_id if by_chart else fields.chart_number,
        id_kind=IdKind.CHART_NUMBER if by_chart else suffix_kind,
        id_suffix_length=0 if by_chart else id_suffix_length,
        demographics=fields.demographics,
    )


def reply(protocol: str, outcome: Outcome) -> LaunchReply:
    """Exit code and one line for an outcome; a conflict names its id so the admin can find it."""
    message = outcome.message
    if outcome.conflict_id is not None:
        message += f" (conflict {outcome.conflict_id})"
    return LaunchReply(EXIT_CODES[outcome.status], f"pms-bridge {protocol}: {message}")


async def open_patient(
    rt: Runtime,
    launch: Launch,
    profile: LaunchProfile,
    parse: Callable[[], PatientFields],
    *,
    id_suffix_length: int = 0,
) -> LaunchReply:
    """Parse a launch, open its patient, answer; every failure becomes an exit code and a line.

    Logs carry the protocol, workstation and exit code, never the message's names or dates.
    """
    context = {"protocol": launch.protocol, "workstation": launch.workstation, "transport": launch.transport}
    try:
        fields = parse()
    except MessageError as exc:
        log.warning("unreadable PMS message", extra={**context, "exit": int(ExitCode.INVALID)})
        return LaunchReply(ExitCode.INVALID, f"pms-bridge {launch.protocol}: {exc}")
    request = build_request(fields, profile, launch, id_suffix_length=id_suffix_length)
    try:
        outcome = await rt.service.handle(request)
    except StoreFileLost:  # answered by the launch route, for every protocol (bridge.web.launch)
        raise
    except Exception:
        log.exception("launch failed", extra=context)
        return LaunchReply(
            ExitCode.ERROR,
            f"pms-bridge {launch.protocol}: internal error; the pms-bridge log has the details"
            + (f" (request {launch.request_id})" if launch.request_id else ""),
        )
    answer = replace(reply(launch.protocol, outcome), request=request, outcome=outcome, phi=fields.sensitive)
    if answer.exit_code:
        log.warning("launch refused", extra={**context, "exit": answer.exit_code, "status": outcome.status})
    return answer
