"""Atomic file replacement with nothing but `os`: cheap enough for the launch commands a PMS waits on.

The file I/O of answers written into a PMS's own file lives here, not in `protocols/`, whose modules
only turn bytes into bytes.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing; mypy takes it as true
if TYPE_CHECKING:
    from collections.abc import Callable

# What `rewrite_head` did.
REWRITTEN = "rewritten"
CHANGED = "changed"  # the file no longer starts with the given head, or changed during the copy: left alone
GONE = "gone"


def write_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one, never a part.

    The temporary file is in the same folder (a rename is only atomic within one file system), flushed
    to disk before the rename, and removed if anything fails.
    """
    target = os.fspath(path)
    folder, name = os.path.split(target)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.{id(data):x}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o644)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:  # noqa: SIM105 - contextlib would cost the launch commands 1 ms of start-up
            os.unlink(tmp)
        except OSError:
            pass
        raise


def rewrite_head(
    path: str | os.PathLike[str], head: bytes, answer: Callable[[int], tuple[bytes, int]]
) -> str:
    """Replace the first bytes of a file too large to hold in memory: REWRITTEN, CHANGED or GONE.

    `head` is what the caller read from the file's start; `answer(size)` (the file's size in bytes)
    returns the new head and the offset n from which the original bytes follow it unchanged. They are
    streamed through a dot-file in the same folder (watched folders skip dot-files), flushed to disk and
    renamed over the file, so readers see the old file or the whole new one. Nothing is written when the
    file no longer starts with `head` or changes during the copy: its writer replaced it meanwhile, and
    its new content is not ours to overwrite.
    """
    target = os.fspath(path)
    folder, name = os.path.split(target)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        with open(target, "rb") as source:
            before = os.fstat(source.fileno())
            if source.read(len(head)) != head:
                return CHANGED
            new_head, rest = answer(before.st_size)
            with open(tmp, "xb") as copy:
                copy.write(new_head)
                source.seek(rest)
                while chunk := source.read(1 << 20):
                    copy.write(chunk)
                copy.flush()
                os.fsync(copy.fileno())
        # The source is closed before the rename: Windows cannot replace a file that is open.
        after = os.stat(target)
        if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
            return CHANGED
        os.replace(tmp, target)
    except FileNotFoundError:
        return GONE
    finally:
        try:  # noqa: SIM105 - contextlib would cost the launch commands 1 ms of start-up
            os.unlink(tmp)
        except FileNotFoundError:
            pass
    return REWRITTEN
