"""Dexis-style launches under two profiles: `pms-bridge dexis ...` and `pms-bridge dentrix ...`.

The same three messages (protocols.dexis) arrive three ways:

* `pms-bridge dexis @FILE`: a classic info file or an Integrator file, named on the command line;
* `pms-bridge dexis SET 4711 LN="..." ...`: the Integrator's SET command on the command line, or as the
  body of `POST /api/v1/launch/dexis` (loopback HTTP with the API token: what a DDE-to-HTTP shim on a
  Windows workstation sends, since DDE itself is Windows-only);
* an Integrator file `Patient_<workstation>.txt` written into a watched folder (`integrator_dir`).

`dentrix` is the same dialect under the `[dentrix]` profile (Dentrix G6's Integrator, Dentrix program
links), so a practice can key those patients by chart number and give them their own thumbnail folder.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bridge.config import DexisSettings, watched_folders
from bridge.exits import ExitCode
from bridge.handlers.base import Launch, LaunchHandler, LaunchReply
from bridge.handlers.profile import open_patient
from bridge.watch import FolderWatcher, Handle
from protocols import dexis
from protocols.common import decode, locale_formats
from protocols.fields import MessageError, PatientFields

if TYPE_CHECKING:
    from bridge.runtime import Runtime


async def handle_dexis(rt: Runtime, launch: Launch) -> LaunchReply:
    """`pms-bridge dexis @FILE | SET ...` under the [dexis] profile."""
    return await _handle(rt, launch, rt.settings.dexis)


async def handle_dentrix(rt: Runtime, launch: Launch) -> LaunchReply:
    """`pms-bridge dentrix @FILE | SET ...` under the [dentrix] profile."""
    return await _handle(rt, launch, rt.settings.dentrix)


async def _handle(rt: Runtime, launch: Launch, profile: DexisSettings) -> LaunchReply:
    if not launch.filename and not launch.content and not any(arg.strip() for arg in launch.args):
        return without_patient(launch)
    return await open_patient(rt, launch, profile, lambda: parse_launch(launch, profile))


def without_patient(launch: Launch) -> LaunchReply:
    """A launch that names nothing: success, and nothing to do.

    A PMS with no patient selected starts the imaging program without arguments [C] (Open Dental's
    Dexis bridge), so this is a valid launch, not a malformed one: an error would pop up at the front
    desk every time. Nothing is published: every viewer event names a patient or an image, and a viewer
    already shows the store without one; nothing is read, so nothing is audited.
    """
    return LaunchReply(
        ExitCode.OK, f"pms-bridge {launch.protocol}: started without a patient; nothing to open"
    )


def parse_launch(launch: Launch, profile: DexisSettings) -> PatientFields:
    """Which of the messages a launch carries: a SET command (arguments or body), else a file; a launch
    that names something else names a file that is not there (`without_patient`: one naming nothing)."""
    joined = " ".join(launch.args)
    today = date.today()  # a birth date may not be after it (the parsers are free of the clock)
    if launch.args and dexis.is_set_command(joined + " "):
        return dexis.parse_set_command(joined, today=today)
    if launch.filename or launch.content:
        encoding = launch.charset or profile.encoding  # an HTTP client's declared charset wins
        if not launch.filename:  # a body without a file: the SET string of an HTTP client, or a file's bytes
            text = decode(launch.content, encoding).text
            if dexis.is_set_command(text):
                return dexis.parse_set_command(text, today=today)
        message = dexis.parse_file(
            launch.content,
            short_date_formats=locale_formats(profile.locale),
            today=today,
            encoding=encoding,
            info_file_male=profile.info_file_sx_m == "male",
        )
        return message.fields
    named = next(arg for arg in launch.args if arg.strip())
    raise MessageError(f"cannot read {named.lstrip('@')}: no such file (the PMS writes it before the launch)")


# --------------------------------------------------------------------------------------------------
# The Integrator's watched folders


def integrator_watchers(rt: Runtime) -> Coroutine[Any, Any, None] | None:
    """The daemon worker polling each profile's `integrator_dir` (None when no profile has one)."""
    watchers = build_integrator_watchers(rt)
    if not watchers:
        return None
    return _run_all(watchers)


def build_integrator_watchers(rt: Runtime) -> list[FolderWatcher]:
    """A watcher per Integrator folder that bridge.config.watched_folders lists ([dexis] and [dentrix]
    `integrator_dir`); a file is handled once its size is stable. A missing folder is not created: the
    watcher reports it and watches it once it appears."""
    handlers: dict[str, LaunchHandler] = {"dexis": handle_dexis, "dentrix": handle_dentrix}
    return [
        FolderWatcher(
            rt,
            folder.watcher,
            folder.path,
            _folder_handler(rt, folder.section, handlers[folder.section]),
            setting=folder.setting,
            accept_name=lambda name: dexis.integrator_workstation(name) is not None,
        )
        for folder in watched_folders(rt.settings)
        if folder.section in handlers
    ]


async def _run_all(watchers: list[FolderWatcher]) -> None:
    await asyncio.gather(*(watcher.run() for watcher in watchers))


def _folder_handler(rt: Runtime, protocol: str, handler: LaunchHandler) -> Handle:
    """Hands a complete communication file to the launch handler, as if the PMS had launched it.

    The file stays where the PMS wrote it (it overwrites it for the next patient, and may also start
    `pms-bridge ... @FILE` on it); the watcher's claim keeps each version from being handled twice.
    Its result, logged and recorded with the claim, is the exit code a launch would have had.
    """

    async def handle(path: Path, content: bytes) -> str:
        launch = Launch(
            protocol=protocol,
            filename=str(path),
            content=content,
            workstation=(dexis.integrator_workstation(path.name) or "")[:120],
            transport="folder",
        )
        answer = await handler(rt, launch)
        if rt.recorder is not None:
            await rt.recorder.folder(f"{protocol}-integrator", protocol, path.name, content, None, answer)
        # The exit code only: the line for a PMS quotes the file's id, names and dates ("BD '31.02.1980'
        # is not a date", "patient 5556 created"), and this result is logged and kept in the store.
        return f"exit {answer.exit_code}"

    return handle
