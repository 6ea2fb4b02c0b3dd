"""Writing a new file past the operating system's page cache (Linux `O_DIRECT`), for bulk imports.

Why: a buffered write copies every byte into page-cache memory the kernel must first find and map; on
the practice's server that is most of the CPU an import spends per file (measured in docs/dicom.md,
"Performance": 1 to 5 ms of system time for a 3 MB X-ray, against about 0.3 ms written directly, the disk
controller reading the bytes itself), and a migration of many gigabytes would push the thumbnails and
database pages that PMSs read out of the cache for files nobody reads soon. A direct write needs its
memory, file offset and length aligned to the disk's block size: the bytes go through a block-aligned
buffer of each process (and thread) in whole blocks, and the last partial block is written buffered.

Durability is unchanged: a direct write may still sit in the disk's own cache, so the file is flushed
(`fsync`) before it is referenced, exactly as a buffered one (bridge.store.files).

Where direct writes are not available (Windows, macOS, a file system without them such as an older
tmpfs, or a share that refuses them), the file is written buffered, with the same result on disk.
"""

from __future__ import annotations

import mmap
import os
import threading

ALIGN = 4096  # covers 512-byte and 4 KiB block devices
_CHUNK = 8 << 20  # the aligned buffer; a larger file is written in several direct writes
_O_DIRECT: int = getattr(os, "O_DIRECT", 0)
_local = threading.local()


def _buffer() -> mmap.mmap:
    """This thread's block-aligned buffer (anonymous mappings start on a page boundary); kept, so that
    its pages are mapped once per process and not once per file."""
    buf: mmap.mmap | None = getattr(_local, "buffer", None)
    if buf is None:
        buf = _local.buffer = mmap.mmap(-1, _CHUNK)
    return buf


def _set_direct(fd: int, on: bool) -> bool:
    """Switch direct writes on or off for `fd`; False when the file system does not offer them."""
    if not _O_DIRECT:
        return False
    import fcntl

    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, (flags | _O_DIRECT) if on else (flags & ~_O_DIRECT))
    except OSError:
        return False
    return True


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data) :]


def write_new(path: str | os.PathLike[str], data: bytes) -> None:
    """Create `path` (which must not exist) holding `data`, not flushed: the caller flushes it before the
    file is referenced. Whole blocks are written directly where the file system allows, the rest buffered.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o644)
    try:
        view = memoryview(data).cast("B")
        offset = 0
        whole = len(view) - len(view) % ALIGN
        if whole and _set_direct(fd, True):
            buf = _buffer()
            aligned = memoryview(buf)
            try:
                while offset < whole:
                    n = min(_CHUNK, whole - offset)
                    buf[:n] = view[offset : offset + n]
                    written = os.write(fd, aligned[:n])
                    offset += written
                    if written % ALIGN:  # a short write off a block boundary: the rest goes buffered
                        break
            except OSError:
                # A device or share that takes the flag but not the write (EINVAL): write buffered from
                # where the file stands. Anything else (a full disk) is raised by the buffered write too.
                offset = os.lseek(fd, 0, os.SEEK_CUR)
            finally:
                aligned.release()
            _set_direct(fd, False)
        _write_all(fd, view[offset:])
    except BaseException:
        os.close(fd)
        try:  # noqa: SIM105 - the same shape as bridge.atomic
            os.unlink(path)
        except OSError:
            pass
        raise
    os.close(fd)
