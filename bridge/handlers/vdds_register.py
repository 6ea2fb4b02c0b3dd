"""`pms-bridge vdds register|unregister [--ini PATH] [--dry-run]`: our entry in VDDS_MMI.INI.

A PVS finds the programs of a BVS in VDDS_MMI.INI (the Windows directory's, by default): the `[BVS]` index
names our section, which holds one command per stage. PVSs start that string unquoted as a raw command
line with the exchange file appended, so a path with a space breaks it: on Windows the 8.3 short names
are registered, elsewhere a path with a space is refused with an explanation. The file belongs to every
imaging program on the machine, so it is edited in its own encoding (cp1252, or UTF-8/UTF-16 with a
BOM), only our two places change and every other byte stays as it was (`protocols.vdds.register`); a
file that does not read back exactly is refused and left untouched.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

from bridge.atomic import write_atomic
from bridge.config import Settings, load_settings
from bridge.handlers.vdds_push import mmi_path
from protocols import vdds


def short_path(path: Path) -> str:
    """`path` as a PVS can start it: without spaces (the 8.3 short name on Windows)."""
    text = str(path)
    if sys.platform == "win32":
        import ctypes

        buffer = ctypes.create_unicode_buffer(32768)
        length = ctypes.windll.kernel32.GetShortPathNameW(text, buffer, len(buffer))
        if 0 < length < len(buffer):
            text = buffer.value
    if " " in text:
        raise vdds.RegistryError(
            f"{text} contains a space, and PVSs start the registered command unquoted. "
            + (
                "This volume has no 8.3 short name for it (fsutil 8dot3name): "
                if sys.platform == "win32"
                else "This system has no 8.3 short names: "
            )
            + "install pms-bridge and its config under a path without spaces, or set [vdds] module_command."
        )
    return text


def launcher() -> Path:
    """The installed `pms-bridge` command beside this interpreter (what the PVS will start)."""
    return Path(sys.executable).with_name("pms-bridge.exe" if sys.platform == "win32" else "pms-bridge")


def entry(settings: Settings) -> vdds.BvsEntry:
    """Our registration for these settings: one command for stages 1-4 (and 5 when it is switched on)."""
    program = launcher()
    command = settings.vdds.module_command
    if not command:
        if not program.exists():
            raise vdds.RegistryError(f"{program} is missing: install pms-bridge first")
        command = f"{short_path(program)} vdds --config {short_path(settings.path)}"
    return vdds.BvsEntry(
        section=settings.vdds.bvs_section,
        name=settings.vdds.bvs_name,
        command=command,
        os_code=vdds.os_code(windows=sys.platform == "win32"),
        install_dir=short_path(program.parent),
        stages=vdds.registered_stages(stage5=settings.vdds.stage5 != "off"),
        version=settings.vdds.version,
    )


def check(settings: Settings) -> str:
    """`pms-bridge doctor`: is our entry in VDDS_MMI.INI, and would registering change nothing?"""
    from bridge.doctor import CheckFailed

    if not settings.vdds.enabled:
        return "VDDS switched off"
    path = mmi_path(settings)
    try:
        current = path.read_bytes()
    except FileNotFoundError:
        # No VDDS PMS has registered on this machine: nothing to check (most US practices).
        return f"no {path} (no VDDS PMS here; with one, run 'pms-bridge vdds register')"
    except OSError as exc:
        raise CheckFailed(f"{path}: {exc.strerror or exc}") from None
    try:
        wanted = vdds.register(current, entry(settings))
    except vdds.RegistryError as exc:
        raise CheckFailed(str(exc)) from None
    if wanted != current:
        raise CheckFailed(f"{path} lacks our current entry: run 'pms-bridge vdds register' as administrator")
    return f"{path} [{settings.vdds.bvs_section}]"


def _diff(path: Path, old: bytes, new: bytes) -> str:
    before = vdds.read_mmi(old).text.splitlines()
    after = vdds.read_mmi(new).text.splitlines()
    lines = difflib.unified_diff(before, after, f"{path}", f"{path} (new)", lineterm="")
    return "\n".join(lines)


def run(ns: argparse.Namespace) -> int:
    """Register or unregister; prints the change (only the change with --dry-run)."""
    settings = load_settings(ns.config)
    path = Path(ns.ini) if ns.ini else mmi_path(settings)
    try:
        old = path.read_bytes()
    except FileNotFoundError:
        old = b""
    except OSError as exc:
        print(f"pms-bridge vdds {ns.action}: cannot read {path}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    try:
        if ns.action == "register":
            new = vdds.register(old, entry(settings))
        else:
            new = vdds.unregister(old, settings.vdds.bvs_section)
    except vdds.RegistryError as exc:
        print(f"pms-bridge vdds {ns.action}: {exc}", file=sys.stderr)
        return 1
    if new == old:
        print(f"{path}: nothing to change")
        return 0
    print(_diff(path, old, new))
    if ns.dry_run:
        print("dry run: nothing written")
        return 0
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, new)
    except PermissionError:
        print(
            f"pms-bridge vdds {ns.action}: no permission to write {path}. Run it from an elevated"
            " (administrator) prompt; a non-elevated program's copy lands in the VirtualStore, where PVSs"
            " do not look.",
            file=sys.stderr,
        )
        return 1
    except OSError as exc:
        print(f"pms-bridge vdds {ns.action}: cannot write {path}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    done = "registered as" if ns.action == "register" else "removed"
    print(f"{path}: {done} [{settings.vdds.bvs_section}]")
    return 0
