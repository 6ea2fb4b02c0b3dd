"""The content-addressed image file store: `images/ab/cd/<sha256>.<ext>`, written once, never modified.

Writes are atomic (a temporary file in the same folder, fsync, rename), so a crash or a full disk never
leaves a half-written file under a final name; the SHA-256 in the file name is the integrity hash that
`pms-bridge reconcile` re-checks.

A bulk import splits that write in two, so that the waits for the disk overlap instead of adding up:
a process-pool worker writes the file under a `staging_path` past the page cache (bridge.store.uncached)
while it checks and hashes the same bytes, and `commit` flushes it, renames it into place and flushes the
folders that hold its new name (in a thread of the daemon, while the workers read on), so the name is
durable before the database transaction that references the file commits. `put` leaves that last flush to
`make_durable`, which its caller runs for all its files at once.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from bridge.atomic import write_atomic

_CHUNK = 1 << 20
STAGING = ".staging"  # the folder of files an import wrote and has not committed yet
UPLOADS = ".import-"  # the prefix of the folder each REST import receives its files into
LEFTOVER_SECONDS = 24 * 3600  # untouched this long, such files belong to no running import


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class ImageFolderMissing(FileNotFoundError):
    """The store's root folder is gone: most often a share that is not mounted (or not reachable).

    The bridge never recreates the root itself (only `pms-bridge init` and the first start of a new
    store do): on an unmounted mount point that would put new images on the local disk underneath,
    where the share's clients never see them, while every health check said "ok". A FileNotFoundError,
    so that callers treating an unreachable store as an OSError (the API's 503) keep doing so.
    """

    def __init__(self, root: Path) -> None:
        super().__init__(
            errno.ENOENT, f"the image folder {root} does not exist: is the share mounted?", str(root)
        )

    def __str__(self) -> str:
        return str(self.strerror)  # the sentence, without "[Errno 2]" and the path repeated after it


class FileStore:
    """Image files by content hash under one root folder (a local folder or a share)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        # `ab/cd` and `ab` folders whose own names this store flushed to disk (`make_durable`): a new file
        # in one needs only its folder flushed. Filled as files go in; at most 65,792 entries.
        self._durable_folders: set[Path] = set()

    def path_for(self, sha256: str, ext: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError(f"not a SHA-256 hex digest: {sha256!r}")
        if not ext.isalnum() or len(ext) > 10:
            raise ValueError(f"bad file extension: {ext!r}")
        return self.root / sha256[:2] / sha256[2:4] / f"{sha256}.{ext.lower()}"

    def put(self, data: bytes, ext: str, digest: str | None = None) -> tuple[str, Path]:
        """Store `data` (idempotent: the same bytes give the same file) and return (sha256, path);
        `digest`: the bytes' SHA-256 when the caller has it already. The name is durable once the caller
        ran `make_durable` (once for all the files it puts)."""
        digest = digest or sha256_bytes(data)
        path = self.path_for(digest, ext)
        if not path.exists():
            self._make_folders(path)
            write_atomic(path, data)
        return digest, path

    def staging_path(self) -> Path:
        """A new name in the store's staging folder, where an import writes a file before `commit` moves
        it into place: on the store's own file system, so that the rename is atomic."""
        folder = self.root / STAGING
        self._make_folder(folder)
        return folder / f"{secrets.token_hex(12)}.tmp"

    def remove_leftovers(self, older_than: float = LEFTOVER_SECONDS) -> int:
        """Remove what imports killed midway (a crash, a power cut) left in the store's root: staged files
        and upload folders nothing has touched for `older_than` seconds; how many were removed. A running
        import touches its own within seconds of writing them; the default day leaves room for a slow
        upload to another daemon sharing the store. Nothing there is referenced by the database."""
        limit = time.time() - older_than
        removed = 0
        staging = self.root / STAGING
        for entry in _entries(staging):
            if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < limit:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed += 1
        for entry in _entries(self.root):
            upload = entry.name.startswith(UPLOADS) and entry.is_dir(follow_symlinks=False)
            if upload and _newest_mtime(Path(entry.path)) < limit:
                shutil.rmtree(entry.path, ignore_errors=True)
                removed += 1
        return removed

    def commit(self, path: Path, sha256: str, ext: str) -> Path:
        """Flush a complete file the bridge wrote itself (staged, or a received upload on this store's
        file system) to disk, rename it to its final name and make that name durable (`make_durable`); the
        final path. When the store already holds those bytes, `path` is removed instead (and the stored
        file's name made durable too: another thread may have renamed it in a moment ago). After an
        OSError the final path may exist without being durable: the caller removes it unless it is
        referenced (bridge.imaging.pipeline's `discard`)."""
        target = self.path_for(sha256, ext)
        try:
            if target.exists():
                path.unlink()
            else:
                self._make_folders(target)
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(path, target)
        except BaseException:
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        self.make_durable([target])
        return target

    def make_durable(self, paths: Iterable[Path]) -> None:
        """Flush to disk the folders that hold the names of these stored files, so that the names survive
        a power cut: each file's `ab/cd` folder, and the folders above it (`ab`, the root) until this
        store has flushed them once (a folder is known durable once the folders above it, up to the root,
        were flushed after it was made; a folder another thread has just made is flushed again). Nothing
        on Windows, which needs no such call (NTFS journals its directories; a folder cannot even be
        opened for it)."""
        if os.name == "nt":
            return
        for path in paths:
            folder = path.parent
            self.sync_folder(folder)
            made: list[Path] = []  # durable only together: a folder in a folder whose name may be lost is not
            while folder not in self._durable_folders and self.root in folder.parents:
                self.sync_folder(folder.parent)
                made.append(folder)
                folder = folder.parent
            self._durable_folders.update(made)

    @staticmethod
    def sync_folder(folder: Path) -> None:
        """Flush a folder's entries to disk (concurrent calls share the file system's journal commits)."""
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def verify(self, sha256: str, ext: str) -> str | None:
        """None when the file is present and intact, else what is wrong (for reconcile and readiness)."""
        path = self.path_for(sha256, ext)
        if not path.exists():
            return "missing"
        actual = sha256_file(path)
        return None if actual == sha256 else f"hash mismatch ({actual})"

    def free_bytes(self) -> int:
        """Bytes free for the store on its disk or share (OSError when it cannot be reached)."""
        return shutil.disk_usage(self.root).free

    def holds_images(self) -> bool:
        """Whether images were ever stored here: a folder of the `ab/cd/` layout in the root (never
        removed once made). A SQLite store whose database file is missing beside such a folder was lost,
        not never made: `remains_of_store` refuses to create a new, empty one over it. A root that cannot
        be listed (missing, no permission) shows nothing; using it fails later with its own reason."""
        try:
            entries = _entries(self.root)
        except OSError:
            return False
        return any(
            len(entry.name) == 2 and all(c in "0123456789abcdef" for c in entry.name) and entry.is_dir()
            for entry in entries
        )

    def create_root(self) -> None:
        """Create the root folder (and its parents): for `pms-bridge init` and a new store only."""
        self.root.mkdir(parents=True, exist_ok=True)

    def check_writable(self) -> None:
        """Raise OSError if the root cannot be written (a share that disappeared, a read-only mount);
        ImageFolderMissing when it does not exist: it is not recreated (see ImageFolderMissing)."""
        if not self.root.is_dir():
            raise ImageFolderMissing(self.root)
        fd, tmp = tempfile.mkstemp(prefix=".probe.", dir=self.root)
        os.close(fd)
        os.unlink(tmp)

    def _make_folders(self, path: Path) -> None:
        """Create the two levels of folders above a stored file's `path` (`ab/cd`), never the root."""
        self._make_folder(path.parent.parent)
        self._make_folder(path.parent)

    def _make_folder(self, folder: Path) -> None:
        """Create one folder directly in an existing one: without `parents`, a missing root is an error."""
        try:
            folder.mkdir(exist_ok=True)
        except FileNotFoundError:
            if not self.root.is_dir():
                raise ImageFolderMissing(self.root) from None
            raise


def _entries(folder: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(folder) as found:
            return list(found)
    except FileNotFoundError:
        return []


def _newest_mtime(folder: Path) -> float:
    """The latest modification time in a folder's tree (an upload still arriving writes into it)."""
    newest = folder.stat().st_mtime
    for base, dirs, names in os.walk(folder):
        for name in [*names, *dirs]:
            with contextlib.suppress(FileNotFoundError):
                newest = max(newest, os.stat(os.path.join(base, name), follow_symlinks=False).st_mtime)
    return newest
