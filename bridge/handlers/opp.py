"""The `opp` launch: `pms-bridge opp FILE` (the file-based XML form) and `pms-bridge opp -p ...` (flags).

OPP's file and command-line forms are fire-and-forget: the published notes describe no answer file, so
the PMS's file is left as it is and the answer is the exit code and one line (EXIT_* below). `execute`
is shared with OPP web (`bridge.web.oppweb`), so both transports run a message the same way.
"""

from __future__ import annotations

import logging
from datetime import date

from bridge.config import Settings
from bridge.handlers.base import Launch, LaunchReply
from bridge.model import Outcome, PatientRequest, Status
from bridge.runtime import Runtime
from protocols.opp import (
    Command,
    OppError,
    OppMessage,
    OppOptions,
    parse_args,
    parse_flag_map,
    parse_xml,
)

log = logging.getLogger(__name__)

PROTOCOL = "opp"
EXIT_OK = 0
EXIT_REFUSED = 1  # the store refused: unknown patient (UPDATE, VIEW_DATA), identity conflict, forbidden
EXIT_INVALID = 2  # the message itself: not XML, unknown version or command, bad flag or date

_REFUSED = {Status.NOT_FOUND, Status.CONFLICT, Status.FORBIDDEN, Status.ERROR}


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
    )


async def execute(rt: Runtime, message: OppMessage, request: PatientRequest) -> Outcome:
    """Run one OPP message (as `message.request(origin)`) against the store: VIEW_DATA is the image list
    plus a viewer (`BridgeService.view_data`), the other commands open, create or update."""
    if message.data_elements:
        log.info(
            "OPP <data> elements are not interpreted (their shape is unpublished)",
            extra={"count": message.data_elements, "command": message.command.value},
        )
    if message.command is Command.VIEW_DATA:
        return await rt.service.view_data(request)
    return await rt.service.handle(request)


def exit_code(status: Status) -> int:
    if status.ok or status is Status.PARTIAL:
        return EXIT_OK
    return EXIT_REFUSED if status in _REFUSED else EXIT_INVALID


async def handle(rt: Runtime, launch: Launch) -> LaunchReply:
    """Parse the flags or the named XML file, run it, answer with an exit code and one line."""
    opts = options(rt.settings)
    try:
        if launch.args and launch.args[0].startswith("-"):
            message = parse_args(launch.args, opts, today=date.today())
        elif launch.content:
            message = parse_xml(launch.content, opts, today=date.today())
        elif launch.args:
            return LaunchReply(EXIT_INVALID, f"OPP: no message in {launch.args[0]!r} (missing or empty file)")
        else:
            return LaunchReply(EXIT_INVALID, "OPP: name an OPP XML file or pass OPP flags (-p REFERENCE ...)")
    except OppError as exc:
        return LaunchReply(EXIT_INVALID, f"OPP: {exc}")
    request = message.request(launch.origin())
    outcome = await execute(rt, message, request)
    text = f"OPP {message.command.value}: {outcome.message}"
    if outcome.conflict_id is not None:
        text += f" (conflict {outcome.conflict_id})"
    return LaunchReply(exit_code(outcome.status), text, request=request, outcome=outcome)
