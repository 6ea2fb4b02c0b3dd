"""Finding the files of an import: named files, folders, DICOMDIR file sets and uploaded zips.

* A named file is read as it is; a file named DICOMDIR (or holding a Media Storage Directory) is a file set.
* A folder that holds a DICOMDIR is that file set: the files its DICOMDIR lists are read, others are not
  (a file set's directory says what belongs to it). Any other folder is walked, and each subfolder
  follows the same rule. Hidden entries (".name") are left out; symbolic links to folders are not followed.
* A DICOMDIR's records are read one after the other, without following their offsets: a reordered
  directory, one without offsets, or one whose records have unexpected types still lists the same files.
  Every Referenced File ID must stay inside the file set's folder after symbolic links are resolved
  (`..` components, absolute paths and links pointing elsewhere are refused). A referenced file that is
  missing is reported. Media written on other systems often change case or add ISO 9660's ";1" or a
  trailing dot, so names are matched that way when the exact one is absent.
* A zip (REST uploads) is unpacked with the same path rules and a size budget counted while unpacking
  (the sizes a zip declares are not trusted). Each entry stands alone: one that cannot be unpacked is
  reported by the name the zip gives it, and the others are unpacked.
* An import of the server's own folders (`[dicom] import_folders`, `POST /api/v1/import` with paths) reads
  nothing outside those folders: a file or DICOMDIR reached through a symbolic link that leads elsewhere is
  refused, when it is found and again when it is opened (`open_inside`).
* An entry that cannot be looked at (a symbolic link loop, no access, a name too long for the system) is
  reported on its own; names that are not UTF-8 (a Latin-1 name from an old CD) are shown with \\xNN escapes.
* A name longer than 255 bytes (a DICOMDIR's File ID component, a zip entry's) is refused before any
  look-up: no file system holds it, and asking fails with ENAMETOOLONG.

Discovery runs in the imaging process pool: it parses untrusted DICOMDIRs.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from bridge.dicom import MEDIA_STORAGE_DIRECTORY
from bridge.store import uncached

MAX_DICOMDIR_BYTES = 64 * 1024 * 1024
MAX_ZIP_MEMBERS = 200_000
MAX_NAME_BYTES = 255  # the longest file name of Linux, macOS and Windows file systems (NAME_MAX)
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Candidate:
    """A file to read: where it is, how reports name it (the path as the user gave it), and the only
    folders it may be read from (`within`, resolved; empty: anywhere), checked again when it is opened."""

    path: str
    display: str
    within: tuple[str, ...] = ()


OUTSIDE = "a link to a file outside [dicom] import_folders: refused"


class OutsideFolders(Exception):
    """A file or DICOMDIR opened for an import of the server's folders lies outside them."""

    def __init__(self) -> None:
        super().__init__(OUTSIDE)


_OPEN_FLAGS = (
    os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
)


def open_inside(path: str, within: tuple[str, ...]) -> int:
    """Open the regular file `path` for reading (an OSError as `os.open` raises, or EINVAL for anything
    else); with `within`, the file opened must lie in one of those folders, checked on the open file itself
    where the system tells (Linux: its link in /proc/self/fd), so a link swapped in after the files were
    found is refused too (OutsideFolders).

    Opened without blocking: a FIFO (or a device) put where a file was would otherwise hold the worker in
    `open` for good, and a daemon waiting for it would never stop."""
    fd = os.open(path, _OPEN_FLAGS)
    try:
        if within:
            try:
                opened = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:  # not Linux: the path as it resolves now
                opened = os.path.realpath(path)
            if not inside_any(opened, within):
                raise OutsideFolders
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        if _OPEN_FLAGS & getattr(os, "O_NONBLOCK", 0):
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


@dataclass(frozen=True)
class Problem:
    """A file that was not imported, and why."""

    path: str
    reason: str


@dataclass
class Discovery:
    """The files an import reads, the problems found on the way, and what was left out on purpose;
    `within` as in Candidate."""

    candidates: list[Candidate] = field(default_factory=list)
    errors: list[Problem] = field(default_factory=list)
    skipped: list[Problem] = field(default_factory=list)
    within: tuple[str, ...] = ()

    def outside(self, path: Path, display: str) -> bool:
        """True, with the file reported, when `path` resolves outside `within` (never read then)."""
        if self.within and not inside_any(os.path.realpath(path), self.within):
            self.errors.append(Problem(display, OUTSIDE))
            return True
        return False


def discover(sources: list[tuple[str, str]], within: tuple[str, ...] = ()) -> Discovery:
    """The files of `sources` (path, display name) by the rules of the module doc. `within`: the only
    folders files may be read from, once symbolic links are resolved (an import of the server's folders);
    a file found outside them, through a link, is refused."""
    found = Discovery(within=within)
    seen: set[str] = set()
    for path, given in sources:
        target, display = Path(path), shown_name(given)
        try:
            is_dir, is_file = target.is_dir(), target.is_file()
        except OSError as exc:  # a name too long for the system (ENAMETOOLONG), a link loop, no access
            found.errors.append(Problem(display, f"cannot be read: {exc.strerror or exc}"))
            continue
        if found.outside(target, display):
            continue
        if is_dir:
            _walk(target, display, found, seen)
        elif is_file:
            if _is_dicomdir(target):
                _read_dicomdir(target, display, found, seen)
            else:
                _add(found, seen, target, display)
        else:
            found.errors.append(Problem(display, "no such file or folder"))
    return found


def shown_name(name: str) -> str:
    """A file system name as reports show it: bytes that are not UTF-8 (a Latin-1 name from an old CD or
    share, which Python keeps as lone surrogates that no UTF-8 text can carry) as \\xNN escapes."""
    try:
        raw = name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that stands for no byte
        return name.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def inside_any(resolved: str, folders: tuple[str, ...]) -> bool:
    """Whether the resolved path `resolved` is one of `folders` (resolved too) or lies below one."""
    for folder in folders:
        try:
            if os.path.commonpath([resolved, folder]) == folder:
                return True
        except ValueError:  # another drive (Windows), or a relative path against an absolute one
            continue
    return False


def _add(found: Discovery, seen: set[str], path: Path, display: str, resolved: str = "") -> None:
    """Add a file once, however it was reached. `resolved`: its path with links resolved, when the caller
    knows it (a plain file in a walked folder: the folder's resolved path and its name), and then known to
    lie inside `within` as that folder does; else resolved and checked here."""
    key = resolved or os.path.realpath(path)
    if key not in seen and (resolved or not found.outside(path, display)):
        seen.add(key)
        found.candidates.append(Candidate(str(path), display, found.within))


def _join(display: str, *parts: str) -> str:
    shown = [shown_name(part) for part in parts]
    return "/".join([display.rstrip("/\\"), *shown]) if display else "/".join(shown)


def _dicomdir_in(folder: Path) -> Path | None:
    try:
        names = os.listdir(folder)
    except OSError:
        return None
    for name in sorted(names):
        if name.upper() in ("DICOMDIR", "DICOMDIR.") and (folder / name).is_file():
            return folder / name
    return None


def _is_dicomdir(path: Path) -> bool:
    """A file named DICOMDIR, or a Part 10 file whose meta information says Media Storage Directory."""
    from pydicom.filereader import read_file_meta_info

    if path.name.upper().rstrip(".") == "DICOMDIR":
        return True
    try:
        with open(path, "rb") as fh:
            if fh.read(132)[128:] != b"DICM":
                return False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            meta = read_file_meta_info(path)
    except Exception:  # not readable as DICOM: the header reader says why
        return False
    return str(meta.get("MediaStorageSOPClassUID", "")) == MEDIA_STORAGE_DIRECTORY


def _walk(folder: Path, display: str, found: Discovery, seen: set[str]) -> None:
    dicomdir = _dicomdir_in(folder)
    if dicomdir is not None:
        shown = _join(display, dicomdir.name)
        if not found.outside(dicomdir, shown):
            _read_dicomdir(dicomdir, shown, found, seen)
        return
    try:
        entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
    except OSError as exc:
        found.errors.append(Problem(display, f"cannot list the folder: {exc.strerror or exc}"))
        return
    # Resolved once for all its plain files (a link is resolved on its own): resolving each file's path
    # looked up every folder above it again: most of the time it took to find a folder's files.
    real = os.path.realpath(folder)
    for entry in entries:
        if entry.name.startswith("."):
            continue
        shown = _join(display, entry.name)
        try:
            if entry.is_symlink() and found.outside(Path(entry.path), shown):
                continue  # before asking what it leads to: whether that exists is not for the report
            is_dir, is_file = entry.is_dir(follow_symlinks=False), entry.is_file()
        except OSError as exc:  # a link loop (ELOOP), an entry this account may not look at
            found.errors.append(Problem(shown, f"cannot be read: {exc.strerror or exc}"))
            continue
        if is_dir:
            _walk(Path(entry.path), shown, found, seen)
        elif is_file:
            plain = not entry.is_symlink()  # (cached by scandir, as is_file)
            _add(found, seen, Path(entry.path), shown, os.path.join(real, entry.name) if plain else "")


def _read_dicomdir(path: Path, display: str, found: Discovery, seen: set[str]) -> None:
    """Add the files a DICOMDIR lists; report the unsafe and the missing ones."""
    import pydicom

    try:
        file = os.fdopen(open_inside(str(path), found.within), "rb")
    except OSError as exc:
        found.errors.append(Problem(display, f"cannot be read: {exc.strerror or exc}"))
        return
    except OutsideFolders:
        found.errors.append(Problem(display, OUTSIDE))
        return
    with file, warnings.catch_warnings():
        size = os.fstat(file.fileno()).st_size
        if size > MAX_DICOMDIR_BYTES:
            found.errors.append(Problem(display, f"DICOMDIR too large ({size / 1e6:.0f} MB)"))
            return
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(file)
            records = list(ds.get("DirectoryRecordSequence", None) or ())
            sop_class = str(ds.file_meta.get("MediaStorageSOPClassUID", ""))
        except Exception as exc:  # a parser meeting hostile bytes fails in many ways
            found.errors.append(Problem(display, f"unreadable DICOMDIR ({type(exc).__name__}: {exc})"))
            return
    if sop_class != MEDIA_STORAGE_DIRECTORY:
        found.errors.append(
            Problem(display, f"not a DICOMDIR (Media Storage SOP Class {sop_class or 'missing'})")
        )
        return
    root = path.parent.resolve()
    base = display.rsplit("/", 1)[0] if "/" in display else ""
    listed = 0
    for record in records:
        if "ReferencedFileID" not in record or record.get("RecordInUseFlag", 0xFFFF) == 0:
            continue
        value = record.ReferencedFileID
        components = [value] if isinstance(value, str) else [str(v) for v in value]
        shown = _join(base, *components)
        listed += 1
        if _too_long(components):
            found.errors.append(
                Problem(
                    shown, f"the DICOMDIR names a file or folder longer than {MAX_NAME_BYTES} bytes: refused"
                )
            )
            continue
        if not _safe_components(components):
            found.errors.append(Problem(shown, "the DICOMDIR refers to a path outside its file set: refused"))
            continue
        named = os.path.realpath(root.joinpath(*components))  # through links, whether it exists or not
        if not inside_any(named, (str(root),)) or (found.within and not inside_any(named, found.within)):
            found.errors.append(Problem(shown, "the DICOMDIR refers to a file outside its file set: refused"))
            continue
        located = _locate(root, components)
        if located is None:
            found.errors.append(Problem(shown, "listed in the DICOMDIR but missing from the file set"))
            continue
        try:
            resolved = located.resolve()
        except (RuntimeError, OSError) as exc:  # a symbolic link loop is a RuntimeError before Python 3.13
            why = "a symbolic link loop" if isinstance(exc, RuntimeError) else exc.strerror or "unresolvable"
            found.errors.append(
                Problem(shown, f"the DICOMDIR refers to a path that cannot be resolved ({why}): refused")
            )
            continue
        if not resolved.is_relative_to(root):
            found.errors.append(Problem(shown, "the DICOMDIR refers to a file outside its file set: refused"))
            continue
        if not resolved.is_file():
            found.errors.append(Problem(shown, "listed in the DICOMDIR but not a file"))
            continue
        _add(found, seen, located, shown)
    if listed == 0:
        found.skipped.append(Problem(display, "the DICOMDIR lists no files"))


def _safe_components(components: list[str]) -> bool:
    """File ID components that name a path below the file set's folder (nothing absolute, no ..)."""
    if not components:
        return False
    for part in components:
        if part in ("", ".", "..") or any(c in part for c in "/\\:\x00") or part.strip() != part:
            return False
    return True


def _too_long(components: list[str]) -> bool:
    """A component no file system can hold as a name: asking for it fails with ENAMETOOLONG, so it is
    refused before any look-up."""
    return any(len(part.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES for part in components)


def _locate(root: Path, components: list[str]) -> Path | None:
    """The file a File ID names: exactly, else ignoring case, ISO 9660's ';1' and a trailing dot; None
    when absent or when the system cannot look the path up (too long as a whole: ENAMETOOLONG)."""
    current = root
    for part in components:
        spellings = _spellings(part)
        exact = next((current / name for name in spellings if _exists(current / name)), None)
        if exact is not None:
            current = exact
            continue
        try:
            names = os.listdir(current)
        except OSError:
            return None
        wanted = {name.upper() for name in spellings}
        matches = [n for n in sorted(names) if n.upper().split(";")[0].rstrip(".") in wanted]
        if not matches:
            return None
        current = current / matches[0]
    return current


def _spellings(part: str) -> list[str]:
    """A File ID component as the file system may hold it: as decoded, and, for a name with characters
    beyond ASCII, as its Latin-1 bytes (a CD written with ISO_IR 100 names on a system that is not UTF-8)."""
    try:
        latin = os.fsdecode(part.encode("latin-1"))
    except UnicodeEncodeError:
        return [part]
    return [part] if latin == part else [part, latin]


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):  # too long for the system; a name it cannot hold
        return False


# --------------------------------------------------------------------------------------------------
# Zips (REST uploads)


MAX_ZIP_PATH_BYTES = 1024  # an entry's path in the zip: far beyond any file set's, well below PATH_MAX
# What reading one entry may raise besides OSError: zipfile's own errors (a bad CRC, a bad local header),
# RuntimeError, NotImplementedError (a compression it lacks), EOFError and zlib.error
# (truncated or corrupt data), ValueError.
_ENTRY_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    RuntimeError,
    NotImplementedError,
    EOFError,
    ValueError,
    zlib.error,
)


class ZipTooLarge(ValueError):
    """A zip unpacks to more than the import may take."""


@dataclass
class _Budget:
    """The bytes a zip's entries unpacked to so far, counted across entries, and how many it may."""

    used: int
    limit: int


def unpack_zip(archive: Path, dest: Path, display: str, max_bytes: int) -> list[Problem]:
    """Unpack `archive` into `dest` (path rules of the module doc); the members refused and why.

    Each entry stands alone: one that cannot be unpacked (encrypted, corrupt, a name the file system
    refuses) is a problem of that entry, named as the zip names it (never by the server's path), with no
    file left behind, and the entries after it are unpacked. A zip whose directory cannot be read is one
    problem naming the zip. Raises ZipTooLarge when the members, counted while unpacking, exceed
    `max_bytes`; the caller then drops the whole upload.
    """
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else f"{type(exc).__name__}: {exc}"
        return [Problem(display, f"unreadable zip ({reason})")]
    problems: list[Problem] = []
    budget = _Budget(0, max_bytes)
    try:
        with zf:
            members = zf.infolist()
            if len(members) > MAX_ZIP_MEMBERS:
                return [Problem(display, f"the zip holds {len(members)} entries (limit {MAX_ZIP_MEMBERS})")]
            for info in members:
                if info.is_dir():
                    continue
                name = info.filename.replace("\\", "/")
                reason = _unpack_entry(zf, info, name, dest, budget)
                if reason:
                    problems.append(Problem(_join(display, name), reason))
    except ZipTooLarge:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return problems


def _unpack_entry(zf: zipfile.ZipFile, info: zipfile.ZipInfo, name: str, dest: Path, budget: _Budget) -> str:
    """Unpack one entry below `dest`; why it was not, or "" when it was."""
    parts = PurePosixPath(name).parts
    if not parts or name.startswith("/") or ":" in parts[0] or not _safe_components(list(parts)):
        return "unsafe path in the zip: refused"
    if _too_long(list(parts)):
        return f"a file or folder name longer than {MAX_NAME_BYTES} bytes: refused"
    if len(name.encode("utf-8", "surrogatepass")) > MAX_ZIP_PATH_BYTES:
        return f"a path longer than {MAX_ZIP_PATH_BYTES} bytes: refused"
    if stat.S_ISLNK(info.external_attr >> 16):
        return "a symbolic link in the zip: refused"
    if info.flag_bits & 0x1:
        return "encrypted in the zip: refused (an import has no password)"
    target = dest.joinpath(*parts)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        return "its folder is a file of the zip: refused"
    except OSError as exc:
        return f"cannot be unpacked ({exc.strerror or type(exc).__name__})"
    try:
        with zf.open(info) as src:  # opened before the file is created: one it refuses leaves nothing
            try:
                out = uncached.NewFile(target)  # read back past the page cache, as a received file
            except FileExistsError:
                return "a second entry of this name in the zip: refused"
            with out:  # removed again if reading fails half-way (a bad CRC is found at the end)
                while chunk := src.read(_CHUNK):
                    budget.used += len(chunk)
                    if budget.used > budget.limit:
                        limit = f"{budget.limit / 1e6:.0f} MB"
                        raise ZipTooLarge(f"the zip unpacks to more than {limit} ([dicom] max_upload_mb)")
                    out.write(chunk)
    except ZipTooLarge:
        raise
    except _ENTRY_ERRORS as exc:
        return f"cannot be unpacked ({type(exc).__name__}: {exc})"
    except OSError as exc:
        return f"cannot be unpacked ({exc.strerror or type(exc).__name__})"
    return ""
