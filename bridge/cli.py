"""The `pms-bridge` command. Thin: parses arguments and calls into the packages.

Launch commands a PMS waits on (`pms-bridge vdds FILE`, `opp`, `cliniview`, `dexis` ...) take a fast path
that imports neither argparse nor anything else heavy: they go straight to `bridge.launch`. Everything
else is an argparse sub-command whose implementation is imported only when it runs.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from bridge.handlers import HANDLERS

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (3 ms); mypy takes it as true

if TYPE_CHECKING:
    import argparse

# Sub-commands of a launch protocol that are admin commands, not PMS launches.
ADMIN_SUBCOMMANDS: dict[str, frozenset[str]] = {
    "vdds": frozenset({"register", "unregister"}),
}

EXIT_USAGE = 2


def _is_launch(argv: Sequence[str]) -> bool:
    if not argv or argv[0] not in HANDLERS:
        return False
    rest = list(argv[1:])
    while rest and rest[0].startswith("--config"):  # `--config FILE` or `--config=FILE` before the rest
        del rest[: 2 if rest[0] == "--config" else 1]
    admin = ADMIN_SUBCOMMANDS.get(argv[0], frozenset())
    return not (rest and (rest[0] in admin or rest[0] in ("--help", "-h")))


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if _is_launch(args):
        from bridge.launch import run

        return run(args[0], args[1:])
    return _run_command(args)


# --------------------------------------------------------------------------------------------------
# Sub-commands


def cmd_init(ns: argparse.Namespace) -> int:
    from pathlib import Path

    from bridge.install import init_home

    settings, done = init_home(Path(ns.home))
    for line in done or ["nothing to do: the home folder is complete"]:
        print(line)
    print(f"config: {settings.path}")
    print(f"start the daemon with: pms-bridge serve --config {shell_quoted(str(settings.path))}")
    return 0


def shell_quoted(path: str) -> str:
    """`path` as the platform's shell reads it back in a pasted command line: a space, `#` or `&` in a
    folder name ("Praxis #2") would otherwise cut it. POSIX: shlex.quote. Windows (cmd and PowerShell):
    double quotes, which no Windows path contains, around anything but letters, digits and `\\:/._-`."""
    import os

    if os.name != "nt":
        import shlex

        return shlex.quote(path)
    plain = all(char.isascii() and (char.isalnum() or char in "\\:/._-") for char in path)
    return path if plain else f'"{path}"'


def cmd_serve(ns: argparse.Namespace) -> int:
    import asyncio

    from bridge import logs
    from bridge.config import load_settings
    from bridge.daemon import serve

    settings = load_settings(ns.config)
    logs.configure(settings.daemon.log_level, settings.daemon.log_format, settings.daemon.log_file)
    asyncio.run(serve(settings))
    return 0


def cmd_doctor(ns: argparse.Namespace) -> int:
    from bridge.doctor import run_checks

    return run_checks(ns.config)


def cmd_reconcile(ns: argparse.Namespace) -> int:
    from bridge.config import load_settings
    from bridge.reconcile import reconcile

    return reconcile(load_settings(ns.config))


def cmd_import(ns: argparse.Namespace) -> int:
    from bridge.imaging.pool import prestart

    prestart()  # the pool's fork server imports its modules while this process imports the rest
    from bridge.dicom.commands import run_import

    return run_import(ns.config, ns.paths, as_json=ns.json)


def _import_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH", help="DICOM files, folders, DICOMDIR file sets")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def cmd_export_dicom(ns: argparse.Namespace) -> int:
    from bridge.dicom.commands import run_export

    return run_export(
        ns.config,
        pms_id=ns.patient,
        out=ns.out,
        profile=ns.profile,
        mode=ns.mode,
        pms_system=ns.pms_system,
        practice_id=ns.practice_id,
        as_json=ns.json,
    )


def _export_dicom_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--patient", required=True, metavar="PMS_ID", help="the patient's id in the PMS")
    parser.add_argument(
        "--out", required=True, metavar="DIR", help="a new (or empty) folder for the file set"
    )
    parser.add_argument(
        "--profile", choices=("general", "dental"), default="general", help="STD-GEN-CD or STD-DEN-CD"
    )
    parser.add_argument("--mode", choices=("original", "filtered"), default="original", help="originals only")
    parser.add_argument("--pms-system", help="the PMS that knows the id (default: [dicom] pms_system)")
    parser.add_argument("--practice-id", help="its practice id (default: [dicom] practice_id)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def cmd_replay(ns: argparse.Namespace) -> int:
    import asyncio
    from pathlib import Path

    from bridge import logs
    from bridge.replay import print_table, replay

    logs.configure("error", "text")  # the table is the output; the daemons' own logs would drown it
    results = asyncio.run(
        replay(
            Path(ns.samples),
            pattern=ns.case,
            config=Path(ns.config) if ns.config else None,
            url=ns.url,
            token=ns.token or "",
            opp_url=ns.opp_url or "",
            update=ns.update,
        )
    )
    print_table(results)
    return 0 if results and all(r.result in ("pass", "n/a") for r in results) else 1


def cmd_vdds(ns: argparse.Namespace) -> int:
    from bridge.handlers.vdds_register import run

    return run(ns)


def _actions(parser: argparse.ArgumentParser, *actions: tuple[str, str]) -> list[argparse.ArgumentParser]:
    """The sub-commands (ACTION) of a command, each taking `--config` where the command takes it too."""
    import argparse

    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    parsers = []
    for name, text in actions:
        action = sub.add_parser(name, help=text, description=text)
        action.add_argument("--config", default=argparse.SUPPRESS, help="config file (as before the action)")
        parsers.append(action)
    return parsers


def _vdds_args(parser: argparse.ArgumentParser) -> None:
    for action in _actions(
        parser,
        ("register", "add or update our [BVS] entry in VDDS_MMI.INI (needs administrator rights)"),
        ("unregister", "remove our [BVS] entry from VDDS_MMI.INI"),
    ):
        action.add_argument("--ini", help="VDDS_MMI.INI to edit (default: [vdds] mmi_ini, else the system's)")
        action.add_argument("--dry-run", action="store_true", help="print the change, write nothing")


def cmd_outbox(ns: argparse.Namespace) -> int:
    from bridge.outbox_admin import run

    return run(ns)


def _outbox_args(parser: argparse.ArgumentParser) -> None:
    _listing, retry = _actions(
        parser,
        ("list", "count the pushes to PMSs by channel and state; show why failed ones failed"),
        ("retry", "make failed pushes pending again (after fixing the cause), each in the audit log"),
    )
    retry.add_argument("--channel", help="only this channel (e.g. vdds-push, dentrix-thumbnails)")


def _replay_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("samples", help="folder of cases (see samples/README.md)")
    parser.add_argument("--case", default="*", help="glob of case names to run, e.g. 'vdds/*'")
    parser.add_argument("--url", help="replay against the daemon at this API URL instead of a fresh store")
    parser.add_argument("--token", help="API token for --url")
    parser.add_argument("--opp-url", help="OPP web URL for --url (default: same host, port 4435)")
    parser.add_argument("--update", action="store_true", help="rewrite expected answers (after review!)")


# name -> (help, function, function adding the command's own arguments)
Command = tuple[str, Callable[["argparse.Namespace"], int], Callable[["argparse.ArgumentParser"], None]]


def _no_args(_parser: argparse.ArgumentParser) -> None:
    return None


def _init_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--home", required=True, help="folder for the config, store and certificate")


COMMANDS: dict[str, Command] = {
    "init": ("write a working config with an embedded store under --home (idempotent)", cmd_init, _init_args),
    "serve": ("run the daemon in the foreground until SIGTERM/SIGINT or the stop file", cmd_serve, _no_args),
    "doctor": (
        "configure and test PMS integration: check config, store, folders, daemon",
        cmd_doctor,
        _no_args,
    ),
    "reconcile": ("re-check every image file against its SHA-256", cmd_reconcile, _no_args),
    "outbox": (
        "pushes to PMSs waiting or given up: 'outbox list', 'outbox retry [--channel NAME]'",
        cmd_outbox,
        _outbox_args,
    ),
    "import": ("import DICOM files, folders and DICOMDIR file sets", cmd_import, _import_args),
    "export-dicom": (
        "write a patient's images as a DICOM File Set with a DICOMDIR",
        cmd_export_dicom,
        _export_dicom_args,
    ),
    "replay": (
        "replay captured PMS messages and compare answers and store effects",
        cmd_replay,
        _replay_args,
    ),
    "vdds": (
        "VDDS-media: the module a PVS calls (pms-bridge vdds FILE, pms-bridge vdds MMOID) and its"
        " registration in VDDS_MMI.INI",
        cmd_vdds,
        _vdds_args,
    ),
}

# Launch commands (PMS entry points) are listed for --help; their arguments go to the daemon as they are.
LAUNCH_HELP: dict[str, str] = {
    "dexis": 'Dexis bridge: @INFOFILE (classic or Integrator file) or SET <id> LN="..." FN="..." BD=yyyyMMdd',
    "dentrix": "Dentrix G6/G7: the Dexis formats under the [dentrix] profile (CN=<chart number> optional)",
    "eaglesoft": "Eaglesoft / Patterson: INIFILE, the Patterson Imaging ini the PMS wrote",
    "cliniview": "CLINIVIEW: -ID;FIRST;LAST;SSN;MM/dd/yyyy, or the path of Cliniview.ini",
    "opp": "OPP: 'opp FILE' (the XML file form) or 'opp -p REFERENCE -l LAST ...' (flags; docs/opp.md)",
}


def build_parser() -> argparse.ArgumentParser:
    import argparse

    from bridge import __version__

    parser = argparse.ArgumentParser(
        prog="pms-bridge",
        description="Connects dental practice management systems to an imaging store.",
        epilog="Every command reads --config FILE (default: $PMS_BRIDGE_CONFIG, then ./pms-bridge.ini).",
    )
    parser.add_argument("--version", action="version", version=f"pms-bridge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, func, add_args) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        cmd.add_argument("--config", help="config file (default: $PMS_BRIDGE_CONFIG, then ./pms-bridge.ini)")
        add_args(cmd)
        cmd.set_defaults(func=func)
    for name in sorted(HANDLERS.keys() - COMMANDS.keys()):  # a protocol with admin commands is listed above
        help_text = LAUNCH_HELP.get(name, f"the {name} entry point a PMS calls")
        launch = sub.add_parser(name, help=help_text, description=help_text)
        launch.add_argument("--config", help="config file")
        launch.add_argument("args", nargs="*", help="as the PMS passes them")
        launch.set_defaults(func=None)
    return parser


def _run_command(argv: list[str]) -> int:
    from bridge.config import ConfigError

    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.command is None:
        parser.print_help()
        return EXIT_USAGE
    if ns.func is None:  # a launch command asked for its help
        parser.parse_args([ns.command, "--help"])
        return EXIT_USAGE
    try:
        result: int = ns.func(ns)
    except ConfigError as exc:
        print(f"pms-bridge {ns.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    return result
