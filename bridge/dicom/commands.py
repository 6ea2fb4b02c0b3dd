"""The command-line entry points `pms-bridge import PATH...` and `pms-bridge export-dicom`.

Both run against the store directly (as `reconcile` does), not through the daemon: media are local to the
machine the command runs on, a CT set is too large to send through HTTP for no gain, and an import must
work while the daemon is down (a migration, a first install once `init` has made the store: they never
make one). They build the same Runtime the daemon builds, so identity goes through the same service and
images through the same pipeline. A daemon running on the same store sees the new images on its next
read; pushes to PMSs are written to the outbox in the import's transactions and sent by the daemon's
outbox workers.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from bridge.config import Settings, load_settings
from bridge.dicom.importer import ImportAborted, Importer, ImportReport
from bridge.model import Origin
from bridge.runtime import Runtime

if TYPE_CHECKING:
    from bridge.dicom.export import ExportReport

EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_USAGE = 2
EXIT_NOT_WRITTEN = 3  # export-dicom: the set could not be written (its folder, a full disk); nothing is left


def cli_origin(transport: str) -> Origin:
    """Who runs a command, for the audit log: this machine and the operating-system user."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return Origin(
        protocol="dicom", transport=transport, workstation=socket.gethostname()[:120], actor=f"user:{user}"
    )


def _workers() -> int:
    return max(1, os.cpu_count() or 1)


def build_runtime(settings: Settings, command: str) -> Runtime:
    """The daemon's Runtime for a command; a schema it migrated (`[store] migrate`) is said on stderr, as
    the daemon logs it, so that no upgrade goes unnoticed. A missing SQLite database file is refused
    (one line), not made a new store: `init` and the daemon make new stores."""
    rt = Runtime.build(settings, imaging_workers=_workers(), create=False)
    if rt.schema_upgrade is not None:
        print(f"pms-bridge {command}: {rt.schema_upgrade.describe()}", file=sys.stderr)
    return rt


def run_import(config: str | None, paths: Sequence[str], *, as_json: bool) -> int:
    """`pms-bridge import PATH...`: print what became of every file; exit 1 if any file was refused."""
    settings = load_settings(config)
    sources = [(str(Path(p).absolute()), p) for p in paths]
    rt = build_runtime(settings, "import")
    try:
        report = asyncio.run(_import(rt, sources))
    except ImportAborted as exc:
        print(f"pms-bridge import: {exc}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        rt.close()
    if as_json:
        print(json.dumps(report.to_json(), indent=2, ensure_ascii=False))
    else:
        print_report(report)
    return EXIT_PROBLEMS if report.errors else EXIT_OK


async def _import(rt: Runtime, sources: list[tuple[str, str]]) -> ImportReport:
    try:
        return await Importer(rt, cli_origin("import"), concurrency=2 * _workers()).run(sources)
    finally:
        await rt.audit.flush()


def run_export(
    config: str | None,
    *,
    pms_id: str,
    out: str,
    profile: str,
    mode: str,
    pms_system: str | None,
    practice_id: str | None,
    as_json: bool,
) -> int:
    """`pms-bridge export-dicom`: write the file set; exit 1 if an image could not be exported, 3 (one
    line, no traceback) if the set could not be written at all."""
    # not imported by `pms-bridge import`: 0.15 s of start-up
    from bridge.dicom.export import ExportNotWritten, ExportRefused

    settings = load_settings(config)
    rt = build_runtime(settings, "export-dicom")
    try:
        report = asyncio.run(
            _export(rt, pms_id, Path(out), profile, mode, pms_system=pms_system, practice_id=practice_id)
        )
    except ExportRefused as exc:
        print(f"pms-bridge export-dicom: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ExportNotWritten as exc:
        print(f"pms-bridge export-dicom: {exc}", file=sys.stderr)
        return EXIT_NOT_WRITTEN
    finally:
        rt.close()
    if as_json:
        print(json.dumps(report.to_json(), indent=2, ensure_ascii=False))
    else:
        for item in report.written:
            note = f" ({item.note})" if item.note else ""
            print(f"exported  image {item.image_id} -> {'/'.join(item.file_id)} [{item.how}]{note}")
        for kind, problems in (("skipped", report.skipped), ("error", report.errors)):
            for problem in problems:
                print(f"{kind:9} image {problem.image_id}: {problem.reason}")
        print(
            f"{len(report.written)} images written to {report.out} with its DICOMDIR; "
            f"{len(report.skipped)} left out; {len(report.errors)} failed"
        )
    return EXIT_PROBLEMS if report.errors else EXIT_OK


async def _export(
    rt: Runtime,
    pms_id: str,
    out: Path,
    profile: str,
    mode: str,
    *,
    pms_system: str | None,
    practice_id: str | None,
) -> ExportReport:
    from bridge.dicom.export import export_patient

    try:
        return await export_patient(
            rt,
            cli_origin("export"),
            pms_id=pms_id,
            out=out,
            profile=profile,
            mode=mode,
            pms_system=pms_system,
            practice_id=practice_id,
        )
    finally:
        await rt.audit.flush()


def print_report(report: ImportReport) -> None:
    """One line per file, then a summary line."""
    for item in report.imported:
        what = f"{item.category}, a volume of {item.files} slices" if item.files > 1 else item.category
        print(f"imported  {item.path} -> image {item.image_id} (patient {item.pms_id}, {what})")
    for kind, problems in (("skipped", report.skipped), ("error", report.errors), ("note", report.notes)):
        for problem in problems:
            print(f"{kind:9} {problem.path}: {problem.reason}")
    files = sum(item.files for item in report.imported)
    print(
        f"{len(report.imported)} images imported from {files} files; "
        f"{len(report.skipped)} skipped; {len(report.errors)} not imported"
    )
