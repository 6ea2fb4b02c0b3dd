"""Atomic file replacement with nothing but `os`: cheap enough for the launch commands a PMS waits on."""

from __future__ import annotations

import os


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
