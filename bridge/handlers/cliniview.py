"""`pms-bridge cliniview ARG`: CLINIVIEW-style launches, the argument or Cliniview.ini.

`ARG` is either the one argument `-ID;FIRST;LAST;SSN;MM/dd/yyyy` or the path of the Cliniview.ini the
PMS wrote. A PMS that did not strip the spaces from names splits the argument into several; they are
joined again with the spaces they were split at.
"""

from __future__ import annotations

from datetime import date
from typing import TYPE_CHECKING

from bridge.config import CliniviewSettings
from bridge.handlers.base import Launch, LaunchReply
from bridge.handlers.profile import open_patient
from protocols import cliniview
from protocols.common import dotnet_date_formats
from protocols.fields import MessageError, PatientFields

if TYPE_CHECKING:
    from bridge.runtime import Runtime


async def handle(rt: Runtime, launch: Launch) -> LaunchReply:
    profile = rt.settings.cliniview
    return await open_patient(rt, launch, profile, lambda: parse_launch(launch, profile))


def parse_launch(launch: Launch, profile: CliniviewSettings) -> PatientFields:
    if launch.filename or launch.content:
        return cliniview.parse_ini_file(
            launch.content,
            section=profile.ini_section,
            keys=profile.ini_keys,
            date_formats=dotnet_date_formats(profile.ini_date_format),
            today=date.today(),  # a birth date may not be after it (the parser is free of the clock)
            encoding=profile.encoding,
        )
    if not launch.args:
        raise MessageError("expected -ID;FIRST;LAST;SSN;MM/dd/yyyy or the path of Cliniview.ini")
    return cliniview.parse_argument(
        " ".join(launch.args), date_formats=dotnet_date_formats(profile.date_format), today=date.today()
    )
