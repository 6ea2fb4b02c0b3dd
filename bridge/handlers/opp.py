"""The `opp` launch: `pms-bridge opp FILE` (the file-based XML form) and `pms-bridge opp -p ...` (flags).

OPP's file and command-line forms are fire-and-forget: the published notes describe no answer file, so
the PMS's file is left as it is and the answer is the exit code and one line (EXIT_CODES below). `execute`
is shared with OPP web (`bridge.web.oppweb`), so both transports run a message the same way.
"""

from __future__ import annotations

import logging
from datetime import date

from bridge.config import Settings
from bridge.exits import ExitCode
from bridge.handlers.base import Launch, LaunchReply
from bridge.model import Outcome, PatientRequest, Status
from bridge.runtime import Runtime
from bridge.store.limits import TEXT_RULES
from protocols.opp import (
    STORED_FIELDS,
    Command,
    OppError,
    OppMessage,
    OppOptions,
    parse_args,
    parse_flag_map,
    parse_xml,
)

log = logging.getLogger(__name__)

# The store's limits for the OPP fields it keeps (bridge.store.limits, read from the columns), handed to
# the parser as data so that protocols.opp holds no copy of them.
FIELD_LIMITS: dict[str, int] = {opp: TEXT_RULES[name].limit for opp, name in STORED_FIELDS.items()}

PROTOCOL = "opp"
# OPP's documented table (docs/opp.md) predates the US profiles' 5 to 7: every refusal by the store
# (unknown patient for UPDATE or VIEW_DATA, identity conflict, forbidden, a failure) is 1; the message
# itself (not XML, unknown version or command, bad flag or date) is 2.
EXIT_CODES: dict[Status, ExitCode] = {
    Status.OK: ExitCode.OK,
    Status.CREATED: ExitCode.OK,
    Status.UPDATED: ExitCode.OK,
    Status.PARTIAL: ExitCode.OK,
    Status.NOT_FOUND: ExitCode.ERROR,
    Status.CONFLICT: ExitCode.ERROR,
    Status.FORBIDDEN: ExitCode.ERROR,
    Status.ERROR: ExitCode.ERROR,
    Status.INVALID: ExitCode.INVALID,
}
# OPP web's answer to each refusal by the service: the HTTP status and problem kind (docs/opp.md). An
# INVALID request is a field of the message the store cannot take (a line separator in a name): 400
# invalid-field like every other bad field of the message, not the REST API's 422.
WEB_ANSWERS: dict[Status, tuple[int, str]] = {
    Status.NOT_FOUND: (404, "not-found"),
    Status.CONFLICT: (409, "conflict"),
    Status.FORBIDDEN: (403, "forbidden"),
    Status.INVALID: (400, "invalid-field"),
    Status.ERROR: (500, "error"),
}


def options(settings: Settings) -> OppOptions:
    """The parser's view of the `[opp]` settings (a few microseconds; not worth a cache keyed by
    settings, which hold unhashable maps)."""
    opp = settings.opp
    return OppOptions(
        software_name=opp.software_name,
        practice_id=opp.practice_id,
        practice_id_attribute=opp.practice_id_attribute,
        middle_name_attribute=opp.middle_name_attribute,
        encoding=opp.encoding,
        cli_flags=parse_flag_map(opp.cli_flags),
        cli_case_sensitive=opp.cli_case_sensitive,
        cli_command=Command(opp.cli_command.upper()),
        field_limits=FIELD_LIMITS,
    )


async def execute(rt: Runtime, message: OppMessage, request: PatientRequest) -> Outcome:
    """Run one OPP message (as `message.request(origin)`) against the store: VIEW_DATA is the image list
    plus a viewer (`BridgeService.view_data`), the other commands open, create or update."""
    # Which PMS build sent it, for an integration engineer reading a debug log (never patient data).
    log.debug(
        "OPP message",
        extra={
            "command": message.command.value,
            "version": message.version,
            "software_version": message.software_version,
        },
    )
    if message.data_elements:
        log.info(
            "OPP <data> elements are not interpreted (their shape is unpublished)",
            extra={"count": message.data_elements, "command": message.command.value},
        )
    if message.command is Command.VIEW_DATA:
        return await rt.service.view_data(request)
    return await rt.service.handle(request)


async def handle(rt: Runtime, launch: Launch) -> LaunchReply:
    """Parse the flags or the named XML file, run it, answer with an exit code and one line."""
    opts = options(rt.settings)
    try:
        if launch.args and launch.args[0].startswith("-"):
            message = parse_args(launch.args, opts, today=date.today())
        elif launch.content:
            message = parse_xml(launch.content, opts, today=date.today())
        elif launch.args:
            return LaunchReply(
                ExitCode.INVALID, f"OPP: no message in {launch.args[0]!r} (missing or empty file)"
            )
        else:
            return LaunchReply(
                ExitCode.INVALID, "OPP: name an OPP XML file or pass OPP flags (-p REFERENCE ...)"
            )
    except OppError as exc:
        return LaunchReply(ExitCode.INVALID, f"OPP: {exc}")
    request = message.request(launch.origin())
    outcome = await execute(rt, message, request)
    text = f"OPP {message.command.value}: {outcome.message}"
    if outcome.conflict_id is not None:
        text += f" (conflict {outcome.conflict_id})"
    return LaunchReply(EXIT_CODES[outcome.status], text, request=request, outcome=outcome)
