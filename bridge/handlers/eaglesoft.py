"""`pms-bridge eaglesoft FILE`: Eaglesoft (Patterson) launches with the Patterson Imaging ini.

The PMS writes the ini (its path is configured in the PMS's imaging link), then starts the imaging
program with it; pms-bridge stands in for that program. Patients are matched on the patient number only;
with `[eaglesoft] legacy_id_suffix = 5` the number is the last 5 characters of the PMS's, matched by the
service against the ends of known numbers.
"""

from __future__ import annotations

from datetime import date
from typing import TYPE_CHECKING

from bridge.config import EaglesoftSettings
from bridge.handlers.base import Launch, LaunchReply
from bridge.handlers.profile import open_patient
from protocols import patterson
from protocols.common import locale_formats
from protocols.fields import MessageError, PatientFields

if TYPE_CHECKING:
    from bridge.runtime import Runtime


async def handle(rt: Runtime, launch: Launch) -> LaunchReply:
    profile = rt.settings.eaglesoft
    return await open_patient(
        rt, launch, profile, lambda: parse_launch(launch, profile), id_suffix_length=profile.legacy_id_suffix
    )


def parse_launch(launch: Launch, profile: EaglesoftSettings) -> PatientFields:
    if not launch.filename and not launch.content:
        named = f": {launch.args[0]!r} is not a file" if launch.args else ""
        raise MessageError(f"expected the path of the Patterson Imaging ini the PMS wrote{named}")
    return patterson.parse(
        launch.content,
        section=profile.ini_section,
        keys=profile.ini_keys,
        short_date_formats=locale_formats(profile.locale),
        today=date.today(),  # a birth date may not be after it (the parser is free of the clock)
        encoding=profile.encoding,
    )
